"""linear_logprobs_entropy (token statistics from hidden states and the LM head) against the
float64 reference and the logits path, on every backend."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import lenkernels as lk
from lenkernels.ops import linear_stats as ops
from lenkernels.reference import linear_stats as ref
from lenkernels.reference import token_stats as ref_ts
from tests.utils import STAT_RTOL, assert_close, backend_params

BACKENDS = backend_params("linear_stats")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LOW_PRECISION_RTOL = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-9}

# (leading shape, D, V): why each is in the grid
SHAPES = [
    ((50,), 64, 300),  # N not a multiple of the 64-row tile, V = 2 * 128 + 44: masked row and column tails
    ((2, 7), 40, 257),  # padded [B, T] layout; D = 40 is no multiple of the K step (masked K tail)
    ((3,), 17, 129),  # few rows: the vocabulary is split across programs and merged; odd D
]
# chunk_size: None = one tile; 2000 = tiles of 45 rows x 44 columns at N = 50, V = 300 (2-D tiling:
# row chunks, and vocabulary chunks whose states are merged)
CHUNKS = [None, 2000]


def _inputs(lead, dim, vocab, dtype, *, bias=True, device="cpu"):
    """fp32: random normals. bf16/fp16: values on a coarse grid whose dot products are exact in
    fp32, so every backend (and the float64 reference) rounds the same logits to the same bits and
    the comparison tests the statistics, not GEMM summation order."""
    if dtype == torch.float32:
        hidden = torch.randn(*lead, dim)
        weight = torch.randn(vocab, dim) * (2.0 / math.sqrt(dim))
        b = torch.randn(vocab)
    else:
        hidden = torch.randint(-8, 9, (*lead, dim)) / 8.0
        weight = torch.randint(-8, 9, (vocab, dim)) / 16.0
        b = torch.randint(-64, 65, (vocab,)) / 64.0
    ids = torch.randint(0, vocab, lead)
    out = [t.to(dtype).to(device) for t in (hidden, weight, b)]
    return out[0], out[1], (out[2] if bias else None), ids.to(device)


def _reference_inputs(hidden, weight, bias):
    """fp32 inputs are compared with exact float64 maths; low-precision ones with the float64
    statistics of their (exactly computed, once rounded) low-precision logits."""
    if hidden.dtype == torch.float32:
        return tuple(None if t is None else t.detach().cpu().double() for t in (hidden, weight, bias))
    return tuple(None if t is None else t.detach().cpu() for t in (hidden, weight, bias))


def _reference_grads(hidden, weight, bias, ids, temperature, g_lp, g_h, ignore_index=-100):
    """float64 gradients of (lp * g_lp + ent * g_h).sum() and the magnitude of the terms each sums
    (the scale a correct low-precision computation's error grows with)."""
    h, w, b = _reference_inputs(hidden, weight, bias)
    logits = ref.linear_logits(h, w, b).double().reshape(-1, w.shape[0]).requires_grad_(True)
    temp = temperature.double().cpu().reshape(-1) if torch.is_tensor(temperature) else temperature
    lp, ent = ref_ts.token_logprobs_entropy(logits, ids.cpu().reshape(-1), temp, ignore_index)
    (dl,) = torch.autograd.grad((lp * g_lp.double().reshape(-1)).sum() + (ent * g_h.double().reshape(-1)).sum(), logits)
    # per-element size of SPEC 1's gradient terms
    with torch.no_grad():
        t = temp.unsqueeze(-1) if torch.is_tensor(temp) else temp
        z = logits / t
        p = torch.softmax(z, -1)
        mean_z = (p * z).sum(-1, keepdim=True)
        glp = g_lp.double().reshape(-1, 1).abs() * (ids.cpu().reshape(-1, 1) != ignore_index)
        s = (glp * (p + 1e-300) + g_h.double().reshape(-1, 1).abs() * p * ((z - mean_z).abs() + 1)) / t
        s = s + dl.abs()
    h2, w2 = h.double().reshape(-1, w.shape[1]), w.double()
    grads = {"hidden": dl @ w2, "weight": dl.T @ h2, "bias": dl.sum(0)}
    scales = {"hidden": s @ w2.abs(), "weight": s.T @ h2.abs(), "bias": s.sum(0)}
    return grads, scales


def _stat_scale(hidden, weight, bias, temperature=1.0):
    h, w, b = _reference_inputs(hidden, weight, bias)
    logits = ref.linear_logits(h, w, b).double()
    t = temperature.double().cpu().unsqueeze(-1) if torch.is_tensor(temperature) else temperature
    return torch.logsumexp(logits / t, -1).abs() + 1


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,dim,vocab", SHAPES)
@pytest.mark.parametrize("chunk", CHUNKS, ids=["one_tile", "tiled"])
def test_forward_matches_reference(backend, device, dtype, lead, dim, vocab, chunk):
    if backend == "triton" and chunk is not None:
        pytest.skip("the triton forward holds no logits tile: chunk_size only shapes its backward")
    hidden, weight, bias, ids = _inputs(lead, dim, vocab, dtype, device=device)
    lp, ent = lk.linear_logprobs_entropy(hidden, weight, ids, bias=bias, chunk_size=chunk, backend=backend)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32 and lp.shape == ids.shape
    h, w, b = _reference_inputs(hidden, weight, bias)
    lp_ref, ent_ref = ref.linear_logprobs_entropy(h, w, ids.cpu(), b)
    assert_close(lp, lp_ref, rtol=STAT_RTOL, scale=_stat_scale(hidden, weight, bias), name="logprobs")
    assert_close(ent, ent_ref, rtol=STAT_RTOL, scale=1.0, name="entropy")
    assert bool((ent >= -1e-5).all()) and bool((ent <= math.log(vocab) + 1e-4).all())
    assert bool((lp <= 1e-6).all())


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk", CHUNKS, ids=["one_tile", "tiled"])
def test_backward_matches_reference(backend, device, dtype, chunk):
    lead, dim, vocab = (50,), 40, 300  # D = 40: masked K tail in the recomputed tiles too
    hidden, weight, bias, ids = _inputs(lead, dim, vocab, dtype, device=device)
    ids[[0, 7]] = -100  # ignored rows: entropy gradient only
    temp = (torch.rand(lead) + 0.5).to(device)  # per-token temperature
    g_lp, g_h = torch.randn(lead).to(device), torch.randn(lead).to(device)
    h, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    lp, ent = lk.linear_logprobs_entropy(h, w, ids, bias=b, temperature=temp, chunk_size=chunk, backend=backend)
    got = dict(zip(("hidden", "weight", "bias"), torch.autograd.grad((lp * g_lp + ent * g_h).sum(), (h, w, b))))
    expected, scales = _reference_grads(hidden, weight, bias, ids, temp, g_lp, g_h)
    rtol = 1e-5 if dtype == torch.float32 else LOW_PRECISION_RTOL[dtype]
    for name in got:
        assert got[name].dtype == dtype and got[name].shape == {"hidden": h, "weight": w, "bias": b}[name].shape
        assert_close(got[name], expected[name].reshape(got[name].shape), rtol=rtol,
                     scale=scales[name].reshape(got[name].shape), name=f"d{name}")  # fmt: skip


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_matches_logits_path(backend, device, dtype):
    """The documented equivalence: token_logprobs_entropy(F.linear(hidden, weight, bias), ids)."""
    hidden, weight, bias, ids = _inputs((2, 9), 48, 200, dtype, device=device)
    ids[0, 3] = -100
    g_lp, g_h = torch.randn(2, 9).to(device), torch.randn(2, 9).to(device)
    paths = []
    for fused in (True, False):
        h, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
        if fused:
            lp, ent = lk.linear_logprobs_entropy(h, w, ids, bias=b, temperature=0.8, backend=backend)
        else:
            ts_backend = backend if backend != "triton" or device == "cuda" else "triton"
            lp, ent = lk.token_logprobs_entropy(F.linear(h, w, b), ids, temperature=0.8, backend=ts_backend)
        paths.append((lp, ent, *torch.autograd.grad((lp * g_lp + ent * g_h).sum(), (h, w, b))))
    names = ("logprobs", "entropy", "dhidden", "dweight", "dbias")
    scale = _stat_scale(hidden, weight, bias, 0.8).reshape(2, 9)
    assert_close(paths[0][0], paths[1][0], rtol=STAT_RTOL, scale=scale, name=names[0])
    assert_close(paths[0][1], paths[1][1], rtol=STAT_RTOL, scale=1.0, name=names[1])
    if backend == "cpu" and dtype == torch.float32:
        # one tile: the same GEMM and the same token_stats kernel -> the same bits
        assert torch.equal(paths[0][0], paths[1][0]) and torch.equal(paths[0][1], paths[1][1])
    rtol = 1e-5 if dtype == torch.float32 else 2.0**-7
    for name, a, e in zip(names[2:], paths[0][2:], paths[1][2:]):
        assert_close(a, e, rtol=rtol, atol=rtol * e.abs().max().item(), name=name)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind", ["scalar", "per_token", "per_sequence"])
def test_temperature(backend, device, kind):
    hidden, weight, bias, ids = _inputs((3, 4), 32, 150, torch.bfloat16, device=device)
    temp = {"scalar": 0.7, "per_token": torch.rand(3, 4) + 0.3, "per_sequence": torch.rand(3, 1) + 0.3}[kind]
    temp = temp.to(device) if torch.is_tensor(temp) else temp
    lp, ent = lk.linear_logprobs_entropy(hidden, weight, ids, bias=bias, temperature=temp, backend=backend)
    t_ref = temp.cpu().expand(3, 4) if torch.is_tensor(temp) else temp
    lp_ref, ent_ref = ref.linear_logprobs_entropy(hidden.cpu(), weight.cpu(), ids.cpu(), bias.cpu(), t_ref)
    scale = _stat_scale(hidden, weight, bias, t_ref if torch.is_tensor(t_ref) else t_ref)
    assert_close(lp, lp_ref, rtol=STAT_RTOL, scale=scale, name="logprobs")
    assert_close(ent, ent_ref, rtol=STAT_RTOL, scale=1.0, name="entropy")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ignore_index_rows(backend, device):
    hidden, weight, bias, ids = _inputs((20,), 24, 140, torch.float32, device=device)
    ids[::3] = 5  # a non-negative ignore_index: a valid-looking id must still be ignored
    h = hidden.clone().requires_grad_(True)
    lp, ent = lk.linear_logprobs_entropy(h, weight, ids, bias=bias, ignore_index=5, chunk_size=500, backend=backend)
    assert bool((lp[::3] == 0).all()), "ignored rows must give logprob exactly 0"
    assert bool(torch.isfinite(ent).all())
    (dh,) = torch.autograd.grad(lp.sum(), h)
    assert bool((dh[::3] == 0).all()), "ignored rows get no logprob gradient"
    assert bool((dh[1::3] != 0).any())


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_masked_vocab_and_degenerate_rows(backend, device):
    hidden, weight, bias, ids = _inputs((6,), 16, 260, torch.float32, device=device)
    bias[130:] = float("-inf")  # masked vocabulary: whole tiles and a partial one are -inf
    ids[:] = torch.tensor([3, 100, 129, 0, 7, 64])
    hidden[4, 2] = float("nan")  # NaN propagates to its row only
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    lp, ent = lk.linear_logprobs_entropy(h, w, ids, bias=bias, chunk_size=400, backend=backend)
    lp_ref, ent_ref = ref.linear_logprobs_entropy(hidden.cpu().double(), weight.cpu().double(), ids.cpu(),
                                                  bias.cpu().double())  # fmt: skip
    assert torch.isnan(lp[4]) and torch.isnan(ent[4])
    ok = [0, 1, 2, 3, 5]
    assert_close(lp[ok], lp_ref[ok], rtol=STAT_RTOL, scale=20.0, name="logprobs")
    assert_close(ent[ok], ent_ref[ok], rtol=STAT_RTOL, scale=1.0, name="entropy")
    dh, dw = torch.autograd.grad(lp[ok].sum() + ent[ok].sum(), (h, w))
    assert bool(torch.isfinite(dh[ok]).all())
    assert bool(torch.isnan(dw).any()), "a NaN hidden row poisons the weight gradient, as in eager autograd"
    # without the NaN row: finite gradients, and none for the masked part of the LM head
    keep = torch.tensor(ok, device=device)
    h, w = hidden[keep].clone().requires_grad_(True), weight.clone().requires_grad_(True)
    lp, ent = lk.linear_logprobs_entropy(h, w, ids[keep], bias=bias, chunk_size=400, backend=backend)
    dh, dw = torch.autograd.grad(lp.sum() + ent.sum(), (h, w))
    assert bool(torch.isfinite(dh).all()) and bool(torch.isfinite(dw).all())
    assert bool((dw[130:] == 0).all()), "masked vocabulary rows of the LM head get zero gradient"
    # every entry masked: NaN, never a plausible number (SPEC 1)
    lp, ent = lk.linear_logprobs_entropy(hidden, weight, ids, bias=torch.full_like(bias, float("-inf")), backend=backend)
    assert bool(torch.isnan(lp).all()) and bool(torch.isnan(ent).all())


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_deterministic(backend, device):
    hidden, weight, bias, ids = _inputs((40,), 32, 300, torch.bfloat16, device=device)
    runs = []
    for _ in range(2):
        h, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
        lp, ent = lk.linear_logprobs_entropy(h, w, ids, bias=b, chunk_size=4000, backend=backend)  # 3 tiles
        runs.append((lp, ent, *torch.autograd.grad(lp.sum() + ent.sum(), (h, w, b))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_frozen_inputs_skip_their_gradients(backend, device):
    """A frozen LM head (LoRA) or frozen features: only the needed gradients are computed, and
    they are the ones the full backward computes."""
    hidden, weight, bias, ids = _inputs((12,), 24, 130, torch.float32, device=device)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    lp, ent = lk.linear_logprobs_entropy(h, w, ids, bias=bias, backend=backend)
    dh_full, dw_full = torch.autograd.grad((lp - ent).sum(), (h, w))
    h = hidden.clone().requires_grad_(True)
    lp, ent = lk.linear_logprobs_entropy(h, weight, ids, bias=bias, backend=backend)
    (dh,) = torch.autograd.grad((lp - ent).sum(), h)
    assert torch.equal(dh, dh_full)
    w = weight.clone().requires_grad_(True)
    lp, ent = lk.linear_logprobs_entropy(hidden, w, ids, bias=bias, backend=backend)
    (dw,) = torch.autograd.grad((lp - ent).sum(), w)
    assert torch.equal(dw, dw_full)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_contiguous_inputs(backend, device):
    hidden, weight, bias, ids = _inputs((10,), 32, 150, torch.float32, device=device)
    h_t = hidden.T.contiguous().T  # column-major hidden: copied to unit stride along D once
    w_wide = torch.randn(150, 64).to(device)[:, ::2]  # stride 2 along D
    w_wide.copy_(weight)
    for h, w in ((h_t, weight), (hidden, w_wide), (torch.randn(20, 32).to(device)[::2], weight)):
        lp, ent = lk.linear_logprobs_entropy(h, w, ids, bias=bias, backend=backend)
        lp_ref, ent_ref = ref.linear_logprobs_entropy(h.cpu().double(), w.cpu().double(), ids.cpu(), bias.cpu().double())
        assert_close(lp, lp_ref, rtol=STAT_RTOL, scale=_stat_scale(h, w, bias), name="logprobs")
        assert_close(ent, ent_ref, rtol=STAT_RTOL, scale=1.0, name="entropy")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_without_bias_and_int32_ids(backend, device):
    hidden, weight, _, ids = _inputs((2, 5), 20, 100, torch.float32, bias=False, device=device)
    lp, ent = lk.linear_logprobs_entropy(hidden, weight, ids.int(), backend=backend)
    lp_ref, ent_ref = ref.linear_logprobs_entropy(hidden.cpu().double(), weight.cpu().double(), ids.cpu())
    assert_close(lp, lp_ref, rtol=STAT_RTOL, scale=_stat_scale(hidden, weight, None), name="logprobs")
    assert_close(ent, ent_ref, rtol=STAT_RTOL, scale=1.0, name="entropy")
    assert lk.linear_logprobs_entropy(hidden, weight, ids, return_entropy=False, backend=backend)[1] is None


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_batch(backend, device):
    hidden = torch.randn(0, 3, 16).to(device).requires_grad_(True)
    weight = torch.randn(50, 16).to(device).requires_grad_(True)
    ids = torch.zeros(0, 3, dtype=torch.long).to(device)
    lp, ent = lk.linear_logprobs_entropy(hidden, weight, ids, backend=backend)
    assert lp.shape == (0, 3) and ent.shape == (0, 3)
    dh, dw = torch.autograd.grad(lp.sum() + ent.sum(), (hidden, weight))
    assert dh.shape == hidden.shape and bool((dw == 0).all())


def test_reference_backend_float64():
    """The reference backend runs the tiled path in float64 (fp32 outputs), e.g. to check a model."""
    hidden, weight, bias, ids = (t.double() if t.is_floating_point() else t for t in _inputs((9,), 12, 90, torch.float32))
    h = hidden.clone().requires_grad_(True)
    lp, ent = lk.linear_logprobs_entropy(h, weight, ids, bias=bias, chunk_size=200, backend="reference")
    lp_ref, ent_ref = ref.linear_logprobs_entropy(hidden, weight, ids, bias)
    assert_close(lp, lp_ref, rtol=1e-6, scale=_stat_scale(hidden, weight, bias), name="logprobs")
    (dh,) = torch.autograd.grad(lp.sum(), h)
    assert dh.dtype == torch.float64


def test_tile_plan_bounds_memory(monkeypatch):
    """No tile exceeds chunk_size logits, forward or backward (the memory bound of the op)."""
    for n, v, chunk in [(8192, 151_936, 1 << 26), (65_536, 151_936, 1 << 26), (7, 50_000, 1000), (1, 10, 1),
                        (100, 100, 10_000), (333, 77, 50)]:  # fmt: skip
        rows, cols = ops.tile_plan(n, v, chunk)
        assert 1 <= rows <= max(n, 1) and 1 <= cols <= v and rows * cols <= max(chunk, 1), (n, v, chunk)
    rows, cols = ops.tile_plan(8192, 151_936, 1 << 26)
    assert rows == 8192 and cols >= 4096, "whole rows and large vocabulary chunks at the benchmark size"

    seen = []
    tile = ref.tile_logits

    def recording(*args):
        out = tile(*args)
        seen.append(out.numel())
        return out

    monkeypatch.setattr(ref, "tile_logits", recording)
    hidden, weight, bias, ids = _inputs((37,), 16, 211, torch.float32)
    h = hidden.clone().requires_grad_(True)
    lp, ent = lk.linear_logprobs_entropy(h, weight, ids, bias=bias, chunk_size=600, backend="cpu")
    (lp + ent).sum().backward()
    assert seen and max(seen) <= 600 and len(seen) > 2


def test_bad_input():
    hidden, weight, bias, ids = _inputs((4,), 8, 30, torch.float32)
    call = lk.linear_logprobs_entropy
    with pytest.raises(TypeError, match="hidden"):
        call(hidden.int(), weight, ids)
    with pytest.raises(TypeError, match="hidden"):
        call(hidden.double(), weight.double(), ids, backend="cpu")
    with pytest.raises(ValueError, match="weight"):
        call(hidden, weight[:, :7], ids)
    with pytest.raises(ValueError, match="weight"):
        call(hidden, weight[0], ids)
    with pytest.raises(TypeError, match="weight"):
        call(hidden, weight.to(torch.bfloat16), ids)
    with pytest.raises(ValueError, match="weight"):
        call(hidden, weight[:0], ids)
    with pytest.raises(ValueError, match="bias"):
        call(hidden, weight, ids, bias=bias[:5])
    with pytest.raises(TypeError, match="bias"):
        call(hidden, weight, ids, bias=bias.double())
    with pytest.raises(ValueError, match="ids"):
        call(hidden, weight, ids[:3])
    with pytest.raises(TypeError, match="ids"):
        call(hidden, weight, ids.float())
    bad = ids.clone()
    bad[1] = 30
    with pytest.raises(ValueError, match="ids"):
        call(hidden, weight, bad)
    with pytest.raises(ValueError, match="temperature"):
        call(hidden, weight, ids, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        call(hidden, weight, ids, chunk_size=0)
    with pytest.raises(TypeError, match="ignore_index"):
        call(hidden, weight, ids, ignore_index=1.5)
    with pytest.raises(TypeError, match="process_group"):
        call(hidden, weight, ids, process_group="tp")
    with pytest.raises(ValueError, match="backend"):
        call(hidden, weight, ids, backend="tpu")
    with pytest.raises(lk.BackendUnavailableError, match="cuda"):
        call(hidden, weight, ids, backend="cuda")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_opcheck(backend, device, with_bias):
    hidden, weight, bias, ids = _inputs((6,), 16, 70, torch.float32, bias=with_bias, device=device)
    temp = torch.full((1,), 0.9, device=device)
    args = [hidden.requires_grad_(True), weight.requires_grad_(True), bias, ids, temp, -100, 1000, backend, "", True]
    if with_bias:
        bias.requires_grad_(True)
    torch.library.opcheck(torch.ops.lenkernels.linear_stats.default, tuple(args))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    hidden, weight, bias, ids = _inputs((2, 3), 16, 90, torch.float32, device=device)

    def step(h, w, b):
        lp, ent = lk.linear_logprobs_entropy(h, w, ids, bias=b, temperature=0.9, chunk_size=120, backend=backend)
        return (lp * 2).sum() - 0.1 * ent.mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_in = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    compiled_in = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    out_eager, out_compiled = step(*eager_in), compiled(*compiled_in)
    out_eager.backward()
    out_compiled.backward()
    assert torch.equal(out_eager, out_compiled)
    for a, b in zip(eager_in, compiled_in):
        assert torch.equal(a.grad, b.grad)


_RECOMPILE_SCRIPT = r"""
import json
from tests.specializations import linear_stats_launches, recording
with recording() as keys:
    linear_stats_launches(10)  # rows, hidden size, vocabulary, temperature and tile offsets all change
print(json.dumps({k: len(v) for k, v in keys.items()}))
"""


def test_no_recompiles_across_sizes():
    """Rows, vocabulary, hidden size, tile positions and hyper-parameters are runtime values: the
    kernels compile once per (dtype, bias) pair (counted from Triton's own cache keys)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _RECOMPILE_SCRIPT], capture_output=True, text=True, env=env,
                          cwd=root, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(counts) == {"linear_stats_fwd_kernel", "linear_stats_finalize_kernel", "linear_stats_bwd_kernel"}
    assert counts["linear_stats_finalize_kernel"] == 1
    assert counts["linear_stats_fwd_kernel"] <= 4 and counts["linear_stats_bwd_kernel"] <= 4, counts
