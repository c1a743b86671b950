"""verl's top-K on-policy distillation loss (``compute_forward_kl_topk``, ``loss_mode="forward_kl_topk"``)
three ways: verl's default path (a ``[B, T, V]`` log-softmax), verl's ``use_chunked_topk`` path
(float32 chunks) and lenkernels' drop-in (one ``token_stats`` call): forward + backward time
(interleaved rounds, medians and the ratio to verl's default in each round) and peak memory above
the inputs.

    python -m lenkernels.bench.verl_distill [--tokens 512] [--vocab 65536] [--topk 64] [--json PATH]

Needs verl (its distillation module and configs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def _inputs(tokens: int, vocab: int, topk: int, dtype: torch.dtype, device: torch.device):
    g = torch.Generator().manual_seed(0)
    student = (torch.randn(1, tokens, vocab, generator=g) * 2).to(dtype=dtype, device=device)
    teacher_lp, teacher_ids = torch.log_softmax(torch.randn(tokens, vocab, generator=g) * 2, -1).topk(topk, -1)
    cu = torch.tensor([0, tokens // 3, tokens], device=device)
    nested = torch.nested.nested_tensor_from_jagged
    return student, nested(teacher_lp.to(device), cu), nested(teacher_ids.to(device), cu)


def _variants(topk: int) -> dict:
    from verl.trainer.distillation.fsdp import losses
    from verl.workers.config import DistillationConfig, DistillationLossConfig

    from lenkernels.integrations.verl import compute_forward_kl_topk

    def config(chunked: bool):
        loss = DistillationLossConfig(loss_mode="forward_kl_topk", topk=topk, use_policy_gradient=False,
                                      use_chunked_topk=chunked)  # fmt: skip
        return DistillationConfig(distillation_loss=loss)

    return {"verl": (losses.compute_forward_kl_topk, config(False)),
            "verl-chunked": (losses.compute_forward_kl_topk, config(True)),
            "lenkernels": (compute_forward_kl_topk, config(False))}  # fmt: skip


def _step(fn, cfg, student, teacher_lp, teacher_ids):
    x = student.detach().requires_grad_()
    out = fn(x, teacher_lp, teacher_ids, cfg, "thd")
    out["distillation_losses"].sum().backward()
    return x.grad


def main(argv=None, *, keep_heap: bool = False) -> int:
    """The command line (``keep_heap``: ``bench.core.steady_heap`` first, as ``python -m`` runs it; it
    changes this process's allocator for good, so in-process callers such as tests leave it off)."""
    p = argparse.ArgumentParser(prog="python -m lenkernels.bench.verl_distill", description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    from lenkernels.bench import report
    from lenkernels.bench.core import peak_extra_mb, steady_heap

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    inputs = _inputs(args.tokens, args.vocab, args.topk, dtype, device)
    variants = _variants(args.topk)
    peaks = {name: peak_extra_mb(lambda f=f, c=c: _step(f, c, *inputs), device) for name, (f, c) in variants.items()}
    heap = steady_heap() if keep_heap and device.type == "cpu" else None
    times = {name: [] for name in variants}
    for f, c in variants.values():  # warm-up
        _step(f, c, *inputs)
    for r in range(args.rounds):
        names = list(variants)[r % 3 :] + list(variants)[: r % 3]
        for name in names:
            f, c = variants[name]
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            _step(f, c, *inputs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) * 1e3)
    rows = []
    for name in variants:
        ratio = statistics.median(t / b for t, b in zip(times[name], times["verl"], strict=True))
        rows.append({"variant": name, "median_ms": statistics.median(times[name]), "ratio_to_verl": ratio,
                     "peak_extra_mb": peaks[name]})  # fmt: skip
        print(f"{name:14s} {rows[-1]['median_ms']:9.1f} ms  x{ratio:.2f} of verl's time  "
              f"peak {peaks[name]:.0f} MB above the inputs")  # fmt: skip
    logits_mb = inputs[0].numel() * inputs[0].element_size() / 2**20
    print(f"(student logits: {logits_mb:.0f} MB, {args.dtype}, fwd+bwd, {args.rounds} interleaved rounds)")
    if args.json:
        report.write_json({"schema": "lenkernels.bench.verl_distill/1", "machine": report.machine(device),
                           "options": {**vars(args), "steady_heap": heap, "logits_mb": logits_mb},
                           "results": rows}, args.json)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(keep_heap=True))
