// The pybind11 side shared by every binding, CPU (csrc/cpu/*.cpp) and CUDA (csrc/cuda/*.cu): raw
// addresses from Python, argument checks and the module definition. Host-only: pybind11 never
// reaches device code. std::invalid_argument reaches Python as ValueError, std::runtime_error (CUDA
// errors) as RuntimeError.
#pragma once

#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "lenkernels/common.h"

namespace py = pybind11;

namespace lk {
namespace bind {

// A raw data address from Python (tensor.data_ptr(); 0 = not given): a binding takes it as an int
// and hands it to the kernel's argument struct, whose field gives the pointer type.
struct Addr {
  uintptr_t v = 0;
  template <class T>
  operator T*() const {
    return reinterpret_cast<T*>(v);
  }
  explicit operator bool() const { return v != 0; }
};

// Raises ValueError(why) unless why is empty (the invalid_codes() functions of the shared headers).
inline void check(const std::string& why) {
  if (!why.empty()) throw std::invalid_argument(why);
}

inline void require(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(what);
}

// An unknown dtype code raises before any work.
inline void check_float_dtype(int code) { check(invalid_dtype(code)); }

// The parameter count of a lambda or a function.
template <class F>
struct Arity : Arity<decltype(&F::operator())> {};
template <class C, class R, class... A>
struct Arity<R (C::*)(A...) const> : std::integral_constant<size_t, sizeof...(A)> {};
template <class R, class... A>
struct Arity<R (*)(A...)> : std::integral_constant<size_t, sizeof...(A)> {};

template <class F, size_t... I, class... Extra>
void def_named(py::module_& m, const char* name, const std::vector<std::string>& args, F&& fn,
               std::index_sequence<I...>, const Extra&... extra) {
  m.def(name, std::forward<F>(fn), py::arg(args[I].c_str())..., extra...);
}

// m.def(name, fn, py::arg(...) for each name of `args`, extra...): `args` names fn's parameters in
// order, separated by spaces (the launchers pass them by keyword); a miscount raises at import.
template <class F, class... Extra>
void def(py::module_& m, const char* name, const char* args, F&& fn, const Extra&... extra) {
  std::vector<std::string> names;
  std::istringstream words(args);
  for (std::string w; words >> w;) names.push_back(w);
  constexpr size_t n = Arity<std::decay_t<F>>::value;
  if (names.size() != n) {
    throw std::logic_error(std::string(name) + ": " + std::to_string(names.size()) + " argument names for " +
                           std::to_string(n) + " parameters");
  }
  def_named(m, name, names, std::forward<F>(fn), std::make_index_sequence<n>{}, extra...);
}

// The module's docstring, its functions, SOURCE_HASH (the hash _build.py compiled it for) and, for
// a CUDA module, CUDART_VERSION.
inline void define_module(py::module_& m, const char* doc, void (*define)(py::module_&)) {
  m.doc() = doc;
  define(m);
  m.attr("SOURCE_HASH") = LK_SOURCE_HASH;
#if defined(CUDART_VERSION)
  m.attr("CUDART_VERSION") = CUDART_VERSION;  // the CUDA runtime the module was built against
#endif
}

}  // namespace bind

// Every backend's bindings use these helpers by their short names.
namespace cpu {
using namespace ::lk::bind;
}
namespace cuda {
using namespace ::lk::bind;
}

}  // namespace lk

namespace pybind11 {
namespace detail {

template <>
struct type_caster<lk::bind::Addr> {
  PYBIND11_TYPE_CASTER(lk::bind::Addr, const_name("int"));
  bool load(handle src, bool convert) {
    make_caster<uintptr_t> address;
    if (!address.load(src, convert)) return false;
    value.v = cast_op<uintptr_t>(address);
    return true;
  }
  static handle cast(lk::bind::Addr a, return_value_policy, handle) { return PyLong_FromSize_t(size_t(a.v)); }
};

}  // namespace detail
}  // namespace pybind11

// LK_MODULE(_cpu_phase_stats, "doc", lk::cpu::define_phase_stats): the extension module whose
// functions define_phase_stats(m) adds.
#define LK_MODULE(name, doc, define) \
  PYBIND11_MODULE(name, m) { ::lk::bind::define_module(m, doc, define); }

// Releases the GIL while the bound function runs (a launch can block while the device queue is
// full; CPU kernels run for long): m.def(name, fn, ..., LK_NOGIL).
#define LK_NOGIL ::py::call_guard<::py::gil_scoped_release>()
