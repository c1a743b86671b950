"""Loader and host launchers of the CUDA C++ backend (``csrc/cuda/``, one module per op family).

``backend="cuda"`` runs hand-written kernels instead of the Triton ones: explicit 16-byte vector
loads, loads in flight while the previous tile is reduced, warp-shuffle and block merges of the
online-softmax state, and split-vocab grids for few rows. The kernels share their arithmetic with
the CPU backend through ``csrc/include/lenkernels/`` and take raw device pointers, sizes, strides
and the current CUDA stream: no torch C++ headers, so the module works with any torch build.

Building (each ``csrc/cuda/<family>.cu`` becomes ``lenkernels._cuda_<family>``, for sm_80 and sm_90
plus sm_90 PTX; flags in ``lenkernels/_build.py``):

- ``pip install -e .`` builds the modules when ``nvcc`` is found (``CUDA_HOME``/``CUDA_PATH`` or
  ``PATH``); ``LENKERNELS_SKIP_CUDA=1 pip install -e .`` skips them (no CUDA toolchain needed).
- Otherwise a module is compiled with ``nvcc`` on first use into ``~/.cache/lenkernels``
  (``LENKERNELS_CACHE`` overrides), keyed by a hash of its sources, so an edited kernel is rebuilt
  and a stale build is never loaded. ``LENKERNELS_FORCE_JIT=1`` ignores an installed module.
- ``available(family)`` says whether the module loads and, when not, why and how to fix it;
  ``lenkernels.explain_backend(family, "cuda")`` prints it for every backend.

Example (packed layout: the N response tokens of all sequences as rows)::

    logits = model(input_ids).logits[0, :-1]        # [N, V] bf16 on a GPU
    lp, ent = lenkernels.token_logprobs_entropy(logits, input_ids[0, 1:], temperature=0.7, backend="cuda")

The O(N) families (policy loss, group advantages, phase statistics) write their kernels as bodies
over a team of cooperating threads (``csrc/cuda/team.h``); under :func:`host_emulation` their
launchers accept CPU tensors and run those very bodies on the host, thread by thread, with the
GPU's reduction order (slow: for checking the kernels where there is no GPU).
"""

from __future__ import annotations

import contextlib
import functools
from types import ModuleType

import torch

from lenkernels import _build, _checks, _extensions

_HOW_TO_BUILD = (
    "the CUDA backend is compiled with nvcc: install the CUDA toolkit (nvcc) and either "
    "reinstall with `pip install -e .` or let it build on first use (set CUDA_HOME if nvcc is not on PATH)"
)


def load(family: str) -> ModuleType:
    """The compiled CUDA module of an op family, e.g. ``load("token_stats")`` (built if needed)."""
    return _extensions.load(f"_cuda_{family}", "cuda")


def available(family: str) -> tuple[bool, str]:
    """``(True, "")`` when the family's CUDA module loads, else ``(False, why)`` with how to fix it."""
    if f"_cuda_{family}" not in _build.cuda_modules():
        try:
            import importlib

            importlib.import_module(f"lenkernels._cuda_{family}")
            return True, ""
        except ImportError:
            return False, f"no CUDA C++ kernels for {family} in this build"
    try:
        load(family)
    except ImportError as exc:
        return False, f"{exc}; {_HOW_TO_BUILD}"
    return True, ""


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _launch_context(x: torch.Tensor) -> tuple[int, int, int]:
    """(device index, SM count, current stream handle) for a launch on ``x``'s device."""
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return index, _sm_count(index), torch.cuda.current_stream(index).cuda_stream


def _check_rows(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2 or x.stride(1) != 1 or x.dtype not in _checks.DTYPE_CODES:
        raise ValueError(f"{name} must be [N, V] float32/bfloat16/float16 with unit stride along V")
    if x.device.type != "cuda":
        raise ValueError(f"{name} must be a CUDA tensor for backend='cuda', got {x.device}")


def _ids(ids: torch.Tensor) -> torch.Tensor:
    if ids.dtype not in (torch.int32, torch.int64):
        ids = ids.to(torch.int64)
    return ids.contiguous()


def token_stats_fwd(x, ids, temperature, ignore_index, logprobs, entropy, lse, mean_z, max_z=None, log_s=None):
    """Host launcher of the forward.

    x: [N, V] float32/bfloat16/float16, unit stride along V, any row stride; ids: [N] int32/int64;
    temperature: fp32 [1] or [N]; writes logprobs, entropy, lse, mean_z (fp32 [N], contiguous), and
    when given max_z, log_s: each row's online-softmax state (``lse = max_z + log_s``, kept apart for
    ``lenkernels.distributed.merge_stats``). Out-of-range ids give NaN logprobs (checked on the host
    only with LENKERNELS_DEBUG=1).
    """
    _check_rows(x, "logits")
    n_rows, vocab = x.shape
    if n_rows == 0:
        return
    module = load("token_stats")
    device, sm_count, stream = _launch_context(x)
    dtype = _checks.DTYPE_CODES[x.dtype]
    ids = _ids(ids)
    temperature = temperature.to(torch.float32).contiguous()
    n_splits = module.token_stats_splits(n_rows, vocab, dtype, sm_count)
    # partial (m, S, U) states of each (row, split) when a row spans several blocks
    partial = torch.empty(n_rows * n_splits * 3, dtype=torch.float32, device=x.device) if n_splits > 1 else None
    outs = (("logprobs", logprobs), ("entropy", entropy), ("lse", lse), ("mean_z", mean_z), ("max_z", max_z),
            ("log_s", log_s))  # fmt: skip
    for name, out in outs:
        if out is not None and not (out.is_contiguous() and out.dtype == torch.float32 and out.numel() == n_rows):
            raise ValueError(f"{name} must be a contiguous float32 tensor of {n_rows} elements")
    module.token_stats_fwd(
        x.data_ptr(), dtype, n_rows, vocab, x.stride(0), ids.data_ptr(), ids.element_size(),
        temperature.data_ptr(), 0 if temperature.numel() == 1 else 1, ignore_index,
        logprobs.data_ptr(), entropy.data_ptr(), lse.data_ptr(), mean_z.data_ptr(),
        0 if max_z is None else max_z.data_ptr(), 0 if log_s is None else log_s.data_ptr(),
        0 if partial is None else partial.data_ptr(), n_splits, device, stream,
    )  # fmt: skip


def token_stats_bwd(x, ids, temperature, lse, mean_z, g_logprobs, g_entropy, ignore_index, dlogits):
    """Host launcher of the backward.

    x: [N, V] as in the forward; lse, mean_z: fp32 [N] from it; g_logprobs, g_entropy: fp32 [N] with
    any stride (0 = broadcast); writes dlogits ([N, V], x's dtype, unit stride along V, any row
    stride; may be x itself for the in-place backward).
    """
    _check_rows(x, "logits")
    _check_rows(dlogits, "dlogits")
    n_rows, vocab = x.shape
    if n_rows == 0:
        return
    if dlogits.shape != x.shape or dlogits.dtype != x.dtype:
        raise ValueError(
            f"dlogits must match logits {tuple(x.shape)} {x.dtype}, got {tuple(dlogits.shape)} {dlogits.dtype}"
        )
    module = load("token_stats")
    device, sm_count, stream = _launch_context(x)
    dtype = _checks.DTYPE_CODES[x.dtype]
    ids = _ids(ids)
    temperature = temperature.to(torch.float32).contiguous()
    lse = lse.to(torch.float32).contiguous()
    mean_z = mean_z.to(torch.float32).contiguous()
    g_lp = g_logprobs.to(torch.float32)
    g_h = g_entropy.to(torch.float32)
    n_splits = module.token_stats_splits(n_rows, vocab, dtype, sm_count)
    module.token_stats_bwd(
        x.data_ptr(), dtype, n_rows, vocab, x.stride(0), ids.data_ptr(), ids.element_size(),
        temperature.data_ptr(), 0 if temperature.numel() == 1 else 1, ignore_index,
        lse.data_ptr(), mean_z.data_ptr(), g_lp.data_ptr(), g_lp.stride(0), g_h.data_ptr(), g_h.stride(0),
        dlogits.data_ptr(), dlogits.stride(0), n_splits, device, stream,
    )  # fmt: skip


# --- the O(N) families: policy loss, group advantages, phase statistics ------------------------------

_emulated_sm_count: int | None = None


@contextlib.contextmanager
def host_emulation(sm_count: int = 4):
    """Within this context the launchers of the policy-loss, advantage and phase-statistics kernels
    accept CPU tensors and run the kernels' bodies on the host: one thread per GPU thread, meeting
    at the same reductions in the same order (``csrc/cuda/team.h``), planned as for a GPU with
    ``sm_count`` SMs (small values split sequences across blocks sooner). For tests and debugging
    without a GPU; CUDA tensors still run on their device.

    Example::

        with lenkernels.cuda.host_emulation():
            lenkernels.cuda.phase_stats_fwd(values, ids, valid, cu_seqlens, delimiter, *outs)
    """
    global _emulated_sm_count
    if isinstance(sm_count, bool) or not isinstance(sm_count, int) or sm_count < 1:
        raise ValueError(f"sm_count must be a positive int, got {sm_count!r}")
    previous, _emulated_sm_count = _emulated_sm_count, sm_count
    try:
        yield
    finally:
        _emulated_sm_count = previous


def _target(x: torch.Tensor, name: str) -> tuple[int, int, int]:
    """(device index, SM count, stream) for a launch on ``x``'s device; device -1 (host emulation)
    for a CPU tensor inside :func:`host_emulation`."""
    if x.device.type == "cuda":
        return _launch_context(x)
    if x.device.type == "cpu" and _emulated_sm_count is not None:
        return -1, _emulated_sm_count, 0
    raise ValueError(f"{name} must be a CUDA tensor for backend='cuda', got {x.device}")


def _ptr(x: torch.Tensor | None) -> int:
    return 0 if x is None else x.data_ptr()


def _dtype_code(x: torch.Tensor, name: str) -> int:
    if x.dtype not in _checks.DTYPE_CODES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16 for backend='cuda', got {x.dtype}")
    return _checks.DTYPE_CODES[x.dtype]


def _as_u8(mask: torch.Tensor) -> torch.Tensor:
    """A 0/1 byte view of a mask: bool/uint8/int8 as they are, any other dtype through ``!= 0``."""
    if mask.dtype not in (torch.bool, torch.uint8, torch.int8):
        mask = mask != 0
    return mask.view(torch.uint8)


def _policy_args(t, cfg) -> dict:
    """The kernel-side view of the policy-loss inputs (keys read by ``parse`` in
    csrc/cuda/policy_loss.cu): columns keep their own dtype, padded ``[B, T]`` with unit stride
    along T (row stride ``*_rs``) or packed ``[N]`` (``*_rs`` = 0) with cu_seqlens."""
    packed = t.cu_seqlens is not None
    args = {"n_seqs": t.n_seqs, "seq_len": t.seq_len, "cu_seqlens": _ptr(t.cu_seqlens)}
    for name, x in (("logprobs", t.logprobs), ("old_logprobs", t.old_logprobs), ("ref_logprobs", t.ref_logprobs),
                    ("entropy", t.entropy), ("importance_weights", t.importance_weights)):  # fmt: skip
        args[name] = _ptr(x)
        args[name + "_rs"] = 0 if (x is None or packed) else x.stride(0)
        args[name + "_dtype"] = 0 if x is None else _dtype_code(x, name)
    adv = t.advantages
    args["advantages"] = adv.data_ptr()
    args["advantages_rs"] = adv.stride(0) if not (t.adv_per_token and packed) else 0
    args["advantages_dtype"] = _dtype_code(adv, "advantages")
    mask = None if t.mask is None else _as_u8(t.mask)
    args["mask"], args["mask_rs"] = _ptr(mask), 0 if (mask is None or packed) else mask.stride(0)
    args["_keep"] = mask  # alive until the launch is queued (then the stream orders its reuse)
    args["threshold"], args["normaliser"] = _ptr(t.threshold), _ptr(t.normaliser)
    args.update(
        adv_per_token=t.adv_per_token, mode=cfg.mode, lo=cfg.lo, hi=cfg.hi, dual=cfg.dual, dual_c=cfg.dual_c,
        tau_pos=cfg.tau_pos, tau_neg=cfg.tau_neg, agg=cfg.agg, kl_est=cfg.kl_est, kl_straight=cfg.kl_straight,
        kl_clamp=cfg.kl_clamp, has_seq=cfg.has_seq, kl_coef=cfg.kl_coef, entropy_coef=cfg.entropy_coef,
        norm_source=cfg.norm_source, norm_const=cfg.norm_const, scale=cfg.scale,
    )  # fmt: skip
    return args


def _policy_splits(module, t, sm_count: int) -> int:
    mean_len = t.seq_len if t.cu_seqlens is None else -(-t.logprobs.shape[0] // max(t.n_seqs, 1))
    return module.policy_loss_splits(t.n_seqs, mean_len, sm_count)


def policy_loss_fwd(t, cfg, stats: torch.Tensor, seq: torch.Tensor) -> None:
    """Host launcher of the fused policy loss (lenkernels/ops/policy_loss.py).

    t: the op's per-token tensors in kernel layout (``_Tokens``: padded ``[B, T]`` with unit stride
    along T, or packed ``[N]`` with ``cu_seqlens`` int64 ``[B + 1]``; float32/bfloat16/float16 each,
    mask of any dtype); cfg: its resolved ``_Config``. Writes stats (fp32 ``[16]``,
    ``lk::policy::Stat`` layout) and, for GSPO/LUSPO/GMPO or a seq-mean aggregation, seq (fp32
    ``[B, 4]``). Queued on the current stream; no host synchronisation.
    """
    device, sm_count, stream = _target(t.logprobs, "logprobs")
    module = load("policy_loss")
    n_splits = _policy_splits(module, t, sm_count)
    f32 = {"dtype": torch.float32, "device": t.logprobs.device}
    blocks = t.n_seqs * n_splits
    seq_part = torch.empty(blocks * 8, **f32) if cfg.has_seq else None
    part = torch.empty(blocks * 16, **f32)
    for name, out, numel in (("stats", stats, 16), ("seq", seq, 4 * t.n_seqs)):
        if not (out.is_contiguous() and out.dtype == torch.float32 and out.numel() == numel):
            raise ValueError(f"{name} must be a contiguous float32 tensor of {numel} elements")
    args = _policy_args(t, cfg)
    module.policy_loss_fwd(
        args=args, n_splits=n_splits, seq_part=_ptr(seq_part), part=part.data_ptr(), stats=stats.data_ptr(),
        seq=seq.data_ptr(), device=device, stream=stream,
    )  # fmt: skip


def policy_loss_bwd(t, cfg, stats, seq, g_stats, dlogprobs, dentropy) -> None:
    """Host launcher of the policy-loss backward: writes dlogprobs (and dentropy when not None),
    each in its own dtype and the layout of its input (padded: any row stride, unit stride along T;
    packed: ``[N]``, tokens outside every sequence left as they are)."""
    device, sm_count, stream = _target(t.logprobs, "logprobs")
    module = load("policy_loss")
    packed = t.cu_seqlens is not None
    for name, x in (("dlogprobs", dlogprobs), ("dentropy", dentropy)):
        if x is not None and x.dim() > 1 and x.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride along the tokens")
    g_stats = g_stats.to(torch.float32).contiguous()
    module.policy_loss_bwd(
        args=_policy_args(t, cfg), n_splits=_policy_splits(module, t, sm_count), stats=stats.data_ptr(),
        seq=seq.data_ptr(), g_stats=g_stats.data_ptr(), dlp=dlogprobs.data_ptr(),
        dlp_dtype=_dtype_code(dlogprobs, "dlogprobs"), dlp_rs=0 if packed else dlogprobs.stride(0),
        dent=_ptr(dentropy), dent_dtype=0 if dentropy is None else _dtype_code(dentropy, "dentropy"),
        dent_rs=0 if (packed or dentropy is None) else dentropy.stride(0), device=device, stream=stream,
    )  # fmt: skip


def kl_penalty_fwd(logprobs, ref_logprobs, est: int, clamp: bool, out) -> None:
    """Host launcher: the per-token KL estimate ``out`` (fp32, contiguous) of contiguous inputs of
    any float dtype each."""
    device, sm_count, stream = _target(logprobs, "logprobs")
    lp, rf = logprobs.contiguous(), ref_logprobs.contiguous()
    load("policy_loss").kl_penalty_fwd(
        lp=lp.data_ptr(), lp_dtype=_dtype_code(lp, "logprobs"), ref=rf.data_ptr(),
        ref_dtype=_dtype_code(rf, "ref_logprobs"), out=out.data_ptr(), n=lp.numel(), est=est, clamp=clamp,
        sm_count=sm_count, device=device, stream=stream,
    )  # fmt: skip


def kl_penalty_bwd(logprobs, ref_logprobs, grad, est: int, straight: bool, clamp: bool, dlogprobs, dref) -> None:
    """Host launcher: d logprobs and d ref_logprobs (contiguous, each in its own dtype) from the
    cotangent ``grad`` of the estimate."""
    device, sm_count, stream = _target(logprobs, "logprobs")
    lp, rf, g = logprobs.contiguous(), ref_logprobs.contiguous(), grad.contiguous()
    load("policy_loss").kl_penalty_bwd(
        lp=lp.data_ptr(), lp_dtype=_dtype_code(lp, "logprobs"), ref=rf.data_ptr(),
        ref_dtype=_dtype_code(rf, "ref_logprobs"), grad=g.data_ptr(), grad_dtype=_dtype_code(g, "grad"),
        dlp=dlogprobs.data_ptr(), dlp_dtype=_dtype_code(dlogprobs, "dlogprobs"), dref=dref.data_ptr(),
        dref_dtype=_dtype_code(dref, "dref"), n=lp.numel(), est=est, straight=straight, clamp=clamp,
        sm_count=sm_count, device=device, stream=stream,
    )  # fmt: skip


# group advantages (lenkernels/ops/advantages.py): codes of masks / lengths as its WEIGHT_CODES,
# methods as its METHODS (csrc/include/lenkernels/advantages.h)
_REINFORCE_PP, _OPO = 3, 7
_WEIGHT_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.bool: 3, torch.uint8: 3,
                 torch.int32: 4, torch.int64: 5}  # fmt: skip


def _weight_code(x: torch.Tensor, name: str) -> int:
    if x.dtype not in _WEIGHT_CODES:
        raise ValueError(f"{name} must be float32/bfloat16/float16/bool/uint8/int32/int64, got {x.dtype}")
    return _WEIGHT_CODES[x.dtype]


def _rows(x: torch.Tensor | None, name: str) -> torch.Tensor | None:
    """[B, T] rows with unit stride along T (a copy only when needed)."""
    if x is not None and x.dim() == 2 and x.stride(1) != 1 and x.shape[1] > 1:
        return x.contiguous()
    return x


def _segment_ptrs(seg) -> dict:
    return {
        "perm": _ptr(seg.perm), "offsets": _ptr(seg.offsets), "n_groups": seg.n_groups.data_ptr(),
        "group_size": seg.group_size, "bound": max(seg.bound, 1),
    }  # fmt: skip


def group_advantages(rewards, mask, lengths, seg, method: int, eps: float, norm: bool, ddof: float, adv, raw=None,
                     w_out=None) -> None:  # fmt: skip
    """Host launcher of the group step (lenkernels/ops/advantages.py ``_group_step``).

    rewards: ``[B]`` scores or ``[B, T]`` token rewards (summed over every position), float32 /
    bfloat16 / float16; mask: ``[B, T]`` of any weight dtype or None, whose row sums are the
    lengths of opo and reinforce_pp_baseline when ``lengths`` (``[B]``) is None; seg: the
    segmentation (``Segments``: perm, offsets, n_groups on the device). Writes adv ``[B]`` fp32
    (and raw scores / lengths into raw / w_out when given), response order. No host sync.
    """
    device, sm_count, stream = _target(rewards, "rewards")
    n = rewards.shape[0]
    if lengths is not None or method not in (_OPO, _REINFORCE_PP):
        mask = None  # the lengths come from `lengths`, or the method needs none
    rewards, mask = _rows(rewards, "rewards"), _rows(mask, "mask")
    token = rewards.dim() == 2
    f32 = {"dtype": torch.float32, "device": rewards.device}
    score_buf = torch.empty(n, **f32) if token else None
    len_buf = torch.empty(n, **f32) if mask is not None else None
    load("advantages").group_advantages(
        rewards=rewards.data_ptr(), r_dtype=_dtype_code(rewards, "rewards"), n=n,
        T=rewards.shape[1] if token else 0, stride_r=rewards.stride(0) if token else 1,
        mask=_ptr(mask), m_dtype=0 if mask is None else _weight_code(mask, "mask"),
        Tm=0 if mask is None else mask.shape[1], stride_m=0 if mask is None else mask.stride(0),
        lengths=_ptr(lengths), l_dtype=0 if lengths is None else _weight_code(lengths, "lengths"),
        **_segment_ptrs(seg), method=method, eps=float(eps), norm=bool(norm), ddof=float(ddof),
        adv=adv.data_ptr(), raw=_ptr(raw), w_out=_ptr(w_out), score_buf=_ptr(score_buf), len_buf=_ptr(len_buf),
        sm_count=sm_count, device=device, stream=stream,
    )  # fmt: skip


def gaussian_rank(keys, runs, adv) -> None:
    """Host launcher of the gaussian rank map: keys ``[B]`` fp32 scores, ``runs`` the (group, score)
    segmentation of lenkernels/ops/advantages.py; writes adv ``[B]`` fp32, response order."""
    device, sm_count, stream = _target(keys, "rewards")
    keys = keys.to(torch.float32).contiguous()
    load("advantages").gaussian_rank(
        keys=keys.data_ptr(), n=keys.shape[0], perm=runs.perm.data_ptr(), group_of=runs.group_of.data_ptr(),
        group_offsets=runs.group_offsets.data_ptr(), run_offsets=runs.run_offsets.data_ptr(),
        n_runs=runs.n_runs.data_ptr(), adv=adv.data_ptr(), sm_count=sm_count, device=device, stream=stream,
    )  # fmt: skip


def batch_shift_scale(x, w, method: int, eps: float) -> torch.Tensor:
    """``(shift, scale)`` fp32 ``[2]`` of batch / reinforce_pp_baseline from x ``[B]`` fp32 and
    optional weights ``[B]`` (any weight dtype): weighted moments of fixed 4096-element chunks merged
    in order, as the CPU backend forms them."""
    device, _, stream = _target(x, "rewards")
    stats = torch.empty(2, dtype=torch.float32, device=x.device)
    x = x.to(torch.float32).contiguous()
    w = None if w is None else w.contiguous()
    load("advantages").batch_shift_scale(
        x=x.data_ptr(), n=x.shape[0], w=_ptr(w), w_dtype=0 if w is None else _weight_code(w, "weights"),
        method=method, eps=float(eps), stats=stats.data_ptr(), device=device, stream=stream,
    )  # fmt: skip
    return stats


def broadcast(adv, stats, mask, out) -> None:
    """out = (adv - shift) * scale (with stats), times the mask row when given (masked tokens exactly
    0); out ``[B]`` or ``[B, T]`` fp32 with unit stride along T."""
    device, sm_count, stream = _target(adv, "rewards")
    mask = _rows(mask, "mask")
    load("advantages").broadcast(
        adv=adv.data_ptr(), n=adv.shape[0], stats=_ptr(stats), mask=_ptr(mask),
        m_dtype=0 if mask is None else _weight_code(mask, "mask"), T=0 if mask is None else mask.shape[1],
        stride_m=0 if mask is None else mask.stride(0), out=out.data_ptr(),
        stride_o=out.stride(0) if mask is not None else 1, sm_count=sm_count, device=device, stream=stream,
    )  # fmt: skip


def group_stats(values, where, mask, seg, stats, lengths) -> None:
    """Host launcher of the per-group statistics: values ``[B, C]`` fp32, where ``[B, C']`` fp32 0/1
    or None, mask ``[B, T]`` (any weight dtype; its row sums become column C) or None; writes stats
    ``[B, C', 6]`` (count, sum, mean, std, min, max) and, with a mask, lengths ``[B]``."""
    device, sm_count, stream = _target(values, "values")
    values = values.to(torch.float32).contiguous()
    where = None if where is None else where.to(torch.float32).contiguous()
    mask = _rows(mask, "mask")
    n, c_in = values.shape
    load("advantages").group_stats(
        values=values.data_ptr(), n=n, c_in=c_in, c_out=stats.shape[1], where=_ptr(where), mask=_ptr(mask),
        m_dtype=0 if mask is None else _weight_code(mask, "mask"), T=0 if mask is None else mask.shape[1],
        stride_m=0 if mask is None else mask.stride(0), **_segment_ptrs(seg), stats=stats.data_ptr(),
        lengths=_ptr(lengths) if mask is not None else 0, sm_count=sm_count, device=device, stream=stream,
    )  # fmt: skip


# phase statistics (lenkernels/ops/phase_stats.py)


def phase_stats_fwd(values, ids, valid, cu_seqlens, delimiter, think_mean, think_sum, answer_mean, answer_sum,
                    think_count, answer_count, k, found) -> None:  # fmt: skip
    """Host launcher of the phase split: values ``[C, N]`` float32/bfloat16/float16 (unit stride
    along N, any channel stride), ids ``[N]`` int32/int64, valid ``[N]`` bool/uint8, cu_seqlens
    int64 ``[S + 1]``, delimiter int64 ``[L]``; writes the means and sums (fp32 ``[C, S]``,
    contiguous), counts and k (int64 ``[S]``) and found (bool/uint8 ``[S]``)."""
    device, _, stream = _target(values, "values")
    if values.shape[-1] > 1 and values.stride(-1) != 1:
        values = values.contiguous()
    ids = ids if ids.dtype in (torch.int32, torch.int64) else ids.to(torch.int64)
    ids, valid = ids.contiguous(), _as_u8(valid.contiguous())
    cu, delim = cu_seqlens.to(torch.int64).contiguous(), delimiter.to(torch.int64).contiguous()
    load("phase_stats").phase_stats_fwd(
        values=values.data_ptr(), dtype=_dtype_code(values, "values"), n_channels=values.shape[0],
        channel_stride=values.stride(0), ids=ids.data_ptr(), id_bytes=ids.element_size(), valid=valid.data_ptr(),
        n_tokens=valid.numel(), cu_seqlens=cu.data_ptr(), n_seq=cu.numel() - 1, delim=delim.data_ptr(),
        delim_len=delim.numel(), think_mean=think_mean.data_ptr(), think_sum=think_sum.data_ptr(),
        answer_mean=answer_mean.data_ptr(), answer_sum=answer_sum.data_ptr(), think_count=think_count.data_ptr(),
        answer_count=answer_count.data_ptr(), k=k.data_ptr(), found=found.data_ptr(), device=device, stream=stream,
    )  # fmt: skip


def phase_stats_bwd(valid, cu_seqlens, k, think_count, answer_count, delim_len: int, g_think_mean, g_think_sum,
                    g_answer_mean, g_answer_sum, dvalues) -> None:  # fmt: skip
    """Host launcher of the phase-split backward: writes dvalues ``[C, N]`` (values dtype, unit stride
    along N) for every token of every sequence from the fp32 ``[C, S]`` cotangents of the means and
    sums; tokens outside every sequence are left as they are."""
    device, _, stream = _target(dvalues, "dvalues")
    if dvalues.shape[-1] > 1 and dvalues.stride(-1) != 1:
        raise ValueError("dvalues must have unit stride along the tokens")
    valid, cu = _as_u8(valid.contiguous()), cu_seqlens.to(torch.int64).contiguous()
    g = [x.to(torch.float32).contiguous() for x in (g_think_mean, g_think_sum, g_answer_mean, g_answer_sum)]
    load("phase_stats").phase_stats_bwd(
        valid=valid.data_ptr(), n_tokens=valid.numel(), cu_seqlens=cu.data_ptr(), n_seq=cu.numel() - 1,
        k=k.contiguous().data_ptr(), think_count=think_count.contiguous().data_ptr(),
        answer_count=answer_count.contiguous().data_ptr(), delim_len=int(delim_len), g_think_mean=g[0].data_ptr(),
        g_think_sum=g[1].data_ptr(), g_answer_mean=g[2].data_ptr(), g_answer_sum=g[3].data_ptr(),
        dvalues=dvalues.data_ptr(), dtype=_dtype_code(dvalues, "dvalues"), n_channels=dvalues.shape[0],
        channel_stride=dvalues.stride(0), device=device, stream=stream,
    )  # fmt: skip


def sequence_stats_fwd(values, valid, cu_seqlens, threshold: float, quantile, length, mean, vmin, vmax, frac,
                       high) -> None:  # fmt: skip
    """Host launcher of the per-sequence statistics: values ``[N]`` float32/bfloat16/float16, valid
    ``[N]``, quantile fp32 ``[1]`` or None; writes length (int64 ``[S]``), mean/min/max/frac (fp32
    ``[S]``) and, with a quantile, high (bool/uint8 ``[N]``; tokens outside every sequence left as
    they are)."""
    device, _, stream = _target(values, "entropy")
    values, valid = values.contiguous(), _as_u8(valid.contiguous())
    cu = cu_seqlens.to(torch.int64).contiguous()
    load("phase_stats").sequence_stats_fwd(
        values=values.data_ptr(), dtype=_dtype_code(values, "entropy"), valid=valid.data_ptr(),
        n_tokens=values.numel(), cu_seqlens=cu.data_ptr(), n_seq=cu.numel() - 1, threshold=float(threshold),
        quantile=_ptr(quantile), length=length.data_ptr(), mean=mean.data_ptr(), min=vmin.data_ptr(),
        max=vmax.data_ptr(), frac_above=frac.data_ptr(), high=0 if quantile is None else high.data_ptr(),
        device=device, stream=stream,
    )  # fmt: skip
