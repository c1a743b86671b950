"""Host launchers of the C++ policy-loss and KL kernels (``csrc/cpu/policy_loss.cpp``): the
``backend="cpu"`` implementation of the policy_loss family (same launcher signatures as
``lenkernels/{triton,cuda,reference}/policy_loss.py``).

The kernels read fp32 columns and a 0/1 byte mask through raw pointers: other dtypes are converted
here (one copy each), and gradients of other dtypes are written to fp32 buffers and copied back.
"""

from __future__ import annotations

import torch

from lenkernels.cpu import load

FAMILY = "policy_loss"


def _f32(x: torch.Tensor | None) -> torch.Tensor | None:
    """fp32 with unit stride along the tokens (any row stride)."""
    if x is None:
        return None
    x = x.to(torch.float32)
    return x if x.dim() < 2 or x.stride(-1) == 1 else x.contiguous()


def _bytes(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A 0/1 byte view of a mask: bool/uint8/int8 as they are, any other dtype through ``!= 0``."""
    if mask is None:
        return None
    if mask.dtype not in (torch.bool, torch.uint8, torch.int8):
        mask = mask != 0
    mask = mask.view(torch.uint8)
    return mask if mask.dim() < 2 or mask.stride(-1) == 1 else mask.contiguous()


def _for_cpu(t):
    """``t`` (``PolicyTokens``) with the columns the kernels read as fp32 and the mask as bytes."""
    return t._replace(
        logprobs=_f32(t.logprobs), old_logprobs=_f32(t.old_logprobs), advantages=_f32(t.advantages),
        mask=_bytes(t.mask), ref_logprobs=_f32(t.ref_logprobs), entropy=_f32(t.entropy),
        importance_weights=_f32(t.importance_weights),
    )  # fmt: skip


def _args(t, cfg) -> dict:
    """The kernel-side view (keys read by ``parse`` in csrc/cpu/policy_loss.cpp) of fp32 tokens
    ``t`` (``_for_cpu``): pointers and row strides (0 when packed), then the config's scalars
    (``PolicyConfig.kernel_scalars``)."""
    packed = t.cu_seqlens is not None

    def p(x):
        return 0 if x is None else x.data_ptr()

    def rs(x):
        return 0 if (x is None or packed) else x.stride(0)

    return {
        "n_seqs": t.n_seqs, "seq_len": t.seq_len, "cu_seqlens": p(t.cu_seqlens),
        "logprobs": p(t.logprobs), "logprobs_rs": rs(t.logprobs),
        "old_logprobs": p(t.old_logprobs), "old_logprobs_rs": rs(t.old_logprobs),
        "advantages": p(t.advantages), "advantages_rs": rs(t.advantages) if t.adv_per_token else t.advantages.stride(0),
        "adv_per_token": t.adv_per_token, "mask": p(t.mask), "mask_rs": rs(t.mask),
        "ref_logprobs": p(t.ref_logprobs), "ref_logprobs_rs": rs(t.ref_logprobs),
        "entropy": p(t.entropy), "entropy_rs": rs(t.entropy),
        "importance_weights": p(t.importance_weights), "importance_weights_rs": rs(t.importance_weights),
        "threshold": p(t.threshold), "normaliser": p(t.normaliser),
        "threads": torch.get_num_threads(), **cfg.kernel_scalars(),
    }  # fmt: skip


def _fp32_target(out: torch.Tensor | None) -> torch.Tensor | None:
    """``out`` itself when fp32, else an fp32 copy of it (written, then copied back)."""
    return out if out is None or out.dtype == torch.float32 else out.to(torch.float32)


def policy_loss_fwd(t, cfg, stats: torch.Tensor, seq: torch.Tensor) -> None:
    """Writes ``stats`` (fp32 ``[16]``, ``_codes.Stat`` layout) and, for GSPO/LUSPO/GMPO or a
    seq-mean aggregation, ``seq`` (fp32 ``[B, 4]``, ``SeqValue`` layout); both contiguous."""
    c = _for_cpu(t)  # alive until the call returns: _args holds only its pointers
    load(FAMILY).policy_loss_fwd(_args(c, cfg), stats.data_ptr(), seq.data_ptr())


def policy_loss_bwd(t, cfg, stats, seq, g_stats, dlogprobs: torch.Tensor, dentropy: torch.Tensor | None) -> None:
    """Writes d loss / d logprobs (and d loss / d entropy when ``dentropy`` is given), each in its
    own dtype and the layout of its input (padded: unit stride along T; packed: ``[N]``, tokens
    outside every sequence left as they are)."""
    c = _for_cpu(t)
    packed = t.cu_seqlens is not None
    d_lp, d_ent = _fp32_target(dlogprobs), _fp32_target(dentropy)
    load(FAMILY).policy_loss_bwd(
        _args(c, cfg), stats.data_ptr(), seq.data_ptr(), g_stats.data_ptr(), d_lp.data_ptr(),
        0 if packed else d_lp.stride(0), 0 if d_ent is None else d_ent.data_ptr(),
        0 if (packed or d_ent is None) else d_ent.stride(0),
    )  # fmt: skip
    if d_lp is not dlogprobs:
        dlogprobs.copy_(d_lp)
    if d_ent is not dentropy:
        dentropy.copy_(d_ent)


def kl_penalty_fwd(logprobs, ref_logprobs, cfg, out: torch.Tensor) -> None:
    """Writes the per-token estimate (``cfg``: ``KLConfig``) into ``out`` (fp32, contiguous) from
    contiguous inputs."""
    lp = logprobs.to(torch.float32).contiguous()
    rf = ref_logprobs.to(torch.float32).contiguous()
    load(FAMILY).kl_penalty_fwd(
        lp.data_ptr(), rf.data_ptr(), out.data_ptr(), lp.numel(), int(cfg.est), cfg.clamp, torch.get_num_threads()
    )


def kl_penalty_bwd(logprobs, ref_logprobs, grad, cfg, dlogprobs: torch.Tensor, dref: torch.Tensor) -> None:
    """Writes d logprobs and d ref_logprobs (contiguous, each in its own dtype) from the cotangent
    ``grad`` of the estimate."""
    lp = logprobs.to(torch.float32).contiguous()
    rf = ref_logprobs.to(torch.float32).contiguous()
    g = grad.to(torch.float32).contiguous()
    d_lp, d_rf = _fp32_target(dlogprobs), _fp32_target(dref)
    load(FAMILY).kl_penalty_bwd(
        lp.data_ptr(), rf.data_ptr(), g.data_ptr(), d_lp.data_ptr(), d_rf.data_ptr(), lp.numel(), int(cfg.est),
        cfg.straight, cfg.clamp, torch.get_num_threads(),
    )  # fmt: skip
    if d_lp is not dlogprobs:
        dlogprobs.copy_(d_lp)
    if d_rf is not dref:
        dref.copy_(d_rf)
