// Fused policy losses and KL estimators on the GPU (SPEC 2-3), CUDA C++ backend.
//   policy_loss_seq_kernel       grid (B * n_splits): per-sequence sums (GSPO/LUSPO/GMPO, seq-mean)
//   policy_loss_fwd_kernel       grid (B * n_splits): loss terms, flags and metrics per block
//   policy_loss_finalize_kernel  one block: the statistics vector (loss, metrics, 1 / normaliser)
//   policy_loss_bwd_kernel       grid (B * n_splits): d loss / d logprobs, d loss / d entropy
//   kl_penalty_fwd_kernel, kl_penalty_bwd_kernel: elementwise, grid-stride
// What the blocks compute is in policy_loss.h; the per-token maths in lenkernels/policy_loss.h,
// shared with the CPU backend. Raw device pointers, sizes and the stream come from Python
// (lenkernels/cuda/policy_loss.py): no torch headers. device -1 runs the same bodies on the host (team.h).
#include <pybind11/pybind11.h>

#include <climits>
#include <string>

#include "cuda_utils.h"
#include "lenkernels/policy_args.h"
#include "policy_loss.h"
#include "team.h"

namespace lk {
namespace cuda {
namespace policy_loss {
namespace {

__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) policy_loss_seq_kernel(const Args a) {
  __shared__ TeamScratch<kThreads> scratch;
  BlockTeam<kThreads> team{&scratch};
  seq_block(a, blockIdx.x, team);
}

__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) policy_loss_fwd_kernel(const Args a) {
  __shared__ TeamScratch<kThreads> scratch;
  BlockTeam<kThreads> team{&scratch};
  fwd_block(a, blockIdx.x, team);
}

__global__ void __launch_bounds__(kThreads) policy_loss_finalize_kernel(const Args a) {
  __shared__ TeamScratch<kThreads> scratch;
  BlockTeam<kThreads> team{&scratch};
  finalize_block(a, team);
}

__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) policy_loss_bwd_kernel(const Args a) {
  __shared__ TeamScratch<kThreads> scratch;
  BlockTeam<kThreads> team{&scratch};
  bwd_block(a, blockIdx.x, team);
}

__global__ void __launch_bounds__(kThreads) kl_penalty_fwd_kernel(const KlArgs a) {
  __shared__ TeamScratch<kThreads> scratch;
  BlockTeam<kThreads> team{&scratch};
  kl_fwd_block(a, blockIdx.x, gridDim.x, team);
}

__global__ void __launch_bounds__(kThreads) kl_penalty_bwd_kernel(const KlArgs a) {
  __shared__ TeamScratch<kThreads> scratch;
  BlockTeam<kThreads> team{&scratch};
  kl_bwd_block(a, blockIdx.x, gridDim.x, team);
}

unsigned grid_of(const Args& a) {
  if (a.n_seqs < 1) throw std::invalid_argument("policy loss needs at least one sequence");
  if (a.n_splits < 1) throw std::invalid_argument("n_splits must be at least 1");
  if (a.n_seqs > INT_MAX / a.n_splits) throw std::invalid_argument("too many sequences for one launch");
  return unsigned(a.n_seqs * a.n_splits);
}

void forward(const Args& a, int device, cudaStream_t stream) {
  const unsigned blocks = grid_of(a);
  if (device < 0) {
    if (a.has_seq) emulate<kThreads>(blocks, [&](int64_t i, auto& team) { seq_block(a, i, team); });
    emulate<kThreads>(blocks, [&](int64_t i, auto& team) { fwd_block(a, i, team); });
    emulate<kThreads>(1, [&](int64_t, auto& team) { finalize_block(a, team); });
    return;
  }
  DeviceGuard guard(device);
  if (a.has_seq) {
    policy_loss_seq_kernel<<<blocks, kThreads, 0, stream>>>(a);
    check_cuda(cudaGetLastError(), "launching policy_loss_seq_kernel");
  }
  policy_loss_fwd_kernel<<<blocks, kThreads, 0, stream>>>(a);
  check_cuda(cudaGetLastError(), "launching policy_loss_fwd_kernel");
  policy_loss_finalize_kernel<<<1, kThreads, 0, stream>>>(a);
  check_cuda(cudaGetLastError(), "launching policy_loss_finalize_kernel");
}

void backward(const Args& a, int device, cudaStream_t stream) {
  const unsigned blocks = grid_of(a);
  if (device < 0) {
    emulate<kThreads>(blocks, [&](int64_t i, auto& team) { bwd_block(a, i, team); });
    return;
  }
  DeviceGuard guard(device);
  policy_loss_bwd_kernel<<<blocks, kThreads, 0, stream>>>(a);
  check_cuda(cudaGetLastError(), "launching policy_loss_bwd_kernel");
}

void kl(const KlArgs& a, bool fwd, int64_t sm_count, int device, cudaStream_t stream) {
  if (a.n <= 0) return;
  const int64_t blocks = elementwise_blocks(a.n, sm_count);
  if (device < 0) {
    if (fwd) {
      emulate<kThreads>(blocks, [&](int64_t i, auto& team) { kl_fwd_block(a, i, blocks, team); });
    } else {
      emulate<kThreads>(blocks, [&](int64_t i, auto& team) { kl_bwd_block(a, i, blocks, team); });
    }
    return;
  }
  DeviceGuard guard(device);
  if (fwd) {
    kl_penalty_fwd_kernel<<<unsigned(blocks), kThreads, 0, stream>>>(a);
    check_cuda(cudaGetLastError(), "launching kl_penalty_fwd_kernel");
  } else {
    kl_penalty_bwd_kernel<<<unsigned(blocks), kThreads, 0, stream>>>(a);
    check_cuda(cudaGetLastError(), "launching kl_penalty_bwd_kernel");
  }
}

template <typename T>
T* opt_ptr(const pybind11::dict& d, const char* key) {
  return reinterpret_cast<T*>(d[key].cast<uintptr_t>());
}

Column column(const pybind11::dict& d, const std::string& name) {
  return Column{opt_ptr<const void>(d, name.c_str()), d[(name + "_rs").c_str()].cast<int64_t>(),
                d[(name + "_dtype").c_str()].cast<int>()};
}

// The kernel-side view of the op's inputs; keys as lenkernels/cuda/policy_loss.py _policy_args writes
// them. Every code is checked here, before any launch.
Args parse(const pybind11::dict& d) {
  Args a = {};
  static_cast<PolicyScalars&>(a) = parse_policy_scalars(d);  // checks the codes
  a.n_seqs = d["n_seqs"].cast<int64_t>();
  a.seq_len = d["seq_len"].cast<int64_t>();
  a.cu = opt_ptr<const int64_t>(d, "cu_seqlens");
  a.lp = column(d, "logprobs");
  a.old = column(d, "old_logprobs");
  a.adv = column(d, "advantages");
  a.ref = column(d, "ref_logprobs");
  a.ent = column(d, "entropy");
  a.w = column(d, "importance_weights");
  a.adv_per_token = d["adv_per_token"].cast<bool>();
  a.mask = opt_ptr<const uint8_t>(d, "mask");
  a.mask_rs = d["mask_rs"].cast<int64_t>();
  a.thr = opt_ptr<const double>(d, "threshold");
  a.norm = opt_ptr<const float>(d, "normaliser");
  if (a.lp.p == nullptr || a.old.p == nullptr || a.adv.p == nullptr) {
    throw std::invalid_argument("logprobs, old_logprobs and advantages are required");
  }
  if (a.thr != nullptr && a.ent.p == nullptr) throw std::invalid_argument("a threshold needs the entropy");
  return a;
}

void check_kl_estimator(int est) {
  const std::string why = invalid_kl_estimator(est);
  if (!why.empty()) throw std::invalid_argument(why);
}

}  // namespace
}  // namespace policy_loss
}  // namespace cuda
}  // namespace lk

namespace py = pybind11;

PYBIND11_MODULE(_cuda_policy_loss, m) {
  using namespace lk::cuda;
  using namespace lk::cuda::policy_loss;
  m.doc() = "lenkernels CUDA kernels: fused policy losses and KL estimators (raw device pointers)";
  // std::invalid_argument reaches Python as ValueError, std::runtime_error (CUDA errors) as RuntimeError
  m.def("policy_loss_splits", &split_count, py::arg("n_seqs"), py::arg("mean_len"), py::arg("sm_count"),
        "Blocks per sequence of every stage (seq_part holds n_seqs * n_splits * 8 floats, part * 16).");
  m.def(
      "policy_loss_fwd",
      [](const py::dict& args, int n_splits, uintptr_t seq_part, uintptr_t part, uintptr_t stats, uintptr_t seq,
         int device, uintptr_t stream) {
        Args a = parse(args);
        a.n_splits = n_splits;
        a.seq_part = ptr<float>(seq_part);
        a.part = ptr<float>(part);
        a.stats = ptr<float>(stats);
        a.seq = ptr<float>(seq);
        if (a.part == nullptr || a.stats == nullptr || (a.has_seq && (a.seq_part == nullptr || a.seq == nullptr))) {
          throw std::invalid_argument("policy_loss_fwd needs its part, stats (and seq_part, seq) buffers");
        }
        py::gil_scoped_release release;  // a launch can block while the device queue is full
        forward(a, device, reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("args"), py::arg("n_splits"), py::arg("seq_part"), py::arg("part"), py::arg("stats"), py::arg("seq"),
      py::arg("device"), py::arg("stream"),
      "Writes stats[16] (lk::policy::Stat layout) and, with per-sequence values, seq[B, 4] (SeqValue layout).");
  m.def(
      "policy_loss_bwd",
      [](const py::dict& args, int n_splits, uintptr_t stats, uintptr_t seq, uintptr_t g_stats, uintptr_t dlp,
         int dlp_dtype, int64_t dlp_rs, uintptr_t dent, int dent_dtype, int64_t dent_rs, int device, uintptr_t stream) {
        Args a = parse(args);
        a.n_splits = n_splits;
        a.stats = ptr<float>(stats);
        a.seq = ptr<float>(seq);
        a.g_stats = ptr<const float>(g_stats);
        a.dlp = reinterpret_cast<void*>(dlp);
        a.dlp_dtype = dlp_dtype;
        a.dlp_rs = dlp_rs;
        a.dent = reinterpret_cast<void*>(dent);
        a.dent_dtype = dent_dtype;
        a.dent_rs = dent_rs;
        if (a.stats == nullptr || a.g_stats == nullptr || a.dlp == nullptr || (a.has_seq && a.seq == nullptr)) {
          throw std::invalid_argument("policy_loss_bwd needs stats, g_stats, dlp (and seq)");
        }
        py::gil_scoped_release release;
        backward(a, device, reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("args"), py::arg("n_splits"), py::arg("stats"), py::arg("seq"), py::arg("g_stats"), py::arg("dlp"),
      py::arg("dlp_dtype"), py::arg("dlp_rs"), py::arg("dent"), py::arg("dent_dtype"), py::arg("dent_rs"),
      py::arg("device"), py::arg("stream"),
      "Writes d loss / d logprobs (and d loss / d entropy when dent != 0) for every token of every sequence.");
  m.def(
      "kl_penalty_fwd",
      [](uintptr_t lp, int lp_dtype, uintptr_t ref, int ref_dtype, uintptr_t out, int64_t n, int est, bool clamp,
         int64_t sm_count, int device, uintptr_t stream) {
        check_kl_estimator(est);
        KlArgs a{reinterpret_cast<const void*>(lp), lp_dtype, reinterpret_cast<const void*>(ref), ref_dtype, nullptr,
                 lk::kFloat32, ptr<float>(out), nullptr, lk::kFloat32, nullptr, lk::kFloat32, n, est, false, clamp};
        py::gil_scoped_release release;
        kl(a, true, sm_count, device, reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("lp"), py::arg("lp_dtype"), py::arg("ref"), py::arg("ref_dtype"), py::arg("out"), py::arg("n"),
      py::arg("est"), py::arg("clamp"), py::arg("sm_count"), py::arg("device"), py::arg("stream"),
      "Writes the per-token estimate out[n] (fp32) from contiguous logprobs and ref_logprobs.");
  m.def(
      "kl_penalty_bwd",
      [](uintptr_t lp, int lp_dtype, uintptr_t ref, int ref_dtype, uintptr_t grad, int grad_dtype, uintptr_t dlp,
         int dlp_dtype, uintptr_t dref, int dref_dtype, int64_t n, int est, bool straight, bool clamp,
         int64_t sm_count, int device, uintptr_t stream) {
        check_kl_estimator(est);
        KlArgs a{reinterpret_cast<const void*>(lp), lp_dtype, reinterpret_cast<const void*>(ref), ref_dtype,
                 reinterpret_cast<const void*>(grad), grad_dtype, nullptr, reinterpret_cast<void*>(dlp), dlp_dtype,
                 reinterpret_cast<void*>(dref), dref_dtype, n, est, straight, clamp};
        py::gil_scoped_release release;
        kl(a, false, sm_count, device, reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("lp"), py::arg("lp_dtype"), py::arg("ref"), py::arg("ref_dtype"), py::arg("grad"), py::arg("grad_dtype"),
      py::arg("dlp"), py::arg("dlp_dtype"), py::arg("dref"), py::arg("dref_dtype"), py::arg("n"), py::arg("est"),
      py::arg("straight"), py::arg("clamp"), py::arg("sm_count"), py::arg("device"), py::arg("stream"),
      "Writes d logprobs and d ref_logprobs = -d logprobs (each in its own dtype) from the cotangent grad.");
  m.attr("SOURCE_HASH") = LK_SOURCE_HASH;
  m.attr("CUDART_VERSION") = CUDART_VERSION;
  m.attr("BLOCK_THREADS") = kThreads;
}
