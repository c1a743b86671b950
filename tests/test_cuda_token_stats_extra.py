"""The CUDA C++ kernels of the extra token statistics (SPEC 7: sum_p2 / log_sum_p2, argmax /
max_logprob, mean_logit) without a GPU: their per-thread code (``csrc/cuda/token_stats_extra.h``),
replayed on the host block by block and thread by thread (``tests/cuda_host_replay_extra.cu``, built
with nvcc; skipped, saying so, where nvcc is absent), against the float64 reference on fresh random
inputs: ties, -inf masks, per-token temperature, ignore_index rows, fp32/bf16/fp16, row edges, split
ranges, misaligned and in-place rows; bitwise batch invariance; logprob/entropy/lse/mean_z with the
bits of the two-output kernels. tests/test_cuda_compile.py compiles the kernels themselves (sm_80,
sm_90, no spill); tests/test_token_stats_extra.py runs them through ``lenkernels.token_stats`` on a GPU.
"""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

import pytest
import torch

from lenkernels import _build, _checks
from lenkernels.reference import token_stats as ref
from tests.utils import GRAD_ATOL, GRAD_RTOL, STAT_RTOL, assert_close, load_replay, nan_like

NVCC = _build.find_nvcc()
pytestmark = pytest.mark.skipif(
    NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH): the CUDA sources cannot be compiled here"
)

HERE = Path(__file__).resolve().parent
H100_SMS = 132  # the split plan is replayed as an H100 would run it
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _compile(source: Path, out: Path) -> None:
    cmd = [
        NVCC, "-O2", "-std=c++17", "-Xcompiler=-fPIC", "-shared", "-Werror=all-warnings",
        f"-I{_build.INCLUDE}", f"-I{_build.CSRC / 'cuda'}", str(source), "-o", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]


@pytest.fixture(scope="module")
def replay(tmp_path_factory):
    """(extra replay, two-output replay): the second for the bitwise comparison of the shared outputs."""
    tmp = tmp_path_factory.mktemp("cuda_extra")
    _compile(HERE / "cuda_host_replay_extra.cu", tmp / "extra.so")
    _compile(HERE / "cuda_host_replay.cu", tmp / "base.so")
    lib = ctypes.CDLL(str(tmp / "extra.so"))
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.lk_replay_split_count.argtypes = [i64, i64, i64, i64]
    lib.lk_replay_extra_fwd.argtypes = [ptr, i32, i64, i64, i64, ptr, i32, ptr, i64, i64] + [ptr] * 9 + [i32]
    lib.lk_replay_extra_bwd.argtypes = [ptr, i32, i64, i64, i64, ptr, i32, ptr, i64, i64, ptr, ptr, ptr, ptr, ptr,
                                        ptr, i64, i32]  # fmt: skip
    return lib, load_replay(tmp / "base.so")


def _splits(lib, x) -> int:
    return lib.lk_replay_split_count(x.shape[0], x.shape[1], x.element_size(), H100_SMS)


def _fwd(lib, x, ids, temp, ignore_index=-100, n_splits=None):
    """(logprobs, entropy, lse, mean_z, sum_p2, log_sum_p2, argmax, max_logprob, mean_logit), NaN-filled first."""
    n_rows, vocab = x.shape
    n_splits = _splits(lib, x) if n_splits is None else n_splits
    outs = [nan_like(torch.empty(n_rows)) for _ in range(9)]
    outs[6] = torch.full((n_rows,), -7, dtype=torch.int64)
    rc = lib.lk_replay_extra_fwd(
        x.data_ptr(), _checks.DTYPE_CODES[x.dtype], n_rows, vocab, x.stride(0), ids.data_ptr(), ids.element_size(),
        temp.data_ptr(), 0 if temp.numel() == 1 else 1, ignore_index, *(o.data_ptr() for o in outs), n_splits,
    )  # fmt: skip
    assert rc == 0
    return outs


def _bwd(lib, x, ids, temp, lse, mean_z, log_sum_p2, argmax, grads, dlogits, ignore_index=-100, n_splits=None):
    n_rows, vocab = x.shape
    n_splits = _splits(lib, x) if n_splits is None else n_splits
    g = torch.stack([t.to(torch.float32) for t in grads]).contiguous()
    rc = lib.lk_replay_extra_bwd(
        x.data_ptr(), _checks.DTYPE_CODES[x.dtype], n_rows, vocab, x.stride(0), ids.data_ptr(), ids.element_size(),
        temp.data_ptr(), 0 if temp.numel() == 1 else 1, ignore_index, lse.data_ptr(), mean_z.data_ptr(),
        log_sum_p2.data_ptr(), argmax.data_ptr(), g.data_ptr(), dlogits.data_ptr(), dlogits.stride(0), n_splits,
    )  # fmt: skip
    assert rc == 0


def _rows(kind: str, dtype, n_rows: int, vocab: int, gen) -> torch.Tensor:
    """[n_rows, vocab] logits with a tie, a -inf mask and a -inf-only stretch (a padding chunk)."""
    base = torch.randn(n_rows, vocab + 3, generator=gen) * 3
    base = base.to(dtype).float()
    x = base[:, :vocab] if kind == "contiguous" else base[:, 1 : vocab + 1]
    top = x.max(-1).values
    # a tie at the max in row 0: the lower id must win (placed late and early, other order)
    j_late, j_early = vocab - 1, vocab // 3
    x[0, j_late] = x[0, j_early] = top[0] + 1
    if n_rows > 1:
        x[1, ::3] = float("-inf")  # a masked vocabulary
    if n_rows > 2 and vocab > 40:
        x[2, : vocab // 2] = float("-inf")  # whole chunks / tiles of -inf in front
    if kind == "contiguous":
        return x.to(dtype).contiguous()
    full = base.to(dtype)
    full[:, 1 : vocab + 1] = x.to(dtype)
    return full[:, 1 : vocab + 1]  # storage offset 1, row stride V + 3: every row at another 16-byte phase


# (n_rows, vocab, layout, n_splits: 1, or None for the H100 plan): why each is in the grid
CASES = [
    (3, 7, "contiguous", None),  # V below one 16-byte vector: edge scalars only, rows misaligned
    (5, 4_099, "contiguous", None),  # odd V: rows at every 16-byte phase, a scalar tail
    (3, 151_936, "contiguous", None),  # Qwen vocab, few rows: one block per chunk + the finalize kernel
    (4, 50_257, "sliced", None),  # GPT-2 vocab, offset view (misaligned rows): split, a tail
    (3, 2_048 * 8 + 5, "sliced", 1),  # one block walks the row's chunks (the merge in the block)
]


def _check_forward(outs, x, ids, temp, ignore_index=-100):
    lp, ent, lse, mean_z, sp2, lsp2, amax, mlp, mean = outs
    exp = ref.token_stats_extra_forward(x, ids.long(), temp, ignore_index)
    z = x.double() / temp.double().expand(ids.shape).unsqueeze(-1)
    zf = torch.where(torch.isfinite(z), z, torch.zeros_like(z))
    big = zf.abs().amax(-1) + 1
    for name, got, want, scale in [
        ("logprobs", lp, exp[0], big), ("entropy", ent, exp[1], 1.0), ("lse", lse, exp[2], big),
        ("mean_z", mean_z, exp[3], big), ("sum_p2", sp2, exp[4], 0.0), ("log_sum_p2", lsp2, exp[5], 1.0),
        ("max_logprob", mlp, exp[7], 1.0), ("mean_logit", mean, exp[8], zf.abs().mean(-1)),
    ]:  # fmt: skip
        assert_close(got, want, rtol=STAT_RTOL, scale=scale, name=name)
    assert torch.equal(amax, exp[6]), f"argmax {amax.tolist()} != {exp[6].tolist()}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_rows,vocab,layout,n_splits", CASES)
def test_replay_forward_matches_reference(replay, dtype, n_rows, vocab, layout, n_splits):
    lib, base = replay
    gen = torch.Generator().manual_seed(vocab * 7 + n_rows)
    x = _rows(layout, dtype, n_rows, vocab, gen)
    ids = torch.randint(0, vocab, (n_rows,), generator=gen)
    ids[-1] = -100  # ignored row: logprob exactly 0, the other statistics defined
    temp = torch.rand(n_rows, generator=gen) + 0.5  # per-token temperature
    outs = _fwd(lib, x, ids, temp, n_splits=n_splits)
    _check_forward(outs, x, ids, temp)
    assert outs[0][-1] == 0
    if n_rows > 1 and vocab > 7:
        assert outs[6][0] == vocab // 3  # the tie: the lower id
    # logprob, entropy, lse, mean_z: the bits of the two-output kernels (same fold, same reduction)
    two = [nan_like(torch.empty(n_rows)) for _ in range(4)]
    rc = base.lk_replay_fwd(
        x.data_ptr(), _checks.DTYPE_CODES[x.dtype], n_rows, vocab, x.stride(0), ids.data_ptr(), ids.element_size(),
        temp.data_ptr(), 1, -100, *(o.data_ptr() for o in two), None, None,
        _splits(lib, x) if n_splits is None else n_splits,
    )  # fmt: skip
    assert rc == 0
    for name, a, b in zip(("logprobs", "entropy", "lse", "mean_z"), outs[:4], two):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_replay_batch_invariance(replay, dtype):
    """A row's bits do not depend on N, its position, or the plan (1 block a row or 1 a chunk)."""
    lib, _ = replay
    gen = torch.Generator().manual_seed(1)
    vocab = 151_936
    x = _rows("contiguous", dtype, 3, vocab, gen)
    ids = torch.randint(0, vocab, (3,), generator=gen)
    temp = torch.tensor([0.7])
    split = _fwd(lib, x, ids, temp)  # the H100 plan: one block a chunk
    assert _splits(lib, x) > 1
    whole = _fwd(lib, x, ids, temp, n_splits=1)
    alone = _fwd(lib, x[1:2].clone(), ids[1:2].clone(), temp)
    for a, b, c in zip(split, whole, alone):
        assert torch.equal(a, b) and torch.equal(a[1:2], c)


def test_replay_argmax_ties_masks_and_degenerate_rows(replay):
    lib, _ = replay
    vocab = 5_000
    x = torch.randn(6, vocab)
    x[0, [3, 1_700, 4_000]] = 9.0  # a tie across threads and tiles: the lowest id wins
    x[1] = 2.0  # every entry tied
    x[2, :1_000] = float("-inf")  # masked vocabulary, max after the mask, tied
    x[2, 3_000] = x[2, 3_001] = 7.0
    x[3] = float("-inf")  # all -inf: NaN statistics, argmax 0
    x[4, ::2] = float("-inf")
    x[5, 4_999] = 100.0  # one dominant entry (the scalar tail of an fp32 row of 4 999 + 1)
    ids = torch.tensor([3, 0, -100, 5, 1, 4_999])
    temp = torch.ones(1)
    for n_splits in (1, None):
        outs = _fwd(lib, x, ids, temp, n_splits=n_splits)
        assert outs[6].tolist() == [3, 0, 3_000, 0, int(torch.argmax(x[4])), 4_999]
        assert outs[0][2] == 0 and all(torch.isfinite(o[2]) for i, o in enumerate(outs) if i != 6)
        assert all(torch.isnan(o[3]) for i, o in enumerate(outs) if i in (1, 4, 5, 7, 8))
        assert abs(outs[4][1].item() - 1 / vocab) < 1e-9
        ok = torch.tensor([0, 1, 2, 4, 5])
        _check_forward([o[ok] for o in outs], x[ok], ids[ok], temp)


def _grad_scale(x, ids, temp, grads, ignore_index=-100):
    """Sum of |terms| of the gradient per element: the scale its fp32 error grows with."""
    g_lp, g_h, g_sp2, g_lsp2, g_mlp, g_mean = (g.double().unsqueeze(-1) for g in grads)
    t = temp.double().expand(ids.shape).unsqueeze(-1)
    z = x.double() / t
    p = torch.softmax(z, -1)
    q = torch.softmax(2 * z, -1)
    zf = torch.where(torch.isneginf(z), 0, z)
    mean_z = (p * zf).sum(-1, keepdim=True)
    valid = (ids != ignore_index).unsqueeze(-1)
    hot = torch.zeros_like(z).scatter_(-1, torch.where(valid, ids.long().unsqueeze(-1), 0), 1.0) * valid
    top = torch.zeros_like(z).scatter_(-1, torch.argmax(z, -1, keepdim=True), 1.0)
    sp2 = (p * p).sum(-1, keepdim=True)
    ent = torch.where(p > 0, p * ((z - mean_z).abs() + 1), 0)
    terms = ((g_lp * valid).abs() * (hot + p) + g_h.abs() * ent + 2 * g_sp2.abs() * p * (p + sp2)
             + 2 * g_lsp2.abs() * (q + p) + g_mlp.abs() * (top + p) + g_mean.abs() / z.shape[-1])  # fmt: skip
    return terms / t


# which cotangents are non-zero: each output alone (its closed form), and all together
GRAD_SETS = {"sum_p2": (2,), "log_sum_p2": (3,), "max_logprob": (4,), "mean_logit": (5,), "all": (0, 1, 2, 3, 4, 5)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_rows,vocab,layout,n_splits", CASES)
@pytest.mark.parametrize("mode", ["fresh", "inplace", "other_phase"])
@pytest.mark.parametrize("which", sorted(GRAD_SETS))
def test_replay_backward_matches_reference(replay, dtype, n_rows, vocab, layout, n_splits, mode, which):
    lib, _ = replay
    gen = torch.Generator().manual_seed(vocab + n_rows)
    x = _rows(layout, dtype, n_rows, vocab, gen)
    ids = torch.randint(0, vocab, (n_rows,), generator=gen, dtype=torch.int32)  # int32 ids are read as such
    ids[-1] = -100
    temp = torch.rand(n_rows, generator=gen) + 0.5
    outs = _fwd(lib, x, ids, temp, n_splits=n_splits)
    grads = [torch.randn(n_rows, generator=gen) if i in GRAD_SETS[which] else torch.zeros(n_rows) for i in range(6)]
    expected = ref.token_stats_extra_backward(x.double(), ids.long(), temp, grads, -100)
    logits = x.clone() if mode == "inplace" else x
    if mode == "fresh":
        dlogits = nan_like(x)
    elif mode == "inplace":
        dlogits = logits
    else:  # rows at another 16-byte phase than the logits: the scalar path
        dlogits = nan_like(torch.empty(n_rows, vocab + 2, dtype=dtype))[:, 2:] if layout == "sliced" else nan_like(
            torch.empty(n_rows, vocab + 1, dtype=dtype))[:, 1:]  # fmt: skip
    _bwd(lib, logits, ids, temp, outs[2], outs[3], outs[5], outs[6], grads, dlogits, n_splits=n_splits)
    scale = _grad_scale(x, ids, temp, grads)
    assert_close(dlogits, expected, rtol=GRAD_RTOL[dtype], atol=GRAD_ATOL[dtype], scale=scale, name="dlogits")
    assert not torch.isnan(dlogits[1]).any()  # a masked logit: exactly its finite terms, never NaN


def test_replay_large_logits(replay):
    """|z| = 1e4: log_sum_p2 = log S2 - 2 log S and max_logprob = -log S keep fp32's relative precision."""
    lib, _ = replay
    gen = torch.Generator().manual_seed(3)
    x = torch.round((torch.randn(4, 2_000, generator=gen) * 2) * 512) / 512 + 1e4
    ids = torch.randint(0, 2_000, (4,), generator=gen)
    temp = torch.ones(1)
    outs = _fwd(lib, x, ids, temp)
    exp = ref.token_stats_extra_forward(x, ids, temp, -100)
    for i, name in ((1, "entropy"), (4, "sum_p2"), (5, "log_sum_p2"), (7, "max_logprob")):
        assert_close(outs[i], exp[i], rtol=STAT_RTOL, scale=1.0, name=name)
    assert_close(outs[8], exp[8], rtol=STAT_RTOL, name="mean_logit")


# --- the Python launchers' marshalling (no GPU: the module's calls are recorded, not run) ---------------


def _binding_params(doc: str, name: str) -> list[str]:
    """Parameter names of a pybind11 function from its signature line."""
    line = next(s for s in doc.splitlines() if s.startswith(name + "("))
    return [p.split(":")[0].strip() for p in line[len(name) + 1 : line.rindex(")")].split(",")]


def test_launchers_pass_what_the_bindings_take(monkeypatch):
    """Every pointer lands in the parameter of its name, the sizes and strides too, for both launchers
    (the compiled module's own signatures; built by tests/test_cuda_compile.py or here)."""
    import lenkernels.cuda
    from lenkernels import _extensions
    from lenkernels.cuda import token_stats_extra as launch

    module = _extensions.load("_cuda_token_stats", "cuda")
    calls = {}

    class Recorder:
        def __getattr__(self, name):
            if name == "token_stats_splits":
                return lambda n_rows, vocab, dtype, sm_count: module.token_stats_splits(n_rows, vocab, dtype, sm_count)
            params = _binding_params(getattr(module, name).__doc__, name)

            def record(*args):
                assert len(args) == len(params), f"{name}: {len(args)} arguments for {params}"
                calls[name] = dict(zip(params, args))

            return record

    monkeypatch.setattr(launch, "load", lambda family: Recorder())
    # the launch context and the row checks live in lenkernels.cuda (shared with the two-output launchers)
    monkeypatch.setattr(lenkernels.cuda, "_launch_context", lambda x: (0, H100_SMS, 1234))
    for where in (launch, lenkernels.cuda):
        monkeypatch.setattr(where, "_check_rows", lambda x, name: None)
    n, vocab = 3, 151_936
    x = torch.empty(n, vocab + 8, dtype=torch.bfloat16)[:, :vocab]
    ids = torch.zeros(n, dtype=torch.int32)
    temp = torch.ones(n)
    outs = [torch.empty(n) for _ in range(9)]
    outs[6] = torch.empty(n, dtype=torch.int64)
    launch.token_stats_extra_fwd(x, ids, temp, -100, *outs)
    fwd = calls["token_stats_extra_fwd"]
    names = ("logprobs", "entropy", "lse", "mean_z", "sum_p2", "log_sum_p2", "argmax", "max_logprob", "mean_logit")
    assert {k: fwd[k] for k in names} == {k: o.data_ptr() for k, o in zip(names, outs)}
    assert (fwd["logits"], fwd["row_stride"], fwd["vocab"], fwd["n_rows"]) == (x.data_ptr(), vocab + 8, vocab, n)
    assert (fwd["ids"], fwd["id_bytes"], fwd["temp_stride"], fwd["ignore_index"]) == (ids.data_ptr(), 4, 1, -100)
    assert fwd["n_splits"] == 5 and fwd["partial"] != 0 and (fwd["device"], fwd["stream"]) == (0, 1234)
    grads = [torch.full((n,), float(i)) for i in range(6)]
    dlogits = torch.empty_like(x)
    launch.token_stats_extra_bwd(x, ids, temp, outs[2], outs[3], outs[5], outs[6], grads, -100, dlogits)
    bwd = calls["token_stats_extra_bwd"]
    assert (bwd["lse"], bwd["mean_z"], bwd["log_sum_p2"], bwd["argmax"]) == tuple(
        outs[i].data_ptr() for i in (2, 3, 5, 6)
    )
    assert (bwd["dlogits"], bwd["dlogits_row_stride"], bwd["n_splits"]) == (dlogits.data_ptr(), dlogits.stride(0), 5)
