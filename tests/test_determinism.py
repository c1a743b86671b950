"""Determinism of every op on every backend: the same inputs give bitwise-equal outputs and
gradients run after run; on the cpu backend the bits do not depend on the thread count; calls from
several Python threads at once give the bits of a lone call.

Every case returns the op's outputs and the gradients of its differentiable inputs for a fixed
random cotangent. Bits are compared as integers, so NaNs (and -0.0 vs 0.0) count too.
"""

from __future__ import annotations

import threading

import pytest
import torch

import lenkernels as lk
from lenkernels import shaping
from lenkernels.cpu import advantages as cpu_adv
from lenkernels.cpu import phase_stats as cpu_phase
from tests.utils import HAS_CUDA, backend_params

_INT_OF = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().cpu()
    return t.view(_INT_OF[t.element_size()]) if t.is_floating_point() else t


def _same_bits(a: list, b: list, what: str) -> None:
    assert len(a) == len(b), what
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.shape == y.shape and x.dtype == y.dtype, f"{what}: output {i}"
        diff = _bits(x) != _bits(y)
        if bool(diff.any()):
            where = diff.nonzero()[0].tolist()
            raise AssertionError(f"{what}: output {i} differs at {where} ({int(diff.sum())} of {x.numel()} elements): "
                                 f"{x.detach().cpu()[tuple(where)].item()!r} vs {y.detach().cpu()[tuple(where)].item()!r}")  # fmt: skip


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _grads(outputs, inputs, seed=1):
    """The outputs and d(sum_k <cotangent_k, output_k>)/d inputs, with fixed random cotangents."""
    g = _gen(seed)
    floats = [o for o in outputs if o is not None and o.requires_grad]
    total = sum((o * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in floats)
    grads = torch.autograd.grad(total, inputs, allow_unused=True) if floats else []
    return [o.detach() for o in outputs if o is not None] + [d for d in grads if d is not None]


# --- one function per op: (backend, device, big) -> tensors -----------------------------------------
# ``big``: sizes past the thresholds where the cpu kernels use more than one thread.


def token_stats(backend, device, big=False):
    n, v = (64, 9000) if big else (5, 300)  # big: several rows per thread and vocab chunks merged
    g = _gen()
    x = (torch.randn(n, v, generator=g) * 3).to(torch.bfloat16).to(device).requires_grad_(True)
    ids = torch.randint(0, v, (n,), generator=g).to(device)
    ids[1] = -100
    temp = (torch.rand(n, generator=g) + 0.5).to(device)
    lp, ent = lk.token_logprobs_entropy(x, ids, temperature=temp, backend=backend)
    return _grads([lp, ent], [x])


def linear_stats(backend, device, big=False):
    n, d, v = (33_000, 8, 600) if big else (9, 16, 70)  # big: >= 2^15 rows (threaded fold) and 2 vocab chunks
    g = _gen()
    h = torch.randn(n, d, generator=g).to(device).requires_grad_(True)
    w = (torch.randn(v, d, generator=g) / 3).to(device).requires_grad_(True)
    b = torch.randn(v, generator=g).to(device).requires_grad_(True)
    ids = torch.randint(0, v, (n,), generator=g).to(device)
    lp, ent = lk.linear_logprobs_entropy(h, w, ids, bias=b, temperature=0.8, chunk_size=1 << 17 if big else 300,
                                         backend=backend)  # fmt: skip
    return _grads([lp, ent], [h, w, b])


def _policy_inputs(device, big):
    b, t = (16, 3000) if big else (3, 37)  # big: several 1024-token tiles per sequence
    g = _gen()
    lp = -torch.rand(b, t, generator=g) * 3
    return dict(
        logprobs=lp.to(device).requires_grad_(True), old_logprobs=(lp + torch.randn(b, t, generator=g) * 0.3).to(device),
        advantages=torch.randn(b, generator=g).to(device), mask=(torch.rand(b, t, generator=g) > 0.2).to(device),
        ref_logprobs=(lp + torch.randn(b, t, generator=g) * 0.2).to(device), kl_coef=0.05,
        entropy=(torch.rand(b, t, generator=g) * 2).to(device).requires_grad_(True), entropy_coef=0.01,
        importance_weights=(torch.rand(b, t, generator=g) + 0.5).to(device),
    )  # fmt: skip


def policy_loss(backend, device, big=False):
    out = []
    for mode, extra in (("ppo", {"clip_dual": 3.0, "top_entropy_quantile": 0.5}), ("gspo", {}), ("gmpo", {})):
        kw = _policy_inputs(device, big)
        res = lk.policy_loss(**kw, mode=mode, **extra, backend=backend)
        out += _grads([res.loss], [kw["logprobs"], kw["entropy"]]) + list(res.metrics().values())
    return out


def kl_penalty(backend, device, big=False):
    kw = _policy_inputs(device, big)
    ref = kw["ref_logprobs"].clone().requires_grad_(True)
    return _grads([lk.kl_penalty(kw["logprobs"], ref, "k3+", backend=backend)], [kw["logprobs"], ref])


def policy_loss_from_logits(backend, device, big=False):
    b, t, v = (8, 64, 512) if big else (2, 5, 40)
    g = _gen()
    x = torch.randn(b, t, v, generator=g).to(device).requires_grad_(True)
    ids = torch.randint(0, v, (b, t), generator=g).to(device)
    res = lk.policy_loss_from_logits(x, ids, (-torch.rand(b, t, generator=g)).to(device), torch.randn(b, generator=g).to(device),
                                     entropy_coef=0.01, backend=backend)  # fmt: skip
    return _grads([res.loss], [x])


def group_advantages(backend, device, big=False):
    n, t = (4096, 32) if big else (12, 7)
    g = _gen()
    rewards = torch.randn(n, t, generator=g).to(device)
    mask = (torch.rand(n, t, generator=g) > 0.3).to(device)
    ids = torch.randint(0, n // 4, (n,), generator=g).to(device)
    return [lk.group_advantages(rewards, ids, method=m, mask=mask, backend=backend)
            for m in ("grpo", "rloo", "reinforce_pp_baseline", "gaussian", "opo", "batch")]  # fmt: skip


def group_stats(backend, device, big=False):
    n, t = (4096, 32) if big else (12, 7)
    g = _gen()
    ids = torch.randint(0, n // 4, (n,), generator=g).to(device)
    values = torch.randn(n, 2, generator=g).to(device)
    mask = (torch.rand(n, t, generator=g) > 0.3).to(device)
    stats, lengths = lk.group_stats(values, ids, where=(torch.rand(n, 3, generator=g) > 0.3).to(device), mask=mask,
                                    backend=backend)  # fmt: skip
    return [stats, lengths]


def shaping_functions(backend, device, big=False):
    n = 4096 if big else 12
    g = _gen()
    ids = torch.randint(0, n // 4, (n,), generator=g).to(device)
    correct = (torch.rand(n, generator=g) > 0.5).to(device)
    mask = (torch.arange(20)[None] < torch.randint(1, 21, (n, 1), generator=g)).to(device)
    new_len, new_mask = shaping.dot_truncation(correct, ids, mask=mask, k=0.5, margin=1, backend=backend)
    return [shaping.grpo_lambda(correct, ids, mask=mask, backend=backend),
            shaping.kimi_length_reward(correct, ids, mask=mask, backend=backend), new_len, new_mask,
            shaping.canon_advantages(torch.randn(n, generator=g).to(device), ids, torch.rand(n, generator=g).to(device),
                                     backend=backend),
            shaping.dler_advantages(correct, ids, mask=mask, target_length=10, backend=backend)]  # fmt: skip


def _phase_inputs(device, big):
    b, t = (64, 9000) if big else (3, 40)
    g = _gen()
    ids = torch.randint(0, 6, (b, t), generator=g).to(device)
    mask = (torch.rand(b, t, generator=g) > 0.1).to(device)
    return ids, mask


def phase_stats(backend, device, big=False):
    ids, mask = _phase_inputs(device, big)
    values = torch.rand((2, *ids.shape), generator=_gen()).to(device).requires_grad_(True)
    st = lk.phase_stats(values, ids, mask, delimiter=[3, 4], backend=backend)
    return _grads([st.think_mean, st.think_sum, st.answer_mean, st.answer_sum], [values]) + [
        st.think_count, st.answer_count, st.delimiter_pos, st.found]  # fmt: skip


def sequence_stats(backend, device, big=False):
    ids, mask = _phase_inputs(device, big)
    ent = torch.rand(ids.shape, generator=_gen()).to(device)
    st = lk.sequence_stats(ent, mask, threshold=0.5, top_entropy_quantile=0.2, backend=backend)
    return [x for x in st if x is not None]


def token_stats_with_phases(backend, device, big=False):
    b, t, v = (4, 256, 512) if big else (2, 9, 20)
    g = _gen()
    x = torch.randn(b, t, v, generator=g).to(device).requires_grad_(True)
    ids = torch.randint(0, 6, (b, t), generator=g).to(device)
    out = lk.token_stats_with_phases(x, ids, delimiter=[3], temperature=0.9, backend=backend)
    return _grads([out.logprobs, out.entropy, out.entropy_phases.think_mean, out.logprob_phases.answer_sum], [x])


CASES = {
    "token_stats": (token_stats, "token_stats"),
    "linear_stats": (linear_stats, "linear_stats"),
    "policy_loss": (policy_loss, "policy_loss"),
    "kl_penalty": (kl_penalty, "policy_loss"),
    "policy_loss_from_logits": (policy_loss_from_logits, "policy_loss"),
    "group_advantages": (group_advantages, "advantages"),
    "group_stats": (group_stats, "advantages"),
    "shaping": (shaping_functions, "advantages"),
    "phase_stats": (phase_stats, "phase_stats"),
    "sequence_stats": (sequence_stats, "phase_stats"),
    "token_stats_with_phases": (token_stats_with_phases, "phase_stats"),
}


def _params():
    out = []
    for name, (fn, family) in CASES.items():
        for p in backend_params(family):
            out.append(pytest.param(fn, *p.values, id=f"{name}-{p.id}", marks=p.marks))
    return out


@pytest.mark.parametrize("fn,backend,device", _params())
def test_same_bits_run_after_run(fn, backend, device):
    """Two runs on fresh copies of the same inputs: outputs and gradients are bitwise equal."""
    first = fn(backend, device)
    second = fn(backend, device)
    _same_bits(first, second, f"{fn.__name__} ({backend})")
    assert first, "nothing was compared"


@pytest.fixture
def many_threads_everywhere(monkeypatch):
    """The cpu kernels keep small problems on one thread; lower those thresholds so the sizes here
    (kept small for CI) run on every thread the test asks for."""
    monkeypatch.setattr(cpu_adv, "_threads", lambda work: torch.get_num_threads())
    monkeypatch.setattr(cpu_phase, "_TOKENS_PER_THREAD", 1)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", list(CASES))
def test_cpu_bits_do_not_depend_on_thread_count(name, many_threads_everywhere):
    """1, 2 and 3 threads (3 > the cores of a CI machine: uneven splits) give the same bits."""
    fn, _ = CASES[name]
    runs = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        runs.append(fn("cpu", "cpu", big=True))
    for threads, other in zip((2, 3), runs[1:]):
        _same_bits(runs[0], other, f"{name}: 1 vs {threads} threads")


@pytest.mark.parametrize("name", ["policy_loss", "group_advantages", "phase_stats", "linear_stats", "shaping"])
def test_concurrent_calls_give_the_bits_of_a_lone_call(name):
    """Four Python threads call the op at once (the kernels release the GIL): each gets exactly the
    result of a call made alone; nothing is shared between concurrent calls."""
    fn, _ = CASES[name]
    expected = fn("cpu", "cpu")
    results, errors = {}, []

    def work(i):
        try:
            for _ in range(3):
                results[i] = fn("cpu", "cpu")
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(4):
        _same_bits(expected, results[i], f"{name}: thread {i}")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_streams_do_not_change_bits(name):
    """The same op on a side stream (and with the default stream busy) gives the default stream's bits."""
    fn, family = CASES[name]
    for backend in [p.values[0] for p in backend_params(family) if not p.marks and p.values[1] == "cuda"]:
        expected = fn(backend, "cuda")
        side = torch.cuda.Stream()
        busy = torch.randn(4096, 4096, device="cuda")
        busy @ busy  # keep the default stream busy while the side stream works
        with torch.cuda.stream(side):
            got = fn(backend, "cuda")
        side.synchronize()
        _same_bits(expected, got, f"{name} ({backend}) on a side stream")
