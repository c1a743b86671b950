// Fused policy losses and KL estimators on the GPU (SPEC 2-3), CUDA C++ backend.
//   policy_loss_seq_kernel       grid (B * n_splits): per-sequence sums (GSPO/LUSPO/GMPO, seq-mean)
//   policy_loss_fwd_kernel       grid (B * n_splits): loss terms, flags and metrics per block
//   policy_loss_finalize_kernel  one block: the statistics vector (loss, metrics, 1 / normaliser)
//   policy_loss_bwd_kernel       grid (B * n_splits): d loss / d logprobs, d loss / d entropy
//   kl_penalty_fwd_kernel, kl_penalty_bwd_kernel: elementwise, grid-stride
// What the blocks compute is in policy_loss.h; the per-token maths in lenkernels/policy_loss.h,
// shared with the CPU backend. Raw device pointers, sizes and the stream come from Python
// (lenkernels/cuda/policy_loss.py): no torch headers. device -1 runs the same bodies on the host (team.h).
#include <climits>
#include <string>

#include "cuda_utils.h"
#include "lenkernels/binding.h"
#include "lenkernels/policy_args.h"
#include "policy_loss.h"
#include "team.h"

namespace lk {
namespace cuda {
namespace policy_loss {
namespace {

LK_BLOCK_KERNEL(policy_loss_seq_kernel, (kThreads, kMinBlocksPerSm), Args, seq_block(a, block, team))
LK_BLOCK_KERNEL(policy_loss_fwd_kernel, (kThreads, kMinBlocksPerSm), Args, fwd_block(a, block, team))
LK_BLOCK_KERNEL(policy_loss_finalize_kernel, (kThreads), Args, finalize_block(a, team))
LK_BLOCK_KERNEL(policy_loss_bwd_kernel, (kThreads, kMinBlocksPerSm), Args, bwd_block(a, block, team))
LK_BLOCK_KERNEL(kl_penalty_fwd_kernel, (kThreads), KlArgs, kl_fwd_block(a, block, n_blocks, team))
LK_BLOCK_KERNEL(kl_penalty_bwd_kernel, (kThreads), KlArgs, kl_bwd_block(a, block, n_blocks, team))

unsigned grid_of(const Args& a) {
  if (a.n_seqs < 1) throw std::invalid_argument("policy loss needs at least one sequence");
  if (a.n_splits < 1) throw std::invalid_argument("n_splits must be at least 1");
  if (a.n_seqs > INT_MAX / a.n_splits) throw std::invalid_argument("too many sequences for one launch");
  return unsigned(a.n_seqs * a.n_splits);
}

void forward(const Args& a, int device, cudaStream_t stream) {
  const unsigned blocks = grid_of(a);
  if (a.has_seq) LK_LAUNCH(policy_loss_seq_kernel, a, blocks, device, stream);
  LK_LAUNCH(policy_loss_fwd_kernel, a, blocks, device, stream);
  LK_LAUNCH(policy_loss_finalize_kernel, a, 1, device, stream);
}

// The kernel-side view of the op's inputs (keys as lenkernels/cuda/policy_loss.py _policy_args writes
// them), the split count and the stats / seq buffers of both passes. Every code is checked here,
// before any launch.
Args parse(const pybind11::dict& d, int n_splits, float* stats, float* seq) {
  Args a = {};
  a.n_splits = n_splits;
  a.stats = stats;
  a.seq = seq;
  parse_policy_inputs(d, a, [](const pybind11::dict& dd, const std::string& name) {
    return Column{dict_ptr<const void>(dd, name), dd[(name + "_rs").c_str()].cast<int64_t>(),
                  dd[(name + "_dtype").c_str()].cast<int>()};
  });
  if (a.lp.p == nullptr || a.old.p == nullptr || a.adv.p == nullptr) {
    throw std::invalid_argument("logprobs, old_logprobs and advantages are required");
  }
  if (a.thr != nullptr && a.ent.p == nullptr) throw std::invalid_argument("a threshold needs the entropy");
  return a;
}

void define(py::module_& m) {
  def(m, "policy_loss_splits", "n_seqs mean_len sm_count", &split_count,
      "Blocks per sequence of every stage (seq_part holds n_seqs * n_splits * 8 floats, part * 16).");
  def(m, "policy_loss_fwd",
      "args n_splits seq_part part stats seq device stream",
      [](const py::dict& args, int n_splits, Addr seq_part, Addr part, Addr stats, Addr seq, int device,
         Addr stream) {
        Args a = parse(args, n_splits, stats, seq);
        a.seq_part = seq_part;
        a.part = part;
        if (a.part == nullptr || a.stats == nullptr || (a.has_seq && (a.seq_part == nullptr || a.seq == nullptr))) {
          throw std::invalid_argument("policy_loss_fwd needs its part, stats (and seq_part, seq) buffers");
        }
        py::gil_scoped_release release;  // a launch can block while the device queue is full
        forward(a, device, stream);
      },
      "Writes stats[16] (lk::policy::Stat layout) and, with per-sequence values, seq[B, 4] (SeqValue layout).");
  def(m, "policy_loss_bwd",
      "args n_splits stats seq g_stats dlp dlp_dtype dlp_rs dent dent_dtype dent_rs device stream",
      [](const py::dict& args, int n_splits, Addr stats, Addr seq, Addr g_stats, Addr dlp, int dlp_dtype,
         int64_t dlp_rs, Addr dent, int dent_dtype, int64_t dent_rs, int device, Addr stream) {
        Args a = parse(args, n_splits, stats, seq);
        a.g_stats = g_stats;
        a.dlp = dlp;
        a.dlp_dtype = dlp_dtype;
        a.dlp_rs = dlp_rs;
        a.dent = dent;
        a.dent_dtype = dent_dtype;
        a.dent_rs = dent_rs;
        if (a.stats == nullptr || a.g_stats == nullptr || a.dlp == nullptr || (a.has_seq && a.seq == nullptr)) {
          throw std::invalid_argument("policy_loss_bwd needs stats, g_stats, dlp (and seq)");
        }
        py::gil_scoped_release release;
        LK_LAUNCH(policy_loss_bwd_kernel, a, grid_of(a), device, stream);
      },
      "Writes d loss / d logprobs (and d loss / d entropy when dent != 0) for every token of every sequence.");
  def(m, "kl_penalty_fwd",
      "lp lp_dtype ref ref_dtype out n est clamp sm_count device stream",
      [](Addr lp, int lp_dtype, Addr ref, int ref_dtype, Addr out, int64_t n, int est, bool clamp, int64_t sm_count,
         int device, Addr stream) {
        check(invalid_kl_estimator(est));
        const KlArgs a{lp, lp_dtype, ref, ref_dtype, nullptr, lk::kFloat32, out, nullptr,
                       lk::kFloat32, nullptr, lk::kFloat32, n, est, false, clamp};
        LK_LAUNCH(kl_penalty_fwd_kernel, a, n > 0 ? elementwise_blocks(n, sm_count) : 0, device, stream);
      },
      LK_NOGIL,
      "Writes the per-token estimate out[n] (fp32) from contiguous logprobs and ref_logprobs.");
  def(m, "kl_penalty_bwd",
      "lp lp_dtype ref ref_dtype grad grad_dtype dlp dlp_dtype dref dref_dtype n est straight clamp "
      "sm_count device stream",
      [](Addr lp, int lp_dtype, Addr ref, int ref_dtype, Addr grad, int grad_dtype, Addr dlp, int dlp_dtype, Addr dref,
         int dref_dtype, int64_t n, int est, bool straight, bool clamp, int64_t sm_count, int device, Addr stream) {
        check(invalid_kl_estimator(est));
        const KlArgs a{lp, lp_dtype, ref, ref_dtype, grad, grad_dtype, nullptr, dlp,
                       dlp_dtype, dref, dref_dtype, n, est, straight, clamp};
        LK_LAUNCH(kl_penalty_bwd_kernel, a, n > 0 ? elementwise_blocks(n, sm_count) : 0, device, stream);
      },
      LK_NOGIL,
      "Writes d logprobs and d ref_logprobs = -d logprobs (each in its own dtype) from the cotangent grad.");
  m.attr("BLOCK_THREADS") = kThreads;
}

}  // namespace
}  // namespace policy_loss
}  // namespace cuda
}  // namespace lk

LK_MODULE(_cuda_policy_loss, "lenkernels CUDA kernels: fused policy losses and KL estimators (raw device pointers)",
          lk::cuda::policy_loss::define)
