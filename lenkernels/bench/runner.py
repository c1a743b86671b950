"""Runs suites and turns measurements into Results (see core.py for the method)."""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch

from lenkernels.bench.core import Result, Suite, _sync, copy_bandwidth_gbps, copy_ms, max_error, peak_extra_mb, time_fn

ROTATE_BELOW_BYTES = 64 * 2**20  # inputs smaller than this are rotated among copies (cache effects)
ROTATIONS = 4


def _nbytes(inputs: dict) -> int:
    return sum(t.numel() * t.element_size() for t in inputs.values() if isinstance(t, torch.Tensor))


def _clone_inputs(inputs: dict) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def _restore(inputs: dict, pristine: dict) -> None:
    for k, v in pristine.items():
        if isinstance(v, torch.Tensor):
            inputs[k].copy_(v)


def run_suite(
    suite: Suite,
    options,
    device: torch.device,
    *,
    providers: list[str] | None = None,
    on_step: Callable[[str], None] = lambda msg: None,
) -> list[Result]:
    results: list[Result] = []
    copy_gbps_cache: dict[int, float | None] = {}
    for case in suite.cases(options):
        inputs = suite.make_inputs(case, device)
        rotated = [inputs] + (
            [_clone_inputs(inputs) for _ in range(ROTATIONS - 1)] if _nbytes(inputs) < ROTATE_BELOW_BYTES else []
        )
        pristine = None
        largest = max((v for v in inputs.values() if isinstance(v, torch.Tensor)), key=lambda t: t.nbytes)
        copy_time = copy_ms(largest, device)
        for mode in suite.modes:
            expected = suite.expected(inputs, mode)
            nbytes = suite.bytes_moved(case, mode)
            if device.type == "cuda" and nbytes and nbytes not in copy_gbps_cache:
                copy_gbps_cache[nbytes] = copy_bandwidth_gbps(max(nbytes // 2, 2**20), device)
            case_results: list[Result] = []
            for provider in suite.providers:
                if providers and not any(p in provider.name for p in providers):
                    continue
                if mode not in provider.modes:
                    continue
                on_step(f"{suite.name} {case} {mode} {provider.name}")
                res = Result(suite.name, dict(case), mode, provider.name, "ok", note=provider.note)
                ok, why = provider.available(device)
                if not ok:
                    res.status, res.note = "skipped", why
                    case_results.append(res)
                    continue
                mutates = getattr(provider.fn, "mutates_inputs", False)
                if mutates and pristine is None:
                    pristine = _clone_inputs(inputs)
                try:
                    t0 = time.perf_counter()
                    out = provider.fn(inputs, mode)
                    _sync(device)
                    slow = time.perf_counter() - t0 > 0.5  # the correctness run was its warm-up
                    res.max_error = max_error(out, expected)
                    del out
                    if mutates:
                        _restore(inputs, pristine)
                    if not res.max_error <= provider.tolerance:
                        res.status = "failed"
                        res.note = f"max error {res.max_error:.3g} > tolerance {provider.tolerance:.3g}"
                        case_results.append(res)
                        continue
                    times = time_fn(
                        lambda i: provider.fn(rotated[i % len(rotated)], mode),
                        device,
                        min_repeats=options.repeats,
                        budget_s=options.budget,
                        warmup=0 if slow else 1,
                    )
                    if mutates:  # every rotated copy started as a clone of the same inputs
                        for r in rotated:
                            _restore(r, pristine)
                    res.median_ms = statistics.median(times)
                    res.x_copy = res.median_ms / copy_time if copy_time > 0 else None
                    res.extra["copy_ms"] = copy_time
                    res.min_ms, res.max_ms, res.repeats = min(times), max(times), len(times)
                    res.peak_extra_mb = peak_extra_mb(lambda: provider.fn(inputs, mode), device)
                    if mutates:
                        _restore(inputs, pristine)
                    if nbytes:
                        res.gbps = nbytes / (res.median_ms * 1e-3) / 1e9
                        copy = copy_gbps_cache.get(nbytes)
                        if copy:
                            res.copy_share = res.gbps / copy
                            res.extra["copy_gbps"] = copy
                except Exception as exc:  # a provider that crashes is reported, not fatal
                    res.status, res.note = "error", f"{type(exc).__name__}: {exc}"[:300]
                case_results.append(res)
            base = next(
                (r for r in case_results if r.status == "ok" and _is_baseline(suite, r.provider)), None
            )
            for r in case_results:
                if base is not None and r.status == "ok" and r.median_ms:
                    r.speedup = base.median_ms / r.median_ms
            results.extend(case_results)
        del inputs, rotated, pristine
    return results


def _is_baseline(suite: Suite, name: str) -> bool:
    return any(p.baseline and p.name == name for p in suite.providers)


def summary_line(r: Result) -> str:
    if r.status != "ok":
        return f"{r.provider}: {r.status} ({r.note})"
    sp = f", {r.speedup:.1f}x" if r.speedup and not math.isnan(r.speedup) else ""
    return f"{r.provider}: {r.median_ms:.3f} ms{sp}"
