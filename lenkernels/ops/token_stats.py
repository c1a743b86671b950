"""Token log-probabilities and entropy from logits (SPEC 1), one read of the logits per pass.

Chain of names: ``token_stats`` (public, SPEC 1 and 7; ``token_logprobs_entropy`` is its
two-output form, ``token_logprobs`` / ``token_entropy`` its one-output forms) -> for logprob/entropy
only, ``lenkernels::token_stats`` (custom op with autograd; ``lenkernels::token_stats_vocab_parallel``
under a process group) -> ``token_stats_fwd`` / ``token_stats_bwd`` (host launchers, one per
backend) -> kernels (``triton/token_stats.py``, ``csrc/cpu/token_stats.cpp``,
``csrc/cuda/token_stats.cu``); with ``sum_p2``/``argmax``/``mean_logit``,
``lenkernels::token_stats_extra`` -> ``token_stats_extra_fwd`` / ``token_stats_extra_bwd`` launchers
(triton, cuda, cpu, reference).
The sparse outputs (top-k, gathered, kept set) go to ``lenkernels::token_stats_sparse``
(``ops/token_stats_sparse.py``): the same dense kernels plus a gather of a few logits per row.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lenkernels import _backend, _checks
from lenkernels.ops import _library

FAMILY = "token_stats"
# On CUDA tensors the CUDA C++ kernels are the default: the static SASS report
# (benchmarks/results/sass-sm90.json) has their backward at 16 instructions per logit with 128-bit
# loads and stores against Triton's 33 with 2-byte accesses (forwards: 10 and 11). The outputs
# beyond logprob/entropy (token_stats(outputs=...)) are a family of their own; there too the CUDA
# C++ kernels are the default on CUDA tensors, by the same report: forward 13.4 instructions per
# logit against Triton's 19.3, backward 20.2 with one exp a logit against 34.7 with two, 128-bit
# accesses on both (bf16, sm_90).
_backend.register_family(FAMILY, ("triton", "cuda", "cpu", "reference"), prefer={"cuda": ("cuda", "triton")})
EXTRA_FAMILY = "token_stats_extra"
_backend.register_family(
    EXTRA_FAMILY, ("triton", "cuda", "cpu", "reference"), prefer={"cuda": ("cuda", "triton")}, module=FAMILY
)


def _rows(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [N, V] with unit stride along V: a view when the layout allows, else one copy."""
    x = logits.reshape(-1, logits.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def _is_row_view(logits: torch.Tensor) -> bool:
    """Whether _rows(logits) aliases logits (required to write the gradient in place)."""
    x = _rows(logits)
    return x.numel() == 0 or x.data_ptr() == logits.data_ptr() and x.stride(-1) == 1 and logits.stride(-1) == 1


def token_stats_fwd(logits, ids, temperature, ignore_index: int, backend: str, state: bool = False, sparse=None):
    """Host launcher: ``(logprobs, entropy, lse, mean_z)``, fp32 of shape ``ids.shape``.

    ``state=True`` appends each row's online-softmax state ``(max_z, log_s)`` (``lse = max_z +
    log_s``): what ``lenkernels.distributed.merge_stats`` needs to merge vocabulary parts without
    the rounding of ``lse`` at the size of the logits. ``sparse``: keyword arguments for a backend
    whose kernel also gathers (``SPARSE_IN_KERNEL``; ``ops/token_stats_sparse.py``).
    """
    shape = ids.shape
    x = _rows(logits)
    y = ids.reshape(-1)
    n_rows, vocab = x.shape
    outs = [torch.empty(n_rows, dtype=torch.float32, device=logits.device) for _ in range(6 if state else 4)]
    if n_rows == 0:
        return tuple(o.reshape(shape) for o in outs)
    kernels = _backend.kernels(backend, FAMILY)
    if _checks.value_checks(y.device) and not getattr(kernels, "IDS_CHECKED_IN_KERNEL", False):
        _checks.ids_in_range(y, vocab, ignore_index)
    kernels.token_stats_fwd(x, y.contiguous(), temperature, ignore_index, *outs, **(sparse or {}))
    return tuple(o.reshape(shape) for o in outs)


def token_stats_bwd(logits, ids, temperature, lse, mean_z, g_logprobs, g_entropy, ignore_index, backend, dlogits,
                    sparse=None):  # fmt: skip
    """Host launcher: writes ``dlogits`` ([..., V], logits dtype; may be ``logits`` itself);
    ``sparse`` as in :func:`token_stats_fwd` (the sparse gradient terms added by the kernel)."""
    x = _rows(logits)
    if x.shape[0] == 0:
        return
    g_lp = g_logprobs.reshape(-1).to(torch.float32)
    g_h = g_entropy.reshape(-1).to(torch.float32)
    _backend.kernels(backend, FAMILY).token_stats_bwd(
        x, ids.reshape(-1).contiguous(), temperature, lse.reshape(-1), mean_z.reshape(-1), g_lp, g_h, ignore_index,
        dlogits.view(-1, dlogits.shape[-1]), **(sparse or {}),
    )  # fmt: skip


# --- torch.library registration -------------------------------------------------------------


def _token_stats(
    logits: torch.Tensor,
    ids: torch.Tensor,
    temperature: torch.Tensor,
    ignore_index: int,
    inplace_backward: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return token_stats_fwd(logits, ids, temperature, ignore_index, backend)


_TOKEN_STATS_ARGS = _token_stats  # the undecorated function: its typed arguments, for the vocab-parallel op
_token_stats = torch.library.custom_op("lenkernels::token_stats", _token_stats, mutates_args=())


@_token_stats.register_fake
def _(logits, ids, temperature, ignore_index, inplace_backward, backend):
    return tuple(torch.empty(ids.shape, dtype=torch.float32, device=logits.device) for _ in range(4))


def _token_stats_backward(
    logits: torch.Tensor,
    ids: torch.Tensor,
    temperature: torch.Tensor,
    lse: torch.Tensor,
    mean_z: torch.Tensor,
    g_logprobs: torch.Tensor,
    g_entropy: torch.Tensor,
    ignore_index: int,
    backend: str,
) -> torch.Tensor:
    dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    token_stats_bwd(logits, ids, temperature, lse, mean_z, g_logprobs, g_entropy, ignore_index, backend, dlogits)
    return dlogits


def _backward_into_logits(logits, *args) -> None:
    token_stats_bwd(logits, *args, logits)


_library.writing_twin(
    "lenkernels::token_stats_backward_", _token_stats_backward, _backward_into_logits, mutates="logits",
    doc="Overwrites ``logits`` with d(loss)/d(logits): saves the [N, V] gradient buffer.",
)  # fmt: skip
_token_stats_backward = torch.library.custom_op(
    "lenkernels::token_stats_backward", _token_stats_backward, mutates_args=()
)


@_token_stats_backward.register_fake
def _(logits, ids, temperature, lse, mean_z, g_logprobs, g_entropy, ignore_index, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup_context(ctx, inputs, output):
    """Saves ``(logits, ids, temperature, lse, mean_z[, vocab_offset])`` for :func:`_backward` and
    :func:`_vp_backward` (the vocabulary-parallel op has one more input and output)."""
    logits, ids, temperature, ignore_index, inplace_backward, backend = inputs[:6]
    ctx.save_for_backward(logits, ids, temperature, *output[2:])
    ctx.ignore_index = ignore_index
    ctx.inplace = inplace_backward
    ctx.backend = backend


def _logits_grad(logits, args, inplace: bool) -> torch.Tensor:
    """d(loss)/d(logits) from the backward op; written over ``logits`` when asked and it is a row view."""
    if inplace and _is_row_view(logits):
        torch.ops.lenkernels.token_stats_backward_(logits, *args)
        return logits
    return torch.ops.lenkernels.token_stats_backward(logits, *args)


def _backward(ctx, g_logprobs, g_entropy, g_lse, g_mean_z):
    logits, ids, temperature, lse, mean_z = ctx.saved_tensors
    args = (ids, temperature, lse, mean_z, g_logprobs, g_entropy, ctx.ignore_index, ctx.backend)
    return _logits_grad(logits, args, ctx.inplace), None, None, None, None, None


_token_stats.register_autograd(_backward, setup_context=_setup_context)


# --- vocabulary parallelism (lenkernels.distributed) ---------------------------------------------
# Each rank reduces its shard of the vocabulary to its state (max_r, log S_r), H_r and, where it
# holds the target, (z_y - max_r) - log S_r; two all-reduces merge them (distributed.merge_stats).
# Backward needs no communication: SPEC 1's gradient of a shard only reads the merged lse and mean_z.


def _token_stats_vocab_parallel(logits, ids, temperature, ignore_index, inplace_backward, backend, group_name):
    """``(logprobs, entropy, lse, mean_z, vocab_offset)`` of the full vocabulary; ``logits`` is
    this rank's shard of it, ``ids`` are global. The arguments of ``lenkernels::token_stats`` and
    the process group's name."""
    from lenkernels import distributed as lkdist

    group = lkdist.resolve_group(group_name)
    vocab = logits.shape[-1]
    sizes = lkdist.shard_sizes(vocab, group, logits.device)
    offset = lkdist.vocab_offset(sizes, group)
    if _checks.value_checks(ids.device):
        lkdist.global_vocab_check(ids, sizes, ignore_index)
    local = lkdist.shard_local_ids(ids, offset, vocab, ignore_index)
    # rows whose target is elsewhere contribute only their softmax state: treat them as ignored
    fwd_ids = lkdist.chunk_ids(local.reshape(-1), 0, vocab, for_backward=False).reshape(ids.shape)
    lp, ent, _, _, max_z, log_s = token_stats_fwd(logits, fwd_ids, temperature, lkdist.IGNORED, backend, state=True)
    lp, ent, lse, mean_z = lkdist.merge_stats(max_z, log_s, ent, lp, local >= 0, group=group)
    lp = torch.where(ids == ignore_index, torch.zeros_like(lp), lp)
    return lp, ent, lse, mean_z, offset


_token_stats_vocab_parallel = torch.library.custom_op(
    "lenkernels::token_stats_vocab_parallel",
    _library.with_arguments(
        _token_stats_vocab_parallel, _TOKEN_STATS_ARGS, ("group_name", str), returns=tuple[(torch.Tensor,) * 5]
    ),
    mutates_args=(),
)


@_token_stats_vocab_parallel.register_fake
def _(logits, ids, temperature, ignore_index, inplace_backward, backend, group_name):
    stats = tuple(torch.empty(ids.shape, dtype=torch.float32, device=logits.device) for _ in range(4))
    return (*stats, torch.empty(1, dtype=torch.int64, device=logits.device))


def _vp_backward(ctx, g_logprobs, g_entropy, g_lse, g_mean_z, g_offset):
    from lenkernels import distributed as lkdist

    logits, ids, temperature, lse, mean_z, offset = ctx.saved_tensors
    # shard-local ids: -1 ignored, -2 target on another rank (still gets the -p_j logprob term)
    local = lkdist.shard_local_ids(ids, offset, logits.shape[-1], ctx.ignore_index)
    if ctx.backend == "reference":
        from lenkernels.reference.linear_stats import shard_dlogits

        x = logits.reshape(-1, logits.shape[-1])
        dlogits = shard_dlogits(
            x, local.reshape(-1), temperature, lse.reshape(-1), mean_z.reshape(-1),
            g_logprobs.reshape(-1), g_entropy.reshape(-1),
        ).reshape(logits.shape)  # fmt: skip
        return dlogits, None, None, None, None, None, None
    args = (local, temperature, lse, mean_z, g_logprobs, g_entropy, lkdist.IGNORED, ctx.backend)
    return _logits_grad(logits, args, ctx.inplace), None, None, None, None, None, None


_token_stats_vocab_parallel.register_autograd(_vp_backward, setup_context=_setup_context)


def _check_token_args(logits, ids, temperature, ignore_index, backend: str) -> torch.Tensor:
    """The checks of the token ops' arguments once the backend is chosen; the temperature as the
    fp32 tensor the ops take."""
    _checks.logits_dtype(logits, backend)
    _checks.ids_match(logits, ids)
    if logits.shape[-1] == 0:
        raise ValueError("logits must have a non-empty vocabulary (last) dimension")
    _checks.index(ignore_index, "ignore_index")
    return _checks.temperature(temperature, ids)


class TokenStats(NamedTuple):
    """Per-token statistics of ``lenkernels.token_stats`` (float32 of ``ids.shape``; ``argmax`` int64;
    ``topk_ids`` int64 and ``topk_logprobs`` ``[..., top_k]``; ``gathered_logprobs`` ``[..., K]``); a
    field whose output was not asked for is None."""

    logprob: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    sum_p2: torch.Tensor | None = None
    log_sum_p2: torch.Tensor | None = None
    argmax: torch.Tensor | None = None
    max_logprob: torch.Tensor | None = None
    mean_logit: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    gathered_logprobs: torch.Tensor | None = None
    kept_logprob: torch.Tensor | None = None
    kept_entropy: torch.Tensor | None = None
    kept_log_mass: torch.Tensor | None = None


DENSE_EXTRA = ("sum_p2", "argmax", "mean_logit")  # the outputs of the extended kernels
TWO_OUTPUT = frozenset(("logprob", "entropy"))  # the outputs of lenkernels::token_stats
OUTPUTS = ("logprob", "entropy", *DENSE_EXTRA, "topk", "gathered", "kept")
# each TokenStats field, and the output name that asks for it
FIELD_OUTPUT = {"logprob": "logprob", "entropy": "entropy", "sum_p2": "sum_p2", "log_sum_p2": "sum_p2",
                "argmax": "argmax", "max_logprob": "argmax", "mean_logit": "mean_logit", "topk_ids": "topk",
                "topk_logprobs": "topk", "gathered_logprobs": "gathered", "kept_logprob": "kept",
                "kept_entropy": "kept", "kept_log_mass": "kept"}  # fmt: skip


def family_of(wanted) -> str:
    """The backend family that computes the outputs ``wanted``: the extended kernels' when a dense
    statistic beyond logprob/entropy is asked for, else token_stats' (the sparse outputs run on it)."""
    return EXTRA_FAMILY if set(wanted) & set(DENSE_EXTRA) else FAMILY


def token_stats(
    logits: torch.Tensor,
    ids: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    ignore_index: int = -100,
    outputs=("logprob", "entropy"),
    top_k: int = 0,
    gather_ids: torch.Tensor | None = None,
    kept_ids: torch.Tensor | None = None,
    sampling: dict | None = None,
    inplace_backward: bool = False,
    process_group=None,
    backend: str | None = None,
) -> TokenStats:
    """Every per-token vocabulary statistic asked for, from one read of the logits (SPEC 1, 7).

    Args:
        logits: ``[..., V]`` float32, bfloat16 or float16 (float64 with ``backend="reference"``),
            padded ``[B, T, V]`` or packed ``[N, V]``. Any strides: a layout that cannot be viewed
            as ``[N, V]`` rows with unit stride along V is copied once.
        ids: ``[...]`` int32/int64 token ids, the leading shape of ``logits``.
        temperature: a positive float, or a tensor broadcastable to ``ids`` (per token ``[B, T]``,
            per sequence ``[B, 1]``). Applied in fp32 inside the kernel: ``z = logits / T``. Not
            differentiable.
        ignore_index: rows with this id get logprob 0 and no logprob gradient; their entropy is
            still computed.
        outputs: names of the statistics wanted (any order, at least one) among
            ``"logprob"``, ``"entropy"`` (SPEC 1), ``"sum_p2"`` (fields ``sum_p2 = sum_j p_j^2``, verl's
            optimal-token baseline, and ``log_sum_p2 = logsumexp(2z) - 2 lse``, TRL's
            ``log_sum_sq_probs``; both without cancellation), ``"argmax"`` (fields ``argmax``: the
            lowest id among the maxima of z, int64, 0 for an all ``-inf`` row; and ``max_logprob =
            max z - lse``; TRL's is-top1 is ``argmax == ids``), ``"mean_logit"`` (``(1/V) sum_j
            z_j`` over the finite entries of the vocabulary, V = the full last dimension), and the
            sparse statistics:

            - ``"topk"`` (needs ``top_k``): ``topk_ids`` int64 and ``topk_logprobs = z - lse``, both
              ``[..., top_k]``: the ``top_k`` largest z in descending order, ties to the lower id
              (exactly, also where bf16 ties straddle the k-th place);
            - ``"gathered"`` (needs ``gather_ids``): ``gathered_logprobs`` ``[..., K]`` ``= z_g - lse``
              at ``gather_ids`` (0, without gradient, at -1 padding): the student's logprobs at a
              teacher's top-k ids (on-policy distillation);
            - ``"kept"`` (needs ``kept_ids`` or ``sampling``): for a kept set K (a sampler's
              truncation), ``kept_logprob = z_y - logsumexp_K z``, ``kept_entropy`` (the entropy of
              softmax(z) restricted to K and renormalised) and ``kept_log_mass = logsumexp_K z - lse``.
        top_k: int in ``[0, V]``; ``>= 1`` exactly when ``"topk"`` is asked for.
        gather_ids: ``[..., K]`` int32/int64 ids (K >= 0) of the leading shape of ``logits``, -1 padding.
        kept_ids: ``[..., K]`` int32/int64 ids (K >= 1), -1 padding (repeats count once): each row's kept set.
        sampling: instead of ``kept_ids``, the kept set of vLLM's sampler replayed at this
            temperature: ``dict(top_k=..., top_p=..., min_p=...)`` (missing keys, ``top_k`` 0 / -1,
            ``top_p=1`` and ``min_p=0`` disable a step). In SPEC 7's order (vLLM's V0 sampler):
            top-k keeps every z >= the k-th largest (ties all kept); top-p then keeps the smallest
            prefix of the survivors (z descending, ties by id ascending) whose renormalised mass
            reaches p, the crossing token included (masses in float64); min-p keeps p_j >= min_p *
            max p. Ids of zero probability are never kept. vLLM's V1 sampler applies min-p before
            top-k/top-p: with both top_p and min_p set its set may differ.
        inplace_backward: write d(loss)/d(logits) into ``logits`` itself during backward, saving an
            ``[N, V]`` buffer. Only when nothing else needs ``logits`` afterwards (ValueError when
            autograd or the caller visibly still does: a leaf, a view of one, a tensor its producer
            saved); ignored (a new tensor is returned) when ``logits`` cannot be viewed as rows.
            Only with outputs among logprob/entropy (NotImplementedError otherwise).
        process_group: vocabulary (tensor) parallelism: ``logits`` is this rank's shard of the
            vocabulary (shards in rank order along V, sizes free), ``ids``, ``gather_ids`` and
            ``kept_ids`` hold global ids (the same on every rank), V (for ``top_k`` and the id checks)
            is the global vocabulary, and every output equals the full vocabulary's on every rank: the
            dense statistics from merged per-shard states (``sum_p2`` merges ``logsumexp(2z)`` like the
            lse, ``argmax`` is the lowest global id among the maxima), ``topk`` from each rank's local
            top-k merged (ties to the lower global id across shards), gathered/kept logits from the rank
            owning each id. Each rank's ``logits`` gets its shard's gradient; the backward needs no
            communication. ``sampling`` needs ``top_k`` (``0 < top_k < V``; top-p / min-p then apply to
            the merged top-k survivors) or no truncation at all: top-p or min-p without top-k raise
            NotImplementedError. Outputs of only logprob/entropy run one vocabulary-parallel custom op
            (two all-reduces of 4 floats per token, plus one of the shard sizes); with any other output
            the forward runs the backend's dense kernels on the shard (two reads of it with
            ``sum_p2``/``argmax``/``mean_logit``: the softmax-state kernel and the extended one) and the
            gradient is computed with torch operations on it (one gradient tensor, float32, float64 on
            the reference backend; not a custom op: under ``torch.compile`` a graph break). Collectives
            per call: one all-gather of the shard sizes (a host sync for V), two all-reduces of the
            softmax states, one of the logits at the target / gathered / kept ids (``[..., 1 + K]``),
            two more (SUM, MIN) for ``sum_p2``/``argmax``/``mean_logit``, two all-gathers of
            ``[..., top_k]`` candidates for ``topk`` (``sampling``: of the top-k candidates, ties
            included, after one all-reduce of their width, a host sync). Default None: the whole
            vocabulary is here.
        backend: ``None`` (CUDA tensors: the CUDA C++ kernels, Triton where they are missing; CPU
            tensors: cpu), ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"``.

    Returns:
        ``TokenStats``: the fields asked for, None elsewhere. Every float field is differentiable in
        ``logits``. ``logprob = z_y - logsumexp(z)``, ``entropy = logsumexp(z) - sum_j p_j z_j``. A
        row of all ``-inf`` gives NaN in every float field (``-inf`` entries elsewhere are a masked
        vocabulary); rows with ``ids == ignore_index`` get logprob and kept_logprob 0 (no gradient),
        their other statistics are still computed. A valid id outside its kept set raises ValueError
        where value checks run (CPU tensors, ``LENKERNELS_DEBUG=1``), else gives NaN in the row's
        kept statistics.

    Reads of the logits: the dense statistics one (forward) and one plus one gradient write
    (backward), whatever the combination; ``gathered`` and ``kept_ids`` add K reads per row (and
    K read-modify-writes of the gradient); ``topk`` and ``sampling`` with top-k add one read of the
    logits for the selection (on CPU tensors an exact top-k kernel; elsewhere ``torch.topk`` of
    2k + 8 candidates), ``sampling`` with top-p or min-p but no top-k at most three reads on CPU
    tensors (the max, the mass and the ids near the top, all ids only where the cut lies below them),
    elsewhere a float64 pass and ``torch.topk`` of 256, 1024, ... candidates until each row's set
    ends (at worst a sort of the row, ``O(V log V)``, in row chunks). ``topk`` and ``sampling`` sync the
    host (free on CPU tensors; under ``torch.compile`` they are opaque custom ops, the kept set's
    width an unbacked size).

    ``outputs`` of only logprob/entropy run the two-output kernels (``token_logprobs_entropy``'s:
    one custom op, the same launches and bits whichever of the two is asked for).
    ``sum_p2``/``argmax``/``mean_logit`` run the extended kernels (which also compute logprob and
    entropy, with the same per-chunk arithmetic, and on the cuda backend the same bits); on CUDA
    tensors ``backend=None`` runs them with the CUDA C++ kernels, as the two-output path. The sparse
    outputs run on any backend's kernels.

    Example (packed layout, per-sequence temperature)::

        logits = model(input_ids).logits[0, :-1]          # [N, V], N tokens of all sequences
        st = token_stats(logits, input_ids[0, 1:], temperature=0.7)   # st.logprob, st.entropy

    Example (on-policy distillation: the student's logprobs at the teacher's top-20 ids)::

        st = token_stats(student_logits, ids, outputs=("logprob", "gathered"), gather_ids=teacher_topk_ids)
        kl = (teacher_topk_probs * (teacher_topk_logprobs - st.gathered_logprobs)).sum(-1)

    Example (the trainer's logprob under the rollout's truncated distribution, vLLM top_p=0.95 / top_k=20)::

        st = token_stats(logits, ids, temperature=0.6, outputs=("kept",), sampling=dict(top_k=20, top_p=0.95))
    """
    sparse = _sparse
    if isinstance(outputs, str) or not isinstance(outputs, (tuple, list)):
        raise TypeError(f"outputs must be a tuple or list of names among {OUTPUTS}, got {outputs!r}")
    wanted = set()
    for name in outputs:
        if name not in OUTPUTS:
            raise ValueError(f"unknown token_stats output {name!r}: expected names among {OUTPUTS}")
        wanted.add(name)
    if not wanted:
        raise ValueError(f"outputs must name at least one statistic among {OUTPUTS}")
    _checks.flags(inplace_backward=inplace_backward)
    two_output = wanted <= TWO_OUTPUT  # the two-output op: no extended or sparse kernels
    if inplace_backward and not two_output:
        raise NotImplementedError(
            "inplace_backward=True needs outputs among ('logprob', 'entropy') (only the two-output kernels "
            f"write the gradient in place), got outputs={tuple(outputs)}: pass inplace_backward=False"
        )
    if inplace_backward and isinstance(logits, torch.Tensor):
        _checks.inplace_target(logits)
    _checks.tensor(logits, "logits", min_dim=1)
    extra = bool(wanted & set(DENSE_EXTRA))
    name = _backend.resolve(backend, family_of(wanted), logits.device)
    temp = _check_token_args(logits, ids, temperature, ignore_index, name)
    shard = group = None
    if process_group is not None:
        from lenkernels.distributed import group_name

        group = group_name(process_group)  # type check
        if not two_output:
            if not torch.compiler.is_compiling() and extra:
                _extra_kernels(name)
            shard = sparse.vp.vocab_shard(logits, process_group)
    vocab = logits.shape[-1] if shard is None else shard.vocab
    # with two outputs the checks only reject sparse arguments, whatever V is
    top_k, gather_ids, kept_ids, sampling = sparse.check_args(wanted, ids, vocab, top_k, gather_ids, kept_ids, sampling)
    if two_output:
        if group is None:
            lp, ent, _, _ = torch.ops.lenkernels.token_stats(logits, ids, temp, ignore_index, inplace_backward, name)
        else:
            lp, ent, _, _, _ = torch.ops.lenkernels.token_stats_vocab_parallel(
                logits, ids, temp, ignore_index, inplace_backward, name, group
            )
        return TokenStats(logprob=lp if "logprob" in wanted else None, entropy=ent if "entropy" in wanted else None)
    if shard is not None or wanted & set(sparse.SPARSE_OUTPUTS):
        if _checks.value_checks(ids.device):
            _checks.ids_in_range(ids, vocab, ignore_index)
        fields = sparse.sparse_token_stats(
            logits, ids, temp, ignore_index, wanted, top_k, gather_ids, kept_ids, sampling, extra, name, shard
        )
        return TokenStats(**fields)
    if not torch.compiler.is_compiling():  # raise before the op (it raises inside too when traced)
        _extra_kernels(name)
    lp, ent, _, _, sp2, lsp2, amax, mlp, mean = torch.ops.lenkernels.token_stats_extra(
        logits, ids, temp, ignore_index, name
    )
    has = wanted.__contains__
    return TokenStats(
        logprob=lp if has("logprob") else None,
        entropy=ent if has("entropy") else None,
        sum_p2=sp2 if has("sum_p2") else None,
        log_sum_p2=lsp2 if has("sum_p2") else None,
        argmax=amax if has("argmax") else None,
        max_logprob=mlp if has("argmax") else None,
        mean_logit=mean if has("mean_logit") else None,
    )


# --- public API --------------------------------------------------------------------------------


def token_logprobs_entropy(
    logits: torch.Tensor,
    ids: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = True,
    inplace_backward: bool = False,
    process_group=None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of each sampled token and the entropy of its distribution, in one pass: the
    two-output form of :func:`token_stats` (``outputs=("logprob", "entropy")``; the same custom op,
    kernels and bits).

    Args (in full at :func:`token_stats`):
        logits: ``[..., V]`` float32/bfloat16/float16, padded ``[B, T, V]`` or packed ``[N, V]``, any
            strides (a layout that is not ``[N, V]`` rows with unit stride along V is copied once).
        ids: ``[...]`` int32/int64 token ids, the leading shape of ``logits``.
        temperature: a positive float or a tensor broadcastable to ``ids`` (per token or per
            sequence): ``z = logits / T`` in fp32. Not differentiable.
        ignore_index: rows with this id get logprob 0 and no logprob gradient (entropy still counts).
        return_entropy: when False the second output is None (it costs nothing extra to compute).
        inplace_backward: write d(loss)/d(logits) into ``logits`` itself during backward, saving an
            ``[N, V]`` buffer, when nothing else needs ``logits`` afterwards.
        process_group: vocabulary (tensor) parallelism: ``logits`` is this rank's shard along V,
            ``ids`` are global; every rank gets the full vocabulary's statistics.
        backend: ``None``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"``.

    Returns:
        ``(logprobs, entropy)``: float32 of shape ``ids.shape``; differentiable in ``logits``
        through both. ``logprob = z_y - logsumexp(z)``, ``entropy = logsumexp(z) - sum_j p_j z_j``.
        A row of all ``-inf`` gives NaN in both; ``-inf`` entries elsewhere are a masked vocabulary.

    Example (packed layout, per-sequence temperature)::

        logits = model(input_ids).logits[0, :-1]          # [N, V], N tokens of all sequences
        lp, ent = token_logprobs_entropy(logits, input_ids[0, 1:], temperature=0.7)

    Example (vocabulary split over a tensor-parallel group, each rank holding [N, V_r])::

        lp, ent = token_logprobs_entropy(logits_shard, global_ids, process_group=tp_group)
    """
    _checks.flags(return_entropy=return_entropy)
    s = token_stats(
        logits, ids, temperature=temperature, ignore_index=ignore_index, outputs=("logprob", "entropy"),
        inplace_backward=inplace_backward, process_group=process_group, backend=backend,
    )  # fmt: skip
    return s.logprob, (s.entropy if return_entropy else None)


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """``token_logprobs_entropy(...)[0]``: log-probabilities of ``ids`` (same arguments)."""
    return token_logprobs_entropy(logits, ids, return_entropy=False, **kwargs)[0]


def token_entropy(logits: torch.Tensor, *, ids: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """Entropy of each row of ``logits`` (float32, shape ``logits.shape[:-1]``).

    ``ids`` is optional: without it every row is treated as ignored for the logprob part.
    """
    if ids is None:
        ignore_index = kwargs.get("ignore_index", -100)
        ids = torch.full(logits.shape[:-1], ignore_index, dtype=torch.int64, device=logits.device)
    return token_logprobs_entropy(logits, ids, **kwargs)[1]


from lenkernels.ops import token_stats_sparse as _sparse  # registers its custom ops
from lenkernels.ops.token_stats_extra import _extra_kernels  # registers its custom ops
