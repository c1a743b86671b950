"""Every Triton kernel compiles for sm_80 and sm_90 (PTX and cubin, no GPU needed) without
register spills. The interpreter used by the other tests accepts code the compiler rejects."""

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
    assert rows, "no kernel was compiled: is AOT_SPECS declared in the kernel modules?"
    return rows


def test_every_kernel_compiles_without_spills(compiled):
    errors = [r for r in compiled if "error" in r]
    assert not errors, "\n".join(f"{r['kernel']} sm_{r['arch']}: {r['error']}" for r in errors)
    spills = [r for r in compiled if r["spill_bytes"] > 0]
    assert not spills, "\n".join(f"{r['kernel']} sm_{r['arch']}: {r['spill_bytes']} spill bytes" for r in spills)
    assert {r["arch"] for r in compiled} == {80, 90}


def test_every_kernel_module_declares_aot_specs():
    import importlib
    import pkgutil

    import lenkernels.triton as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name in ("aot", "utils", "__init__"):
            continue
        module = importlib.import_module(f"lenkernels.triton.{info.name}")
        kernels = {n for n, v in vars(module).items() if n.endswith("_kernel")}
        covered = {spec["kernel"].__name__ for spec in getattr(module, "AOT_SPECS", ())}
        assert kernels <= covered, f"lenkernels/triton/{info.name}.py: kernels without AOT_SPECS: {kernels - covered}"
