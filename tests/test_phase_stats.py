"""Phase-split statistics (SPEC 6), the fused logits path and per-sequence token statistics,
against the float64 reference and an independent brute-force delimiter search, on every backend."""

from __future__ import annotations

import math
import os
import random
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import lenkernels as lk
from lenkernels.cpu import phase_stats as cpu_phase
from lenkernels.ops import phase_stats as ops
from lenkernels.ops import sequence_stats as seq_ops
from lenkernels.ops.quantile import quantile_threshold
from lenkernels.reference import phase_stats as ref
from lenkernels.reference import token_stats as ref_tokens
from tests.fuzz import examples
from tests.utils import GRAD_RTOL, STAT_RTOL, assert_close, backend_params, nan_like

BACKENDS = backend_params("phase_stats")

# Token ids: filler tokens never take part in a delimiter; the delimiters are built from 3 and 4.
# The three-token delimiter repeats its first token, so "3 3 3 4" must match one token late.
FILLER = list(range(10, 20))
DELIMITERS = {1: [3], 3: [3, 3, 4]}
PAD_IDS = [0, 3, 4]  # padding and prompts hold delimiter tokens too: they must never match


# --- an independent definition: plain Python over lists ---------------------------------------------


def brute_force(ids, valid, delim):
    """(k, found, think positions, answer positions) of one sequence, from SPEC 6 word for word."""
    n, width = len(ids), len(delim)
    k = n
    for t in range(n - width + 1):
        if all(valid[t + j] and ids[t + j] == delim[j] for j in range(width)):
            k = t
            break
    think = [t for t in range(n) if valid[t] and t < k]
    answer = [t for t in range(n) if valid[t] and t >= k + width]
    return k, k < n, think, answer


def _filler(rng, n):
    return [(rng.choice(FILLER), 1) for _ in range(n)]


def _scenarios(rng, delim):
    """One response per case, as (id, is_response) pairs; the name says what it exercises."""
    width = len(delim)
    d = [(t, 1) for t in delim]
    partial = d[: width - 1]
    cases = {
        "start": d + _filler(rng, 6),  # empty think phase
        "end": _filler(rng, 7) + d,  # empty answer phase
        "middle": _filler(rng, 4) + d + _filler(rng, 5),
        "missing": _filler(rng, 9),  # every token is think, found = False
        "repeated": _filler(rng, 2) + d + _filler(rng, 3) + d + _filler(rng, 2),  # the first one counts
        "partial_end": _filler(rng, 8) + partial,  # a partial match at the end does not count
        "overlap": _filler(rng, 3) + [(3, 1)] + d + _filler(rng, 3),  # "3 3 3 4": match starts one late
        # the delimiter's tail (head) lies in masked padding: split across the padding boundary
        "split_pad_right": _filler(rng, 6) + partial + [(t, 0) for t in delim[width - 1 :]],
        "split_pad_left": [(delim[0], 0)] + [(t, 1) for t in delim[1:]] + _filler(rng, 6),
        # a masked gap (tool output) inside the delimiter, or a masked one-token delimiter: no occurrence
        "gap": _filler(rng, 3) + (d[:1] + [(19, 0)] + d[1:] if width > 1 else [(delim[0], 0)]) + _filler(rng, 3),
        "empty": [],  # no response tokens at all
        "noise": [(rng.choice([3, 4, 3, 11]), int(rng.random() < 0.85)) for _ in range(14)],
        "only_delimiter": list(d),  # both phases empty
    }
    return cases


def make_batch(layout, width, seed, mask_dtype=torch.bool, only=None, T=29):
    """ids, mask (and cu_seqlens for packed) holding every scenario (or those in ``only``) once;
    returns the scenario names too. Padded rows have T tokens (29: odd, longer than every case,
    not a multiple of any block size)."""
    rng = random.Random(seed)
    delim = DELIMITERS[width]
    cases = _scenarios(rng, delim)
    names = [n for n in cases if only is None or n in only]
    seqs = [cases[n] for n in names]
    if layout == "packed":
        ids, valid, cu = [], [], [0]
        for seq in seqs:
            prompt = [(rng.choice(PAD_IDS), 0) for _ in range(rng.randint(0, 4))]
            if rng.random() < 0.5:
                prompt += [(t, 0) for t in delim]  # a delimiter inside the (masked) prompt
            toks = prompt + seq
            ids += [t for t, _ in toks]
            valid += [v for _, v in toks]
            cu.append(len(ids))
        trailing = 3  # tokens after the last sequence (a packer's alignment padding): no sequence
        ids += [delim[0]] * trailing
        valid += [1] * trailing
        return (torch.tensor(ids), torch.tensor(valid).to(mask_dtype), torch.tensor(cu), names)
    rows_ids, rows_valid = [], []
    for seq in seqs:
        pad = [(rng.choice(PAD_IDS), 0) for _ in range(T - len(seq))]
        row = seq + pad if layout == "right" else pad + seq
        rows_ids.append([t for t, _ in row])
        rows_valid.append([v for _, v in row])
    return torch.tensor(rows_ids), torch.tensor(rows_valid).to(mask_dtype), None, names


def _flat(ids, mask, cu):
    """(ids [N], valid [N], cu [S + 1]) of either layout, for the reference and the brute force."""
    if cu is None:
        cu = ref.padded_offsets(ids.shape[0], ids.shape[1])
    return ids.reshape(-1), (mask != 0).reshape(-1), cu


def _values(shape, valid, dtype=torch.float32):
    """Random values with NaN on non-response tokens: a kernel that reads them shows it."""
    v = torch.randn(shape) * 2 + 0.5
    v = torch.where(valid.reshape(v.shape[-len(valid.shape) :]) != 0, v, torch.full_like(v, float("nan")))
    return v.to(dtype)


def _abs_phase_sums(values, think, answer, cu):
    """Sum of |value| per sequence and phase: the magnitude an fp32 sum's error grows with."""
    v = values.double().abs().nan_to_num(0.0).reshape(-1)
    seq, _, _ = ref._segments(cu, v.numel())
    n_seq = cu.numel() - 1
    idx = seq.clamp(min=0)
    out = []
    for member in (think, answer):
        out.append(torch.zeros(n_seq, dtype=torch.float64).index_add(0, idx, torch.where(member, v, 0.0)))
    return out


# --- forward -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("width", [1, 3], ids=["one_token", "three_tokens"])
@pytest.mark.parametrize(
    "layout,mask_dtype",
    [("right", torch.bool), ("left", torch.int64), ("packed", torch.float32)],
    ids=["right_pad", "left_pad", "packed"],
)
def test_phase_stats_matches_reference_and_brute_force(backend, device, width, layout, mask_dtype):
    ids, mask, cu, names = make_batch(layout, width, seed=width * 7 + len(layout), mask_dtype=mask_dtype)
    delim = DELIMITERS[width]
    flat_ids, valid, flat_cu = _flat(ids, mask, cu)
    values = _values(ids.shape, mask)
    dev = lambda x: None if x is None else x.to(device)
    got = lk.phase_stats(dev(values), dev(ids), dev(mask), delimiter=delim, cu_seqlens=dev(cu), backend=backend)
    want = ref.phase_stats(values.reshape(-1), flat_ids, valid, flat_cu, delim)
    w_tm, w_ts, w_am, w_as, w_tc, w_ac, w_k, w_found = want

    # integer outputs: exact, and equal to the brute force run on plain lists
    for b, name in enumerate(names):
        lo, hi = int(flat_cu[b]), int(flat_cu[b + 1])
        k, found, think, answer = brute_force(flat_ids[lo:hi].tolist(), valid[lo:hi].tolist(), delim)
        assert (int(got.delimiter_pos[b]), bool(got.found[b])) == (k, found), name
        assert (int(got.think_count[b]), int(got.answer_count[b])) == (len(think), len(answer)), name
    assert torch.equal(got.delimiter_pos.cpu(), w_k) and torch.equal(got.found.cpu(), w_found)
    assert torch.equal(got.think_count.cpu(), w_tc) and torch.equal(got.answer_count.cpu(), w_ac)
    assert got.found.dtype == torch.bool and got.think_count.dtype == torch.int64

    think, answer, _, _ = ref.phase_masks(flat_ids, valid, flat_cu, delim)
    s_think, s_answer = _abs_phase_sums(values, think, answer, flat_cu)
    assert_close(got.think_sum, w_ts, rtol=STAT_RTOL, scale=s_think, name="think_sum")
    assert_close(got.answer_sum, w_as, rtol=STAT_RTOL, scale=s_answer, name="answer_sum")
    assert_close(got.think_mean, w_tm, rtol=STAT_RTOL, scale=s_think / w_tc.clamp(min=1), name="think_mean")
    assert_close(got.answer_mean, w_am, rtol=STAT_RTOL, scale=s_answer / w_ac.clamp(min=1), name="answer_mean")

    # SPEC 6 by case: empty phases are exactly 0 (never NaN); what counts as an occurrence
    stats = {n: b for b, n in enumerate(names)}
    for field in (got.think_mean, got.answer_mean, got.think_sum, got.answer_sum):
        assert not bool(torch.isnan(field).any()), "NaN on non-response tokens leaked into a statistic"
    found = {n: bool(got.found[b]) for n, b in stats.items()}
    assert all(found[n] for n in ("start", "end", "middle", "repeated", "overlap", "only_delimiter"))
    assert not any(found[n] for n in ("missing", "partial_end", "split_pad_right", "split_pad_left", "gap", "empty"))
    for name, field in (("start", "think"), ("end", "answer"), ("missing", "answer"), ("empty", "think"),
                        ("only_delimiter", "think"), ("only_delimiter", "answer")):  # fmt: skip
        b = stats[name]
        assert int(getattr(got, f"{field}_count")[b]) == 0, (name, field)
        assert float(getattr(got, f"{field}_mean")[b]) == 0.0 and float(getattr(got, f"{field}_sum")[b]) == 0.0
    # k = the sequence length when missing: think = mask & (t < k) then covers every response token
    b = stats["missing"]
    assert int(got.delimiter_pos[b]) == int(flat_cu[b + 1] - flat_cu[b])
    assert int(got.think_count[b]) == int(valid[int(flat_cu[b]) : int(flat_cu[b + 1])].sum())


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_delimiter_across_tile_boundaries(backend, device):
    """Rows longer than the kernels' 1024-token tile, with the delimiter straddling a tile edge,
    ending exactly at one, and a first occurrence in the second tile after partial matches in
    the first: the single-pass split must classify tokens of both tiles correctly."""
    T = 2_100
    delim = DELIMITERS[3]
    ids = torch.randint(10, 20, (4, T))
    ids[0, 1022:1025] = torch.tensor(delim)  # straddles 1023 | 1024
    ids[1, 1021:1024] = torch.tensor(delim)  # ends at the tile edge
    ids[2, 1022:1024] = torch.tensor(delim[:2])  # partial at the edge, real one later
    ids[2, 2050:2053] = torch.tensor(delim)
    mask = torch.ones(4, T, dtype=torch.bool)
    mask[3, :700] = False  # left padding, no delimiter
    values = torch.rand(4, T) * 4  # entropy-like, one sign: a sum of 2000 terms stays accurate
    got = lk.phase_entropy(values.to(device), ids.to(device), mask.to(device), delimiter=delim, backend=backend)
    assert got.delimiter_pos.tolist() == [1022, 1021, 2050, T]
    assert got.found.tolist() == [True, True, True, False]
    flat_ids, valid, cu = _flat(ids, mask, None)
    want = ref.phase_stats(values.reshape(-1), flat_ids, valid, cu, delim)
    assert_close(got.think_sum, want[1], rtol=STAT_RTOL, scale=want[1].abs(), name="think_sum")
    assert_close(got.answer_mean, want[2], rtol=STAT_RTOL, scale=want[2].abs(), name="answer_mean")
    assert got.think_count.tolist() == want[4].tolist() and got.answer_count.tolist() == want[5].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_long_reasoning_traces(backend, device):
    """32k-token traces (the length reasoning models produce): fp32 sums of ~30 000 terms stay
    within the derived tolerance, the delimiter is found deep inside, and nothing is skipped."""
    B, T = 3, 32_768
    ids = torch.randint(10, 1000, (B, T))
    ids[0, 30_001:30_004] = torch.tensor(DELIMITERS[3])
    ids[1, 5:8] = torch.tensor(DELIMITERS[3])
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[2, 31_000:] = False
    values = torch.rand(B, T) * 6
    x = values.to(device).requires_grad_(True)
    got = lk.phase_entropy(x, ids.to(device), mask.to(device), delimiter=DELIMITERS[3], backend=backend)
    (got.think_mean.sum() + got.answer_mean.sum()).backward()
    flat_ids, valid, cu = _flat(ids, mask, None)
    want = ref.phase_stats(values.reshape(-1), flat_ids, valid, cu, DELIMITERS[3])
    assert got.delimiter_pos.tolist() == [30_001, 5, T] and got.think_count.tolist() == want[4].tolist()
    assert_close(got.think_sum, want[1], rtol=STAT_RTOL, scale=want[1].abs(), name="think_sum")
    assert_close(got.answer_mean, want[2], rtol=STAT_RTOL, scale=want[2].abs(), name="answer_mean")
    expected = torch.where(torch.arange(T) < 30_001, 1.0 / 30_001, 1.0 / (T - 30_004))
    assert_close(x.grad[0], expected.masked_fill((torch.arange(T) >= 30_001) & (torch.arange(T) < 30_004), 0.0),
                 rtol=1e-6, name="dvalues")  # fmt: skip


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_values(backend, device, dtype):
    ids, mask, _, _ = make_batch("right", 3, seed=5)
    values = _values(ids.shape, mask, dtype)
    got = lk.phase_entropy(values.to(device), ids.to(device), mask.to(device), delimiter=DELIMITERS[3], backend=backend)
    flat_ids, valid, cu = _flat(ids, mask, None)
    want = ref.phase_stats(values.reshape(-1), flat_ids, valid, cu, DELIMITERS[3])  # same bf16/fp16 values
    think, answer, _, _ = ref.phase_masks(flat_ids, valid, cu, DELIMITERS[3])
    s_think, s_answer = _abs_phase_sums(values, think, answer, cu)
    assert got.think_mean.dtype == torch.float32
    assert_close(got.think_mean, want[0], rtol=STAT_RTOL, scale=s_think / want[4].clamp(min=1), name="think_mean")
    assert_close(got.answer_sum, want[3], rtol=STAT_RTOL, scale=s_answer, name="answer_sum")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_several_statistics_share_one_split(backend, device):
    """values [C, B, T]: each channel equals its own call (bitwise), the split is shared."""
    ids, mask, _, _ = make_batch("left", 3, seed=11)
    stack = torch.stack([_values(ids.shape, mask) for _ in range(3)]).to(device)
    args = {"delimiter": DELIMITERS[3], "backend": backend}
    both = lk.phase_stats(stack, ids.to(device), mask.to(device), **args)
    assert both.think_mean.shape == (3, ids.shape[0]) and both.think_count.shape == (ids.shape[0],)
    for c in range(3):
        one = lk.phase_stats(stack[c], ids.to(device), mask.to(device), **args)
        for a, b in zip(one, both):
            assert torch.equal(a, b if a.shape == b.shape else b[c])


# --- backward ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout", ["right", "left", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_matches_reference(backend, device, layout, dtype):
    ids, mask, cu, _ = make_batch(layout, 3, seed=3 + len(layout))
    values = _values(ids.shape, mask, dtype)
    n_seq = ids.shape[0] if cu is None else cu.numel() - 1
    cot = [torch.randn(n_seq) for _ in range(4)]  # random cotangents of the four float outputs
    x = values.to(device).requires_grad_(True)
    dev = lambda t: None if t is None else t.to(device)
    st = lk.phase_stats(x, dev(ids), dev(mask), delimiter=DELIMITERS[3], cu_seqlens=dev(cu), backend=backend)
    outs = (st.think_mean, st.think_sum, st.answer_mean, st.answer_sum)
    (grad,) = torch.autograd.grad(sum((o * g.to(device)).sum() for o, g in zip(outs, cot)), x)
    assert grad.dtype == dtype and grad.shape == values.shape

    flat_ids, valid, flat_cu = _flat(ids, mask, cu)
    x64 = values.double().reshape(-1).requires_grad_(True)
    w = ref.phase_stats(x64, flat_ids, valid, flat_cu, DELIMITERS[3])
    (grad64,) = torch.autograd.grad(sum((o * g.double()).sum() for o, g in zip(w[:4], cot)), x64)
    scale = torch.zeros_like(grad64)
    seq, _, _ = ref._segments(flat_cu, x64.numel())
    counts = torch.stack([w[4], w[5]]).clamp(min=1).double()
    idx = seq.clamp(min=0)
    scale += (cot[0].double() / counts[0])[idx].abs() + cot[1].double()[idx].abs()
    scale += (cot[2].double() / counts[1])[idx].abs() + cot[3].double()[idx].abs()
    assert_close(grad.reshape(-1), grad64, rtol=GRAD_RTOL[dtype], scale=scale, name="dvalues")
    think, answer, _, _ = ref.phase_masks(flat_ids, valid, flat_cu, DELIMITERS[3])
    outside = ~(think | answer)  # padding, prompts, delimiter tokens, tokens after cu_seqlens[-1]
    assert bool((grad.reshape(-1).cpu()[outside] == 0).all()), "non-phase tokens must get exactly zero"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_launchers_write_every_output(backend, device):
    """Host launchers fill NaN/sentinel-initialised outputs completely (padded: every token of
    every row belongs to a sequence, so the backward must write all of them)."""
    ids, mask, _, _ = make_batch("right", 3, seed=2)
    flat_ids, valid, cu = (t.to(device) for t in _flat(ids, mask, None))
    delim = torch.tensor(DELIMITERS[3], device=device)
    values = _values(ids.shape, mask).reshape(1, -1).to(device)
    n_seq = ids.shape[0]
    outs = [torch.full((1, n_seq), float("nan"), device=device) for _ in range(4)]
    outs += [torch.full((n_seq,), -7, dtype=torch.int64, device=device) for _ in range(3)]
    want_found = ref.find_delimiter(flat_ids.cpu(), valid.cpu(), cu.cpu(), DELIMITERS[3])[1]
    outs += [(~want_found).to(device)]  # the opposite of the answer: an unwritten flag shows
    ops.phase_stats_fwd(values, flat_ids, valid, cu, delim, backend, outs)
    assert not any(bool(torch.isnan(o).any()) for o in outs[:4])
    assert not any(bool((o == -7).any()) for o in outs[4:7])
    assert torch.equal(outs[7].cpu(), want_found)
    grads = [torch.randn(1, n_seq, device=device) for _ in range(4)]
    dvalues = nan_like(values)
    ops.phase_stats_bwd(valid, cu, outs[6], outs[4], outs[5], 3, grads, backend, dvalues)
    assert not bool(torch.isnan(dvalues).any())
    seq_outs = [torch.full((n_seq,), -7, dtype=torch.int64, device=device)]
    seq_outs += [torch.full((n_seq,), float("nan"), device=device) for _ in range(4)]
    seq_outs += [torch.ones(flat_ids.numel(), dtype=torch.bool, device=device)]
    quantile = torch.full((1,), 0.3, device=device)
    seq_ops.sequence_stats_fwd(values.reshape(-1), valid, cu, 0.5, quantile, backend, seq_outs)
    assert not bool((seq_outs[0] == -7).any()) and not any(bool(torch.isnan(o).any()) for o in seq_outs[1:5])
    assert not bool(seq_outs[5][~valid].any()), "padding tokens are never high-entropy tokens"


# --- property-based: random layouts and delimiters against the brute force -------------------------


@st.composite
def phase_cases(draw, layout):
    """Sequences over a 3-letter alphabet (partial and overlapping matches everywhere), random
    masks and delimiters of 1-4 tokens."""
    width = draw(st.integers(1, 4))
    delim = draw(st.lists(st.sampled_from([3, 4, 5]), min_size=width, max_size=width))
    n_seq = draw(st.integers(0, 5))
    seqs = draw(st.lists(st.lists(st.tuples(st.sampled_from([3, 4, 5]), st.booleans()), max_size=12),
                         min_size=n_seq, max_size=n_seq))  # fmt: skip
    return delim, seqs, layout, draw(st.integers(0, 2**31 - 1))


def _check_phase_case(case, backend):
    delim, seqs, layout, seed = case
    if layout == "packed":
        ids = torch.tensor([t for s in seqs for t, _ in s], dtype=torch.long)
        mask = torch.tensor([m for s in seqs for _, m in s], dtype=torch.bool)
        cu = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
    else:
        T = max([len(s) for s in seqs] + [1])
        ids = torch.full((len(seqs), T), 3, dtype=torch.long)  # padding ids are delimiter tokens
        mask = torch.zeros((len(seqs), T), dtype=torch.bool)
        for b, s in enumerate(seqs):
            cols = range(len(s)) if layout == "right" else range(T - len(s), T)
            for c, (t, m) in zip(cols, s):
                ids[b, c], mask[b, c] = t, m
        cu = None
    values = torch.randn(ids.shape, generator=torch.Generator().manual_seed(seed))
    got = lk.phase_stats(values, ids, mask, delimiter=delim, cu_seqlens=cu, backend=backend)
    flat_ids, valid, flat_cu = _flat(ids, mask, cu)
    v = values.reshape(-1).double()
    for b in range(flat_cu.numel() - 1):
        lo, hi = int(flat_cu[b]), int(flat_cu[b + 1])
        k, found, think, answer = brute_force(flat_ids[lo:hi].tolist(), valid[lo:hi].tolist(), delim)
        assert (int(got.delimiter_pos[b]), bool(got.found[b])) == (k, found)
        assert (int(got.think_count[b]), int(got.answer_count[b])) == (len(think), len(answer))
        for pos, mean, total in (
            (think, got.think_mean[b], got.think_sum[b]),
            (answer, got.answer_mean[b], got.answer_sum[b]),
        ):
            want = v[[lo + t for t in pos]]
            scale = float(want.abs().sum()) + 1e-30
            assert abs(float(total) - float(want.sum())) <= STAT_RTOL * scale
            assert abs(float(mean) - (float(want.mean()) if pos else 0.0)) <= STAT_RTOL * scale / max(len(pos), 1)


@pytest.mark.parametrize("backend", [p.values[0] for p in BACKENDS if not p.marks])
@pytest.mark.parametrize("layout", ["right", "left", "packed"])
def test_phase_stats_property(backend, layout):
    # the Triton interpreter pays ~10 ms per program: fewer examples there
    @examples(8 if backend == "triton" else 40)
    @given(phase_cases(layout))
    def check(case):
        _check_phase_case(case, backend)

    check()


def test_quantile_threshold_host_and_device_paths():
    """The host selection (CPU, eager) and the sort + gather path (GPU, compiled) both give TRL's
    torch.quantile bitwise: ties, negatives, NaN, no valid token, levels 0 and 1."""
    g = torch.Generator().manual_seed(1)
    for trial in range(60):
        n = [0, 1, 2, 7, 50, 333][trial % 6]
        x = torch.randint(-2, 5, (n,), generator=g).float() * 0.5 if trial % 2 else torch.randn(n, generator=g)
        valid = torch.rand(n, generator=g) < [1.0, 0.5, 0.0][trial % 3]
        if trial % 7 == 3 and n:
            x[0] = float("nan")
        rho = [0.0, 0.2, 0.5, 1.0, 0.37][trial % 5]
        want = ref.top_entropy_threshold(x, valid, rho).reshape(1)
        for host in (True, False):
            got = quantile_threshold(x, valid, 1.0 - rho, None, host_select=host)
            assert torch.equal(got, want) or (bool(torch.isnan(got).all()) and bool(torch.isnan(want).all())), (
                trial, host, got, want,
            )  # fmt: skip


# --- the fused logits path ----------------------------------------------------------------------


class _OpLog(TorchDispatchMode):
    """Records every op and whether it received the logits tensor."""

    def __init__(self, logits):
        super().__init__()
        self.logits_ptr = logits.data_ptr()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        reads = any(t.data_ptr() == self.logits_ptr and t.numel() > 0 for t in flat)
        self.calls.append((str(func), reads))
        return func(*args, **kwargs)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout", ["right", "packed"])
def test_token_stats_with_phases(backend, device, layout):
    # a few rows: the Triton interpreter runs the logits kernels one program per row
    ids, mask, cu, _ = make_batch(layout, 3, seed=9, only=("start", "middle", "missing", "split_pad_right"), T=14)
    V = 37  # small odd vocabulary: ids in the batch reach 19
    logits = torch.randn(*ids.shape, V) * 2
    temp = 0.8
    dev = lambda t: None if t is None else t.to(device)
    x = logits.to(device).requires_grad_(True)
    with _OpLog(x) as log:
        out = lk.token_stats_with_phases(
            x, dev(ids), dev(mask), delimiter=DELIMITERS[3], cu_seqlens=dev(cu), temperature=temp, backend=backend
        )
    readers = [name for name, reads in log.calls if reads]
    assert readers == ["lenkernels.token_stats.default"], f"the logits must be read once, by one op: {readers}"

    lp64, ent64 = ref_tokens.token_logprobs_entropy(logits.double(), ids, temp)
    assert_close(out.logprobs, lp64, rtol=STAT_RTOL, scale=20.0, name="logprobs")
    assert_close(out.entropy, ent64, rtol=STAT_RTOL, scale=1.0, name="entropy")
    flat_ids, valid, flat_cu = _flat(ids, mask, cu)
    for got, per_token in ((out.entropy_phases, ent64), (out.logprob_phases, lp64)):
        want = ref.phase_stats(per_token.reshape(-1), flat_ids, valid, flat_cu, DELIMITERS[3])
        scale = 20.0 if got is out.logprob_phases else 1.0
        assert_close(got.think_mean, want[0], rtol=STAT_RTOL, scale=scale, name="think_mean")
        assert_close(got.answer_sum, want[3], rtol=STAT_RTOL, scale=scale * want[5].double(), name="answer_sum")
        assert torch.equal(got.delimiter_pos.cpu(), want[6]) and torch.equal(got.answer_count.cpu(), want[5])
    assert isinstance(out.entropy_phases, lk.PhaseEntropy) and not isinstance(out.logprob_phases, lk.PhaseEntropy)

    # gradient of a loss on the phase means reaches the logits through both per-token outputs
    g = [torch.randn(flat_cu.numel() - 1) for _ in range(2)]
    loss = (out.entropy_phases.think_mean * g[0].to(device)).sum() + (
        out.logprob_phases.answer_mean * g[1].to(device)
    ).sum()
    (grad,) = torch.autograd.grad(loss, x)
    x64 = logits.double().requires_grad_(True)
    lp, ent = ref_tokens.token_logprobs_entropy(x64, ids, temp)
    w_ent = ref.phase_stats(ent.reshape(-1), flat_ids, valid, flat_cu, DELIMITERS[3])
    w_lp = ref.phase_stats(lp.reshape(-1), flat_ids, valid, flat_cu, DELIMITERS[3])
    (grad64,) = torch.autograd.grad((w_ent[0] * g[0].double()).sum() + (w_lp[2] * g[1].double()).sum(), x64)
    assert_close(grad, grad64, rtol=1e-5, atol=1e-7, scale=grad64.abs().amax(-1, keepdim=True), name="dlogits")


# --- per-sequence statistics ------------------------------------------------------------------


def _entropy_batch(layout, seed, discrete=False):
    g = torch.Generator().manual_seed(seed)
    if layout == "packed":
        lengths = [0, 7, 1, 23, 12, 5]  # includes an empty sequence and a single token
        n = sum(lengths) + 2  # two trailing tokens outside every sequence
        cu = torch.tensor([0] + lengths).cumsum(0)
        mask = torch.rand(n, generator=g) > 0.2
        shape = (n,)
    else:
        cu = None
        shape = (7, 19)
        mask = torch.zeros(shape, dtype=torch.bool)
        for b, length in enumerate([19, 0, 5, 11, 1, 17, 8]):  # full row, empty row, single token
            if layout == "right":
                mask[b, :length] = True
            else:
                mask[b, shape[1] - length :] = True
    if discrete:  # many ties: the quantile sits on repeated values
        ent = torch.randint(0, 6, shape, generator=g).float() * 0.5
    else:
        ent = torch.rand(shape, generator=g) * 3
    ent = torch.where(mask, ent, torch.full_like(ent, float("nan")))
    return ent, mask, cu


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout", ["right", "left", "packed"])
@pytest.mark.parametrize("rho", [0.2, 0.5, 1.0, 0.0])
def test_sequence_stats_matches_reference_and_trl(backend, device, layout, rho):
    ent, mask, cu = _entropy_batch(layout, seed=int(rho * 10) + len(layout), discrete=rho == 0.5)
    dev = lambda t: None if t is None else t.to(device)
    st = lk.sequence_stats(dev(ent), dev(mask), cu_seqlens=dev(cu), threshold=1.25, top_entropy_quantile=rho,
                           backend=backend)  # fmt: skip
    flat_cu = ref.padded_offsets(*ent.shape) if cu is None else cu
    length, mean, vmin, vmax, frac, _ = ref.sequence_stats(ent.reshape(-1), mask.reshape(-1), flat_cu, 1.25)
    assert torch.equal(st.length.cpu(), length)
    assert_close(st.entropy_mean, mean, rtol=STAT_RTOL, name="entropy_mean")
    assert torch.equal(st.entropy_min.cpu(), vmin.float()) and torch.equal(st.entropy_max.cpu(), vmax.float())
    assert_close(st.frac_above_threshold, frac, rtol=1e-7, name="frac_above_threshold")
    assert float(st.entropy_mean[length == 0].abs().sum()) == 0.0, "empty sequences report 0, not NaN"
    # TRL's get_high_entropy_mask on the same tokens: the identical threshold and mask
    if cu is None:
        trl_thr = ref.top_entropy_threshold(ent, mask, rho)
        trl_mask = ref.high_entropy_mask(ent, mask, rho)
    else:
        covered = torch.arange(ent.numel()) < cu[-1]
        trl_thr = ref.top_entropy_threshold(ent, mask & covered, rho)
        trl_mask = ref.high_entropy_mask(ent, mask & covered, rho)
    assert torch.equal(st.high_entropy_threshold.cpu(), trl_thr), (st.high_entropy_threshold, trl_thr)
    assert torch.equal(st.high_entropy_mask.cpu(), trl_mask)
    assert st.high_entropy_mask.shape == ent.shape and st.high_entropy_mask.dtype == torch.bool


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_sequence_stats_degenerate(backend, device):
    ent = torch.rand(3, 6).to(device)
    none = torch.zeros(3, 6, dtype=torch.bool, device=device)
    st = lk.sequence_stats(ent, none, top_entropy_quantile=0.2, backend=backend)
    assert st.length.tolist() == [0, 0, 0] and float(st.entropy_max.abs().sum()) == 0.0
    assert math.isnan(float(st.high_entropy_threshold)) and not bool(st.high_entropy_mask.any())
    # a NaN entropy on a response token poisons its sequence's mean/min/max and (as in TRL) the mask
    ent[1, 2] = float("nan")
    mask = torch.ones(3, 6, dtype=torch.bool, device=device)
    st = lk.sequence_stats(ent, mask, top_entropy_quantile=0.2, backend=backend)
    assert [math.isnan(float(x)) for x in st.entropy_mean] == [False, True, False]
    assert math.isnan(float(st.entropy_min[1])) and math.isnan(float(st.entropy_max[1]))
    assert not bool(st.high_entropy_mask.any())
    plain = lk.sequence_stats(ent, mask, backend=backend)
    assert plain.high_entropy_mask is None and plain.high_entropy_threshold is None
    assert lk.sequence_stats(torch.rand(0, 4).to(device), backend=backend).length.shape == (0,)


def _distributed_worker(rank, world, init_file, out_dir, cases):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = []
        for case in cases:
            ent, mask, rho, backend = case["ent"][rank], case["mask"][rank], case["rho"], case["backend"]
            st = lk.sequence_stats(ent, mask, top_entropy_quantile=rho, process_group=dist.group.WORLD,
                                   backend=backend)  # fmt: skip
            results.append((st.high_entropy_threshold, st.high_entropy_mask))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sequence_stats_quantile_over_ranks():
    """Two gloo ranks with different shapes: the threshold is the quantile of the union of their
    response tokens (TRL gathers them); the exact bisection must agree with torch.quantile."""
    g = torch.Generator().manual_seed(0)
    cases = []
    specs = [  # (shape of rank 0, shape of rank 1, rho, discrete values, backend)
        ((3, 7), (2, 11), 0.2, False, "cpu"),
        ((4, 5), (1, 3), 0.5, True, "cpu"),  # ties
        ((2, 9), (3, 4), 1.0, False, "reference"),  # rho = 1: the minimum, every token kept
        ((2, 9), (3, 4), 0.0, True, "triton"),  # rho = 0: the maximum
        ((5, 6), (0, 6), 0.3, False, "cpu"),  # one rank holds no rows
    ]
    for shape0, shape1, rho, discrete, backend in specs:
        ents, masks = [], []
        for shape in (shape0, shape1):
            e = (
                torch.randint(0, 4, shape, generator=g).float() * 0.75
                if discrete
                else torch.rand(shape, generator=g) * 2
            )
            e = e - 0.5 * (torch.rand(shape, generator=g) < 0.1)  # a few negative values: generic statistics
            ents.append(e)
            masks.append(torch.rand(shape, generator=g) > 0.3)
        cases.append({"ent": ents, "mask": masks, "rho": rho, "backend": backend})
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.spawn(
            _distributed_worker, args=(2, os.path.join(tmp, "init"), tmp, cases), nprocs=2, join=True
        )
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    for i, case in enumerate(cases):
        union = torch.cat([e[m] for e, m in zip(case["ent"], case["mask"])]).float()
        want = torch.quantile(union, 1.0 - case["rho"])
        for rank in range(2):
            thr, high = results[rank][i]
            assert torch.equal(thr, want), (i, rank, thr, want)
            assert torch.equal(high, (case["ent"][rank] >= want) & case["mask"][rank])


# --- edge cases, errors, compile ------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_and_degenerate_layouts(backend, device):
    args = {"delimiter": [3], "backend": backend}
    st = lk.phase_entropy(torch.rand(0, 5).to(device), torch.zeros(0, 5, dtype=torch.long).to(device), None, **args)
    assert st.think_mean.shape == (0,) and st.found.shape == (0,)
    # packed: empty sequences at the start, middle and end; sequences of one token
    ids = torch.tensor([3, 7, 3, 3]).to(device)
    cu = torch.tensor([0, 0, 1, 1, 2, 4, 4]).to(device)
    x = torch.rand(4).to(device).requires_grad_(True)
    st = lk.phase_entropy(x, ids, None, cu_seqlens=cu, **args)
    assert st.found.tolist() == [False, True, False, False, True, False]
    assert st.think_count.tolist() == [0, 0, 0, 1, 0, 0] and st.answer_count.tolist() == [0, 0, 0, 0, 1, 0]
    assert st.delimiter_pos.tolist() == [0, 0, 0, 1, 0, 0]
    (st.think_mean.sum() + st.answer_mean.sum()).backward()
    assert x.grad.tolist() == [0.0, 1.0, 0.0, 1.0]  # [7] is think of sequence 3, the last 3 answer of 4
    # int32 ids and offsets, delimiter as a tensor or a bare int
    a = lk.phase_entropy(x.detach(), ids.int(), None, cu_seqlens=cu.int(), delimiter=torch.tensor([3]), backend=backend)
    b = lk.phase_entropy(x.detach(), ids, None, cu_seqlens=cu, delimiter=3, backend=backend)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    # a numpy delimiter, first seen under inference_mode (a logging step), then used in training
    delim = np.array([7, 3], dtype=np.int64)
    with torch.inference_mode():
        lk.phase_entropy(x.detach(), ids, None, cu_seqlens=cu, delimiter=delim, backend=backend)
    y = x.detach().clone().requires_grad_(True)
    st = lk.phase_entropy(y, ids, None, cu_seqlens=cu, delimiter=delim, backend=backend)
    st.answer_mean.sum().backward()
    assert st.found.tolist() == [False] * 6 and y.grad.tolist() == [0.0] * 4


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_deterministic(backend, device):
    ids, mask, cu, _ = make_batch("packed", 3, seed=4)
    values = _values(ids.shape, mask).to(device)
    runs = []
    for _ in range(2):
        x = values.clone().requires_grad_(True)
        st = lk.phase_stats(x, ids.to(device), mask.to(device), delimiter=DELIMITERS[3], cu_seqlens=cu.to(device),
                            backend=backend)  # fmt: skip
        (st.think_mean.sum() - st.answer_mean.sum()).backward()
        seq = lk.sequence_stats(values, mask.to(device), cu_seqlens=cu.to(device), top_entropy_quantile=0.3,
                                backend=backend)  # fmt: skip
        runs.append((*st, x.grad, *seq))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_cpu_results_do_not_depend_on_threads(monkeypatch):
    """Small inputs run on one thread; forcing every thread count over the same data must give
    bitwise the same statistics, gradients and masks (one sequence is reduced by one thread)."""
    ids, mask, cu, _ = make_batch("packed", 3, seed=12)
    values = _values(ids.shape, mask)
    runs = []
    saved = torch.get_num_threads()
    try:
        for threads, grain in ((1, 1 << 30), (2, 1), (3, 7)):
            torch.set_num_threads(threads)
            monkeypatch.setattr(cpu_phase, "_TOKENS_PER_THREAD", grain)
            x = values.clone().requires_grad_(True)
            st = lk.phase_stats(x, ids, mask, delimiter=DELIMITERS[3], cu_seqlens=cu, backend="cpu")
            (st.think_mean.sum() + st.answer_sum.sum()).backward()
            seq = lk.sequence_stats(values, mask, cu_seqlens=cu, top_entropy_quantile=0.3, backend="cpu")
            runs.append((*st, x.grad, *seq))
    finally:
        torch.set_num_threads(saved)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bad_input(backend, device):
    ids = torch.randint(0, 5, (2, 6)).to(device)
    ent = torch.rand(2, 6).to(device)
    mask = torch.ones(2, 6, dtype=torch.bool, device=device)
    run = lambda **kw: lk.phase_entropy(
        kw.pop("entropy", ent), kw.pop("ids", ids), kw.pop("mask", mask), delimiter=kw.pop("delimiter", [3]),
        backend=backend, **kw,
    )  # fmt: skip
    cases = [
        (ValueError, "entropy", {"entropy": ent[:, :5]}),
        (TypeError, "entropy", {"entropy": ent.long()}),
        (TypeError, "ids", {"ids": ids.float()}),
        (ValueError, "mask", {"mask": mask[:1]}),
        (ValueError, "delimiter", {"delimiter": []}),
        (ValueError, "delimiter", {"delimiter": [3, -1]}),
        (TypeError, "delimiter", {"delimiter": "</think>"}),
        (TypeError, "delimiter", {"delimiter": [3.0]}),
        (TypeError, "delimiter", {"delimiter": torch.tensor([3.0])}),
        (ValueError, "delimiter", {"delimiter": torch.tensor([[3]])}),
        (
            ValueError,
            "ids",
            {"ids": ids.reshape(-1), "entropy": ent.reshape(-1), "mask": None},
        ),  # 1-D without cu_seqlens
        (ValueError, "ids", {"cu_seqlens": torch.tensor([0, 12]).to(device)}),  # 2-D with cu_seqlens
    ]
    if backend != "reference":
        cases.append((TypeError, "entropy", {"entropy": ent.double()}))
    for exc, name, kw in cases:
        with pytest.raises(exc, match=name):
            run(**kw)
    flat = {"entropy": ent.reshape(-1), "ids": ids.reshape(-1), "mask": None}
    for cu in ([0, 7, 5, 12], [0, 13], [-1, 12], [[0, 12]]):
        with pytest.raises(ValueError, match="cu_seqlens"):
            run(cu_seqlens=torch.tensor(cu).to(device), **flat)
    with pytest.raises(TypeError, match="cu_seqlens"):
        run(cu_seqlens=torch.tensor([0.0, 12.0]).to(device), **flat)
    for shape in ((4, 2, 5), (0, 2, 6)):  # neither ids.shape nor [C >= 1, *ids.shape]
        with pytest.raises(ValueError, match="values"):
            lk.phase_stats(torch.rand(shape).to(device), ids, mask, delimiter=[3], backend=backend)
    with pytest.raises(ValueError, match="top_entropy_quantile"):
        lk.sequence_stats(ent, mask, top_entropy_quantile=1.5, backend=backend)
    with pytest.raises(TypeError, match="threshold"):
        lk.sequence_stats(ent, mask, threshold="high", backend=backend)
    with pytest.raises(ValueError, match="process_group"):
        lk.sequence_stats(ent, mask, process_group=object(), backend=backend)
    with pytest.raises(ValueError, match="backend"):
        lk.phase_entropy(ent, ids, mask, delimiter=[3], backend="tpu")


def test_cuda_backend_not_available_says_why():
    with pytest.raises(lk.BackendUnavailableError, match="phase_stats"):
        lk.phase_entropy(torch.rand(2, 4), torch.zeros(2, 4, dtype=torch.long), None, delimiter=[1], backend="cuda")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    # opcheck runs each op a dozen times: a small packed batch keeps the interpreter quick
    ids, mask, cu, _ = make_batch("packed", 3, seed=8, only=("start", "gap", "empty"))
    flat_ids, valid, flat_cu = (t.to(device) for t in _flat(ids, mask, cu))
    values = torch.randn(1, ids.numel(), device=device, requires_grad=True)
    delim = torch.tensor(DELIMITERS[3], device=device)
    torch.library.opcheck(torch.ops.lenkernels.phase_stats.default, (values, flat_ids, valid, flat_cu, delim, backend))
    quantile = torch.full((1,), 0.4, device=device)
    for q in (quantile, None):
        torch.library.opcheck(
            torch.ops.lenkernels.sequence_stats.default, (values[0].detach(), valid, flat_cu, 0.5, q, backend)
        )
    out = torch.ops.lenkernels.phase_stats(values.detach(), flat_ids, valid, flat_cu, delim, backend)
    grads = [torch.randn(1, flat_cu.numel() - 1, device=device) for _ in range(4)]
    torch.library.opcheck(
        torch.ops.lenkernels.phase_stats_backward.default,
        (valid, flat_cu, out[6], out[4], out[5], 3, *grads, torch.float32, backend),
    )


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    ids, mask, _, _ = make_batch("left", 3, seed=6, only=("start", "end", "missing", "overlap"), T=15)
    ids, mask = ids.to(device), mask.to(device)
    logits = torch.randn(*ids.shape, 23, device=device)

    def step(x, y, m):
        out = lk.token_stats_with_phases(x, y, m, delimiter=DELIMITERS[3], temperature=0.9, backend=backend)
        pe = lk.phase_entropy(out.entropy, y, m, delimiter=DELIMITERS[3], backend=backend)
        seq = lk.sequence_stats(out.entropy, m, top_entropy_quantile=0.2, backend=backend)
        penalty = (pe.think_mean - pe.answer_mean).clamp(min=0).mean()
        loss = penalty - (out.logprobs * seq.high_entropy_mask).sum() + out.logprob_phases.answer_sum.mean()
        return loss, seq.entropy_max, pe.found

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    eager = step(x1, ids, mask)
    comp = compiled(x2, ids, mask)
    eager[0].backward()
    comp[0].backward()
    assert torch.allclose(eager[0], comp[0]) and torch.equal(eager[1], comp[1]) and torch.equal(eager[2], comp[2])
    assert torch.allclose(x1.grad, x2.grad)
