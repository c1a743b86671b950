"""Static SASS report of the kernels that stream logits or hidden-state tiles: how close each one
can get to the speed of light, measured without a GPU.

``python -m lenkernels.bench.sass [--arch 90 --arch 80] [--json PATH] [--markdown]``

Each kernel is compiled for sm_90 and sm_80 on the CPU (Triton: ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))`` with the module's compilation spec (``AOT_CASES`` or
``AOT_SPECS``, lenkernels/triton/aot.py), its pointers 16-byte aligned as Triton's launcher
specialises any such tensor; the token-stats kernels in their ``ALIGNED`` variant (rows on 16-byte
boundaries, 16-byte accesses) and, as ``<name>.unaligned``, the other one; CUDA C++:
``nvcc -cubin -arch=sm_XX`` with the build's flags) and disassembled (cuobjdump/nvdisasm shipped with
Triton). The hot loop is the innermost backward-branching loop that moves the most global-memory
bytes; per kernel the report gives, from that loop's static instructions:

- instructions per logit: warp instructions of one iteration / logits one thread handles in it
  (the loop's global-load bytes / element size: every load of these loops is a logit); i.e.
  thread-instructions per logit, the unit of the issue model below;
- MUFU (exp2, rcp, lg2) per logit; global load/store opcodes (``LDG.E.128`` = 16 bytes a thread,
  ``LDG.E.U16`` = 2); shuffles and barriers per iteration; branches inside the loop;
- registers and shared memory (cuobjdump -res-usage), and an occupancy estimate (warps per SM from
  registers, threads, shared memory and the 32-block limit);
- for a loop nested in another (a chunk loop around the tile loop), the enclosing loop's own
  instructions: the per-chunk cost (block reduction), also per logit of the chunk.

The issue's model ("The GPU kernels at speed of light, measured without a GPU"): an SM issues 4 warp
instructions per clock; 132 SMs at 1.98 GHz give 4 x 32 x 132 x 1.98e9 = 3.35e13 thread-instructions
per second (H100 SXM; the H200 has the same SMs and clocks). Predicted time of a pass over N x V
logits = max(bytes / bandwidth, N x V x instructions per logit / 3.35e13), with 3.35 TB/s (H100) or
4.8 TB/s (H200), reported also as a multiple of the bandwidth floor (1.00 = at the speed of light).
Calibration (from the issue): TRL's in-tree Triton kernel counts 26 instructions per logit and the
model predicts 0.97 ms at N = 8192, V = 151 936 bf16 on an H100, against 0.89 ms published.

These are static counts: predicated-off instructions count, latency and memory stalls do not, and
the loop is assumed to run at the issue rate. They rank kernels and catch regressions
(tests/test_sass.py holds the budgets); GPU timings are the measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# --- the issue's model ---------------------------------------------------------------------------
SMS = 132
CLOCK_HZ = 1.98e9
WARP_ISSUE_PER_CLOCK = 4
ISSUE_RATE = WARP_ISSUE_PER_CLOCK * 32 * SMS * CLOCK_HZ  # thread-instructions per second (3.35e13)
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}  # bytes per second
MODEL_N, MODEL_V, MODEL_ELEM = 8192, 151_936, 2  # bf16 logits
CALIBRATION = {"kernel": "TRL in-tree Triton logprob/entropy kernel", "instructions_per_logit": 26,
               "predicted_ms_h100": None, "published_ms_h100": 0.89}  # fmt: skip

# per-SM limits for the occupancy estimate (sm_80 and sm_90 alike, but for shared memory)
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
REGS_PER_SM = 65536
SMEM_PER_SM = {80: 164 * 1024, 90: 228 * 1024}

REPO = Path(__file__).resolve().parents[2]
RESULT = REPO / "benchmarks" / "results" / "sass-sm90.json"


@dataclass
class Kernel:
    """One kernel to report: how to compile it and what one of its passes moves."""

    name: str  # report name
    source: str  # "triton" or "cuda"
    role: str  # "fwd" (reads N x V logits), "bwd" (reads and writes them), "epilogue" (linear_stats)
    threads: int
    spec: dict | None = None  # Triton: an AOT_SPECS entry
    symbol: str = ""  # CUDA: a substring of the mangled name
    elem_bytes: int = 2
    chunk_logits_per_thread: int | None = None  # logits a thread folds per iteration of the enclosing loop
    logits_per_thread: int | None = None  # epilogue kernels: logits a thread owns per tile
    note: str = ""
    results: dict = field(default_factory=dict)


# --- tools ------------------------------------------------------------------------------------------


def _nvidia_tool(name: str) -> str:
    """cuobjdump / nvdisasm: Triton's bundled copy, else the CUDA toolkit's."""
    try:
        from triton import knobs

        path = getattr(knobs.nvidia, name).path
        if path and os.path.exists(path):
            return path
    except Exception:  # an older Triton without knobs: fall through
        pass
    from shutil import which

    from lenkernels import _build

    nvcc = _build.find_nvcc()
    for cand in ([str(Path(nvcc).parent / name)] if nvcc else []) + [which(name) or ""]:
        if cand and os.path.exists(cand):
            return cand
    raise FileNotFoundError(f"{name} not found (neither in Triton's backends/nvidia/bin nor beside nvcc)")


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return proc.stdout + proc.stderr


def versions() -> dict:
    import datetime

    out = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), "python": sys.version.split()[0]}
    try:
        import triton

        out["triton"] = triton.__version__
        from triton.backends.nvidia.compiler import get_ptxas

        for arch in (80, 90):
            text = _run([get_ptxas(arch).path, "--version"])
            out[f"ptxas_sm{arch}"] = re.search(r"release ([\d.]+), V([\d.]+)", text).group(2)
    except Exception as exc:  # reported, not fatal
        out["triton_error"] = str(exc)[:200]
    from lenkernels import _build

    nvcc = _build.find_nvcc()
    if nvcc:
        text = _run([nvcc, "--version"])
        m = re.search(r"release ([\d.]+), V([\d.]+)", text)
        out["nvcc"] = m.group(2) if m else text.strip().splitlines()[-1]
    try:
        out["cuobjdump"] = re.search(r"V([\d.]+)", _run([_nvidia_tool("cuobjdump"), "--version"])).group(1)
    except Exception:
        pass
    return out


# --- compilation ------------------------------------------------------------------------------------


def compile_triton(spec: dict, arch: int, workdir: Path) -> tuple[Path, int]:
    """(cubin path, shared memory bytes) of one Triton AOT spec for sm_<arch>."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET to compile Triton kernels")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # pointers 16-byte aligned, as Triton's launcher specialises them for any torch allocation
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(spec["signature"].values()) if t.startswith("*")}
    src = ASTSource(fn=spec["kernel"], signature=spec["signature"], constexprs=spec.get("constexprs", {}), attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec.get("num_warps", 4)})
    path = workdir / f"{spec['kernel'].__name__}-{abs(hash(json.dumps(spec['signature'])))}-sm{arch}.cubin"
    path.write_bytes(k.asm["cubin"])
    shared = getattr(k.metadata, "shared", 0) or 0
    return path, int(shared)


def compile_cuda(source: Path, arch: int, workdir: Path) -> Path:
    """nvcc -cubin -arch=sm_<arch> of one csrc/cuda source with the build's flags and defines."""
    from lenkernels import _build

    nvcc = _build.find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found: the CUDA kernels cannot be compiled here")
    full = _build.cuda_compile_command(source.stem, [source], workdir / "unused.so", nvcc)
    keep, skip = [], False
    for arg in full[1:]:
        if skip:
            skip = False
            continue
        if arg == "-o":
            skip = True
            continue
        if arg.startswith(("-gencode", "--threads", "-shared")) or arg == str(source):
            continue
        keep.append(arg)
    out = workdir / f"{source.stem}-sm{arch}.cubin"
    _run([nvcc, *keep, "-cubin", f"-arch=sm_{arch}", str(source), "-o", str(out)])
    return out


# --- disassembly and analysis -----------------------------------------------------------------------

_FUNC = re.compile(r"^\s*Function : (\S+)")
_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_RES = re.compile(r"Function (\S+):\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


@dataclass
class Instr:
    addr: int
    opcode: str
    text: str


def disassemble(cubin: Path) -> dict[str, list[Instr]]:
    """{function name: instructions} from cuobjdump -sass."""
    functions: dict[str, list[Instr]] = {}
    current = None
    for line in _run([_nvidia_tool("cuobjdump"), "-sass", str(cubin)]).splitlines():
        if m := _FUNC.match(line):
            current = functions.setdefault(m.group(1), [])
        elif current is not None and (m := _INSTR.match(line)):
            text = m.group(2).strip()
            body = re.sub(r"^@!?U?P\w+\s+", "", text)
            opcode = body.split()[0] if body else ""
            current.append(Instr(int(m.group(1), 16), opcode, text))
    return functions


def resources(cubin: Path) -> dict[str, dict]:
    out = {}
    for m in _RES.finditer(_run([_nvidia_tool("cuobjdump"), "-res-usage", str(cubin)])):
        out[m.group(1)] = {"registers": int(m.group(2)), "stack": int(m.group(3)), "shared": int(m.group(4)),
                           "local": int(m.group(5))}  # fmt: skip
    return out


def _branch_target(ins: Instr) -> int | None:
    if not ins.opcode.startswith("BRA"):
        return None
    m = re.search(r"(?:BRA(?:\.\S+)?)\s+(?:\S+,\s*)?(0x[0-9a-f]+)", ins.text)
    return int(m.group(1), 16) if m else None


def loops(instrs: list[Instr]) -> list[tuple[int, int]]:
    """(first, last) instruction indices of every backward branch's loop, innermost first."""
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    found = set()
    for i, ins in enumerate(instrs):
        target = _branch_target(ins)
        if target is not None and target <= ins.addr and target in index:
            found.add((index[target], i))
    return sorted(found, key=lambda r: r[1] - r[0])


def _innermost(all_loops):
    return [lp for lp in all_loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in all_loops)]


def access_bytes(opcode: str) -> int:
    """Bytes one thread moves with a global load/store opcode (LDG.E.128 -> 16, LDG.E.U16 -> 2)."""
    parts = opcode.split(".")
    for p, n in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if p in parts:
            return n
    return 4


def _is_global(opcode: str, kind: str) -> bool:
    return opcode.split(".")[0] == kind


def _summary(body: list[Instr]) -> dict:
    ops: dict[str, int] = {}
    for ins in body:
        ops[ins.opcode.split(".")[0]] = ops.get(ins.opcode.split(".")[0], 0) + 1
    loads = sorted({i.opcode for i in body if _is_global(i.opcode, "LDG")})
    stores = sorted({i.opcode for i in body if _is_global(i.opcode, "STG")})
    return {
        "instructions": len(body),
        "mufu": sum(i.opcode.startswith("MUFU") for i in body),
        "shuffles": sum(i.opcode.startswith("SHFL") for i in body),
        "barriers": sum(i.opcode.startswith("BAR") for i in body),
        "branches": sum(i.opcode.startswith("BRA") for i in body) - 1,  # less the loop's own
        "load_bytes": sum(access_bytes(i.opcode) for i in body if _is_global(i.opcode, "LDG")),
        "store_bytes": sum(access_bytes(i.opcode) for i in body if _is_global(i.opcode, "STG")),
        "loads": loads,
        "stores": stores,
        "opcodes": dict(sorted(ops.items(), key=lambda kv: -kv[1])[:12]),
    }


def occupancy(registers: int, threads: int, shared: int, arch: int) -> dict:
    warps = -(-threads // 32)
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = REGS_PER_SM // (regs_per_warp * warps) if registers else MAX_BLOCKS_PER_SM
    by_threads = MAX_WARPS_PER_SM // warps
    by_smem = SMEM_PER_SM[arch] // shared if shared else MAX_BLOCKS_PER_SM
    blocks = max(0, min(by_regs, by_threads, by_smem, MAX_BLOCKS_PER_SM))
    limiter = min(
        (by_regs, "registers"), (by_threads, "threads"), (by_smem, "shared memory"), (MAX_BLOCKS_PER_SM, "blocks")
    )[1]
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * warps, "occupancy": round(blocks * warps / MAX_WARPS_PER_SM, 3),
            "limited_by": limiter}  # fmt: skip


def analyse(kernel: Kernel, instrs: list[Instr], res: dict, arch: int, shared_extra: int = 0) -> dict:
    all_loops = loops(instrs)
    inner = _innermost(all_loops)
    out: dict = {"arch": arch, "total_instructions": len(instrs), "loops": len(all_loops)}
    shared = max(res.get("shared", 0), shared_extra)
    out.update({"registers": res.get("registers"), "shared_bytes": shared, "local_bytes": res.get("local", 0)})
    out.update(occupancy(res.get("registers", 0), kernel.threads, shared, arch))
    if kernel.role == "epilogue":
        return _analyse_epilogue(kernel, instrs, all_loops, inner, out)
    if not inner:
        out["error"] = "no loop found"
        return out

    # the most bytes a thread moves per iteration; of equals, the most deeply nested (a chunk's tile
    # loop, not the tail chunk's copy of it after the chunk loop), then the shortest body (a
    # row-alignment fast path, not its narrow-load twin)
    def depth(lp):
        return sum(o != lp and o[0] <= lp[0] and lp[1] <= o[1] for o in all_loops)

    hot = max(inner, key=lambda lp: (_summary(instrs[lp[0] : lp[1] + 1])["load_bytes"], depth(lp), lp[0] - lp[1]))
    body = _summary(instrs[hot[0] : hot[1] + 1])
    logits = body["load_bytes"] / kernel.elem_bytes
    out["hot_loop"] = {"first": hex(instrs[hot[0]].addr), "last": hex(instrs[hot[1]].addr), **body,
                       "logits_per_thread": logits}  # fmt: skip
    if logits:
        out["instructions_per_logit"] = round(body["instructions"] / logits, 3)
        out["mufu_per_logit"] = round(body["mufu"] / logits, 3)
    outer = [lp for lp in all_loops if lp != hot and lp[0] <= hot[0] and hot[1] <= lp[1]]
    if outer and kernel.chunk_logits_per_thread:
        lp = min(outer, key=lambda r: r[1] - r[0])
        own = [ins for i, ins in enumerate(instrs[lp[0] : lp[1] + 1], lp[0]) if not hot[0] <= i <= hot[1]]
        s = _summary(own + [Instr(0, "BRA", "")])  # the enclosing loop less the hot loop
        out["per_chunk"] = {"instructions": s["instructions"] - 1, "mufu": s["mufu"], "shuffles": s["shuffles"],
                            "barriers": s["barriers"], "logits_per_thread": kernel.chunk_logits_per_thread,
                            "instructions_per_logit": round((s["instructions"] - 1) / kernel.chunk_logits_per_thread, 3)}  # fmt: skip
    return out


def _analyse_epilogue(kernel, instrs, all_loops, inner, out):
    """linear_stats: the K loop of the matmul is tensor-core work; the per-logit cost is the code
    around it (the enclosing vocabulary-tile loop less the K loop, or, without one, everything
    outside loops) over the BLOCK_N x BLOCK_V logits of a tile."""
    k_loop = max(inner, key=lambda lp: lp[1] - lp[0]) if inner else None
    outer = [lp for lp in all_loops if k_loop and lp != k_loop and lp[0] <= k_loop[0] and k_loop[1] <= lp[1]]
    if outer:
        lp = min(outer, key=lambda r: r[1] - r[0])
        idx = [i for i in range(lp[0], lp[1] + 1) if not (k_loop[0] <= i <= k_loop[1])]
    else:
        idx = [i for i in range(len(instrs)) if not any(a <= i <= b for a, b in all_loops)]
    region = [instrs[i] for i in idx]
    s = _summary(region + [Instr(0, "BRA", "")])
    s["instructions"] -= 1
    s["branches"] = sum(i.opcode.startswith("BRA") for i in region)
    out["hot_loop"] = {**s, "region": "vocabulary-tile loop less the K loop" if outer else "outside the K loop",
                       "logits_per_thread": kernel.logits_per_thread}  # fmt: skip
    out["instructions_per_logit"] = round(s["instructions"] / kernel.logits_per_thread, 3)
    out["mufu_per_logit"] = round(s["mufu"] / kernel.logits_per_thread, 3)
    if k_loop:
        k = _summary(instrs[k_loop[0] : k_loop[1] + 1])
        out["k_loop"] = {key: k[key] for key in ("instructions", "loads", "opcodes")}
    return out


def predict(kernel: Kernel, ipl: float) -> dict:
    """The issue's model at N = 8192, V = 151 936 bf16."""
    logits = MODEL_N * MODEL_V
    issue_s = logits * ipl / ISSUE_RATE
    out = {"issue_ms": round(issue_s * 1e3, 3)}
    if kernel.role == "epilogue":
        return out  # the matmul's own time is not modelled here
    passes = 2 if kernel.role == "bwd" else 1
    for gpu, bw in BANDWIDTH.items():
        floor = passes * logits * MODEL_ELEM / bw
        t = max(floor, issue_s)
        out[gpu] = {"floor_ms": round(floor * 1e3, 3), "predicted_ms": round(t * 1e3, 3), "x_floor": round(t / floor, 2),
                    "bound": "memory" if floor >= issue_s else "issue"}  # fmt: skip
    return out


# --- the kernels ------------------------------------------------------------------------------------


def _specs(module) -> list[dict]:
    """A Triton module's compilation specs: derived from its ``AOT_CASES`` (launcher calls,
    lenkernels/triton/aot.py), or its explicit ``AOT_SPECS``."""
    if hasattr(module, "AOT_CASES"):
        from lenkernels.triton.aot import module_specs

        return module_specs(module)
    return list(getattr(module, "AOT_SPECS", ()))


def kernels(include=("triton", "cuda")) -> list[Kernel]:
    """Every logits- or hidden-streaming kernel, in its bf16 configuration."""
    out = []
    if "triton" in include:
        from lenkernels.triton import linear_stats as ls
        from lenkernels.triton import token_stats as ts
        from lenkernels.triton import token_stats_extra as tx

        def pick(module, kernel, **want):
            for spec in _specs(module):
                sig, const = spec["signature"], spec.get("constexprs", {})
                if spec["kernel"] is kernel and all(sig.get(k) == v or const.get(k) == v for k, v in want.items()):
                    return spec
            raise LookupError(f"no AOT spec of {kernel.__name__} with {want}")

        # rows on 16-byte boundaries (ALIGNED: any V with 16-byte rows, e.g. 151 936 or 32 000), and the
        # other variant (e.g. V = 50 257), the same code with 2-byte accesses
        for module, prefix in ((ts, "token_stats"), (tx, "token_stats_extra")):
            for aligned, suffix in ((True, ""), (False, ".unaligned")):
                if suffix and module is tx:
                    continue
                # the >= 4096 vocabulary bucket (V = 151 936): a spec needs a bf16 launch at such a V
                big = {"logits_ptr": "*bf16", "ALIGNED": aligned, "BLOCK_V": ts._MAX_BLOCK_V}
                fwd = pick(module, getattr(module, f"{prefix}_fwd_kernel"), **big)
                threads = 32 * fwd["num_warps"]
                chunk = fwd["constexprs"]["BLOCK_V"] * fwd["constexprs"].get("CHUNK_TILES", 1) // threads
                out.append(Kernel(f"triton.{prefix}_fwd{suffix}", "triton", "fwd", threads, spec=fwd,
                                  chunk_logits_per_thread=chunk))  # fmt: skip
                bwd = pick(module, getattr(module, f"{prefix}_bwd_kernel"), **big)
                out.append(Kernel(f"triton.{prefix}_bwd{suffix}", "triton", "bwd", 32 * bwd["num_warps"], spec=bwd))
        for kernel, name in ((ls.linear_stats_fwd_kernel, "fwd"), (ls.linear_stats_bwd_kernel, "bwd")):
            spec = pick(ls, kernel, h_ptr="*bf16", HAS_BIAS=False)
            c = spec["constexprs"]
            threads = 32 * spec["num_warps"]
            out.append(Kernel(f"triton.linear_stats_{name}", "triton", "epilogue", threads, spec=spec,
                              logits_per_thread=c["BLOCK_N"] * c["BLOCK_V"] // threads,
                              note="epilogue of the matmul tile (softmax fold / gradient) per logit"))  # fmt: skip
    if "cuda" in include:
        # CUDA token_stats: 256 threads; a chunk = 4 tiles x 256 threads x 4 vectors of 8 bf16
        out.append(Kernel("cuda.token_stats_fwd", "cuda", "fwd", 256, symbol="token_stats_fwd_kernelI13__nv_bfloat16",
                          chunk_logits_per_thread=4 * 4 * 8))  # fmt: skip
        out.append(Kernel("cuda.token_stats_bwd", "cuda", "bwd", 256, symbol="token_stats_bwd_kernelI13__nv_bfloat16"))
        # the SPEC 7 kernels (token_stats_extra.h): same plan, chunks and accesses
        out.append(Kernel("cuda.token_stats_extra_fwd", "cuda", "fwd", 256,
                          symbol="token_stats_extra_fwd_kernelI13__nv_bfloat16", chunk_logits_per_thread=4 * 4 * 8))
        out.append(Kernel("cuda.token_stats_extra_bwd", "cuda", "bwd", 256,
                          symbol="token_stats_extra_bwd_kernelI13__nv_bfloat16"))  # fmt: skip
    return out


def report(archs=(90, 80), include=("triton", "cuda"), names=None) -> dict:
    from lenkernels import _build

    selected = [k for k in kernels(include) if names is None or k.name in names]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cuda_cubins = {}
        for arch in archs:
            for k in selected:
                row = {"kernel": k.name, "source": k.source, "role": k.role, "threads": k.threads}
                if k.note:
                    row["note"] = k.note
                try:
                    if k.source == "triton":
                        cubin, shared = compile_triton(k.spec, arch, work)
                        funcs, res = disassemble(cubin), resources(cubin)
                        fname = next(iter(funcs))
                    else:
                        if arch not in cuda_cubins:
                            cubin = compile_cuda(_build.CSRC / "cuda" / "token_stats.cu", arch, work)
                            cuda_cubins[arch] = (disassemble(cubin), resources(cubin))
                        funcs, res = cuda_cubins[arch]
                        fname = next(f for f in funcs if k.symbol in f)
                        shared = 0
                    row.update(analyse(k, funcs[fname], res.get(fname, {}), arch, shared))
                    if "instructions_per_logit" in row:
                        row["model"] = predict(k, row["instructions_per_logit"])
                except Exception as exc:  # reported per kernel; the test fails on it
                    row.update({"arch": arch, "error": f"{type(exc).__name__}: {exc}"[:2000]})
                rows.append(row)
    calibration = dict(CALIBRATION)
    calibration["predicted_ms_h100"] = round(
        max(MODEL_N * MODEL_V * MODEL_ELEM / BANDWIDTH["H100"], MODEL_N * MODEL_V * 26 / ISSUE_RATE) * 1e3, 3
    )
    model = {
        "issue_rate_thread_instr_per_s": ISSUE_RATE, "sms": SMS, "clock_hz": CLOCK_HZ,
        "bandwidth_bytes_per_s": BANDWIDTH, "N": MODEL_N, "V": MODEL_V, "dtype": "bf16",
        "predicted": "max(bytes / bandwidth, N * V * instructions_per_logit / issue_rate)",
        "calibration": calibration,
    }  # fmt: skip
    return {
        "what": "static SASS report of the logits/hidden-streaming kernels (no GPU): python -m lenkernels.bench.sass",
        "model": model,
        "versions": versions(),
        "kernels": rows,
    }


def _gpu(model: dict, name: str) -> str:
    g = model.get(name)
    return f"{g['predicted_ms']:.3f} ({g['x_floor']:.2f}x)" if g else f"{model.get('issue_ms', 0):.3f} issue"


def table(data: dict, markdown: bool = False) -> str:
    head = ["kernel", "sm", "instr/logit", "MUFU/logit", "global loads", "global stores", "regs", "occupancy",
            "shfl/bar per iter", "per-chunk instr/logit", "H100 ms (x floor)", "H200 ms (x floor)"]  # fmt: skip
    lines = []
    for r in data["kernels"]:
        if "error" in r:
            lines.append([r["kernel"], str(r.get("arch", "")), "error: " + r["error"].splitlines()[0][:60]] + [""] * 9)
            continue
        hot = r.get("hot_loop", {})
        model = r.get("model", {})

        lines.append([
            r["kernel"], str(r["arch"]), f"{r.get('instructions_per_logit', float('nan')):.2f}",
            f"{r.get('mufu_per_logit', float('nan')):.3f}", " ".join(hot.get("loads", [])) or "-",
            " ".join(hot.get("stores", [])) or "-", str(r.get("registers")), f"{r.get('occupancy', 0):.2f}",
            f"{hot.get('shuffles', 0)}/{hot.get('barriers', 0)}",
            f"{r['per_chunk']['instructions_per_logit']:.2f}" if "per_chunk" in r else "-", _gpu(model, "H100"),
            _gpu(model, "H200"),
        ])  # fmt: skip
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        out += ["| " + " | ".join(c.replace("|", "/") for c in line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(
        [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*line) for line in lines]
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lenkernels.bench.sass", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, action="append", choices=[80, 90], help="default: 90 and 80")
    p.add_argument("--kernel", action="append", help="report only these kernels (names as in the table)")
    p.add_argument("--no-cuda", action="store_true", help="skip the CUDA C++ kernels")
    p.add_argument(
        "--json", metavar="PATH", help=f"write the report as JSON (the committed one: {RESULT.relative_to(REPO)})"
    )
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the report compiles the Triton kernels for real", file=sys.stderr)
        return 2
    include = ("triton",) if args.no_cuda else ("triton", "cuda")
    data = report(tuple(args.arch or (90, 80)), include, set(args.kernel) if args.kernel else None)
    print(table(data, markdown=args.markdown))
    cal = data["model"]["calibration"]
    print(f"\nmodel: N={MODEL_N} V={MODEL_V} bf16, {ISSUE_RATE:.3g} thread-instructions/s, "
          f"{BANDWIDTH['H100'] / 1e12:.2f} TB/s (H100) / {BANDWIDTH['H200'] / 1e12:.1f} TB/s (H200); calibration: "
          f"{cal['instructions_per_logit']} instr/logit -> {cal['predicted_ms_h100']} ms predicted, "
          f"{cal['published_ms_h100']} ms published (H100)")  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(data, indent=1) + "\n")
    return 1 if any("error" in r for r in data["kernels"]) else 0


if __name__ == "__main__":
    sys.exit(main())
