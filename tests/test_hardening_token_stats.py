"""Hardening of the token-statistics op: tensors past 2^31 elements, thread-count independence,
concurrent calls and thread-safe extension loading."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

import lenkernels as lk
from lenkernels.ops.token_stats import token_stats_bwd, token_stats_fwd
from lenkernels.reference import token_stats as ref
from tests.utils import STAT_RTOL, assert_close


def test_logits_past_2_pow_31_elements_cpu():
    """Row offsets N*V past 2^31: a 32-bit index would read and write the wrong rows."""
    vocab = 151_936
    n = (2**31) // vocab + 2  # the last two rows start past element 2^31
    assert (n - 1) * vocab > 2**31
    logits = torch.empty(n, vocab, dtype=torch.bfloat16)
    logits.copy_(torch.randn(vocab).to(torch.bfloat16).expand(n, vocab))
    probe = [0, n // 2, n - 2, n - 1]
    logits[probe] = (torch.randn(len(probe), vocab) * 3).to(torch.bfloat16)
    ids = torch.randint(0, vocab, (n,))
    temp = torch.full((1,), 0.8)
    lp, ent, lse, mean_z = token_stats_fwd(logits, ids, temp, -100, "cpu")
    lp_ref, ent_ref = ref.token_logprobs_entropy(logits[probe], ids[probe], 0.8)
    assert_close(lp[probe], lp_ref, rtol=STAT_RTOL, scale=30.0, name="logprobs")
    assert_close(ent[probe], ent_ref, rtol=STAT_RTOL, scale=1.0, name="entropy")

    g_lp, g_h = torch.randn(n), torch.randn(n)
    expected = ref.token_stats_backward(logits[probe], ids[probe], temp, g_lp[probe], g_h[probe], -100)
    token_stats_bwd(logits, ids, temp, lse, mean_z, g_lp, g_h, -100, "cpu", logits)  # in place
    got = logits[probe].double()
    assert ((got - expected.double()).abs() <= 2**-7 * expected.double().abs() + 1e-12).all()


def test_cpu_results_do_not_depend_on_thread_count():
    logits = (torch.randn(3, 151_936) * 2).to(torch.bfloat16)
    ids = torch.randint(0, 151_936, (3,))
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            x = logits.clone().requires_grad_(True)
            lp, ent = lk.token_logprobs_entropy(x, ids, backend="cpu")
            (lp.sum() - ent.sum()).backward()
            outs.append((lp, ent, x.grad))
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


def test_concurrent_calls_from_threads():
    inputs = [((torch.randn(8, 20_000) * 2), torch.randint(0, 20_000, (8,))) for _ in range(6)]
    expected = [lk.token_logprobs_entropy(x, y, backend="cpu") for x, y in inputs]
    results: dict[int, tuple] = {}
    errors = []

    def work(i):
        try:
            for _ in range(5):
                results[i] = lk.token_logprobs_entropy(inputs[i][0], inputs[i][1], backend="cpu")
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, (lp, ent) in enumerate(expected):
        assert torch.equal(results[i][0], lp) and torch.equal(results[i][1], ent)


def test_extension_build_and_load_is_thread_safe(tmp_path):
    """Eight threads ask for a not-yet-built extension at once: one build, one module, all work."""
    code = """
import threading, torch
from lenkernels import cpu
mods, errors = [], []
def go():
    try:
        mods.append(cpu.load("token_stats"))
    except Exception as exc:
        errors.append(exc)
ts = [threading.Thread(target=go) for _ in range(8)]
[t.start() for t in ts]; [t.join() for t in ts]
assert not errors, errors
assert len({id(m) for m in mods}) == 1 and len(mods) == 8
import lenkernels as lk
x = torch.randn(2, 50); y = torch.tensor([1, 2])
lp, ent = lk.token_logprobs_entropy(x, y, backend="cpu")
assert torch.allclose(lp, torch.log_softmax(x, -1)[[0, 1], [1, 2]], atol=1e-6)
print("ok")
"""
    env = dict(os.environ, LENKERNELS_FORCE_JIT="1", LENKERNELS_CACHE=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
    built = list(tmp_path.rglob("_cpu_token_stats*.so"))
    assert len(built) == 1, built


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_nan_temperature_tensor_is_rejected_not_propagated(backend):
    x, y = torch.randn(3, 10), torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="temperature"):
        lk.token_logprobs_entropy(x, y, temperature=torch.tensor([[1.0], [float("nan")], [1.0]]).reshape(3), backend=backend)
