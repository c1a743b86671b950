"""``linear_token_stats``: every statistic of ``token_stats`` from the last hidden state and the LM
head, with the logit transforms of the models that have them (a logit scale, a final soft cap),
never holding the ``[N, V]`` logits. ``linear_logprobs_entropy`` (``ops/linear_stats.py``) is its
two-output form.

Two paths, one meaning (``token_stats(transform(F.linear(hidden, weight, bias)), ids, ...)``):

- log-probabilities and/or entropy of untransformed logits in the hidden dtype run the fused
  ``lenkernels::linear_stats`` op (``ops/linear_stats.py``): GEMM-epilogue kernels (Triton on CUDA
  tensors), no logits tile in the forward, vocabulary parallelism (``process_group``);
- anything else (``sum_p2``, ``argmax``, ``mean_logit``, the sparse ``topk``/``gathered``/``kept``,
  a logit scale, a soft cap, a compute dtype) runs row
  chunks of at most ``chunk_size`` logits each: the chunk's GEMM in the hidden dtype (rounded like
  the eager ``F.linear``), the transform in fp32, then one ``token_stats`` kernel over the chunk.
  Each chunk is checkpointed: the backward recomputes its logits, writes one gradient tile through
  the ``token_stats`` backward kernel and hands it to the GEMMs' backward, so memory stays one chunk
  of logits whatever N is. No ``process_group`` there (NotImplementedError): never a silent switch
  between the two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lenkernels import _backend, _checks
from lenkernels import distributed as lkdist
from lenkernels.ops import linear_stats
from lenkernels.ops import token_stats as ts


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
    process_group=None,
    reduce_hidden_grad: bool = True,
    backend: str | None = None,
) -> ts.TokenStats:
    """The ``token_stats`` outputs of the logits ``hidden @ weight.T + bias``, transformed as the
    model does, without materialising them.

    The logits are ``y = F.linear(hidden, weight, bias)`` (the hidden dtype, like the eager GEMM),
    then ``y * logit_scale``, then, with ``softcap``, ``softcap * tanh(y / softcap)`` (Gemma's
    ``final_logit_softcapping``; the scale is Cohere's ``logit_scale``, Granite's
    ``1 / logits_scaling``), then ``z = y / temperature`` as in :func:`token_stats`.

    Args:
        hidden: ``[..., D]`` float32, bfloat16 or float16 (float64 with ``backend="reference"``),
            padded ``[B, T, D]`` or packed ``[N, D]``.
        weight: ``[V, D]`` LM head (``[V_r, D]``: this rank's rows under ``process_group``), the
            dtype and device of ``hidden``.
        ids: ``[...]`` int32/int64 target ids, the leading shape of ``hidden``; global vocabulary
            numbering under ``process_group``.
        bias: optional ``[V]`` (or ``[V_r]``) bias of the LM head, the dtype of ``hidden``.
        temperature: a positive float or a tensor broadcastable to ``ids``; applied in fp32 to the
            transformed logits: ``z = y / T``. Not differentiable.
        ignore_index, outputs: as in :func:`token_stats`.
        top_k, gather_ids, kept_ids, sampling: as in :func:`token_stats` (``gather_ids``/``kept_ids``
            ``[..., K]`` of the leading shape of ``hidden``); the sampler's kept set is built per
            row chunk from the chunk's logits (the same set: it is a function of the row).
        logit_scale: a finite number multiplying the logits before the soft cap.
        softcap: None, or a positive finite soft cap.
        chunk_size: most logits elements held at once (rows x vocabulary columns of one tile or row
            chunk); default 2**26 on CUDA, 2**24 on CPU. Smaller saves memory, larger runs bigger
            GEMMs.
        compute_dtype: the dtype of the GEMM (default: the hidden dtype), e.g. autocast's bfloat16
            for float32 ``hidden``/``weight``: the logits are rounded to it, the gradients are
            computed in fp32 from its logits gradient and returned in the inputs' dtypes (TRL's
            fused head under autocast).
        process_group: vocabulary (tensor) parallelism: ``weight``/``bias`` are this rank's shard of
            the LM head along V, shards in rank order, sizes free; every rank gets the statistics of
            the full vocabulary. ``hidden`` and ``ids`` are the same on every rank. Only on the
            fused path (outputs among logprob/entropy, ``logit_scale`` 1, no ``softcap``, no
            ``compute_dtype`` other than the hidden dtype): anything else raises
            NotImplementedError naming the arguments in the way. Default None: the whole
            vocabulary is here.
        reduce_hidden_grad: under ``process_group``, all-reduce the hidden gradient over the group
            (default) so ``hidden.grad`` is the full-vocabulary gradient on every rank. Pass False
            when the caller's framework already reduces it (e.g. Megatron's
            ``copy_to_tensor_model_parallel_region``); each rank then gets its shard's part.
        backend: ``None`` or a backend name: on the fused path that of the fused kernels
            (``None``: triton on CUDA, cpu on CPU; ``"triton"``, ``"cpu"`` or ``"reference"``),
            otherwise that of the ``token_stats`` kernels (as in :func:`token_stats`).

    Returns:
        ``TokenStats`` of shape ``ids.shape``: float fields differentiable in ``hidden``, ``weight``
        and ``bias`` (gradients in their dtypes, accumulated in fp32), ``argmax`` int64. The fused
        path is deterministic: no atomics, tiles reduced in a fixed order.

    Memory: the fused triton forward holds no logits (the online-softmax state is folded into the
    matmul's epilogue); every other pass holds one ``rows x cols <= chunk_size`` tile of logits
    plus fp32 accumulators of the gradients' sizes.

    Example (TRL's fused-LM-head statistics of a Gemma-2 head)::

        st = linear_token_stats(hidden, lm_head.weight, labels, temperature=0.9, softcap=30.0,
                                outputs=("logprob", "entropy", "sum_p2", "mean_logit", "argmax"))
        is_top1 = st.argmax == labels

    Example (packed layout, vocabulary split over a tensor-parallel group)::

        hidden = model.model(input_ids).last_hidden_state[0, :-1]    # [N, D], N tokens in total
        st = linear_token_stats(hidden, lm_head_shard.weight, input_ids[0, 1:], temperature=0.7,
                                process_group=tp_group)             # st.logprob, st.entropy
    """
    wanted = _checks.names(outputs, "outputs", ts.OUTPUTS)
    _checks.flags(reduce_hidden_grad=reduce_hidden_grad)
    _checks.tensor(hidden, "hidden", min_dim=1)
    logit_scale = _checks.number(logit_scale, "logit_scale")
    if softcap is not None:
        softcap = _checks.number(softcap, "softcap", minimum=0.0, exclusive=True)
    if compute_dtype is None:
        compute_dtype = hidden.dtype
    elif compute_dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"compute_dtype must be one of {_checks.FLOAT_DTYPES} or None, got {compute_dtype!r}")
    unfused = _unfused_reasons(wanted, logit_scale, softcap, compute_dtype, hidden.dtype)
    family = ts.family_of(wanted) if unfused else linear_stats.FAMILY
    name = _backend.resolve(backend, family, hidden.device)
    _checks.lm_head(hidden, weight, bias, ids, name)
    _checks.index(ignore_index, "ignore_index")
    top_k, gather_ids, kept_ids, _ = ts._sparse.check_args(wanted, ids, weight.shape[0], top_k, gather_ids, kept_ids,
                                                           sampling)  # fmt: skip
    if chunk_size is None:
        chunk_size = linear_stats.DEFAULT_CHUNK["cuda" if hidden.device.type == "cuda" else "cpu"]
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    group = lkdist.group_name(process_group)
    if group and unfused:
        raise NotImplementedError(
            "linear_token_stats(process_group=...) runs only the fused vocabulary-parallel kernels "
            f"(outputs among ('logprob', 'entropy'), untransformed logits in the hidden dtype); "
            f"here {'; '.join(unfused)}: compute the sharded logits and call token_stats(process_group=...)"
        )
    temp = _checks.temperature(temperature, ids)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    y = ids.reshape(-1)
    if not unfused:
        if h2.stride(-1) != 1:
            h2 = h2.contiguous()
        w = weight if weight.stride(-1) == 1 else weight.contiguous()
        b = None if bias is None else bias.contiguous()
        lp, ent, _, _, _ = torch.ops.lenkernels.linear_stats(
            h2, w, b, y, temp, ignore_index, chunk_size, name, group, reduce_hidden_grad
        )  # fmt: skip
        return ts.TokenStats(
            logprob=lp.reshape(ids.shape) if "logprob" in wanted else None,
            entropy=ent.reshape(ids.shape) if "entropy" in wanted else None,
        )

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


def _unfused_reasons(wanted, logit_scale: float, softcap, compute_dtype, hidden_dtype) -> list[str]:
    """Why the fused ``lenkernels::linear_stats`` op cannot give these statistics (empty: it can)."""
    reasons = []
    if not wanted <= ts.TWO_OUTPUT:
        reasons.append(f"outputs names {tuple(n for n in ts.OUTPUTS if n in wanted - ts.TWO_OUTPUT)}")
    if logit_scale != 1.0:
        reasons.append(f"logit_scale={logit_scale}")
    if softcap is not None:
        reasons.append(f"softcap={softcap}")
    if compute_dtype != hidden_dtype:
        reasons.append(f"compute_dtype={compute_dtype} (hidden is {hidden_dtype})")
    return reasons


def _field_wanted(field: str, wanted) -> bool:
    return ts.FIELD_OUTPUT[field] in wanted
