"""Host launchers of the CUDA C++ policy-loss and KL kernels (``csrc/cuda/policy_loss.cu``): the ``backend="cuda"``
implementation of the policy_loss family (same launcher signatures as the other backends)."""

from __future__ import annotations

import torch

from lenkernels._codes import Partial, SeqPartial, SeqValue, Stat
from lenkernels.cuda import _as_u8, _dtype_code, _ptr, _target, load

FAMILY = "policy_loss"


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
    args.update(adv_per_token=t.adv_per_token, **cfg.kernel_scalars())
    return args


def _policy_splits(module, t, sm_count: int) -> int:
    mean_len = t.seq_len if t.cu_seqlens is None else -(-t.logprobs.shape[0] // max(t.n_seqs, 1))
    return module.policy_loss_splits(t.n_seqs, mean_len, sm_count)


def policy_loss_fwd(t, cfg, stats: torch.Tensor, seq: torch.Tensor) -> None:
    """Host launcher of the fused policy loss (lenkernels/ops/policy_loss.py).

    t: the op's per-token tensors in kernel layout (``PolicyTokens``: padded ``[B, T]`` with unit
    stride along T, or packed ``[N]`` with ``cu_seqlens`` int64 ``[B + 1]``; float32/bfloat16/float16
    each, mask of any dtype); cfg: its ``PolicyConfig``. Writes stats (fp32 ``[16]``, ``_codes.Stat``
    layout) and, for GSPO/LUSPO/GMPO or a seq-mean aggregation, seq (fp32 ``[B, 4]``). Queued on the
    current stream; no host synchronisation.
    """
    device, sm_count, stream = _target(t.logprobs, "logprobs")
    module = load("policy_loss")
    n_splits = _policy_splits(module, t, sm_count)
    f32 = {"dtype": torch.float32, "device": t.logprobs.device}
    blocks = t.n_seqs * n_splits
    seq_part = torch.empty(blocks * SeqPartial.NUM_SEQ_PARTIALS, **f32) if cfg.has_seq else None
    part = torch.empty(blocks * Partial.NUM_PARTIALS, **f32)
    for name, out, numel in (("stats", stats, Stat.NUM_STATS), ("seq", seq, SeqValue.NUM_SEQ_VALUES * t.n_seqs)):
        numel = int(numel)
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


def kl_penalty_fwd(logprobs, ref_logprobs, cfg, out) -> None:
    """Host launcher: the per-token KL estimate (``cfg``: ``KLConfig``) into ``out`` (fp32,
    contiguous) from contiguous inputs of any float dtype each."""
    device, sm_count, stream = _target(logprobs, "logprobs")
    lp, rf = logprobs.contiguous(), ref_logprobs.contiguous()
    load("policy_loss").kl_penalty_fwd(
        lp=lp.data_ptr(), lp_dtype=_dtype_code(lp, "logprobs"), ref=rf.data_ptr(),
        ref_dtype=_dtype_code(rf, "ref_logprobs"), out=out.data_ptr(), n=lp.numel(), est=int(cfg.est), clamp=cfg.clamp,
        sm_count=sm_count, device=device, stream=stream,
    )  # fmt: skip


def kl_penalty_bwd(logprobs, ref_logprobs, grad, cfg, dlogprobs, dref) -> None:
    """Host launcher: d logprobs and d ref_logprobs (contiguous, each in its own dtype) from the
    cotangent ``grad`` of the estimate."""
    device, sm_count, stream = _target(logprobs, "logprobs")
    lp, rf, g = logprobs.contiguous(), ref_logprobs.contiguous(), grad.contiguous()
    load("policy_loss").kl_penalty_bwd(
        lp=lp.data_ptr(), lp_dtype=_dtype_code(lp, "logprobs"), ref=rf.data_ptr(),
        ref_dtype=_dtype_code(rf, "ref_logprobs"), grad=g.data_ptr(), grad_dtype=_dtype_code(g, "grad"),
        dlp=dlogprobs.data_ptr(), dlp_dtype=_dtype_code(dlogprobs, "dlogprobs"), dref=dref.data_ptr(),
        dref_dtype=_dtype_code(dref, "dref"), n=lp.numel(), est=int(cfg.est), straight=cfg.straight, clamp=cfg.clamp,
        sm_count=sm_count, device=device, stream=stream,
    )  # fmt: skip

