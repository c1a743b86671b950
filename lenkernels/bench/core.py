"""Benchmark machinery: suites, providers, honest timing and memory measurement.

A *suite* benchmarks one op family: it makes inputs for a size point (a *case*), computes the
expected result once with the float64 reference, and lists *providers* (lenkernels backends and
the eager code trainers run today). For each case, mode (``fwd`` / ``fwd+bwd``) and provider:

1. correctness: the provider's outputs are compared with the reference; a provider that fails is
   reported as failed and gets no time or speedup;
2. time: warm-up, then repeats until both a minimum count and a time budget are reached; the
   median and the spread (min, max) are reported. On CUDA, events time the kernels; inputs are
   rotated among several copies when they are small enough to sit in cache;
3. memory: the peak above what existed before the call (inputs), measured in a separate run:
   ``torch.cuda.max_memory_allocated`` on GPU, the process's peak resident set (``VmHWM``, reset
   through ``/proc/self/clear_refs``) on CPU.
"""

from __future__ import annotations

import ctypes
import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

# A result is compared on these keys: name -> tensor.
Outputs = dict[str, torch.Tensor]


@dataclass
class Provider:
    """One implementation of a suite's computation.

    ``fn(inputs, mode)`` runs it once and returns its outputs (for ``fwd+bwd`` including the
    gradients). ``available(device)`` returns ``(ok, reason)``. ``tolerance`` is the largest
    error against the float64 reference that still counts as correct (eager code computing in
    bf16 earns a looser one than a kernel accumulating in fp32); ``baseline`` marks the provider
    speedups are computed against.
    """

    name: str
    fn: Callable[[dict, str], Outputs]
    available: Callable[[torch.device], tuple[bool, str]] = lambda device: (True, "")
    tolerance: float = 1e-4
    baseline: bool = False
    modes: tuple[str, ...] = ("fwd", "fwd+bwd")
    note: str = ""


@dataclass
class Suite:
    """A family's benchmark. ``cases(options)`` yields size dicts; ``make_inputs(case, device)``
    returns a dict of tensors; ``expected(inputs, mode)`` the reference outputs; ``bytes_moved``
    the minimum bytes a pass must move (for GB/s)."""

    name: str
    description: str
    cases: Callable[[Any], list[dict]]
    make_inputs: Callable[[dict, torch.device], dict]
    expected: Callable[[dict, str], Outputs]
    providers: list[Provider]
    bytes_moved: Callable[[dict, str], int] = lambda case, mode: 0
    modes: tuple[str, ...] = ("fwd", "fwd+bwd")


SUITES: dict[str, Suite] = {}


def register(suite: Suite) -> Suite:
    SUITES[suite.name] = suite
    return suite


@dataclass
class Result:
    suite: str
    case: dict
    mode: str
    provider: str
    status: str  # "ok", "failed", "skipped", "error"
    note: str = ""
    max_error: float | None = None
    median_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    repeats: int = 0
    peak_extra_mb: float | None = None
    gbps: float | None = None
    copy_share: float | None = None
    x_copy: float | None = None  # median time / time to copy the largest input once, same run
    speedup: float | None = None
    extra: dict = field(default_factory=dict)


# --- correctness -------------------------------------------------------------------------------


def max_error(outputs: Outputs, expected: Outputs) -> float:
    """Largest error over every compared tensor, in units of what that tensor's dtype can hold:
    |a - e| / (1 + |e|) minus the rounding of the output dtype (a bf16 gradient cannot be closer
    to the float64 value than half a bf16 ulp). inf on a missing output, shape or NaN mismatch."""
    worst = 0.0
    for key, exp in expected.items():
        if key not in outputs or outputs[key] is None:
            return math.inf
        out = outputs[key].detach()
        rounding = torch.finfo(out.dtype).eps if out.dtype in (torch.bfloat16, torch.float16) else 0.0
        got = out.to(torch.float64).cpu()
        exp = exp.detach().to(torch.float64).cpu()
        if got.shape != exp.shape or not torch.equal(torch.isnan(got), torch.isnan(exp)):
            return math.inf
        ok = ~torch.isnan(exp)
        if ok.any():
            err = ((got[ok] - exp[ok]).abs() / (1 + exp[ok].abs())).max().item()
            worst = max(worst, max(0.0, err - rounding))
    return worst


# --- timing ------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[int], Any], device: torch.device, *, min_repeats: int = 3, budget_s: float = 1.0, warmup: int = 1
) -> list[float]:
    """Milliseconds per call of ``fn(i)`` (``i`` picks the rotated input copy). The caller may pass
    warmup=0 when a correctness run of the same call has just warmed everything up."""
    for i in range(warmup):
        fn(i)
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    i = 0
    while len(times) < min_repeats or (time.perf_counter() - start < budget_s and len(times) < 200):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn(i)
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(i)
            times.append((time.perf_counter() - t0) * 1e3)
        i += 1
    return times


# --- memory ------------------------------------------------------------------------------------


def _rss_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name):
                return int(line.split()[1])
    return -1


def cpu_peak_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _rss_kb("VmHWM:") > 0
    except OSError:
        return False


def steady_heap() -> bool:
    """Keeps freed CPU buffers in glibc's heap (mmap threshold 32 MiB, no trimming), so each timed
    call reuses pages instead of faulting in a fresh gradient: without it a 19 MB forward+backward
    pays a few ms of page faults whose variance swamps the ratios. Both the baseline and every
    variant run under it (a training loop's steady state); False where glibc's mallopt is absent."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def _release_free_heap() -> None:
    """Hands freed heap memory back to the OS, so the resident-set peak of the next call does not
    depend on what earlier providers left cached in the allocator (glibc only; a no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_extra_mb(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak memory (MB) above what was allocated before ``fn`` ran; None where unmeasurable."""
    gc.collect()
    _release_free_heap()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        del out
        return (peak - before) / 2**20
    if not cpu_peak_supported():
        return None
    before = _rss_kb("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    out = fn()
    peak = _rss_kb("VmHWM:")
    del out
    gc.collect()
    return max(0, peak - before) / 1024


def copy_ms(x: torch.Tensor, device: torch.device) -> float:
    """Median time of one copy of ``x`` into a preallocated buffer (``dst.copy_(x)``): the floor an
    op that reads ``x`` once can be compared with on this machine, CPU or GPU."""
    dst = torch.empty_like(x)
    times = time_fn(lambda i: dst.copy_(x), device, min_repeats=10, budget_s=0.2, warmup=2)
    return statistics.median(times)


def copy_bandwidth_gbps(nbytes: int, device: torch.device) -> float | None:
    """Device-to-device copy bandwidth (read + write bytes / time) of an ``nbytes`` buffer."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    times = time_fn(lambda i: dst.copy_(src), device, min_repeats=10, budget_s=0.5, warmup=3)
    return 2 * src.numel() * 2 / (statistics.median(times) * 1e-3) / 1e9
