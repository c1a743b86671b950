"""``linear_token_stats``: every statistic of ``token_stats`` from the last hidden state and the LM
head, with the logit transforms of the models that have them (a logit scale, a final soft cap),
never holding the ``[N, V]`` logits.

Two paths, one meaning (``token_stats(transform(F.linear(hidden, weight, bias)), ids, ...)``):

- log-probabilities and/or entropy of untransformed logits run ``linear_logprobs_entropy``: the
  fused GEMM-epilogue kernels (Triton on CUDA tensors), no logits tile in the forward;
- anything else (``sum_p2``, ``argmax``, ``mean_logit``, the sparse ``topk``/``gathered``/``kept``,
  a logit scale, a soft cap) runs row
  chunks of at most ``chunk_size`` logits each: the chunk's GEMM in the hidden dtype (rounded like
  the eager ``F.linear``), the transform in fp32, then one ``token_stats`` kernel over the chunk.
  Each chunk is checkpointed: the backward recomputes its logits, writes one gradient tile through
  the ``token_stats`` backward kernel and hands it to the GEMMs' backward, so memory stays one chunk
  of logits whatever N is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lenkernels import _backend, _checks
from lenkernels.ops import linear_stats
from lenkernels.ops import token_stats as ts

TRANSFORM_FREE = frozenset(("logprob", "entropy"))


class _LowPrecisionLinear(torch.autograd.Function):
    """``F.linear`` with the GEMM in a lower compute dtype (autocast's): the hidden chunk is rounded
    to it here, ``weight_c`` / ``bias_c`` are the parameters rounded to it once a call (not once a
    chunk). The gradients' GEMMs accumulate in fp32 from the compute-dtype logits gradient
    (``linear_stats._accumulate_mm``: tensor cores with an fp32 result on CUDA) and return in the
    parameters' dtypes, not rounded to the compute dtype on the way back as they would be through
    ``F.linear(h.to(dtype), w.to(dtype))``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, weight_c, bias_c):
        hidden_c = hidden.to(weight_c.dtype)
        ctx.save_for_backward(hidden_c, weight_c)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return F.linear(hidden_c, weight_c, bias_c)

    @staticmethod
    def backward(ctx, g):
        hidden_c, weight_c = ctx.saved_tensors
        (h_dtype, w_dtype, b_dtype), need = ctx.dtypes, ctx.needs_input_grad
        dh = dw = db = None
        if need[0]:
            dh = g.new_zeros((g.shape[0], weight_c.shape[1]), dtype=torch.float32)
            linear_stats._accumulate_mm(dh, g, weight_c)
            dh = dh.to(h_dtype)
        if need[1]:
            dw = g.new_zeros(weight_c.shape, dtype=torch.float32)
            linear_stats._accumulate_mm(dw, g.T, hidden_c)
            dw = dw.to(w_dtype)
        if b_dtype is not None and need[2]:
            db = g.sum(0, dtype=torch.float32).to(b_dtype)
        return dh, dw, db, None, None


def _chunk_stats(hidden, weight, bias, ids, temperature, ignore_index, outputs, logit_scale, softcap, backend,
                 rounded=None, top_k=0, gather_ids=None, kept_ids=None, sampling=None):  # fmt: skip
    """One row chunk's statistics; ``rounded``: None (the GEMM in the hidden dtype), or the
    parameters rounded to a lower compute dtype, ``(weight_c, bias_c)``."""
    if rounded is None:
        logits = F.linear(hidden, weight, bias)
    else:
        logits = _LowPrecisionLinear.apply(hidden, weight, bias, *rounded)
    if logit_scale != 1.0 or softcap is not None:
        logits = logits.float() * logit_scale
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
    stats = ts.token_stats(logits, ids, temperature=temperature, ignore_index=ignore_index, outputs=outputs,
                           top_k=top_k, gather_ids=gather_ids, kept_ids=kept_ids, sampling=sampling,
                           backend=backend)  # fmt: skip
    return tuple(x for x in stats if x is not None)


def linear_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    ignore_index: int = -100,
    outputs=("logprob", "entropy"),
    logit_scale: float = 1.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    compute_dtype: torch.dtype | None = None,
    top_k: int = 0,
    gather_ids: torch.Tensor | None = None,
    kept_ids: torch.Tensor | None = None,
    sampling: dict | None = None,
    backend: str | None = None,
) -> ts.TokenStats:
    """The ``token_stats`` outputs of the logits ``hidden @ weight.T + bias``, transformed as the
    model does, without materialising them.

    The logits are ``y = F.linear(hidden, weight, bias)`` (the hidden dtype, like the eager GEMM),
    then ``y * logit_scale``, then, with ``softcap``, ``softcap * tanh(y / softcap)`` (Gemma's
    ``final_logit_softcapping``; the scale is Cohere's ``logit_scale``, Granite's
    ``1 / logits_scaling``), then ``z = y / temperature`` as in :func:`token_stats`.

    Args:
        hidden: ``[..., D]`` float32, bfloat16 or float16 (float64 with ``backend="reference"``).
        weight: ``[V, D]`` LM head, the dtype and device of ``hidden``.
        ids: ``[...]`` int32/int64 target ids, the leading shape of ``hidden``.
        bias: optional ``[V]``.
        temperature, ignore_index, outputs, backend: as in :func:`token_stats` (``backend`` names the
            backend of the statistics kernels).
        top_k, gather_ids, kept_ids, sampling: as in :func:`token_stats` (``gather_ids``/``kept_ids``
            ``[..., K]`` of the leading shape of ``hidden``); the sampler's kept set is built per
            row chunk from the chunk's logits (the same set: it is a function of the row).
        logit_scale: a finite number multiplying the logits before the soft cap.
        softcap: None, or a positive finite soft cap.
        chunk_size: most logits elements held at once (default as ``linear_logprobs_entropy``).
        compute_dtype: the dtype of the GEMM (default: the hidden dtype), e.g. autocast's bfloat16
            for float32 ``hidden``/``weight``: the logits are rounded to it, the gradients are
            computed in fp32 from its logits gradient and returned in the inputs' dtypes (TRL's
            fused head under autocast).

    Returns:
        ``TokenStats`` of shape ``ids.shape``: float fields differentiable in ``hidden``, ``weight``
        and ``bias`` (gradients in their dtypes), ``argmax`` int64.

    Example (TRL's fused-LM-head statistics of a Gemma-2 head)::

        st = linear_token_stats(hidden, lm_head.weight, labels, temperature=0.9, softcap=30.0,
                                outputs=("logprob", "entropy", "sum_p2", "mean_logit", "argmax"))
        is_top1 = st.argmax == labels
    """
    wanted = _checks.names(outputs, "outputs", ts.OUTPUTS)
    _checks.tensor(hidden, "hidden", min_dim=1)
    logit_scale = _checks.number(logit_scale, "logit_scale")
    if softcap is not None:
        softcap = _checks.number(softcap, "softcap", minimum=0.0, exclusive=True)
    if compute_dtype is None:
        compute_dtype = hidden.dtype
    elif compute_dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"compute_dtype must be one of {_checks.FLOAT_DTYPES} or None, got {compute_dtype!r}")
    fused = wanted <= TRANSFORM_FREE and logit_scale == 1.0 and softcap is None and compute_dtype == hidden.dtype
    family = linear_stats.FAMILY if fused else ts.family_of(wanted)
    name = _backend.resolve(backend, family, hidden.device)
    _checks.lm_head(hidden, weight, bias, ids, name)
    _checks.index(ignore_index, "ignore_index")
    top_k, gather_ids, kept_ids, _ = ts._sparse.check_args(wanted, ids, weight.shape[0], top_k, gather_ids, kept_ids,
                                                           sampling)  # fmt: skip
    if chunk_size is None:
        chunk_size = linear_stats.DEFAULT_CHUNK["cuda" if hidden.device.type == "cuda" else "cpu"]
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if fused:
        lp, ent = linear_stats.linear_logprobs_entropy(
            hidden, weight, ids, bias=bias, temperature=temperature, ignore_index=ignore_index,
            return_entropy="entropy" in wanted, chunk_size=chunk_size, backend=name,
        )  # fmt: skip
        return ts.TokenStats(logprob=lp if "logprob" in wanted else None, entropy=ent)

    temp = _checks.temperature(temperature, ids)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    y = ids.reshape(-1)
    n_rows, vocab = y.shape[0], weight.shape[0]
    rows = max(1, chunk_size // vocab)
    order = tuple(n for n in ts.OUTPUTS if n in wanted)
    per_row = [None if t is None else t.reshape(n_rows, t.shape[-1]) for t in (gather_ids, kept_ids)]
    differentiable = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias))
    rounded = None
    if compute_dtype != hidden.dtype:  # rounded once for all chunks (a [V, D] cast each would cost a GEMM's read)
        rounded = (weight.detach().to(compute_dtype), None if bias is None else bias.detach().to(compute_dtype))
    parts = []
    for start in range(0, max(n_rows, 1), rows):
        args = (h2[start : start + rows], weight, bias, y[start : start + rows],
                temp if temp.numel() == 1 else temp[start : start + rows], ignore_index, order, logit_scale,
                softcap, name, rounded, top_k,
                *(None if t is None else t[start : start + rows] for t in per_row), sampling)  # fmt: skip
        if differentiable:
            parts.append(checkpoint(_chunk_stats, *args, use_reentrant=False))
        else:
            parts.append(_chunk_stats(*args))
    fields = [torch.cat(column).reshape(*ids.shape, *column[0].shape[1:]) for column in zip(*parts)]
    present = [f for f in ts.TokenStats._fields if _field_wanted(f, wanted)]
    return ts.TokenStats(**dict(zip(present, fields)))


def _field_wanted(field: str, wanted) -> bool:
    return ts.FIELD_OUTPUT[field] in wanted
