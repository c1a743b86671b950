"""Hardening of the public API against what a hostile (or careless) user passes: no silent switch to
the float64 reference, in-place backward that never destroys data the caller or autograd needs,
tensor hyper-parameters checked like their float forms, values past int64/float32, torch.func
transforms, and the compiler launcher of a build on first use. (Flags that are not bools are swept
over every public function in test_bad_input.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import lenkernels as lk
from lenkernels import _build, _checks
from lenkernels._checks import UnsupportedTransformError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("LENKERNELS_BACKEND",)}
    full.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


# --- no silent float64 fallback --------------------------------------------------------------------

_UNBUILDABLE = """
    import torch, lenkernels as lk
    x, ids = torch.randn(3, 11), torch.randint(0, 11, (3,))
    print(lk.explain_backend("token_stats", "cpu"))
    for backend in (None, "cpu"):
        try:
            lk.token_logprobs_entropy(x, ids, backend=backend)
        except lk.BackendUnavailableError as exc:
            print(f"RAISED[{backend}]", repr(str(exc)))  # one line
        else:
            print(f"RAN[{backend}]")
"""


@pytest.mark.parametrize("cache", ["writable", "read_only"])
def test_no_silent_reference_fallback_when_the_cpu_extension_cannot_be_built(tmp_path, cache):
    """backend=None on a CPU tensor must not quietly run the float64 reference (~20x slower, ~8x the
    memory) when the CPU extension cannot be had: it raises, says why, and names the explicit way."""
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    if cache == "read_only":
        cache_dir.chmod(0o500)
    env = {"CXX": "/bin/false", "LENKERNELS_CACHE": str(cache_dir), "LENKERNELS_FORCE_JIT": "1",
           "TRITON_INTERPRET": "0"}  # fmt: skip
    try:
        proc = _run(_UNBUILDABLE, env)
    finally:
        cache_dir.chmod(0o700)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr
    assert "RAN[" not in out, out
    assert "RAISED[None]" in out and "RAISED[cpu]" in out, out
    for line in out.splitlines():
        if line.startswith("RAISED["):
            assert "LENKERNELS_BACKEND=reference" in line, line
    assert "default -> none" in out  # explain_backend says there is no default, and why
    if cache == "writable":  # the compiler's command line is in the error
        assert "/bin/false" in out, out
    # the explicit slow path still works
    ok = _run("import torch, lenkernels as lk; print(lk.token_logprobs_entropy(torch.randn(2, 5), "
              "torch.tensor([1, 2]))[0].shape)", {**env, "LENKERNELS_BACKEND": "reference"})  # fmt: skip
    assert ok.returncode == 0 and "torch.Size([2])" in ok.stdout, ok.stderr


# --- in-place backward ----------------------------------------------------------------------------


def _inplace_calls():
    ids = torch.randint(0, 7, (2, 4))
    mask = torch.ones(2, 4, dtype=torch.bool)
    old, adv = -torch.rand(2, 4), torch.randn(2)
    return {
        "token_logprobs_entropy": lambda x: lk.token_logprobs_entropy(x, ids, inplace_backward=True)[0].sum(),
        "policy_loss_from_logits": lambda x: lk.policy_loss_from_logits(x, ids, old, adv, mask,
                                                                        inplace_backward=True).loss,
        "token_stats_with_phases": lambda x: lk.token_stats_with_phases(x, ids, mask, delimiter=[3],
                                                                        inplace_backward=True).logprobs.sum(),
    }  # fmt: skip


@pytest.mark.parametrize("op", list(_inplace_calls()))
@pytest.mark.parametrize("kind", ["leaf", "view_of_leaf", "saved_by_producer"])
def test_inplace_backward_refuses_to_destroy_data(op, kind):
    w = torch.randn(2, 4, 7, requires_grad=True)
    before = w.detach().clone()
    x = {"leaf": lambda: w, "view_of_leaf": lambda: w[:, :], "saved_by_producer": lambda: torch.tanh(w)}[kind]()
    with pytest.raises(ValueError, match="inplace_backward"):
        _inplace_calls()[op](x)
    assert torch.equal(w.detach(), before)


def test_inplace_backward_on_graph_logits_matches_and_later_saved_uses_are_caught():
    w = torch.randn(3, 9, dtype=torch.float64).float().requires_grad_(True)
    ids = torch.randint(0, 9, (3,))
    grads = []
    for inplace in (False, True):
        w.grad = None
        lp, ent = lk.token_logprobs_entropy(w * 2, ids, inplace_backward=inplace)
        (lp.sum() - 0.5 * ent.sum()).backward()
        grads.append(w.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-7)
    # a later op that saved the logits for its backward: autograd's version counter refuses
    z = w * 2
    q = (z**2).sum()
    lp, _ = lk.token_logprobs_entropy(z, ids, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (lp.sum() + q).backward()


# --- tensor hyper-parameters -----------------------------------------------------------------------


def _loss_inputs():
    lp = (-torch.rand(2, 5)).requires_grad_(True)
    return lp, lp.detach() + 0.1, torch.randn(2), torch.ones(2, 5), torch.rand(2, 5)


_BAD_TENSORS = {
    "entropy_threshold": [float("nan"), float("inf")],
    "num_tokens": [float("inf"), float("nan"), 0.0, -3.0],
    "num_seqs": [float("inf"), 0.0],
}


@pytest.mark.parametrize("name", list(_BAD_TENSORS))
@pytest.mark.parametrize("checks", ["value_checks", "no_value_checks"])
def test_tensor_hyper_parameters_are_checked_like_floats(name, checks, monkeypatch):
    """A NaN threshold keeps no token (loss 0.0, zero gradients) and an infinite normaliser gives
    -0.0: plausible numbers. With value checks they raise naming the argument; without (CUDA
    outside debug mode) the loss is NaN."""
    if checks == "no_value_checks":
        monkeypatch.setattr(_checks, "value_checks", lambda device: False)
    lp, old, adv, mask, ent = _loss_inputs()
    for value in _BAD_TENSORS[name]:
        kw = {name: torch.tensor(value)}
        if name == "entropy_threshold":
            kw["entropy"] = ent
        if name == "num_seqs":
            kw["agg"] = "seq-mean-token-mean"
        if checks == "value_checks":
            with pytest.raises(ValueError, match=name):
                lk.policy_loss(lp, old, adv, mask, **kw)
        else:
            out = lk.policy_loss(lp, old, adv, mask, **kw)
            assert torch.isnan(out.loss), (name, value, out.loss)
    # and a good tensor value gives the float form's result
    good = {"entropy_threshold": 0.5, "num_tokens": 7.0, "num_seqs": 3.0}[name]
    extra = {"entropy": ent} if name == "entropy_threshold" else {}
    if name == "num_seqs":
        extra["agg"] = "seq-mean-token-mean"
    a = lk.policy_loss(lp, old, adv, mask, **{name: torch.tensor(good)}, **extra).loss
    b = lk.policy_loss(lp, old, adv, mask, **{name: good}, **extra).loss
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


# --- values past int64 / float32 --------------------------------------------------------------------


def test_values_past_int64_and_float32_name_the_argument():
    x, ids = torch.randn(2, 7), torch.randint(0, 7, (2,))
    for bad in (2**70, -(2**70), 2**63):
        with pytest.raises(ValueError, match="ignore_index"):
            lk.token_logprobs_entropy(x, ids, ignore_index=bad)
    with pytest.raises(ValueError, match="ignore_index"):
        lk.linear_logprobs_entropy(torch.randn(2, 4), torch.randn(7, 4), ids, ignore_index=2**64)
    for t in (1e39, 1e-46, torch.tensor([1.0, 1e39], dtype=torch.float64), torch.tensor([1.0, 1e-46]),
              torch.tensor([1.0, 1e-46], dtype=torch.float64)):  # fmt: skip
        with pytest.raises(ValueError, match="temperature"):
            lk.token_logprobs_entropy(x, ids, temperature=t)
    ent, tok, mask = torch.rand(2, 6), torch.randint(0, 9, (2, 6)), torch.ones(2, 6)
    for delim in ([2**63], [5, 2**70], 2**64):
        with pytest.raises(ValueError, match="delimiter"):
            lk.phase_entropy(ent, tok, mask, delimiter=delim)
    # the largest legal values still work
    lk.token_logprobs_entropy(x, ids, ignore_index=2**63 - 1, temperature=3e38)
    lk.phase_entropy(ent, tok, mask, delimiter=[2**63 - 1])


# --- torch.func transforms -------------------------------------------------------------------------


def _func_targets():
    x, ids = torch.randn(3, 7), torch.randint(0, 7, (3,))
    lp, m, adv, weight = -torch.rand(2, 5), torch.ones(2, 5), torch.randn(2), torch.randn(7, 4)
    tok = torch.randint(0, 9, (2, 5))
    return {
        "token_stats": (lambda z: lk.token_logprobs_entropy(z, ids)[0].sum(), x),
        "linear_stats": (lambda h: lk.linear_logprobs_entropy(h, weight, ids)[0].sum(), torch.randn(3, 4)),
        "policy_loss": (lambda z: lk.policy_loss(z, lp, adv, m).loss, lp.clone()),
        "advantages": (lambda r: lk.group_advantages(r, 2).sum(), torch.randn(4)),
        "phase_stats": (lambda e: lk.phase_entropy(e, tok, m, delimiter=[3]).think_sum.sum(), torch.rand(2, 5)),
    }


@pytest.mark.parametrize("family", list(_func_targets()))
@pytest.mark.parametrize("transform", ["grad", "vjp", "jacrev", "vmap"])
def test_torch_func_transforms_get_a_lenkernels_error(family, transform):
    fn, x = _func_targets()[family]
    call = {
        "grad": lambda: torch.func.grad(fn)(x),
        "vjp": lambda: torch.func.vjp(fn, x),
        "jacrev": lambda: torch.func.jacrev(fn)(x),
        "vmap": lambda: torch.func.vmap(fn)(x[None].expand(2, *x.shape)),
    }[transform]
    with pytest.raises(UnsupportedTransformError, match="torch.func"):
        call()
    fn(x)  # outside the transform the same call runs


# --- builds on first use ------------------------------------------------------------------------------


def test_compiler_launcher_is_split_like_a_shell():
    """CXX="ccache g++" is a launcher and a compiler, not one executable named 'ccache g++'."""
    env = dict(os.environ, CXX="ccache g++ -pipe")
    old = os.environ.copy()
    try:
        os.environ.update(env)
        cmd = _build.cpu_compile_command("_cpu_linear_stats", _build.cpu_modules()["_cpu_linear_stats"], "out.so")
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert cmd[:3] == ["ccache", "g++", "-pipe"]


def test_build_on_first_use_with_a_launcher_prints_one_line(tmp_path):
    """A real build through a launcher ("env g++"): it works, and says in one line what it compiles
    and where instead of pausing silently."""
    code = """
        from lenkernels import _extensions
        mod = _extensions.load("_cpu_linear_stats", "cpu")
        print("LOADED", mod.__file__)
    """
    proc = _run(code, {"CXX": "env g++", "LENKERNELS_CACHE": str(tmp_path), "LENKERNELS_FORCE_JIT": "1"})
    assert proc.returncode == 0, proc.stderr
    assert str(tmp_path) in proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("lenkernels: building")]
    assert len(lines) == 1 and "_cpu_linear_stats" in lines[0] and str(tmp_path) in lines[0], proc.stderr


# --- backend choice -------------------------------------------------------------------------------------


def test_default_backend_order_follows_the_sass_report(monkeypatch):
    """On CUDA tensors token statistics default to the CUDA C++ kernels (the static SASS report: a
    backward of 16 instructions per logit with 128-bit accesses against Triton's 33 with 2-byte ones),
    and so do the extra outputs (forward 13 against 19, backward 20 against 35); the other families default to Triton."""
    from lenkernels import _backend

    monkeypatch.delenv("LENKERNELS_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "backend_status",
                        lambda family, device: {n: (True, "") for n in _backend.BACKENDS})  # fmt: skip
    cuda = torch.device("cuda")
    assert _backend._default("token_stats", cuda) == "cuda"
    assert _backend._default("token_stats_extra", cuda) == "cuda"
    assert _backend._default("policy_loss", cuda) == "triton"
    assert _backend._default("token_stats", torch.device("cpu")) == "cpu"
    # the extra outputs share the token_stats modules
    assert _backend.kernels("cpu", "token_stats_extra") is _backend.kernels("cpu", "token_stats")
