"""Every Triton kernel compiles for sm_80 and sm_90 (PTX and cubin, no GPU needed) without
register spills. The interpreter used by the other tests accepts code the compiler rejects. What
is compiled is what the launchers pass: lenkernels/triton/aot.py records the launches of each
module's ``AOT_CASES`` (calls of its launchers on CPU tensors) and derives the signatures."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "lenkernels.triton.aot"], capture_output=True, text=True, env=env, timeout=1500
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert rows, "no kernel was compiled: are AOT_CASES declared in the kernel modules?"
    return rows


def test_every_kernel_compiles_without_spills(compiled):
    errors = [r for r in compiled if "error" in r]
    assert not errors, "\n".join(f"{r['kernel']} sm_{r['arch']}: {r['error']}" for r in errors)
    spills = [r for r in compiled if r["spill_bytes"] > 0]
    assert not spills, "\n".join(f"{r['kernel']} sm_{r['arch']}: {r['spill_bytes']} spill bytes" for r in spills)
    assert {r["arch"] for r in compiled} == {80, 90}


def test_aot_cases_launch_every_kernel(compiled):
    import importlib
    import pkgutil

    import lenkernels.triton as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name in ("aot", "utils", "__init__"):
            continue
        module = importlib.import_module(f"lenkernels.triton.{info.name}")
        kernels = {n for n, v in vars(module).items() if n.endswith("_kernel")}
        covered = {r["function"] for r in compiled if r["module"] == info.name}
        missing = kernels - covered
        assert not missing, f"lenkernels/triton/{info.name}.py: kernels that no AOT_CASES call launches: {missing}"


def test_compiled_names_are_distinct(compiled):
    names = [(r["kernel"], r["arch"]) for r in compiled]
    assert len(names) == len(set(names)), "two compiled configurations print the same name"
