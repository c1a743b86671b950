"""Builds the compiled extensions: used by ``setup.py`` and, at run time, to (re)build an extension
that is missing or older than its sources (an editable checkout, a vendored copy).

Imports nothing beyond the standard library (setup.py runs it before torch may exist). The CPU
extensions need only pybind11 and a C++17 compiler; the CUDA ones need ``nvcc`` and no torch
headers (raw device pointers cross the boundary, DESIGN.md).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CSRC = PACKAGE_DIR.parent / "csrc"
INCLUDE = CSRC / "include"

CPU_CXXFLAGS = ["-O3", "-std=c++17", "-fPIC", "-fopenmp", "-fvisibility=hidden", "-Wall", "-Wextra"]
CPU_LDFLAGS = ["-shared", "-fopenmp"]
# sm_80 (A100) and sm_90 (H100/H200); PTX for sm_90 so newer GPUs can JIT it.
CUDA_GENCODE = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]
# No --use_fast_math: the hot loops ask for the approximate exp2 they want explicitly
# (lenkernels/token_stats.h), while the per-row logf/expf and 1/T stay correctly rounded and
# gradients keep denormals, as on the CPU. --threads=0: the architectures compile in parallel.
CUDA_FLAGS = [
    "-O3", "-std=c++17", "-lineinfo", "--threads=0",
    "-Xcompiler=-fPIC", "-Xcompiler=-fvisibility=hidden",
]  # fmt: skip


def cpu_modules() -> dict[str, list[Path]]:
    """``{module name: sources}``: one extension module per ``csrc/cpu/<family>.cpp``."""
    return {f"_cpu_{p.stem}": [p] for p in sorted((CSRC / "cpu").glob("*.cpp"))}


def cuda_modules() -> dict[str, list[Path]]:
    """``{module name: sources}``: one extension module per ``csrc/cuda/<family>.cu``."""
    return {f"_cuda_{p.stem}": [p] for p in sorted((CSRC / "cuda").glob("*.cu"))}


def source_hash(sources: list[Path]) -> str:
    """Hash of the sources and every shared header: a stale build is detected by comparing it."""
    h = hashlib.sha256()
    headers = sorted(INCLUDE.rglob("*.h")) + sorted(p for s in sources for p in s.parent.glob("*.h"))
    for p in list(sources) + headers:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _python_includes() -> list[str]:
    try:
        import pybind11
    except ImportError as exc:  # a declared dependency; missing only in a hand-made environment
        raise RuntimeError("building the extensions needs pybind11 (pip install 'pybind11>=2.12')") from exc

    return [sysconfig.get_paths()["include"], pybind11.get_include()]


def ext_suffix() -> str:
    return sysconfig.get_config_var("EXT_SUFFIX") or ".so"


def cpu_compile_command(name: str, sources: list[Path], output: Path) -> list[str]:
    cxx = shlex.split(os.environ.get("CXX") or "g++")  # "ccache g++" is a launcher and a compiler
    incs = [f"-I{p}" for p in [str(INCLUDE), *_python_includes()]]
    define = f'-DLK_SOURCE_HASH="{source_hash(sources)}"'
    return [*cxx, *CPU_CXXFLAGS, define, *incs, *map(str, sources), "-o", str(output), *CPU_LDFLAGS]


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_compile_command(name: str, sources: list[Path], output: Path, nvcc: str) -> list[str]:
    incs = [f"-I{p}" for p in [str(INCLUDE), *_python_includes()]]
    define = f'-DLK_SOURCE_HASH="{source_hash(sources)}"'
    return [nvcc, *CUDA_FLAGS, *CUDA_GENCODE, define, *incs, "-shared", *map(str, sources), "-o", str(output)]


def cache_dir() -> Path:
    root = os.environ.get("LENKERNELS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lenkernels"
    )
    return Path(root) / f"py{sys.version_info.major}{sys.version_info.minor}"


def build(name: str, kind: str = "cpu", verbose: bool = False) -> Path:
    """Compiles module ``name`` into the cache (keyed by the source hash) and returns the file.

    Safe to call from several processes at once: a file lock serialises builds of one module and
    the result is moved into place atomically.
    """
    modules = cpu_modules() if kind == "cpu" else cuda_modules()
    if name not in modules:
        raise ValueError(f"no {kind} extension named {name!r}; known: {sorted(modules)}")
    sources = modules[name]
    target_dir = cache_dir() / f"{name}-{source_hash(sources)}"
    target = target_dir / f"{name}{ext_suffix()}"
    if target.exists():
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    with open(target_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        with tempfile.TemporaryDirectory(dir=target_dir) as tmp:
            out = Path(tmp) / target.name
            if kind == "cpu":
                cmd = cpu_compile_command(name, sources, out)
            else:
                nvcc = find_nvcc()
                if nvcc is None:
                    raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
                cmd = cuda_compile_command(name, sources, out, nvcc)
            # one line instead of a silent pause: a first build takes tens of seconds
            print(f"lenkernels: building {name} ({kind}) into {target_dir}", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"building {name} failed:\n$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
            if verbose and proc.stderr:
                print(proc.stderr, file=sys.stderr)
            os.replace(out, target)
    return target
