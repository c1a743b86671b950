"""Command line of the benchmark. ``python -m lenkernels.bench --help``."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m lenkernels.bench",
        description="Time and memory of every lenkernels op against the eager code RL trainers use.",
    )
    p.add_argument("--suite", action="append", help="suite name (repeatable; default: all). --list shows them")
    p.add_argument("--provider", action="append", help="only providers whose name contains this (repeatable)")
    p.add_argument("--tokens", type=int, action="append", help="token count N (repeatable: a sweep)")
    p.add_argument("--vocab", type=int, help="vocabulary size V (default 151936)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="logits dtype (default bf16)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--full", action="store_true", help="the full sweep of sizes instead of the small default")
    p.add_argument("--repeats", type=int, default=3, help="minimum timed repeats per measurement (default 3)")
    p.add_argument("--budget", type=float, default=0.25, help="seconds of timing per measurement (default 0.25)")
    p.add_argument("--json", metavar="PATH", help="write every figure and the machine stamp as JSON")
    p.add_argument("--plot", metavar="DIR", help="write PNG charts (time and memory per provider) into DIR")
    p.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    p.add_argument("--list", action="store_true", help="list suites and providers, then exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.budget < 0:
        p.error("--budget must be non-negative")
    if args.tokens and any(n < 1 for n in args.tokens):
        p.error("--tokens must be positive")
    if args.vocab is not None and args.vocab < 1:
        p.error("--vocab must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from lenkernels.bench import report
    from lenkernels.bench.core import SUITES
    from lenkernels.bench.runner import run_suite
    from lenkernels.bench.suites import load_all

    console = Console(width=None if sys.stdout.isatty() else 200)
    load_all()
    if args.list:
        for suite in SUITES.values():
            console.print(f"[bold]{suite.name}[/]: {suite.description}")
            for p in suite.providers:
                console.print(f"  {p.name}{'  (baseline)' if p.baseline else ''}  {p.note}")
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        console.print("[red]--device cuda: no CUDA device is available[/]")
        return 2
    args.device_type = device.type
    names = args.suite or list(SUITES)
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        console.print(f"[red]unknown suite(s) {unknown}; known: {sorted(SUITES)}[/]")
        return 2

    results = []
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console,
        disable=args.no_progress, transient=True,
    ) as progress:  # fmt: skip
        task = progress.add_task("benchmark", total=len(names))
        for name in names:
            results += run_suite(
                SUITES[name], args, device, providers=args.provider,
                on_step=lambda msg: progress.update(task, description=msg[:110]),
            )  # fmt: skip
            progress.advance(task)

    stamp = report.machine(device)
    console.print(report.table(results, title=f"lenkernels benchmark on {stamp['device']} ({device.type})"))
    console.print(
        "speedup: against the provider marked baseline (eager verl code) of the same case and mode; "
        "x copy: median time over one copy of the largest input (the logits) measured in the same run; "
        "peak extra MB: peak memory above the inputs (CPU: process peak RSS)"
    )
    if args.markdown:
        print(report.markdown(results))
    options = {k: v for k, v in vars(args).items() if k not in ("list", "no_progress")}
    if args.json:
        report.write_json(report.to_json(results, device, options), args.json)
        console.print(f"wrote {args.json}")
    if args.plot:
        for path in report.plot(results, args.plot):
            console.print(f"wrote {path}")
    failed = [r for r in results if r.status in ("failed", "error") and r.provider.startswith("lenkernels")]
    if failed:
        console.print(f"[red]{len(failed)} lenkernels measurement(s) failed their correctness check[/]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
