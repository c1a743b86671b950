"""Ahead-of-time compilation of every Triton kernel for sm_80 and sm_90, without a GPU.

The interpreter accepts code the compiler rejects, so the test suite also compiles each kernel
for real (Triton -> PTX -> cubin) and reads ptxas's resource report for register spills.
Each kernel module lists its launch configurations in ``AOT_SPECS``: a list of dicts with the
kernel, its ``signature`` (Triton type strings; ``"constexpr"`` for constexpr arguments), the
``constexprs`` values and ``num_warps``.

Run as ``python -m lenkernels.triton.aot`` (TRITON_INTERPRET must not be set): prints one JSON
line per (kernel, configuration, arch) with registers, spill bytes and any error.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile

ARCHS = (80, 90)


def collect_specs():
    import lenkernels.triton as pkg

    specs = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name in ("aot", "utils"):
            continue
        module = importlib.import_module(f"lenkernels.triton.{info.name}")
        for spec in getattr(module, "AOT_SPECS", ()):
            specs.append((info.name, spec))
    return specs


def ptxas_report(ptx: str, arch: int) -> tuple[int, int, str]:
    """(registers, spill bytes, ptxas stderr) of a PTX module for sm_<arch>."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run(
            [ptxas, "-v", f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
        )
    text = proc.stdout + proc.stderr
    regs = max((int(x) for x in re.findall(r"Used (\d+) registers", text)), default=-1)
    spills = sum(int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text))
    if proc.returncode != 0:
        raise RuntimeError(text)
    return regs, spills, text


def compile_all():
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = []
    for module, spec in collect_specs():
        fn = spec["kernel"]
        ptr_types = [v for v in spec["signature"].values() if v.startswith("*")]
        params = [ptr_types[0][1:]] + [f"{k}={v}" for k, v in spec.get("constexprs", {}).items()]
        name = f"{module}.{fn.__name__}[{','.join(params)}]"
        for arch in ARCHS:
            row = {"kernel": name, "arch": arch}
            try:
                src = ASTSource(fn=fn, signature=spec["signature"], constexprs=spec.get("constexprs", {}))
                k = triton.compile(
                    src, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec.get("num_warps", 4)}
                )
                row["registers"], row["spill_bytes"], _ = ptxas_report(k.asm["ptx"], arch)
            except Exception as exc:  # reported, and failed by the test
                row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            results.append(row)
    return results


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET to compile ahead of time", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the GPU default, stated to silence its warning
    for row in compile_all():
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
