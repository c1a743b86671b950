"""Output of the benchmark: the machine stamp, a rich table, JSON and PNG charts."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from dataclasses import asdict
from pathlib import Path

import torch

import lenkernels
from lenkernels.bench.core import Result

SCHEMA = "lenkernels.bench/1"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    root = Path(lenkernels.__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine(device: torch.device) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_type": device.type,
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lenkernels": lenkernels.__version__,
        "commit": _git_commit(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device=props.name,
            sm_count=props.multi_processor_count,
            memory_gb=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            driver=_nvidia_driver(),
        )
    else:
        info["device"] = info["cpu"]
    return info


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, IndexError):
        return None


def to_json(results: list[Result], device: torch.device, options: dict) -> dict:
    return {"schema": SCHEMA, "machine": machine(device), "options": options, "results": [asdict(r) for r in results]}


_SHORT = {"tokens": "N", "vocab": "V", "dtype": "", "batch": "B", "seqlen": "T", "groups": "G", "hidden": "D"}


def _case_text(case: dict) -> str:
    return " ".join(f"{_SHORT.get(k, k + '=')}{'=' if _SHORT.get(k) else ''}{v}" for k, v in case.items())


def table(results: list[Result], title: str = "lenkernels benchmark"):
    from rich.table import Table

    t = Table(title=title, show_lines=False)
    for col, just in [
        ("suite", "left"), ("case", "left"), ("mode", "left"), ("provider", "left"), ("median ms", "right"),
        ("spread ms", "right"), ("speedup", "right"), ("peak extra MB", "right"), ("GB/s", "right"),
        ("% copy", "right"), ("x copy", "right"), ("max err", "right"), ("status", "left"),
    ]:  # fmt: skip
        t.add_column(col, justify=just)
    for r in results:
        ok = r.status == "ok"
        t.add_row(
            r.suite,
            _case_text(r.case),
            r.mode,
            r.provider,
            f"{r.median_ms:.3f}" if ok else "",
            f"{r.min_ms:.3f}-{r.max_ms:.3f}" if ok else "",
            f"{r.speedup:.1f}x" if ok and r.speedup else "",
            f"{r.peak_extra_mb:.1f}" if ok and r.peak_extra_mb is not None else "",
            f"{r.gbps:.1f}" if ok and r.gbps else "",
            f"{100 * r.copy_share:.0f}%" if ok and r.copy_share else "",
            f"{r.x_copy:.2f}" if ok and r.x_copy else "",
            f"{r.max_error:.1e}" if r.max_error is not None else "",
            r.status if ok else f"{r.status}: {r.note}",
        )
    return t


def markdown(results: list[Result]) -> str:
    """The same table as GitHub markdown (for the README)."""
    head = ("| suite | case | mode | provider | median ms | speedup | x copy | peak extra MB | max err |\n"
            "|---|---|---|---|---:|---:|---:|---:|---:|")
    rows = []
    for r in results:
        if r.status != "ok":
            rows.append(f"| {r.suite} | {_case_text(r.case)} | {r.mode} | {r.provider} | {r.status} | | | | |")
            continue
        rows.append(
            f"| {r.suite} | {_case_text(r.case)} | {r.mode} | {r.provider} | {r.median_ms:.2f} | "
            f"{f'{r.speedup:.1f}x' if r.speedup else ''} | {f'{r.x_copy:.2f}' if r.x_copy else ''} | "
            f"{f'{r.peak_extra_mb:.1f}' if r.peak_extra_mb is not None else ''} | {r.max_error:.1e} |"
        )
    return "\n".join([head, *rows])


def plot(results: list[Result], out_dir: str) -> list[str]:
    """Time and memory per provider across sizes, one PNG per (suite, mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    written = []
    groups: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        if r.status == "ok":
            groups.setdefault((r.suite, r.mode), []).append(r)
    for (suite, mode), rows in groups.items():
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
        size_key = next(iter(rows[0].case))
        for provider in dict.fromkeys(r.provider for r in rows):
            pts = sorted((r.case[size_key], r.median_ms, r.peak_extra_mb) for r in rows if r.provider == provider)
            xs = [p[0] for p in pts]
            ax_t.plot(xs, [p[1] for p in pts], marker="o", label=provider)
            if all(p[2] is not None for p in pts):
                ax_m.plot(xs, [p[2] for p in pts], marker="o", label=provider)
        for ax, label in ((ax_t, "median time (ms)"), (ax_m, "peak memory above inputs (MB)")):
            ax.set_xlabel(size_key)
            ax.set_ylabel(label)
            ax.set_xscale("log", base=2)
        ax_t.set_yscale("log")
        ax_m.set_ylim(bottom=0)
        for ax in (ax_t, ax_m):
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=8)
        fig.suptitle(f"{suite} ({mode})")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{suite}_{mode.replace('+', '_')}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_json(data: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
