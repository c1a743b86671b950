"""Batch invariance (DESIGN.md "Batch invariance"): a row's token statistics (logprob, entropy, lse,
mean_z, the state max_z / log_s) and its dlogits row are bitwise identical whatever else is in the
batch: the batch size N (which picks the split-vocab plan), the row's position, padded ``[B, T, V]``
against packed ``[N, V]`` input, and a row-strided view. RL compares logprobs computed in different
batch shapes (rollout, old policy, update) and expects ratio == 1 exactly on-policy, so closeness is
not enough: every comparison here is ``torch.equal``.

Backends: cpu, triton (the interpreter on CPU tensors without a GPU) and reference through the
op's host launchers (what its custom op calls, forward and backward), and the CUDA kernels replayed
on the host thread by thread (tests/cuda_host_replay.cu, built with nvcc; skipped without it) under
both of their plans (one block per row, one per chunk).
V is odd, so the rows of a packed batch start at every 16-byte phase, and large enough that the
plans differ with N: before the reduction tree was made a function of V alone, the Triton forward
split a row's 10 tiles across 5, 4, 2 or 1 programs for N = 1, 2, 7, 64 (and merged the parts in
another order than one program folds them), and the CUDA forward split its vectors across up to 8
blocks: those statistics differed in the last bits (this test failed on both).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from lenkernels import _build, _checks
from lenkernels.ops.token_stats import token_stats_bwd, token_stats_fwd
from tests.utils import backend_params, load_replay

VOCAB = 40_009  # 2 Triton chunks of 8 x 4096 (the second with the partial tile), 10 CPU chunks of 4096
N_PROBES = 3
IGNORE = -100
DTYPES = [torch.float32, torch.bfloat16]

# (N, layout, {probe: flat row position}): every probe at several positions, in batches whose sizes
# select different split plans (the Triton interpreter's plan splits rows for N < 8; the CPU backend
# splits rows across threads when they are fewer than its threads)
BATCHES = [
    (2, "packed", {0: 1, 1: 0}),
    (7, "packed", {0: 6, 1: 3, 2: 0}),
    (7, "padded", {0: 2, 1: 5, 2: 6}),
    (7, "sliced", {0: 0, 1: 6, 2: 1}),
    (64, "packed", {0: 63, 1: 17, 2: 40}),
    (64, "padded", {0: 31, 1: 32, 2: 5}),
]


def _probes(dtype, vocab=VOCAB):
    """The rows followed through every batch: logits, id, temperature and the two cotangents."""
    gen = torch.Generator().manual_seed(1234)
    x = (torch.randn(N_PROBES, vocab, generator=gen) * 3).to(dtype)
    x[1, ::7] = float("-inf")  # masked vocabulary entries
    x[2, :5000] += 6  # the max far from the row's end
    ids = torch.tensor([5, vocab - 1, IGNORE])
    temp = torch.tensor([0.7, 1.0, 1.3])
    g_lp = torch.tensor([0.5, -1.25, 2.0])
    g_h = torch.tensor([-0.75, 0.25, 1.5])
    return x, ids, temp, g_lp, g_h


def _batch(probes, n_rows, layout, where, vocab=VOCAB):
    """(logits [..., V], ids, temperature, g_lp, g_h) with the probes at flat positions ``where``
    among random filler rows; padded: [2, T, V] with 2 T >= N rows, sliced: a [N, V] view of
    [N, V + 3] (odd row stride, storage offset 1)."""
    x_p, ids_p, temp_p, g_lp_p, g_h_p = probes
    total = 2 * -(-n_rows // 2) if layout == "padded" else n_rows
    x = (torch.randn(total, vocab) * 3).to(x_p.dtype)
    ids = torch.randint(0, vocab, (total,))
    temp = torch.rand(total) + 0.5
    g_lp, g_h = torch.randn(total), torch.randn(total)
    for probe, row in where.items():
        x[row], ids[row], temp[row], g_lp[row], g_h[row] = (
            x_p[probe],
            ids_p[probe],
            temp_p[probe],
            g_lp_p[probe],
            g_h_p[probe],
        )
    if layout == "sliced":
        wide = torch.full((total, vocab + 3), float("nan"), dtype=x.dtype)
        wide[:, 1 : vocab + 1] = x
        x = wide[:, 1 : vocab + 1]
        assert x.stride(0) == vocab + 3 and x.storage_offset() == 1
    if layout == "padded":
        shape = (2, total // 2)
        return (
            x.reshape(*shape, vocab),
            ids.reshape(shape),
            temp.reshape(shape),
            g_lp.reshape(shape),
            g_h.reshape(shape),
        )
    return x, ids, temp, g_lp, g_h


def _run(backend, logits, ids, temp, g_lp, g_h):
    """Every forward output ([N] each, flattened) and dlogits ([N, V]) of a batch, through the op's
    host launchers (the custom op's forward and backward call these)."""
    temp = temp.reshape(-1).contiguous()
    stats = token_stats_fwd(logits, ids, temp, IGNORE, backend, state=True)
    lse, mean_z = stats[2], stats[3]
    dlogits = torch.full_like(logits, float("nan"))
    token_stats_bwd(logits, ids, temp, lse, mean_z, g_lp, g_h, IGNORE, backend, dlogits)
    return [s.reshape(-1) for s in stats], dlogits.reshape(-1, logits.shape[-1])


NAMES = ("logprobs", "entropy", "lse", "mean_z", "max_z", "log_s")


def _assert_same_rows(backend, alone, got, where, what):
    for probe, row in where.items():
        (stats_1, grad_1), (stats_n, grad_n) = alone[probe], got
        for name, a, b in zip(NAMES, stats_1, stats_n):
            assert torch.equal(a[0], b[row]) or (a[0].isnan() and b[row].isnan()), (
                f"{backend} {what}: probe {probe} at row {row}: {name} {b[row].item()!r} != {a[0].item()!r} alone"
            )
        assert torch.equal(grad_1[0], grad_n[row]), (
            f"{backend} {what}: probe {probe} at row {row}: dlogits differ from the row alone in "
            f"{int((grad_1[0] != grad_n[row]).sum())} of {grad_1.shape[-1]} elements"
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", backend_params("token_stats"))
def test_rows_bitwise_identical_in_any_batch(backend, device, dtype):
    if backend == "cuda":
        pytest.skip("the CUDA kernels need a GPU here: test_cuda_replay_rows_bitwise_identical replays them")
    probes = tuple(t.to(device) for t in _probes(dtype))
    alone = []
    for probe in range(N_PROBES):
        batch = _batch(probes, 1, "packed", {probe: 0})
        alone.append(_run(backend, *(t.to(device) for t in batch)))
    for n_rows, layout, where in BATCHES:
        batch = _batch(probes, n_rows, layout, where)
        got = _run(backend, *(t.to(device) for t in batch))
        _assert_same_rows(backend, alone, got, where, f"N={n_rows} {layout}")


# --- the CUDA kernels replayed on the host ---------------------------------------------------------

NVCC = _build.find_nvcc()
REPLAY_SOURCE = Path(__file__).resolve().parent / "cuda_host_replay.cu"
REPLAY_VOCAB = 50_257  # odd; 2 chunks in bf16, 4 in fp32


@pytest.fixture(scope="module")
def replay(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc not found: the CUDA kernels cannot be replayed here")
    out = tmp_path_factory.mktemp("replay") / "replay.so"
    cmd = [
        NVCC, "-O2", "-std=c++17", "-Xcompiler=-fPIC", "-shared", f"-I{_build.INCLUDE}",
        f"-I{_build.CSRC / 'cuda'}", str(REPLAY_SOURCE), "-o", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return load_replay(out)


def _replay(lib, n_splits, logits, ids, temp, g_lp, g_h):
    x = logits.reshape(-1, logits.shape[-1])
    ids, temp, g_lp, g_h = (t.reshape(-1).contiguous() for t in (ids, temp, g_lp, g_h))
    n_rows, vocab = x.shape
    outs = [torch.full((n_rows,), float("nan")) for _ in range(6)]
    rc = lib.lk_replay_fwd(
        x.data_ptr(), _checks.DTYPE_CODES[x.dtype], n_rows, vocab, x.stride(0), ids.data_ptr(), ids.element_size(),
        temp.data_ptr(), 1, IGNORE, *[o.data_ptr() for o in outs], n_splits,
    )  # fmt: skip
    assert rc == 0, f"lk_replay_fwd refused n_splits={n_splits}"
    dlogits = torch.full_like(x, float("nan"))
    rc = lib.lk_replay_bwd(
        x.data_ptr(), _checks.DTYPE_CODES[x.dtype], n_rows, vocab, x.stride(0), ids.data_ptr(), ids.element_size(),
        temp.data_ptr(), 1, IGNORE, outs[2].data_ptr(), outs[3].data_ptr(), g_lp.data_ptr(), 1, g_h.data_ptr(), 1,
        dlogits.data_ptr(), dlogits.stride(0), n_splits,
    )  # fmt: skip
    assert rc == 0
    return outs, dlogits


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_replay_rows_bitwise_identical(replay, dtype):
    probes = _probes(dtype, REPLAY_VOCAB)
    elem = torch.empty(0, dtype=dtype).element_size()

    def plans(n_rows):
        # one block per row, and one per chunk: the two plans the kernels run (the H100 plan picks
        # one of them by N; a small SM count makes it pick the other)
        return sorted({replay.lk_replay_split_count(n_rows, REPLAY_VOCAB, elem, sms) for sms in (132, 1)})

    assert plans(64) == [1, replay.lk_replay_split_count(1, REPLAY_VOCAB, elem, 132)] and plans(64)[1] > 1
    alone = [_replay(replay, 1, *_batch(probes, 1, "packed", {p: 0}, REPLAY_VOCAB)) for p in range(N_PROBES)]
    for n_rows, layout, where in BATCHES:
        batch = _batch(probes, n_rows, layout, where, REPLAY_VOCAB)
        for n_splits in plans(n_rows):
            got = _replay(replay, n_splits, *batch)
            _assert_same_rows("cuda (replay)", alone, got, where, f"N={n_rows} {layout} n_splits={n_splits}")


# --- linear_logprobs_entropy: hidden states @ LM head ---------------------------------------------

LINEAR_VOCAB = 2_501  # odd; Triton: 40 tiles of 64 in fp32 (5 chunks), 20 of 128 in 16-bit (3 chunks)
LINEAR_DIM = 80  # not a multiple of BLOCK_K (32): the last K block is masked
LINEAR_CHUNK = 1 << 24  # one fixed chunk_size: it picks the tile plan by design (invariance is per chunk_size)

# (N, layout, {probe: flat row position}): positions 0, 63 (the last of a 64-row tile), 64, the
# second and fourth row tile; N = 1, 5, 70, 200 give the Triton interpreter 1, 1, 2 and 4 row tiles,
# so its plan splits a row tile's work across 8, 8, 4 and 2 programs. Before the vocabulary was cut
# into fixed chunks those were 8, 8, 4, 2 splits of a row's 40 fp32 tiles (7, 7, 4, 2 of 20 in bf16)
# merged in a tree that followed them, and the interpreter's tl.dot (a numpy matmul) rounded a row
# by its place in the 64-row tile: statistics and dlogits differed in the last bits (this failed).
LINEAR_BATCHES = [
    (5, "packed", {0: 4, 1: 0, 2: 2}),
    (70, "packed", {0: 63, 1: 64, 2: 0}),
    (70, "padded", {0: 69, 1: 35, 2: 36}),
    (200, "packed", {0: 199, 1: 130, 2: 191}),
]


def _linear_probes(dtype):
    gen = torch.Generator().manual_seed(4321)
    h = torch.randn(N_PROBES, LINEAR_DIM, generator=gen).to(dtype)
    h[2] *= 4  # a peaked distribution
    ids = torch.tensor([5, LINEAR_VOCAB - 1, IGNORE])
    temp = torch.tensor([0.7, 1.0, 1.3])
    g_lp = torch.tensor([0.5, -1.25, 2.0])
    g_h = torch.tensor([-0.75, 0.25, 1.5])
    return h, ids, temp, g_lp, g_h


def _linear_batch(probes, n_rows, layout, where):
    h_p, ids_p, temp_p, g_lp_p, g_h_p = probes
    total = 2 * -(-n_rows // 2) if layout == "padded" else n_rows
    h = torch.randn(total, LINEAR_DIM).to(h_p.dtype)
    ids = torch.randint(0, LINEAR_VOCAB, (total,))
    temp = torch.rand(total) + 0.5
    g_lp, g_h = torch.randn(total), torch.randn(total)
    for probe, row in where.items():
        h[row], ids[row], temp[row], g_lp[row], g_h[row] = (
            h_p[probe], ids_p[probe], temp_p[probe], g_lp_p[probe], g_h_p[probe],
        )  # fmt: skip
    if layout == "padded":
        shape = (2, total // 2)
        return h.reshape(*shape, LINEAR_DIM), ids.reshape(shape), temp.reshape(shape), g_lp, g_h
    return h, ids, temp, g_lp, g_h


def _linear_run(backend, weight, bias, hidden, ids, temp, g_lp, g_h):
    """Every forward output ([N] each) and the dlogits rows ([N, V], one backward tile of the whole
    batch) through the op's host launchers, flattening padded input as the public function does."""
    from lenkernels import _backend
    from lenkernels import distributed as lkdist
    from lenkernels.ops.linear_stats import FAMILY, linear_stats_fwd

    h = hidden.reshape(-1, hidden.shape[-1])
    n_rows, vocab = h.shape[0], weight.shape[0]
    local = lkdist.shard_local_ids(ids.reshape(-1), torch.zeros(1, dtype=torch.int64), vocab, IGNORE)
    temp = temp.reshape(-1).contiguous()
    stats = linear_stats_fwd(h, weight, bias, local, temp, LINEAR_CHUNK, backend, state=True)
    dlogits = torch.full((n_rows, vocab), float("nan"), dtype=h.dtype, device=h.device)
    _backend.kernels(backend, FAMILY).linear_stats_bwd_tile(
        h, weight, bias, local, temp, stats[2], stats[3], g_lp, g_h, (0, n_rows), (0, vocab), dlogits
    )  # fmt: skip
    return list(stats), dlogits


def _linear_backend_params():
    """triton only: the cpu and reference backends take their logits from an eager GEMM (MKL here),
    which picks its kernel, and so its summation order over D, by the number of rows (fp32 differs
    from N = 2 on): they are not batch invariant, and the README says so."""
    return [p for p in backend_params("linear_stats") if p.values[0] == "triton"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", _linear_backend_params())
def test_linear_rows_bitwise_identical_in_any_batch(backend, device, dtype):
    """linear_logprobs_entropy: a row's statistics and its dlogits row are bitwise identical whatever
    N (which picks the Triton split plan), its position (in and across BLOCK_N row tiles) and padded
    [B, T, D] vs packed [N, D], for a fixed chunk_size (it picks the tile plan by design). The hidden
    gradient row is dlogits @ W by a host GEMM: not covered."""
    gen = torch.Generator().manual_seed(99)
    weight = (torch.randn(LINEAR_VOCAB, LINEAR_DIM, generator=gen) * 0.5).to(dtype).to(device)
    bias = torch.randn(LINEAR_VOCAB, generator=gen).to(dtype).to(device)
    probes = _linear_probes(dtype)
    alone = []
    for probe in range(N_PROBES):
        batch = _linear_batch(probes, 1, "packed", {probe: 0})
        alone.append(_linear_run(backend, weight, bias, *(t.to(device) for t in batch)))
    for n_rows, layout, where in LINEAR_BATCHES:
        batch = _linear_batch(probes, n_rows, layout, where)
        got = _linear_run(backend, weight, bias, *(t.to(device) for t in batch))
        _assert_same_rows(backend, alone, got, where, f"linear N={n_rows} {layout}")
