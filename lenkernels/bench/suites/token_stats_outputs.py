"""What each optional output of ``token_stats`` costs over logprob + entropy alone.

The baseline is ``token_stats(outputs=("logprob", "entropy"))``; every other variant asks for the
baseline's two outputs plus one extra (``sum_p2``, ``argmax``, ``mean_logit``, ``gathered`` at K = 20
``gather_ids``, ``kept`` at K = 20 ``kept_ids``, ``topk`` with ``top_k=20``, sampler replay
``sampling=dict(top_k=20, top_p=0.95)``, ``sampling=dict(top_p=0.95)``), and the last asks for all
of them at once. Forward and forward+backward (every float field gets a random cotangent).

Two ways to run it:

- ``python -m lenkernels.bench --suite token_stats_outputs`` (the common runner: each variant is
  checked against the float64 reference, then timed one after the other; "speedup" is baseline
  time / variant time). Opt-in: the suite has no cases in a plain ``python -m lenkernels.bench``
  run (it is only run when named with ``--suite``, or with ``--full``).
- ``python -m lenkernels.bench.suites.token_stats_outputs [--tokens N] [--json PATH]``: the ratio
  table. Every variant is first checked against the reference (a variant that fails gets no ratio),
  then timed *interleaved*: each round runs the baseline and every variant once, in a rotated order,
  and the round's ratio is variant time / baseline time of that round; the median ratio over the
  rounds (with the 25th-75th percentiles) is reported, which keeps the ratio meaningful on a machine
  whose load drifts during the run.

Logits: ``randn * 2`` over the vocabulary plus a peaked head (64 ids per row at ``16 - i / 4``), so
that the sampler's kept sets are LLM-like (top-p 0.95 keeps 12 ids at T = 0.9) rather than most of a
flat vocabulary; the sampled ids are among each row's top 5 (inside every kept set), ``kept_ids`` and
``gather_ids`` are the head's top 20 in shuffled order (a teacher's top-20 in distillation).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import lenkernels as lk
from lenkernels.bench.core import Provider, Suite, _sync, max_error, register, steady_heap
from lenkernels.bench.suites.common import DTYPES, vocab_cases
from lenkernels.reference import token_stats as ref

NAME = "token_stats_outputs"
TEMPERATURE = 0.9
K = 20
HEAD = 64

# variant name -> token_stats keyword arguments (outputs beyond logprob + entropy, and their options)
VARIANTS: dict[str, dict] = {
    "lp+ent": {},
    "+sum_p2": {"outputs": ("sum_p2",)},
    "+argmax": {"outputs": ("argmax",)},
    "+mean_logit": {"outputs": ("mean_logit",)},
    "+gathered K=20": {"outputs": ("gathered",), "gather": True},
    "+kept K=20 ids": {"outputs": ("kept",), "kept_ids": True},
    "+topk k=20": {"outputs": ("topk",), "top_k": K},
    "+sampling k=20 p=0.95": {"outputs": ("kept",), "sampling": {"top_k": K, "top_p": 0.95}},
    "+sampling p=0.95": {"outputs": ("kept",), "sampling": {"top_p": 0.95}},
    "+all": {"outputs": ("sum_p2", "argmax", "mean_logit", "gathered", "topk"), "gather": True, "top_k": K,
             "sampling": {"top_k": K, "top_p": 0.95}},
}  # fmt: skip
# the targets: ratio to the baseline, per variant
TARGETS = {"+sum_p2": 1.10, "+argmax": 1.10, "+mean_logit": 1.10, "+gathered K=20": 1.10,
           "+kept K=20 ids": 2.0, "+topk k=20": 2.0, "+sampling k=20 p=0.95": 2.0, "+sampling p=0.95": 2.0}  # fmt: skip
FLOAT_FIELDS = ("logprob", "entropy", "sum_p2", "log_sum_p2", "max_logprob", "mean_logit", "topk_logprobs",
                "gathered_logprobs", "kept_logprob", "kept_entropy", "kept_log_mass")  # fmt: skip
INT_FIELDS = ("argmax", "topk_ids")


def cases(options):
    named = bool(options.suite) and NAME in options.suite
    if not (named or options.full):
        return []  # opt-in: keeps the default run of every suite short
    return vocab_cases(options, full=[64, 128, 256, 512], default=[16] if options.device_type == "cpu" else [512])


def make_inputs(case, device):
    n, v = case["tokens"], case["vocab"]
    gen = torch.Generator(device="cpu").manual_seed(0)
    logits = torch.randn(n, v, generator=gen) * 2
    head = min(HEAD, v)
    head_ids = torch.stack([torch.randperm(v, generator=gen)[:head] for _ in range(n)])  # [N, HEAD], descending z
    logits.scatter_(1, head_ids, (16 - torch.arange(head, dtype=torch.float32) / 4).expand(n, head))
    k = min(K, head)
    top = head_ids[:, :k]
    shuffled = top.gather(1, torch.argsort(torch.rand(n, k, generator=gen), dim=1))
    ids = head_ids.gather(1, torch.randint(0, min(5, head), (n, 1), generator=gen)).squeeze(1)
    cot = {f: torch.randn(n, k, generator=gen) if f in ("topk_logprobs", "gathered_logprobs") else torch.randn(n, generator=gen)
           for f in FLOAT_FIELDS}  # fmt: skip
    out = {"logits": logits.to(DTYPES[case["dtype"]]).to(device), "ids": ids.to(device),
           "gather_ids": shuffled.to(device), "kept_ids": shuffled.to(device)}  # fmt: skip
    out.update({f"g_{f}": c.to(device) for f, c in cot.items()})
    return out


def _kwargs(variant: str, inputs: dict) -> dict:
    spec = VARIANTS[variant]
    kw = {"outputs": ("logprob", "entropy", *spec.get("outputs", ()))}
    if spec.get("top_k"):
        kw["top_k"] = spec["top_k"]
    if spec.get("gather"):
        kw["gather_ids"] = inputs["gather_ids"]
    if spec.get("kept_ids"):
        kw["kept_ids"] = inputs["kept_ids"]
    if spec.get("sampling"):
        kw["sampling"] = spec["sampling"]
        if "kept" not in kw["outputs"]:
            kw["outputs"] = (*kw["outputs"], "kept")
    return kw


def _backward(fields: dict, inputs: dict, x: torch.Tensor) -> torch.Tensor:
    loss = sum(
        (fields[f] * inputs[f"g_{f}"].to(fields[f].dtype)).sum() for f in FLOAT_FIELDS if fields.get(f) is not None
    )
    (g,) = torch.autograd.grad(loss, x)
    return g


def _variant_fn(variant: str, backend: str | None = None):
    def fn(inputs, mode):
        kw = _kwargs(variant, inputs)
        if mode == "fwd":
            with torch.no_grad():
                st = lk.token_stats(inputs["logits"], inputs["ids"], temperature=TEMPERATURE, backend=backend, **kw)
            return {f: getattr(st, f) for f in FLOAT_FIELDS + INT_FIELDS if getattr(st, f) is not None}
        x = inputs["logits"].detach().requires_grad_(True)
        st = lk.token_stats(x, inputs["ids"], temperature=TEMPERATURE, backend=backend, **kw)
        fields = {f: getattr(st, f) for f in FLOAT_FIELDS + INT_FIELDS if getattr(st, f) is not None}
        out = {f: t.detach() for f, t in fields.items()}
        out["dlogits"] = _backward(fields, inputs, x)
        return out

    return fn


def reference(inputs: dict, mode: str, variant: str, chunk: int = 32) -> dict:
    """float64 values of ``variant``'s fields (and the gradient) from lenkernels.reference, on the
    inputs' device, in row chunks (rows are independent) so no [N, V] float64 tensor exists at once."""
    n = inputs["logits"].shape[0]
    parts = [_reference_rows(inputs, mode, variant, slice(s, s + chunk)) for s in range(0, n, chunk)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _reference_rows(inputs: dict, mode: str, variant: str, rows: slice) -> dict:
    sub = {k: v[rows] for k, v in inputs.items()}
    kw = _kwargs(variant, sub)
    wanted = kw["outputs"]
    x = sub["logits"].detach().double().requires_grad_(mode == "fwd+bwd")
    ids = sub["ids"]
    z, lse = ref._z_lse(x, TEMPERATURE)
    logp = z - lse
    p = logp.exp()
    f: dict[str, torch.Tensor] = {}
    f["logprob"] = logp.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)
    f["entropy"] = -(p * logp).sum(-1)
    if "sum_p2" in wanted:
        f["sum_p2"] = (p * p).sum(-1)
        f["log_sum_p2"] = torch.logsumexp(2 * z, -1) - 2 * lse.squeeze(-1)
    if "argmax" in wanted:
        f["argmax"] = z.detach().argmax(-1)
        f["max_logprob"] = z.amax(-1) - lse.squeeze(-1)
    if "mean_logit" in wanted:
        f["mean_logit"] = z.mean(-1)
    if "topk" in wanted:
        f["topk_ids"], f["topk_logprobs"] = ref.topk(x, TEMPERATURE, kw["top_k"])
    if "gathered" in wanted:
        f["gathered_logprobs"] = ref.gathered_logprobs(x, TEMPERATURE, sub["gather_ids"])
    if "kept" in wanted:
        if "kept_ids" in kw:
            mask = ref.kept_mask_from_ids(sub["kept_ids"], x.shape[-1])
        else:
            mask = ref.sampler_kept_mask(x, TEMPERATURE, **kw["sampling"])
        f["kept_logprob"], f["kept_entropy"], f["kept_log_mass"] = ref.kept_stats(x, ids, TEMPERATURE, mask)
    out = {k: v.detach() for k, v in f.items()}
    if mode == "fwd+bwd":
        out["dlogits"] = _backward(f, sub, x)
    return out


def _bytes(case, mode):
    logits = case["tokens"] * case["vocab"] * (torch.finfo(DTYPES[case["dtype"]]).bits // 8)
    return logits if mode == "fwd" else 3 * logits


def _common_expected(inputs, mode):
    """What every variant shares: logprob and entropy (the forward values; in fwd+bwd each variant's
    gradient has its own cotangents, so the runner compares these two only and the ratio command
    compares every field and the gradient of each variant against its own reference)."""
    ref_out = reference(inputs, "fwd", "lp+ent")
    return {"logprob": ref_out["logprob"], "entropy": ref_out["entropy"]}


def _provider(variant: str) -> Provider:
    return Provider(f"lenkernels {variant}", _variant_fn(variant), tolerance=1e-4, baseline=variant == "lp+ent",
                    note=", ".join(f"{k}={v}" for k, v in VARIANTS[variant].items()))  # fmt: skip


register(
    Suite(
        name=NAME,
        description="token_stats: each extra output's cost over logprob+entropy alone (opt-in: --suite "
        f"{NAME}; ratios, interleaved: python -m lenkernels.bench.suites.{NAME})",
        cases=cases,
        make_inputs=make_inputs,
        expected=_common_expected,
        providers=[_provider(v) for v in VARIANTS],
        bytes_moved=_bytes,
    )
)


# --- the ratio command: interleaved rounds, median of per-round ratios ------------------------


SPARSE = ("gathered", "kept", "topk")


def tolerance(variant: str, dtype: torch.dtype) -> tuple[float, float]:
    """(fields, gradient) tolerances of ``max_error`` (which already forgives one rounding of the
    output dtype). The sparse outputs add their gradient terms into the dense gradient in its own
    dtype (a read-modify-write per kept / gathered / top-k id, SPEC), a second rounding: up to two
    more ulps of a bf16/fp16 gradient at those ids."""
    sparse = any(o in SPARSE for o in _kwargs(variant, {"gather_ids": None, "kept_ids": None})["outputs"])
    half = dtype in (torch.bfloat16, torch.float16)
    return 1e-4, 1e-4 + (2 * torch.finfo(dtype).eps if sparse and half else 0.0)


def check_variants(inputs: dict, mode: str) -> dict[str, tuple[float, bool]]:
    """Per variant: (largest error against its own float64 reference, within tolerance)."""
    out = {}
    for v in VARIANTS:
        got, exp = _variant_fn(v)(inputs, mode), reference(inputs, mode, v)
        tol_fields, tol_grad = tolerance(v, inputs["logits"].dtype)
        e_fields = max_error(got, {k: t for k, t in exp.items() if k != "dlogits"})
        e_grad = max_error(got, {"dlogits": exp["dlogits"]}) if "dlogits" in exp else 0.0
        out[v] = (max(e_fields, e_grad), e_fields <= tol_fields and e_grad <= tol_grad)
    return out


def interleaved_ratios(inputs: dict, mode: str, device: torch.device, *, rounds: int, variants=None) -> dict:
    """Per variant: median (and 25th/75th percentile) over ``rounds`` of (variant time / baseline
    time in the same round), and the median milliseconds. Each round runs every variant once, the
    order rotated by one each round so no variant always follows the same one."""
    names = list(variants or VARIANTS)
    fns = {v: _variant_fn(v) for v in names}
    for v in names:  # warm-up
        fns[v](inputs, mode)
    times: dict[str, list[float]] = {v: [] for v in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for v in order:
            _sync(device)
            t0 = time.perf_counter()
            fns[v](inputs, mode)
            _sync(device)
            times[v].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for v in names:
        ratios = sorted(t / b for t, b in zip(times[v], times["lp+ent"]))
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        out[v] = {"ratio": statistics.median(ratios), "ratio_q25": q[0], "ratio_q75": q[2],
                  "median_ms": statistics.median(times[v]), "rounds": len(ratios)}  # fmt: skip
    return out


def main(argv=None, *, keep_heap: bool = False) -> int:
    """The command line (``keep_heap``: ``bench.core.steady_heap`` first, as ``python -m`` runs it; it
    changes this process's allocator for good, so in-process callers such as tests leave it off)."""
    p = argparse.ArgumentParser(prog=f"python -m lenkernels.bench.suites.{NAME}", description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, action="append", help="token count N (repeatable; default 64, --full 64..512)")
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--full", action="store_true", help="N = 64, 128, 256, 512")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds per mode (default 15)")
    p.add_argument("--repeat", type=int, default=1, help="repeat the whole measurement; ratios: median of repeats")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.repeat < 1 or (args.tokens and min(args.tokens) < 1):
        p.error("--rounds, --repeat and --tokens must be positive")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    heap = steady_heap() if keep_heap and device.type == "cpu" else None
    sizes = args.tokens or ([64, 128, 256, 512] if args.full else [64])
    rows = []
    for n in sizes:
        case = {"tokens": n, "vocab": args.vocab, "dtype": args.dtype}
        inputs = make_inputs(case, device)
        for mode in ("fwd", "fwd+bwd"):
            checks = check_variants(inputs, mode)
            errors = {v: e for v, (e, _) in checks.items()}
            ok = [v for v in VARIANTS if checks[v][1]]
            if "lp+ent" not in ok:
                ok = []
            reps = [
                interleaved_ratios(inputs, mode, device, rounds=args.rounds, variants=ok) for _ in range(args.repeat)
            ]
            for v in VARIANTS:
                row = {"case": case, "mode": mode, "variant": v, "max_error": errors[v], "target": TARGETS.get(v)}
                if v in ok:
                    row.update({k: statistics.median(r[v][k] for r in reps) for k in reps[0][v]})
                    row["repeat_ratios"] = [r[v]["ratio"] for r in reps]
                    row["met"] = None if row["target"] is None else row["ratio"] <= row["target"]
                    row["status"] = "ok"
                else:
                    row["status"] = "failed"
                rows.append(row)
            for v in VARIANTS:
                r = rows[-len(VARIANTS) :][list(VARIANTS).index(v)]
                if r["status"] != "ok":
                    print(f"N={n} {mode:8s} {v:24s} FAILED max error {r['max_error']:.2g}")
                    continue
                target = f"target <= {r['target']:.2f}: {'met' if r['met'] else 'NOT met'}" if r["target"] else ""
                print(f"N={n} {mode:8s} {v:24s} {r['median_ms']:8.2f} ms  x{r['ratio']:.3f} "
                      f"[{r['ratio_q25']:.3f}, {r['ratio_q75']:.3f}]  err {r['max_error']:.1e}  {target}")  # fmt: skip
        del inputs
    if args.json:
        from lenkernels.bench import report

        data = {"schema": "lenkernels.bench.ratios/1", "suite": NAME, "machine": report.machine(device),
                "options": {**vars(args), "steady_heap": heap},
                "method": "interleaved rounds; ratio = variant / baseline time of the same round; median over rounds "
                "(q25, q75), then median over --repeat repeats", "results": rows}  # fmt: skip
        report.write_json(data, args.json)
        print(f"wrote {args.json}")
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main(keep_heap=True))
