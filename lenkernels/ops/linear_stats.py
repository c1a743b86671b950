"""Token log-probabilities and entropy from the last hidden state and the LM head (SPEC 1 on
``logits = hidden @ weight.T + bias``) without ever holding the ``[N, V]`` logits.

Chain of names: ``linear_token_stats`` (public, ``ops/linear_token_stats.py``: its untransformed
logprob/entropy path; ``linear_logprobs_entropy`` here is its two-output form) ->
``lenkernels::linear_stats`` (custom op with autograd) -> ``linear_stats_fwd`` /
``linear_stats_bwd`` (host launchers) -> the backend's ``linear_stats_fwd`` /
``linear_stats_bwd_tile`` (``lenkernels.<backend>.linear_stats``: triton, cpu, reference; no cuda)
-> kernels (``triton/linear_stats.py``; on the cpu and reference backends a GEMM per tile plus the
token_stats kernels and ``csrc/cpu/linear_stats.cpp``). The backward's gradient GEMMs, common to
every backend, are here.

Memory. The work is cut into tiles of ``rows x cols`` logits with ``rows * cols <= chunk_size``
(``tile_plan``). The Triton forward holds no logits at all (the softmax state is folded in the
matmul's epilogue). Every other pass holds one tile of logits/dlogits at a time, plus fp32
accumulators the size of the gradients (``[N, D]`` for the hidden gradient, ``[cols, D]`` for a
block of the weight gradient), never anything of size ``N * V``.

Numerics. Logits are rounded to the hidden dtype exactly like an eager ``F.linear`` in that dtype,
then reduced in fp32 (DESIGN.md). Backward recomputes each tile with the same code and the same
tile boundaries as the forward, so it sees the forward's logits bit for bit.
"""

from __future__ import annotations

import functools

import torch

from lenkernels import _backend, _checks
from lenkernels import distributed as lkdist
from lenkernels.reference import linear_stats as ref
from lenkernels.reference.linear_stats import tile_plan

FAMILY = "linear_stats"
_backend.register_family(FAMILY, ("triton", "cpu", "reference"))

# Logits elements held at once by default: 64 Mi (128 MiB of bf16) on a GPU, 16 Mi on a CPU.
DEFAULT_CHUNK = {"cuda": 1 << 26, "cpu": 1 << 24}


@functools.cache
def _mm_has_out_dtype(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(..., out_dtype=torch.float32)`` runs for ``dtype`` inputs on this device."""
    try:
        x = torch.ones((1, 1), dtype=dtype, device=device_type)
        return torch.mm(x, x, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with fp32 (or fp64) accumulation and no intermediate rounding to a's dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda and _mm_has_out_dtype(a.device.type, a.dtype):
        acc.add_(torch.mm(a, b, out_dtype=acc.dtype))  # tensor-core GEMM with an fp32 result
    else:  # exact upcast (low-precision products are exact in fp32); copies bounded by a tile
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- host launchers ------------------------------------------------------------------------------


def linear_stats_fwd(hidden, weight, bias, local_ids, temperature, chunk_size: int, backend: str, state: bool = False):
    """Host launcher: statistics of this shard's vocabulary, ``(logprobs, entropy, lse, mean_z)``
    fp32 ``[N]``, then the rows' online-softmax states ``(max_z, log_s)`` with ``state``
    (``lenkernels.distributed.merge_stats``).

    ``hidden`` [N, D], ``weight`` [V, D] and ``bias`` [V] share a dtype and have unit stride along
    D; ``local_ids`` [N] int64 shard-local (``lenkernels.distributed``). logprob is ``z_y - lse``
    (computed as ``(z_y - max_z) - log_s``) where the target is a column of this shard, 0 for
    ignored rows, NaN for the others.
    """
    n_rows = hidden.shape[0]
    # six allocations, not rows of one buffer: a row at an odd offset would change the pointer
    # alignment Triton specialises on (a second compiled variant)
    outs = [torch.empty(n_rows, dtype=torch.float32, device=hidden.device) for _ in range(6)]
    if n_rows > 0:
        _backend.kernels(backend, FAMILY).linear_stats_fwd(
            hidden, weight, bias, local_ids, temperature, chunk_size, *outs
        )  # fmt: skip
    return tuple(outs[: 6 if state else 4])


def linear_stats_bwd(
    hidden, weight, bias, local_ids, temperature, lse, mean_z, g_logprobs, g_entropy,
    chunk_size: int, backend: str, need_hidden: bool, need_weight: bool, need_bias: bool,
):  # fmt: skip
    """Host launcher: ``(dhidden_acc, dweight, dbias)``.

    ``dhidden_acc`` is [N, D] in fp32 (fp64 for fp64 inputs), summed over this shard's vocabulary
    only (the caller all-reduces it under tensor parallelism and casts it); ``dweight`` [V, D] and
    ``dbias`` [V] are in the weight dtype. Gradients not needed are None. ``lse``/``mean_z`` are
    those of the whole vocabulary.

    Each tile of at most ``chunk_size`` logits gets its dlogits from the backend (written into one
    reused buffer), then GEMMs accumulate the gradients in a fixed tile order (no atomics).
    """
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    acc_dtype = _acc_dtype(hidden.dtype)
    device = hidden.device
    dh = torch.zeros((n_rows, dim), dtype=acc_dtype, device=device) if need_hidden else None
    dw = torch.empty_like(weight) if need_weight else None
    db = torch.zeros(vocab, dtype=acc_dtype, device=device) if need_bias else None
    if n_rows == 0 or not (need_hidden or need_weight or need_bias):
        if dw is not None:
            dw.zero_()
        return dh, dw, (db.to(weight.dtype) if db is not None else None)
    g_lp = g_logprobs.reshape(-1).to(torch.float32)
    g_h = g_entropy.reshape(-1).to(torch.float32)
    rows, cols = tile_plan(n_rows, vocab, chunk_size)
    row_spans = ref.spans(n_rows, rows)
    kernels = _backend.kernels(backend, FAMILY)
    buf = torch.empty((rows, cols), dtype=hidden.dtype, device=device)
    for v0, v1 in ref.spans(vocab, cols):
        dw_block = None
        if need_weight:
            dw_block = (
                dw[v0:v1] if dw.dtype == acc_dtype else torch.empty((v1 - v0, dim), dtype=acc_dtype, device=device)
            )
            dw_block.zero_()
        for r0, r1 in row_spans:
            dlogits = buf[: r1 - r0, : v1 - v0]
            kernels.linear_stats_bwd_tile(
                hidden, weight, bias, local_ids, temperature, lse, mean_z, g_lp, g_h, (r0, r1), (v0, v1), dlogits
            )
            if need_hidden:
                _accumulate_mm(dh[r0:r1], dlogits, weight[v0:v1])
            if need_weight:
                _accumulate_mm(dw_block, dlogits.T, hidden[r0:r1])
            if need_bias:
                db[v0:v1] += dlogits.sum(0, dtype=acc_dtype)
        if need_weight and dw_block.data_ptr() != dw[v0:v1].data_ptr():
            dw[v0:v1] = dw_block
    return dh, dw, (db.to(weight.dtype) if db is not None else None)


# --- torch.library registration ------------------------------------------------------------------


def _shard_ids(ids, vocab_local, ignore_index, group_name):
    """(shard-local ids, vocab offset [1] int64), checking ids where value checks run."""
    device = ids.device
    if group_name:
        group = lkdist.resolve_group(group_name)
        sizes = lkdist.shard_sizes(vocab_local, group, device)
        offset = lkdist.vocab_offset(sizes, group)
        if _checks.value_checks(device):
            lkdist.global_vocab_check(ids, sizes, ignore_index)
    else:
        offset = torch.zeros(1, dtype=torch.int64, device=device)
        if _checks.value_checks(device):
            _checks.ids_in_range(ids, vocab_local, ignore_index)
    return lkdist.shard_local_ids(ids, offset, vocab_local, ignore_index), offset


@torch.library.custom_op("lenkernels::linear_stats", mutates_args=())
def _linear_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ids: torch.Tensor,
    temperature: torch.Tensor,
    ignore_index: int,
    chunk_size: int,
    backend: str,
    group_name: str,
    reduce_hidden_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logprobs, entropy, lse, mean_z, vocab_offset)``; ``reduce_hidden_grad`` is read by backward."""
    local_ids, offset = _shard_ids(ids, weight.shape[0], ignore_index, group_name)
    if group_name:
        lp, ent, _, _, max_z, log_s = linear_stats_fwd(
            hidden, weight, bias, local_ids, temperature, chunk_size, backend, state=True
        )
        group = lkdist.resolve_group(group_name)
        lp, ent, lse, mean_z = lkdist.merge_stats(max_z, log_s, ent, lp, local_ids >= 0, group=group)
        lp = torch.where(ids == ignore_index, torch.zeros_like(lp), lp)
    else:
        lp, ent, lse, mean_z = linear_stats_fwd(hidden, weight, bias, local_ids, temperature, chunk_size, backend)
    return lp, ent, lse, mean_z, offset


@_linear_stats.register_fake
def _(hidden, weight, bias, ids, temperature, ignore_index, chunk_size, backend, group_name, reduce_hidden_grad):
    stats = tuple(torch.empty(ids.shape, dtype=torch.float32, device=hidden.device) for _ in range(4))
    return (*stats, torch.empty(1, dtype=torch.int64, device=hidden.device))


@torch.library.custom_op("lenkernels::linear_stats_backward", mutates_args=())
def _linear_stats_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ids: torch.Tensor,
    temperature: torch.Tensor,
    lse: torch.Tensor,
    mean_z: torch.Tensor,
    vocab_offset: torch.Tensor,
    g_logprobs: torch.Tensor,
    g_entropy: torch.Tensor,
    ignore_index: int,
    chunk_size: int,
    backend: str,
    group_name: str,
    reduce_hidden_grad: bool,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dhidden, dweight, dbias); a gradient that is not needed comes back as an empty [0] tensor."""
    local_ids = lkdist.shard_local_ids(ids, vocab_offset, weight.shape[0], ignore_index)
    need_bias = need_bias and bias is not None
    dh, dw, db = linear_stats_bwd(
        hidden, weight, bias, local_ids, temperature, lse, mean_z, g_logprobs, g_entropy,
        chunk_size, backend, need_hidden, need_weight, need_bias,
    )  # fmt: skip
    if dh is not None and group_name and reduce_hidden_grad:
        # hidden is replicated over the group and every shard's logits depend on it: sum the
        # shards' contributions (in fp32, before rounding to the hidden dtype)
        torch.distributed.all_reduce(dh, group=lkdist.resolve_group(group_name))
    return (
        dh.to(hidden.dtype) if dh is not None else hidden.new_empty(0),
        dw if dw is not None else weight.new_empty(0),
        db if db is not None else weight.new_empty(0),
    )


@_linear_stats_backward.register_fake
def _(hidden, weight, bias, ids, temperature, lse, mean_z, vocab_offset, g_logprobs, g_entropy, ignore_index,
      chunk_size, backend, group_name, reduce_hidden_grad, need_hidden, need_weight, need_bias):  # fmt: skip
    return (
        torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
        torch.empty_like(weight) if need_weight else weight.new_empty(0),
        torch.empty_like(bias) if need_bias and bias is not None else weight.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, ids, temperature, *args = inputs
    _, _, lse, mean_z, offset = output
    ctx.save_for_backward(hidden, weight, bias, ids, temperature, lse, mean_z, offset)
    ctx.args = tuple(args)  # ignore_index, chunk_size, backend, group_name, reduce_hidden_grad


def _backward(ctx, g_logprobs, g_entropy, g_lse, g_mean_z, g_offset):
    hidden, weight, bias, ids, temperature, lse, mean_z, offset = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    dh, dw, db = torch.ops.lenkernels.linear_stats_backward(
        hidden, weight, bias, ids, temperature, lse, mean_z, offset, g_logprobs, g_entropy, *ctx.args,
        need_h, need_w, need_b and bias is not None,
    )  # fmt: skip
    return (
        dh if need_h else None,
        dw if need_w else None,
        db if need_b and bias is not None else None,
        None, None, None, None, None, None, None,
    )  # fmt: skip


_linear_stats.register_autograd(_backward, setup_context=_setup_context)


# --- public API ----------------------------------------------------------------------------------


def linear_logprobs_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = True,
    process_group=None,
    reduce_hidden_grad: bool = True,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of each sampled token and the entropy of its distribution, computed from
    the last hidden state and the LM head without ever materialising the ``[N, V]`` logits: the
    two-output form of :func:`lenkernels.linear_token_stats` (``outputs=("logprob", "entropy")``, no
    logit transform; the same fused ``lenkernels::linear_stats`` op and bits).

    Equivalent to ``token_logprobs_entropy(F.linear(hidden, weight, bias), ids, ...)`` (the logits
    rounded to the hidden dtype exactly like that eager GEMM), in memory bounded by ``chunk_size``.

    Args (in full at :func:`lenkernels.linear_token_stats`):
        hidden: ``[..., D]`` float32/bfloat16/float16, padded ``[B, T, D]`` or packed ``[N, D]``.
        weight: ``[V, D]`` LM head (this rank's ``[V_r, D]`` rows under ``process_group``).
        ids: ``[...]`` int32/int64 target ids (global under ``process_group``), hidden's leading shape.
        bias: optional ``[V]`` (``[V_r]``) bias of the LM head, the dtype of ``hidden``.
        temperature: a positive float or a tensor broadcastable to ``ids``: ``z = logits / T``.
        ignore_index: rows with this id get logprob 0 and no logprob gradient (entropy still counts).
        return_entropy: when False the second output is None.
        process_group: vocabulary (tensor) parallelism over the LM head's rows; every rank gets the
            full vocabulary's statistics.
        reduce_hidden_grad: under ``process_group``, all-reduce the hidden gradient over the group
            (default True); False when the caller's framework already reduces it.
        chunk_size: most logits elements held at once (default 2**26 on CUDA, 2**24 on CPU).
        backend: ``None`` (triton on CUDA, cpu on CPU), ``"triton"``, ``"cpu"`` or ``"reference"``.

    Returns:
        ``(logprobs, entropy)``: float32 of shape ``ids.shape``, differentiable in ``hidden``,
        ``weight`` and ``bias``. Gradients come back in the dtype of their input, accumulated in
        fp32. Deterministic: no atomics, tiles reduced in a fixed order.

    Memory: the triton forward holds no logits (the online-softmax state is folded into the
    matmul's epilogue); every other pass holds one ``rows x cols <= chunk_size`` tile of logits
    plus fp32 accumulators of the gradients' sizes.

    Example (packed layout, vocabulary split over a tensor-parallel group)::

        hidden = model.model(input_ids).last_hidden_state[0, :-1]    # [N, D], N tokens in total
        lp, ent = linear_logprobs_entropy(
            hidden, lm_head_shard.weight, input_ids[0, 1:], temperature=0.7, process_group=tp_group
        )
    """
    _checks.flags(return_entropy=return_entropy)
    s = _main.linear_token_stats(
        hidden, weight, ids, bias=bias, temperature=temperature, ignore_index=ignore_index,
        outputs=("logprob", "entropy"), chunk_size=chunk_size, process_group=process_group,
        reduce_hidden_grad=reduce_hidden_grad, backend=backend,
    )  # fmt: skip
    return s.logprob, (s.entropy if return_entropy else None)


# the main entry of this family (it imports this module: bound at the end, after every definition)
from lenkernels.ops import linear_token_stats as _main
