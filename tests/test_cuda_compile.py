"""The CUDA C++ backend without a GPU (nvcc only; skipped, saying so, where nvcc is absent):

- every ``csrc/cuda/*.cu`` compiles for sm_80 and sm_90 with the build's own command and
  ``ptxas -v``, with no error, no warning (``-Werror all-warnings``) and no register spill: one nvcc
  run per module (every run of this file compiles afresh) builds the extension (kernels + pybind11
  binding) and reports every kernel of both architectures; it lands in the extension cache, keyed by
  the source hash, where ``_build.build`` finds it (and tests/test_cuda_ops.py loads it);
- the token-statistics kernels' per-thread code (``csrc/cuda/token_stats.h``), replayed on the host
  block by block and thread by thread (``tests/cuda_host_replay.cu``), matches the float64 reference:
  this checks which elements every thread reads and writes (row edges, split ranges, misaligned and
  in-place rows) before the code ever meets a GPU. The O(N) families' kernels run on the host through
  ``lenkernels.cuda.host_emulation`` in tests/test_cuda_ops.py, the SPEC 7 token-statistics kernels
  through their own replay in tests/test_cuda_token_stats_extra.py; tests/test_cuda_backend.py and
  tests/test_cuda_ops.py run the real kernels on a GPU.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
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

ARCHS = (80, 90)
SOURCES = sorted((_build.CSRC / "cuda").glob("*.cu"))
REPLAY_SOURCE = Path(__file__).resolve().parent / "cuda_host_replay.cu"
H100_SMS = 132  # the split plan is replayed as an H100 would run it


def _module_command(name: str, out: Path) -> list[str]:
    """The build's own nvcc command for a module (``_build.cuda_compile_command``: every architecture,
    host code and binding), with ptxas reporting registers and spills and every warning an error. The
    architectures compile one after the other (no ``--threads``): each report stays contiguous."""
    full = _build.cuda_compile_command(name, _build.cuda_modules()[name], out, NVCC)
    return [a for a in full if not a.startswith("--threads")] + ["-Xptxas=-v,-warn-spills", "-Werror=all-warnings"]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)


_ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\d+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def _parse_ptxas(text: str) -> list[dict]:
    """One record per kernel: name, arch, registers, stack frame and spill bytes."""
    kernels, current = [], None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            current = {"kernel": m.group(1), "arch": int(m.group(2)), "spills": None, "registers": None}
            kernels.append(current)
        elif current is not None and (m := _FRAME.search(line)):
            current["stack"], current["spills"] = int(m.group(1)), int(m.group(2)) + int(m.group(3))
        elif current is not None and (m := _REGS.search(line)):
            current["registers"] = int(m.group(1))
    return kernels


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Every compilation at once (the two cores work in parallel): each extension module with its
    ptxas report, and the host replay library."""
    tmp = tmp_path_factory.mktemp("cuda")
    replay = tmp / "replay.so"
    replay_cmd = [
        NVCC, "-O2", "-std=c++17", "-Xcompiler=-fPIC", "-shared", "-Werror=all-warnings",
        f"-I{_build.INCLUDE}", f"-I{_build.CSRC / 'cuda'}", str(REPLAY_SOURCE), "-o", str(replay),
    ]  # fmt: skip

    def build_module(name):
        """(nvcc process, module path or None, error): the module lands where ``_build.build`` keeps
        it (named by the source hash), so ``_build.build`` returns it without compiling again."""
        sources = _build.cuda_modules()[name]
        target = _build.cache_dir() / f"{name}-{_build.source_hash(sources)}" / f"{name}{_build.ext_suffix()}"
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.parent / f"{name}.partial{_build.ext_suffix()}"
        proc = _run(_module_command(name, partial))
        if proc.returncode != 0:
            return proc, None, proc.stdout + proc.stderr
        os.replace(partial, target)
        try:
            return proc, _build.build(name, "cuda"), ""
        except Exception as exc:  # reported by the test
            return proc, None, str(exc)

    with ThreadPoolExecutor(max_workers=2) as pool:
        modules = {name: pool.submit(build_module, name) for name in _build.cuda_modules()}
        replay_proc = pool.submit(_run, replay_cmd)
        done = {name: f.result() for name, f in modules.items()}
        return {
            "compiles": {_build.cuda_modules()[name][0].name: proc for name, (proc, _, _) in done.items()},
            "modules": {name: (path, error) for name, (_, path, error) in done.items()},
            "replay": (replay_proc.result(), replay),
        }


def test_there_are_cuda_sources():
    names = {p.name for p in SOURCES}
    assert {"token_stats.cu", "policy_loss.cu", "advantages.cu", "phase_stats.cu"} <= names


def _kernels(builds, source: str, arch: int) -> list[dict]:
    proc = builds["compiles"][source]
    return [k for k in _parse_ptxas(proc.stdout + proc.stderr) if k["arch"] == arch]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_source_compiles_without_warnings_or_spills(builds, arch):
    for src in SOURCES:
        proc = builds["compiles"][src.name]
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{src.name} failed:\n{output[-6000:]}"
        warnings = [line for line in output.splitlines() if re.search(r"warning", line, re.IGNORECASE)]
        assert not warnings, f"{src.name}:\n" + "\n".join(warnings)
        assert {k["arch"] for k in _parse_ptxas(output)} == set(ARCHS), f"{src.name}: not every architecture built"
        kernels = _kernels(builds, src.name, arch)
        assert kernels, f"{src.name} sm_{arch}: ptxas reported no kernel:\n{output[-3000:]}"
        unparsed = [k["kernel"] for k in kernels if k["spills"] is None or k["registers"] is None]
        assert not unparsed, f"ptxas output not understood for {unparsed}:\n{output[-3000:]}"
        spills = [f"{k['kernel']}: {k['spills']} spill bytes" for k in kernels if k["spills"] > 0]
        assert not spills, f"{src.name} sm_{arch} register spills:\n" + "\n".join(spills)


@pytest.mark.parametrize("arch", ARCHS)
def test_token_stats_kernels_for_every_dtype(builds, arch):
    names = [k["kernel"] for k in _kernels(builds, "token_stats.cu", arch)]
    kernels = ("token_stats_fwd_kernel", "token_stats_finalize_kernel", "token_stats_bwd_kernel",
               "token_stats_extra_fwd_kernel", "token_stats_extra_finalize_kernel", "token_stats_extra_bwd_kernel")
    for kernel in kernels:
        for dtype in ("If", "I13__nv_bfloat16", "I6__half"):  # mangled template arguments
            assert any(kernel + dtype in n for n in names), f"{kernel}<{dtype}> missing for sm_{arch}: {names}"


# every kernel of the O(N) families (one instance each: dtypes are runtime codes there)
FAMILY_KERNELS = {
    "policy_loss.cu": ("policy_loss_seq_kernel", "policy_loss_fwd_kernel", "policy_loss_finalize_kernel",
                       "policy_loss_bwd_kernel", "kl_penalty_fwd_kernel", "kl_penalty_bwd_kernel"),
    "advantages.cu": ("advantages_row_sums_kernel", "group_advantages_kernel", "gaussian_rank_kernel",
                      "batch_moments_kernel", "advantages_broadcast_kernel", "group_stats_kernel"),
    "phase_stats.cu": ("phase_stats_fwd_kernel", "phase_stats_bwd_kernel", "sequence_stats_fwd_kernel"),
    "rollout_correction.cu": ("rollout_correction_fwd_kernel", "rollout_correction_finalize_kernel"),
}  # fmt: skip


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", sorted(FAMILY_KERNELS))
def test_family_kernels_built(builds, source, arch):
    names = [k["kernel"] for k in _kernels(builds, source, arch)]
    for kernel in FAMILY_KERNELS[source]:
        assert sum(f"{len(kernel)}{kernel}" in n for n in names) == 1, f"{kernel} missing for sm_{arch}: {names}"


def test_extension_modules_build_and_link(builds):
    for name, (path, error) in builds["modules"].items():
        assert path is not None, error[-6000:]
        sources = _build.cuda_modules()[name]
        assert path.name == f"{name}{_build.ext_suffix()}" and _build.source_hash(sources) in str(path)
        # import it in a fresh interpreter: every symbol resolves (no GPU is needed to import)
        probe = (
            "import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('lenkernels.{name}', sys.argv[1])\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "print(m.SOURCE_HASH, ' '.join(sorted(n for n in dir(m) if not n.startswith('_'))))\n"
        )
        proc = subprocess.run(
            [sys.executable, "-c", probe, str(path)], check=False, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        source_hash, *symbols = proc.stdout.split()
        assert source_hash == _build.source_hash(sources)
        expected = {
            "_cuda_token_stats": {"token_stats_fwd", "token_stats_bwd", "token_stats_splits", "token_stats_extra_fwd",
                                  "token_stats_extra_bwd"},
            "_cuda_policy_loss": {"policy_loss_fwd", "policy_loss_bwd", "policy_loss_splits", "kl_penalty_fwd",
                                  "kl_penalty_bwd"},
            "_cuda_advantages": {"group_advantages", "gaussian_rank", "batch_shift_scale", "broadcast", "group_stats"},
            "_cuda_phase_stats": {"phase_stats_fwd", "phase_stats_bwd", "sequence_stats_fwd"},
            "_cuda_rollout_correction": {"rollout_correction_fwd"},
        }  # fmt: skip
        assert expected.get(name, set()) <= set(symbols), f"{name}: {symbols}"


# --- the kernels replayed on the host ---------------------------------------------------------------


@pytest.fixture(scope="module")
def replay(builds):
    proc, path = builds["replay"]
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return load_replay(path)


def _splits(lib, x: torch.Tensor) -> int:
    return lib.lk_replay_split_count(x.shape[0], x.shape[1], x.element_size(), H100_SMS)


def _replay_fwd(lib, x, ids, temp, ignore_index=-100, n_splits=None, state=False):
    """(logprobs, entropy, lse, mean_z), then the rows' states (max_z, log_s) with ``state``."""
    n_rows, vocab = x.shape
    n_splits = _splits(lib, x) if n_splits is None else n_splits
    outs = [nan_like(torch.empty(n_rows)) for _ in range(6 if state else 4)]
    ptrs = [o.data_ptr() for o in outs] + [None, None] * (not state)  # null: no state wanted
    rc = lib.lk_replay_fwd(
        x.data_ptr(), _checks.DTYPE_CODES[x.dtype], n_rows, vocab, x.stride(0), ids.data_ptr(), ids.element_size(),
        temp.data_ptr(), 0 if temp.numel() == 1 else 1, ignore_index, *ptrs, n_splits,
    )  # fmt: skip
    assert rc == 0
    return outs


def _replay_bwd(lib, x, ids, temp, lse, mean_z, g_lp, g_h, dlogits, ignore_index=-100, n_splits=None):
    n_rows, vocab = x.shape
    n_splits = _splits(lib, x) if n_splits is None else n_splits
    rc = lib.lk_replay_bwd(
        x.data_ptr(), _checks.DTYPE_CODES[x.dtype], n_rows, vocab, x.stride(0), ids.data_ptr(), ids.element_size(),
        temp.data_ptr(), 0 if temp.numel() == 1 else 1, ignore_index, lse.data_ptr(), mean_z.data_ptr(),
        g_lp.data_ptr(), g_lp.stride(0), g_h.data_ptr(), g_h.stride(0), dlogits.data_ptr(), dlogits.stride(0), n_splits,
    )  # fmt: skip
    assert rc == 0


def _grad_scale(x, ids, temp, g_lp, g_h, ignore_index):
    """Sum of |terms| of SPEC 1's gradient per element: the scale its fp32 error grows with."""
    z = x.double() / temp.double().expand(ids.shape).unsqueeze(-1)
    p = torch.softmax(z, -1)
    mean_z = (p * torch.where(torch.isneginf(z), 0, z)).sum(-1, keepdim=True)
    valid = (ids != ignore_index).unsqueeze(-1)
    onehot = torch.zeros_like(z).scatter_(-1, torch.where(valid, ids.long().unsqueeze(-1), 0), 1.0) * valid
    ent = torch.where(p > 0, p * ((z - mean_z).abs() + 1), 0)
    lp_term = (g_lp.double().unsqueeze(-1) * valid).abs() * (onehot + p)
    return (lp_term + g_h.double().abs().unsqueeze(-1) * ent) / temp.double().expand(ids.shape).unsqueeze(-1)


def _rows(kind: str, dtype, n_rows: int, vocab: int) -> torch.Tensor:
    """[n_rows, vocab] logits laid out as `kind` says."""
    if kind == "contiguous":
        return (torch.randn(n_rows, vocab) * 3).to(dtype)
    # storage offset 1 and an odd row stride: every row starts at a different 16-byte phase
    base = (torch.randn(n_rows, vocab + 3) * 3).to(dtype)
    return base[:, 1 : vocab + 1]


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (n_rows, vocab, layout, n_splits: 1, or None for the H100 plan): why each is in the grid
CASES = [
    (3, 7, "contiguous", None),  # V below one 16-byte vector: edge scalars only, rows misaligned
    (5, 4_099, "contiguous", None),  # odd V: rows at every 16-byte phase (narrow loads where misaligned), a tail
    (2, 151_936, "contiguous", None),  # Qwen vocab, few rows: the plan splits each row (finalize kernel)
    (4, 50_257, "sliced", None),  # GPT-2 vocab, offset view (misaligned rows): one block per chunk, a tail
    (3, 2_048 * 8 + 5, "sliced", 1),  # exact multiple of one block tile plus a tail, one block per row
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_rows,vocab,layout,n_splits", CASES)
def test_replay_forward_matches_reference(replay, dtype, n_rows, vocab, layout, n_splits):
    x = _rows(layout, dtype, n_rows, vocab)
    ids = torch.randint(0, vocab, (n_rows,))
    ids[0] = -100  # ignored row: logprob exactly 0
    temp = torch.rand(n_rows) + 0.5  # per-row temperature
    lp, ent, lse, mean_z = _replay_fwd(replay, x, ids, temp, n_splits=n_splits)
    lp_ref, ent_ref = ref.token_logprobs_entropy(x, ids, temp)
    lse_ref = torch.logsumexp(x.double() / temp.double().unsqueeze(-1), -1)
    assert_close(lp, lp_ref, rtol=STAT_RTOL, scale=lse_ref.abs() + 1, name="logprobs")
    assert_close(ent, ent_ref, rtol=STAT_RTOL, scale=1.0, name="entropy")
    assert_close(lse, lse_ref, rtol=STAT_RTOL, scale=1.0, name="lse")
    assert_close(mean_z, lse_ref - ent_ref, rtol=STAT_RTOL, scale=lse_ref.abs() + 1, name="mean_z")
    assert lp[0] == 0


# (dtype, base, spread, quantum, temperature): logits around ±base on a grid where every x / T is
# exact in fp32 (tests/test_hardening_large_logits.py), |z| up to 1e4
LARGE = [
    (torch.float32, 1e4, 3.0, 2.0**-9, 1.0),
    (torch.float32, 30.0, 0.03, 2.0**-12, 0.01),
    (torch.float32, 100.0, 0.03, 2.0**-12, 0.01),
    (torch.bfloat16, 1e3, 8.0, None, 1.0),
]


@pytest.mark.parametrize("n_splits", [1, None])  # one block per row, and the plan's (a block per chunk)
@pytest.mark.parametrize(
    "dtype,base,spread,quantum,temp", LARGE, ids=[f"{str(c[0])[6:]}-{c[1]:g}-T{c[4]:g}" for c in LARGE]
)
def test_replay_large_logits(replay, dtype, base, spread, quantum, temp, n_splits):
    """logprob = (z_y - m) - log S, and the tile fold forms (x / T - m) before scaling to base 2:
    exact to STAT_RTOL relative to |logprob| + 1 at |z| = 1e4 (z_y - lse was ~4e-4 off there, and
    x * log2(e) / T - m * log2(e) ~1e-3); the state outputs add up to the float64 lse."""
    gen = torch.Generator().manual_seed(0)
    n_rows, vocab = 4, 20_000
    noise = torch.randn(n_rows, vocab, generator=gen) * spread
    if quantum is not None:
        noise = torch.round(noise / quantum) * quantum
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0])[:, None]
    x = (base * sign + noise).to(dtype)
    x[2] = x[2].float().max().to(dtype)  # all equal: logprob exactly -log V
    ids = torch.randint(0, vocab, (n_rows,), generator=gen)
    temps = torch.full((n_rows,), temp)
    lp, ent, lse, mean_z, max_z, log_s = _replay_fwd(replay, x, ids, temps, n_splits=n_splits, state=True)
    lp_ref, ent_ref = ref.token_logprobs_entropy(x, ids, temps)
    lse_ref = torch.logsumexp(x.double() / temps.double().unsqueeze(-1), -1)
    assert_close(lp, lp_ref, rtol=STAT_RTOL, scale=1.0, name="logprobs")
    assert_close(ent, ent_ref, rtol=STAT_RTOL, scale=1.0, name="entropy")
    assert abs(lp[2].item() + math.log(vocab)) <= STAT_RTOL * (math.log(vocab) + 1)
    assert_close(max_z.double() + log_s.double(), lse_ref, rtol=STAT_RTOL, scale=1.0, name="max_z + log_s")
    assert_close(lse, lse_ref, rtol=STAT_RTOL, scale=0.0, name="lse")
    # backward: p = exp(z - lse) loses only the rounding of lse (|lse| * 2^-24 relative), no NaN
    g_lp, g_h = torch.randn(n_rows, generator=gen), torch.randn(n_rows, generator=gen)
    dlogits = nan_like(x)
    _replay_bwd(replay, x, ids, temps, lse, mean_z, g_lp, g_h, dlogits, n_splits=n_splits)
    expected = ref.token_stats_backward(x, ids, temps, g_lp, g_h, -100)
    rtol = GRAD_RTOL[dtype] + 4 * lse_ref.abs().max().item() * 2.0**-24
    scale = _grad_scale(x, ids, temps, g_lp, g_h, -100)
    assert_close(dlogits, expected, rtol=rtol, atol=GRAD_ATOL[dtype], scale=scale, name="dlogits")


def test_replay_split_plan(replay):
    plan = replay.lk_replay_split_count  # (N, V, element bytes, SMs): nothing else
    assert plan(8192, 151_936, 2, H100_SMS) == 1  # rows alone give several waves of blocks
    assert plan(2_112, 151_936, 2, H100_SMS) == 1  # 4 waves of 132 SMs x 4 blocks
    # fewer rows: one block per chunk of 4 tiles (4 x 256 x 4 vectors), never another split (the
    # chunks, and so the results, are the same whatever N: batch invariance)
    assert plan(2_111, 151_936, 2, H100_SMS) == 5  # 18 992 vectors
    assert plan(300, 151_936, 4, H100_SMS) == 10  # 37 984 vectors
    assert plan(1, 151_936, 2, H100_SMS) == 5
    assert plan(64, 151_936, 2, H100_SMS) == 5
    assert plan(1, 7, 4, H100_SMS) == 1  # less than a chunk: never split
    assert plan(0, 7, 4, H100_SMS) == 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_rows,vocab,layout,n_splits", CASES)
@pytest.mark.parametrize("mode", ["fresh", "inplace", "other_phase"])
def test_replay_backward_matches_reference(replay, dtype, n_rows, vocab, layout, n_splits, mode):
    x = _rows(layout, dtype, n_rows, vocab)
    ids = torch.randint(0, vocab, (n_rows,), dtype=torch.int32)  # int32 ids are read as such
    ids[-1] = -100
    temp = torch.tensor([0.8])
    _, _, lse, mean_z = _replay_fwd(replay, x, ids, temp, n_splits=n_splits)
    g_lp = torch.randn(2 * n_rows)[::2]  # stride 2
    g_h = torch.randn(1).expand(n_rows)  # stride 0: broadcast
    expected = ref.token_stats_backward(x.double(), ids.long(), temp, g_lp, g_h, -100)
    logits = x.clone() if mode == "inplace" else x
    if mode == "fresh":
        dlogits = nan_like(x)  # rows at the same 16-byte phase as the logits: vector path
    elif mode == "inplace":
        dlogits = logits
    else:  # rows at another phase than the logits: the scalar path
        dlogits = (
            nan_like(torch.empty(n_rows, vocab + 2, dtype=dtype))[:, 2:]
            if layout == "sliced"
            else nan_like(torch.empty(n_rows, vocab + 1, dtype=dtype))[:, 1:]
        )
    _replay_bwd(replay, logits, ids, temp, lse, mean_z, g_lp, g_h, dlogits, n_splits=n_splits)
    scale = _grad_scale(x, ids, temp, g_lp, g_h, -100)
    assert_close(dlogits, expected, rtol=GRAD_RTOL[dtype], atol=GRAD_ATOL[dtype], scale=scale, name="dlogits")
