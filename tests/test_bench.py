"""The benchmark CLI: flags, the JSON schema, and that a wrong provider is caught, not timed."""

from __future__ import annotations

import json

import pytest
import torch

from lenkernels.bench import __main__ as cli
from lenkernels.bench.core import SUITES, Provider, Suite
from lenkernels.bench.runner import run_suite
from lenkernels.bench.suites import load_all

SMALL = ["--tokens", "6", "--vocab", "37", "--repeats", "1", "--budget", "0", "--no-progress"]


def test_cli_json_schema(tmp_path):
    out = tmp_path / "r.json"
    code = cli.main(["--suite", "token_stats", "--provider", "eager-verl", "--provider", "lenkernels-cpu", *SMALL,
                     "--dtype", "fp32", "--json", str(out)])  # fmt: skip
    assert code == 0
    data = json.loads(out.read_text())
    assert data["schema"] == "lenkernels.bench/1"
    for key in ("device", "torch", "python", "cpu_cores", "date", "lenkernels"):
        assert key in data["machine"]
    rows = data["results"]
    assert {r["provider"] for r in rows} >= {"eager-verl", "lenkernels-cpu"}
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    for r in rows:
        assert r["case"] == {"tokens": 6, "vocab": 37, "dtype": "fp32"}
        if r["status"] == "ok":
            assert r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["repeats"] >= 1
            assert r["max_error"] <= 1e-4 or r["provider"].startswith("eager")
    base = [r for r in rows if r["provider"] == "eager-verl" and r["status"] == "ok"]
    assert base and all(r["speedup"] == pytest.approx(1.0) for r in base)


def test_cli_sweep_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    code = cli.main(["--suite", "token_stats", "--provider", "lenkernels-cpu", "--tokens", "4", "--tokens", "8",
                     "--vocab", "20", "--repeats", "1", "--budget", "0", "--no-progress", "--plot", str(tmp_path)])  # fmt: skip
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["token_stats_fwd.png", "token_stats_fwd_bwd.png"]


def test_cli_list_and_bad_flags(capsys):
    assert cli.main(["--list"]) == 0
    assert "token_stats" in capsys.readouterr().out
    assert cli.main(["--suite", "nope", "--no-progress"]) == 2
    for bad in (["--repeats", "0"], ["--tokens", "0"], ["--dtype", "int8"]):
        with pytest.raises(SystemExit):
            cli.parse_args(bad)


def _toy_suite(wrong: bool) -> Suite:
    def make_inputs(case, device):
        return {"x": torch.randn(case["tokens"])}

    def expected(inputs, mode):
        return {"y": inputs["x"].double() * 2}

    def right(inputs, mode):
        return {"y": inputs["x"] * 2}

    def bad(inputs, mode):
        return {"y": inputs["x"] * 2 + (0.5 if wrong else 0.0)}

    return Suite(
        name="toy", description="", cases=lambda o: [{"tokens": 5}], make_inputs=make_inputs, expected=expected,
        providers=[Provider("base", right, baseline=True), Provider("lenkernels-bad", bad)], modes=("fwd",),
    )  # fmt: skip


def test_wrong_provider_is_failed_and_not_timed():
    opts = cli.parse_args(["--repeats", "1", "--budget", "0"])
    opts.device_type = "cpu"
    results = {r.provider: r for r in run_suite(_toy_suite(wrong=True), opts, torch.device("cpu"))}
    assert results["base"].status == "ok" and results["base"].speedup == pytest.approx(1.0)
    bad = results["lenkernels-bad"]
    assert bad.status == "failed" and bad.median_ms is None and bad.speedup is None
    assert "tolerance" in bad.note
    ok = {r.provider: r for r in run_suite(_toy_suite(wrong=False), opts, torch.device("cpu"))}
    assert ok["lenkernels-bad"].status == "ok"


def test_failed_lenkernels_provider_fails_the_run(monkeypatch):
    load_all()
    suite = SUITES["token_stats"]
    victim = next(p for p in suite.providers if p.name == "lenkernels-cpu")
    original = victim.fn

    def broken(inputs, mode):
        out = original(inputs, mode)
        out["logprobs"] = out["logprobs"] + 1.0
        return out

    monkeypatch.setattr(victim, "fn", broken)
    assert cli.main(["--suite", "token_stats", "--provider", "lenkernels-cpu", *SMALL]) == 1


def test_token_stats_outputs_suite_smoke(tmp_path):
    """The per-output cost suite: opt-in (no cases in a plain run), every variant correct through
    the runner, and the interleaved ratio command checks each variant against its own reference."""
    load_all()
    from lenkernels.bench.suites import token_stats_outputs as tso

    plain = cli.parse_args([])
    plain.device_type = "cpu"
    assert SUITES["token_stats_outputs"].cases(plain) == []
    assert cli.main(["--suite", "token_stats_outputs", "--provider", "lp+ent", "--provider", "+all", *SMALL]) == 0
    out = tmp_path / "ratios.json"
    # V=64: the peaked head (64 ids) fills the vocabulary, sampler sets stay small; fp32 and bf16 tolerances
    for dtype in ("fp32", "bf16"):
        assert tso.main(["--tokens", "5", "--vocab", "64", "--dtype", dtype, "--rounds", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert {r["variant"] for r in rows} == set(tso.VARIANTS) and {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    assert all(r["status"] == "ok" and r["ratio"] > 0 for r in rows)
    assert all(r["ratio"] == pytest.approx(1.0) for r in rows if r["variant"] == "lp+ent")


def test_verl_distill_bench_smoke(tmp_path):
    """verl's distillation loss three ways (verl's default and chunked paths, lenkernels'): every
    variant runs forward and backward, times and peaks are written."""
    pytest.importorskip("verl.trainer.distillation.fsdp.losses")
    from lenkernels.bench import verl_distill

    out = tmp_path / "distill.json"
    argv = ["--tokens", "12", "--vocab", "96", "--topk", "4", "--rounds", "2", "--json", str(out)]
    assert verl_distill.main(argv) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["variant"] for r in rows] == ["verl", "verl-chunked", "lenkernels"]
    assert all(r["median_ms"] > 0 and r["ratio_to_verl"] > 0 for r in rows)
