"""Ahead-of-time compilation of every Triton kernel for sm_80 and sm_90, without a GPU.

The interpreter accepts code the compiler rejects, so the test suite also compiles each kernel
for real (Triton -> PTX -> cubin) and reads ptxas's resource report for register spills.

What is compiled is derived from the real launch path, so it cannot drift from what the launchers
pass: each kernel module lists ``AOT_CASES``, a few calls of its own host launchers on small CPU
tensors (one per dtype / configuration worth compiling: the heaviest variants). :func:`capture`
records the kernel launches those calls make instead of running them, and :func:`spec_of` turns a
launch into a spec: the kernel, its ``signature`` (Triton type strings from the values passed;
``"constexpr"`` for constexpr parameters), the ``constexprs`` values and ``num_warps``.

Run as ``python -m lenkernels.triton.aot`` (TRITON_INTERPRET must not be set): prints one JSON
line per (kernel, configuration, arch) with registers, spill bytes and any error.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from typing import NamedTuple

import torch

ARCHS = (80, 90)
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
_POINTEE = {
    torch.bool: "i1", torch.uint8: "u8", torch.int8: "i8", torch.int16: "i16", torch.int32: "i32",
    torch.int64: "i64", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
}  # fmt: skip


class Launch(NamedTuple):
    kernel: object  # triton.runtime.jit.JITFunction
    args: tuple
    kwargs: dict  # keyword arguments, launch options (num_warps, ...) included


@contextlib.contextmanager
def capture():
    """Within the block, Triton kernel launches are recorded (yielded list of :class:`Launch`) and
    not run: launchers may be called on CPU tensors, without a GPU or the interpreter (launchers
    keep their CUDA-only steps, pinned copies and stream queries, behind ``device.type == "cuda"``).
    Scoped and reversible: ``JITFunction.run`` is restored on exit."""
    from triton.runtime.jit import JITFunction

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET to capture launches (kernels are interpreted functions then)")
    launches: list[Launch] = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs))

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = original


def type_of(value) -> str:
    """The Triton type string of a runtime argument: a tensor -> ``*<dtype>``, bool -> i1,
    int -> i32 or i64 by range (as Triton's own launcher chooses), float -> fp32."""
    if isinstance(value, torch.Tensor):
        return "*" + _POINTEE[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for an argument of type {type(value).__name__}")


def spec_of(launch: Launch) -> dict:
    """A launch as a compilation spec: kernel, signature (parameter order), constexprs, num_warps and
    every launch option given (``options``)."""
    fn = launch.kernel
    kwargs = dict(launch.kwargs)
    options = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
    bound = {**dict(zip(fn.arg_names, launch.args)), **kwargs}
    unknown = set(bound) - set(fn.arg_names)
    if unknown:
        raise TypeError(f"{fn.__name__} has no parameters {sorted(unknown)}")
    signature, constexprs = {}, {}
    for p in fn.params:
        if p.name in bound:
            value = bound[p.name]
        elif p.has_default:
            value = p.default
        else:
            raise TypeError(f"{fn.__name__}: no value for {p.name}")
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = getattr(value, "value", value)  # a tl.constexpr global: its value
        else:
            signature[p.name] = type_of(value)
    options.setdefault("num_warps", 4)
    return {"kernel": fn, "signature": signature, "constexprs": constexprs, "num_warps": options["num_warps"],
            "options": options}  # fmt: skip


def module_specs(module) -> list[dict]:
    """The distinct specs of the launches made by ``module.AOT_CASES`` (each a callable taking no
    argument), in order of first launch."""
    specs, seen = [], set()
    for case in getattr(module, "AOT_CASES", ()):
        with capture() as launches:
            case()
        for launch in launches:
            spec = spec_of(launch)
            key = (spec["kernel"], tuple(spec["signature"].items()), repr(sorted(spec["constexprs"].items())),
                   repr(sorted(spec["options"].items())))  # fmt: skip
            if key not in seen:
                seen.add(key)
                specs.append(spec)
    return specs


def spec_name(module: str, spec: dict) -> str:
    """``module.kernel[<first pointer's dtype>,NAME=value,...]``."""
    ptr_types = [v for v in spec["signature"].values() if v.startswith("*")]
    params = [ptr_types[0][1:]] + [f"{k}={v}" for k, v in spec["constexprs"].items()]
    return f"{module}.{spec['kernel'].__name__}[{','.join(params)}]"


def spec_names(module: str, specs: list[dict]) -> list[str]:
    """:func:`spec_name` of each spec; specs of one name (they differ in a pointer's dtype only)
    also name the pointers whose dtypes differ: ``...,mask_ptr=*i64]``."""
    base = [spec_name(module, s) for s in specs]
    names = []
    for i, s in enumerate(specs):
        twins = [t for j, t in enumerate(specs) if j != i and base[j] == base[i]]
        diff = [k for k, v in s["signature"].items() if any(t["signature"][k] != v for t in twins)]
        names.append(base[i][:-1] + "".join(f",{k}={s['signature'][k]}" for k in diff) + "]" if diff else base[i])
    return names


def collect_specs():
    """(module name, kernel name, spec) of every kernel module's ``AOT_CASES``."""
    import lenkernels.triton as pkg

    out = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name in ("aot", "utils"):
            continue
        specs = module_specs(importlib.import_module(f"lenkernels.triton.{info.name}"))
        out += [(info.name, name, spec) for name, spec in zip(spec_names(info.name, specs), specs)]
    return out


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
    for module, name, spec in collect_specs():
        fn = spec["kernel"]
        for arch in ARCHS:
            row = {"kernel": name, "module": module, "function": fn.__name__, "arch": arch}
            try:
                src = ASTSource(fn=fn, signature=spec["signature"], constexprs=spec["constexprs"])
                k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=spec["options"])
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
