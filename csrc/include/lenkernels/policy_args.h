// The policy loss's scalars from the launchers' argument dict, shared by the CPU and CUDA bindings
// (csrc/cpu/policy_loss.cpp, csrc/cuda/policy_loss.cu). Host-only: pybind11 never reaches device code.
// The keys are PolicyConfig.kernel_scalars() (lenkernels/ops/policy_loss_args.py): a new scalar is one
// PolicyScalars field (policy_loss.h) and one line here.
#pragma once

#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "lenkernels/policy_loss.h"

namespace lk {
namespace policy {

// Every code is checked here, before any launch: an unknown code raises (ValueError in Python).
inline PolicyScalars parse_policy_scalars(const pybind11::dict& d) {
  PolicyScalars s{};
  s.pp.mode = d["mode"].cast<int>();
  s.pp.lo = d["lo"].cast<float>();
  s.pp.hi = d["hi"].cast<float>();
  s.pp.dual = d["dual"].cast<bool>() ? 1 : 0;
  s.pp.dual_c = d["dual_c"].cast<float>();
  s.pp.tau_pos = d["tau_pos"].cast<float>();
  s.pp.tau_neg = d["tau_neg"].cast<float>();
  s.pp.dro_beta = d["dro_beta"].cast<float>();
  s.agg = d["agg"].cast<int>();
  s.kl_est = d["kl_est"].cast<int>();
  s.kl_straight = d["kl_straight"].cast<bool>();
  s.kl_clamp = d["kl_clamp"].cast<bool>();
  s.has_seq = d["has_seq"].cast<bool>();
  s.kl_coef = d["kl_coef"].cast<float>();
  s.entropy_coef = d["entropy_coef"].cast<float>();
  s.norm_source = d["norm_source"].cast<int>();
  s.norm_const = d["norm_const"].cast<float>();
  s.scale = d["scale"].cast<float>();
  const std::string why = invalid_codes(s.pp.mode, s.agg, s.kl_est, s.norm_source);
  if (!why.empty()) throw std::invalid_argument(why);
  return s;
}

template <typename T>
T* dict_ptr(const pybind11::dict& d, const std::string& key) {
  return reinterpret_cast<T*>(d[key.c_str()].cast<uintptr_t>());
}

// The scalars, sizes and input columns of the argument dict, into a backend's Args (a PolicyScalars
// with the fields below); column(d, name) reads the column `name` (its address, name + "_rs" its row
// stride) into the backend's Column.
template <class Args, class ReadColumn>
void parse_policy_inputs(const pybind11::dict& d, Args& a, ReadColumn column) {
  static_cast<PolicyScalars&>(a) = parse_policy_scalars(d);  // checks the codes
  a.n_seqs = d["n_seqs"].cast<int64_t>();
  a.seq_len = d["seq_len"].cast<int64_t>();
  a.cu = dict_ptr<const int64_t>(d, "cu_seqlens");
  a.lp = column(d, "logprobs");
  a.old = column(d, "old_logprobs");
  a.adv = column(d, "advantages");
  a.ref = column(d, "ref_logprobs");
  a.ent = column(d, "entropy");
  a.w = column(d, "importance_weights");
  a.adv_per_token = d["adv_per_token"].cast<bool>();
  a.mask = dict_ptr<const uint8_t>(d, "mask");
  a.mask_rs = d["mask_rs"].cast<int64_t>();
  a.thr = dict_ptr<const double>(d, "threshold");
  a.norm = dict_ptr<const float>(d, "normaliser");
}

}  // namespace policy
}  // namespace lk
