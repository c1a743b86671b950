"""The CUDA C++ backend on a GPU against the float64 reference, on shapes that reach every code path
of csrc/cuda/token_stats.cu (tests/test_token_stats.py runs the shared suite on it as well).

Skipped without a CUDA device; tests/test_cuda_compile.py covers what can be checked without one.
"""

from __future__ import annotations

import math

import pytest
import torch

import lenkernels as lk
from lenkernels.reference import token_stats as ref
from tests.utils import GRAD_ATOL, GRAD_RTOL, STAT_RTOL, assert_close, nan_like

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CUDA C++ backend runs only there)"),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def module():
    from lenkernels import cuda

    ok, why = cuda.available("token_stats")
    assert ok, why  # on a GPU machine the backend must build and load
    return cuda.load("token_stats")


def _rows(layout, dtype, n_rows, vocab, scale=3.0):
    """[n_rows, vocab] CUDA logits: contiguous, or a view with storage offset 1 and odd row stride
    (every row starts at another 16-byte phase)."""
    if layout == "contiguous":
        return (torch.randn(n_rows, vocab) * scale).to(dtype).cuda()
    return (torch.randn(n_rows, vocab + 3) * scale).to(dtype).cuda()[:, 1 : vocab + 1]


def _lse(x, temp):
    return torch.logsumexp(x.cpu().double() / temp.cpu().double().expand(x.shape[0]).unsqueeze(-1), -1)


def _grad_scale(x, ids, temp, g_lp, g_h, ignore_index=-100):
    """Sum of |terms| of SPEC 1's gradient per element: the scale its fp32 error grows with."""
    x, ids, g_lp, g_h = x.cpu(), ids.cpu(), g_lp.cpu(), g_h.cpu()
    t = temp.cpu().double().expand(ids.shape).unsqueeze(-1)
    z = x.double() / t
    p = torch.softmax(z, -1)
    mean_z = (p * torch.where(torch.isneginf(z), 0, z)).sum(-1, keepdim=True)
    valid = (ids != ignore_index).unsqueeze(-1)
    onehot = torch.zeros_like(z).scatter_(-1, torch.where(valid, ids.long().unsqueeze(-1), 0), 1.0) * valid
    ent = torch.where(p > 0, p * ((z - mean_z).abs() + 1), 0)
    return ((g_lp.double().unsqueeze(-1) * valid).abs() * (onehot + p) + g_h.double().abs().unsqueeze(-1) * ent) / t


def _fwd(x, ids, temp, ignore_index=-100):
    """The launcher itself, into NaN-filled outputs (an element it forgets to write stays NaN)."""
    from lenkernels import cuda

    outs = [nan_like(torch.empty(x.shape[0], device=x.device)) for _ in range(4)]
    cuda.token_stats_fwd(x, ids, temp, ignore_index, *outs)
    return outs


# (n_rows, vocab, layout): why each is in the grid
FWD_CASES = [
    (3, 7, "contiguous"),  # V below one 16-byte vector: edge scalars only
    (5, 4_099, "contiguous"),  # odd V: rows at different 16-byte phases (head and tail peels)
    (1, 151_936, "contiguous"),  # one Qwen row: the split-vocab grid + finalize kernel
    (37, 151_936, "sliced"),  # few rows, offset view: split rows with both edges
    (4, 50_257, "sliced"),  # GPT-2 vocab, odd, offset view
    (3_000, 1_000, "contiguous"),  # more rows than 4 waves of blocks: one block per row
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_rows,vocab,layout", FWD_CASES)
def test_forward_matches_reference(module, dtype, n_rows, vocab, layout):
    x = _rows(layout, dtype, n_rows, vocab)
    ids = torch.randint(0, vocab, (n_rows,), device="cuda")
    ids[0] = -100
    temp = (torch.rand(n_rows, device="cuda") + 0.5) if n_rows > 1 else torch.tensor([0.7], device="cuda")
    lp, ent, lse, mean_z = _fwd(x, ids, temp)
    lp_ref, ent_ref = ref.token_logprobs_entropy(x.cpu(), ids.cpu(), temp.cpu().expand(n_rows))
    lse_ref = _lse(x, temp)
    assert_close(lp, lp_ref, rtol=STAT_RTOL, scale=lse_ref.abs() + 1, name="logprobs")
    assert_close(ent, ent_ref, rtol=STAT_RTOL, scale=1.0, name="entropy")
    assert_close(lse, lse_ref, rtol=STAT_RTOL, scale=1.0, name="lse")
    assert_close(mean_z, lse_ref - ent_ref, rtol=STAT_RTOL, scale=lse_ref.abs() + 1, name="mean_z")
    assert lp[0].item() == 0.0
    assert bool((ent >= -1e-5).all()) and bool((ent <= math.log(vocab) + 1e-4).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_rows,vocab,layout", FWD_CASES)
@pytest.mark.parametrize("mode", ["fresh", "inplace", "other_phase"])
def test_backward_matches_reference(module, dtype, n_rows, vocab, layout, mode):
    from lenkernels import cuda

    x = _rows(layout, dtype, n_rows, vocab)
    ids = torch.randint(0, vocab, (n_rows,), device="cuda", dtype=torch.int32)
    ids[-1] = -100
    temp = torch.tensor([0.8], device="cuda")
    _, _, lse, mean_z = _fwd(x, ids, temp)
    g_lp = torch.randn(2 * n_rows, device="cuda")[::2]  # stride 2
    g_h = torch.randn(1, device="cuda").expand(n_rows)  # stride 0
    expected = ref.token_stats_backward(x.cpu().double(), ids.cpu().long(), temp.cpu(), g_lp.cpu(), g_h.cpu(), -100)
    logits = x.clone() if mode == "inplace" else x
    if mode == "fresh":
        dlogits = nan_like(x)
    elif mode == "inplace":
        dlogits = logits
    else:  # dlogits rows at another 16-byte phase than the logits: scalar accesses
        dlogits = nan_like(torch.empty(n_rows, vocab + 1, dtype=dtype, device="cuda"))[:, 1:]
    cuda.token_stats_bwd(logits, ids, temp, lse, mean_z, g_lp, g_h, -100, dlogits)
    scale = _grad_scale(x, ids, temp, g_lp, g_h)
    assert_close(dlogits, expected, rtol=GRAD_RTOL[dtype], atol=GRAD_ATOL[dtype], scale=scale, name="dlogits")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_public_op_autograd_and_inplace(module, dtype):
    x = _rows("contiguous", dtype, 6, 32_003)
    ids = torch.randint(0, 32_003, (2, 3), device="cuda")
    g_lp, g_h = torch.randn(2, 3, device="cuda"), torch.randn(2, 3, device="cuda")
    a = x.view(2, 3, -1).clone().requires_grad_(True)
    lp, ent = lk.token_logprobs_entropy(a * 1, ids, temperature=0.9, backend="cuda")
    (grad,) = torch.autograd.grad((lp * g_lp + ent * g_h).sum(), a)
    b = x.view(2, 3, -1).clone().requires_grad_(True)
    z = b * 1
    lp2, ent2 = lk.token_logprobs_entropy(z, ids, temperature=0.9, inplace_backward=True, backend="cuda")
    (grad2,) = torch.autograd.grad((lp2 * g_lp + ent2 * g_h).sum(), b)
    assert torch.equal(lp, lp2) and torch.equal(ent, ent2) and torch.equal(grad, grad2)
    assert torch.equal(z.detach(), grad2), "the in-place backward writes into the logits buffer"
    x64 = x.view(2, 3, -1).cpu().double().requires_grad_(True)
    lp64, ent64 = ref.token_logprobs_entropy(x64, ids.cpu(), 0.9)
    (grad64,) = torch.autograd.grad((lp64 * g_lp.cpu().double() + ent64 * g_h.cpu().double()).sum(), x64)
    scale = _grad_scale(x, ids.reshape(-1), torch.tensor([0.9]), g_lp.reshape(-1), g_h.reshape(-1)).view(2, 3, -1)
    assert_close(grad, grad64, rtol=GRAD_RTOL[dtype], atol=GRAD_ATOL[dtype], scale=scale, name="dlogits")


def test_degenerate_rows_match_cpu_backend(module):
    """Same NaN / -inf / ignore_index / out-of-range semantics as the CPU backend."""
    vocab = 9_001
    logits = torch.randn(7, vocab) * 2
    logits[0, 100:] = float("-inf")  # masked vocabulary: whole tiles of -inf
    logits[1, ::3] = float("-inf")
    logits[2] = float("-inf")  # all -inf: NaN, never 0
    logits[3, 17] = float("nan")  # NaN propagates
    logits[4, 5] = float("inf")  # +inf poisons the row like the CPU's
    ids = torch.tensor([5, 1, 3, 4, 8, vocab + 4, -100])  # row 5: out of range -> NaN logprob
    temp = torch.tensor([1.3])
    got = _fwd(logits.cuda(), ids.cuda(), temp.cuda())
    cpu = [torch.full((7,), float("nan")) for _ in range(4)]
    from lenkernels import cpu as cpu_loader

    cpu_loader.load("token_stats").token_stats_fwd(
        logits.data_ptr(), 0, 7, vocab, vocab, ids.data_ptr(), temp.data_ptr(), 0, -100, *(o.data_ptr() for o in cpu),
        0, 0, 1,
    )  # fmt: skip
    for name, a, b in zip(("logprobs", "entropy", "lse", "mean_z"), got, cpu):
        assert_close(a, b, rtol=1e-5, scale=20.0, name=name)
    assert got[0][6].item() == 0.0 and math.isnan(got[0][5].item())


def test_deterministic_and_stream_ordered(module):
    x = _rows("contiguous", torch.bfloat16, 3, 151_936)
    ids = torch.randint(0, 151_936, (3,), device="cuda")
    temp = torch.tensor([1.0], device="cuda")
    first = _fwd(x, ids, temp)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # launches go to the caller's current stream
        second = _fwd(x, ids, temp)
    torch.cuda.current_stream().wait_stream(side)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_cuda_graph_capture(module):
    x = _rows("contiguous", torch.bfloat16, 64, 50_000)
    ids = torch.randint(0, 50_000, (64,), device="cuda")
    temp = torch.tensor([1.0], device="cuda")
    outs = [torch.empty(64, device="cuda") for _ in range(4)]
    from lenkernels import cuda

    cuda.token_stats_fwd(x, ids, temp, -100, *outs)  # warm up (module load, plan)
    expected = [o.clone() for o in outs]
    for o in outs:
        o.fill_(float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cuda.token_stats_fwd(x, ids, temp, -100, *outs)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(outs, expected):
        assert torch.equal(a, b)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensor_on_another_device_than_the_current_one(module):
    x = _rows("contiguous", torch.bfloat16, 4, 5_000).to("cuda:1")
    ids = torch.randint(0, 5_000, (4,), device="cuda:1")
    torch.cuda.set_device(0)
    lp, ent = lk.token_logprobs_entropy(x, ids, backend="cuda")
    assert torch.cuda.current_device() == 0, "the launch restores the caller's device"
    lp_ref, ent_ref = ref.token_logprobs_entropy(x.cpu(), ids.cpu())
    assert_close(lp, lp_ref, rtol=STAT_RTOL, scale=_lse(x, torch.tensor([1.0])).abs() + 1, name="logprobs")
    assert_close(ent, ent_ref, rtol=STAT_RTOL, scale=1.0, name="entropy")


def test_empty_and_backend_errors(module):
    x = torch.randn(0, 5, 100, device="cuda", requires_grad=True)
    lp, ent = lk.token_logprobs_entropy(x, torch.zeros(0, 5, dtype=torch.long, device="cuda"), backend="cuda")
    assert lp.shape == (0, 5)
    (lp.sum() + ent.sum()).backward()
    assert x.grad.shape == x.shape
    with pytest.raises(lk.BackendUnavailableError, match="cuda"):
        lk.token_logprobs_entropy(torch.randn(2, 10), torch.zeros(2, dtype=torch.long), backend="cuda")
    with pytest.raises(ValueError, match="n_splits"):
        module.token_stats_fwd(0, 0, 1, 10, 10, 0, 8, 0, 0, -100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)


def test_matches_triton_backend(module):
    pytest.importorskip("triton")
    x = _rows("contiguous", torch.bfloat16, 16, 151_936).requires_grad_(True)
    ids = torch.randint(0, 151_936, (16,), device="cuda")
    out = {}
    for backend in ("cuda", "triton"):
        lp, ent = lk.token_logprobs_entropy(x, ids, temperature=0.7, backend=backend)
        (grad,) = torch.autograd.grad(lp.sum() + ent.sum(), x)
        out[backend] = (lp, ent, grad)
    lse = _lse(x.detach(), torch.tensor([0.7]))
    assert_close(out["cuda"][0], out["triton"][0], rtol=2 * STAT_RTOL, scale=lse.abs() + 1, name="logprobs")
    assert_close(out["cuda"][1], out["triton"][1], rtol=2 * STAT_RTOL, scale=1.0, name="entropy")
    ones = torch.ones(16)
    scale = _grad_scale(x.detach(), ids, torch.tensor([0.7]), ones, ones)
    # each backend rounds its fp32 gradient to bf16 once: at most one bf16 ulp apart
    assert_close(
        out["cuda"][2],
        out["triton"][2],
        rtol=2 * GRAD_RTOL[torch.bfloat16],
        atol=2 * GRAD_ATOL[torch.bfloat16],
        scale=scale,
        name="dlogits",
    )


@pytest.mark.slow
def test_benchmark_shape(module):
    """The benchmark's case (N = 8192, V = 151 936, bf16), checked on a sample of rows."""
    x = (torch.randn(8192, 151_936, device="cuda") * 2).to(torch.bfloat16)
    ids = torch.randint(0, 151_936, (8192,), device="cuda")
    temp = torch.tensor([0.9], device="cuda")
    lp, ent, _, _ = _fwd(x, ids, temp)
    rows = torch.randint(0, 8192, (32,))
    lp_ref, ent_ref = ref.token_logprobs_entropy(x[rows.cuda()].cpu(), ids[rows.cuda()].cpu(), 0.9)
    assert_close(lp[rows.cuda()], lp_ref, rtol=STAT_RTOL, scale=30.0, name="logprobs")
    assert_close(ent[rows.cuda()], ent_ref, rtol=STAT_RTOL, scale=1.0, name="entropy")
    assert not bool(torch.isnan(lp).any()) and not bool(torch.isnan(ent).any())
