"""Hardening of group advantages and group statistics: no overflow (or underflow) into a plausible
number. Scores whose squares leave fp32's range (|s| past ~1.8e19, or below ~1e-19) still give the
float64 reference's advantages and statistics, on every backend (and on the cuda backend's kernels
under the host emulation of tests/test_cuda_ops.py), and the float64 reference itself does not
overflow for 1e200 (its squares leave float64's range past ~1e154).

The kernels divide each group's (each batch chunk's) values by the power of two 2^e of their
largest magnitude before the sums and squares, and multiply the mean and std back by 2^e: exact in
binary floating point, so values whose squares fit keep their bits, and scaling the input by a power
of two scales the results by it bitwise (``test_power_of_two_scaling_is_exact``).
"""

from __future__ import annotations

import pytest
import torch

import lenkernels as lk
from lenkernels.reference import advantages as ref
from tests.test_cuda_ops import cuda_emulation, emulated_modules  # noqa: F401 (a fixture)
from tests.utils import STAT_RTOL, advantage_scale, assert_close, backend_params

METHODS = list(ref.METHODS)
# (backend, device) of the advantages family, plus the cuda kernels run on the host ("emulated")
TARGETS = [pytest.param(tuple(p.values), id=p.id, marks=p.marks) for p in backend_params("advantages")] + [
    pytest.param(("cuda", "emulated"), id="cuda-emulated")
]


@pytest.fixture
def on(request, monkeypatch):
    """(backend, device) of the test. ``emulated``: the cuda backend on CPU tensors, its kernel bodies
    run on the host (as tests/test_cuda_ops.py's ``dev`` fixture does)."""
    backend, device = request.param
    if device != "emulated":
        yield backend, device
        return
    with cuda_emulation(request, monkeypatch):
        yield backend, "cpu"


def _scale(method, s, ids, eps, lengths):
    """:func:`tests.utils.advantage_scale` with response weights ``lengths`` (float64 throughout:
    fine up to |s| ~ 1e150)."""
    s = ref.scores(s.double())
    return advantage_scale(method, s, ref.group_ids(ids, s.shape[0]), eps, lengths.double())


def _check(on, method, rewards, ids, lengths, eps=1e-6, **kw):
    """The backend's advantages of fp32 ``rewards`` against the float64 reference of the same values."""
    backend, device = on
    if method not in ("opo", "reinforce_pp_baseline"):
        lengths = None
    out = lk.group_advantages(rewards.to(device), ids.to(device), method=method, eps=eps, backend=backend,
                              lengths=None if lengths is None else lengths.to(device), **kw)  # fmt: skip
    want = ref.group_advantages(rewards.double(), ids, method, eps=eps, lengths=lengths, **kw)
    assert bool(torch.isfinite(out).all()), f"{method}: {out}"
    w = lengths if lengths is not None else torch.ones(rewards.shape[0])
    # (atol: results below fp32's smallest subnormal round to 0)
    assert_close(out, want, rtol=STAT_RTOL, atol=2.0**-149, scale=_scale(method, rewards, ids, eps, w),
                 name=f"{method} ({backend})")  # fmt: skip
    return out.cpu()


def _grouping(with_one: bool = True):
    """Shuffled ids: groups of 2, 5, 3, 7 and 4 members, and one of a single member (verl's
    convention: baseline 0, std 1; it does not scale with the others: left out when asked)."""
    ids = torch.repeat_interleave(torch.tensor([40, -3, 7, 11, 0, 95]), torch.tensor([1, 2, 5, 3, 7, 4]))
    ids = ids if with_one else ids[1:]
    return ids[torch.randperm(ids.numel())]


# --- the issue's example and magnitudes past fp32's squares ---------------------------------------


@pytest.mark.parametrize("on", TARGETS, indirect=True)
@pytest.mark.parametrize("method", METHODS)
def test_issue_example(on, method):
    """[1e20, -1e20, 5e19, 0]: the fp32 sum of squares 1e40 overflows; the group std (2.3e20) and the
    advantages ([1.02, -1.32, 0.44, -0.15] for grpo) are ordinary numbers, never a plausible 0."""
    rewards = torch.tensor([1e20, -1e20, 5e19, 0.0])
    out = _check(on, method, rewards, torch.zeros(4, dtype=torch.int64), torch.tensor([3, 1, 4, 2]))
    if method in ("grpo", "batch"):
        assert_close(out, torch.tensor([1.0247, -1.3175, 0.4392, -0.1464], dtype=torch.float64), rtol=1e-3,
                     name=method)  # fmt: skip
    if method != "gaussian":
        assert bool((out != 0).any())


@pytest.mark.parametrize("on", TARGETS, indirect=True)
@pytest.mark.parametrize("magnitude", [1e20, 1e25, 1e30, 1e-30])
@pytest.mark.parametrize("method", METHODS)
def test_huge_and_tiny_magnitudes(on, method, magnitude):
    """0/1 correctness plus a continuous part, times 1e20..1e30 (squares past fp32's max) or 1e-30
    (squares below its smallest subnormal); eps = 0 so that the std itself is checked (tiny groups:
    an underflowed std of 0 would give inf)."""
    ids = _grouping()
    n = ids.numel()
    rewards = (torch.randint(0, 2, (n,)).float() + 0.25 * torch.randn(n)) * magnitude
    _check(on, method, rewards, ids, torch.randint(1, 50, (n,)), eps=0.0)


@pytest.mark.parametrize("on", TARGETS, indirect=True)
@pytest.mark.parametrize("method", METHODS)
def test_mixed_magnitudes(on, method):
    """Groups of 1e30, 1, 1e-30 and 1e20 side by side in one batch (the batch-level std of batch and
    reinforce_pp_baseline spans them all), and a group mixing 1e30 with 1e-30 and 0."""
    parts = [torch.randn(5) * 1e30, torch.randn(4), torch.randn(3) * 1e-30, torch.randn(6) * 1e20,
             torch.tensor([1e30, 1e-30, -1e30, 0.0, 3e29])]  # fmt: skip
    rewards = torch.cat(parts)
    ids = torch.repeat_interleave(torch.arange(len(parts)), torch.tensor([p.numel() for p in parts]))
    perm = torch.randperm(rewards.numel())
    _check(on, method, rewards[perm], ids[perm], torch.randint(1, 50, (rewards.numel(),))[perm])


@pytest.mark.parametrize("on", TARGETS, indirect=True)
@pytest.mark.parametrize("method", ["reinforce_pp_baseline", "opo"])
def test_token_rewards_with_a_mask(on, method):
    """[B, T] token rewards of 1e25 (scores: sums of every position) and mask row sums as weights."""
    backend, device = on
    ids = _grouping()
    n = ids.numel()
    rewards = torch.randn(n, 7) * 1e25
    mask = torch.rand(n, 7) > 0.3
    mask[:, 0] = True
    out = lk.group_advantages(rewards.to(device), ids.to(device), method=method, mask=mask.to(device), backend=backend)
    want = ref.group_advantages(rewards.double(), ids, method, mask=mask)
    s = rewards.double().sum(-1)
    scale = _scale(method, s, ids, 1e-6, mask.double().sum(-1)).unsqueeze(-1) * mask
    factor = 1.0 / s.std() if method == "reinforce_pp_baseline" else 1.0
    scale = scale + rewards.double().abs().sum(-1, keepdim=True) * factor  # the fp32 row sums' rounding
    assert_close(out, want, rtol=STAT_RTOL, scale=scale, name=f"{method} ({backend})")


@pytest.mark.parametrize("on", TARGETS, indirect=True)
@pytest.mark.parametrize("method", ["batch", "reinforce_pp_baseline"])
@pytest.mark.parametrize("order", ["huge_first", "huge_last"])
def test_batch_chunks_of_different_magnitudes(on, method, order):
    """4 800 responses: the batch moments of two 4 096-element chunks, one of scores ~1 and one of
    ~1e25, each with its own power of two, merged at the larger one (either way round)."""
    n = 4_800
    ids = torch.arange(n) // 64  # (few groups: the Triton interpreter runs them one by one)
    rewards = torch.randint(0, 2, (n,)).float() + 0.25 * torch.randn(n)
    huge = slice(0, 4_096) if order == "huge_first" else slice(4_096, n)
    rewards[huge] *= 1e25
    _check(on, method, rewards, ids, torch.randint(0, 300, (n,)))


# --- exact cases keep exact at any magnitude ---------------------------------------------------------


@pytest.mark.parametrize("on", TARGETS, indirect=True)
def test_all_equal_groups_and_groups_of_one(on):
    """All-equal groups of 3e30 and of 1e-30 give exactly 0 (also with eps = 0); a group of one keeps
    baseline 0 and std 1 (grpo: s / (1 + eps), bitwise)."""
    backend, device = on
    rewards = torch.tensor([3e30, 3e30, 3e30, 3e30, -1e-30, -1e-30, -1e-30, 7e33, -2e-31])
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 3])
    lengths = torch.tensor([5, 1, 2, 9, 4, 4, 1, 3, 2])
    for method in ("grpo", "dr_grpo", "rloo", "grpo_passk", "opo"):
        for eps in (0.0, 1e-6):
            out = lk.group_advantages(rewards.to(device), ids.to(device), method=method, eps=eps,
                                      lengths=lengths.to(device), backend=backend).cpu()  # fmt: skip
            assert torch.equal(out[:7], torch.zeros(7)), (method, eps, out)
    out = lk.group_advantages(rewards.to(device), ids.to(device), method="grpo", eps=0.25, backend=backend).cpu()
    assert torch.equal(out[7:], rewards[7:] / 1.25)


@pytest.mark.parametrize("on", TARGETS, indirect=True)
@pytest.mark.parametrize("k", [80, -80])
def test_power_of_two_scaling_is_exact(on, k):
    """Scores times 2^80 (squares past fp32's max) or 2^-80 (squares subnormal): the scale-free
    advantages keep their bits, the others (and group_stats' mean and std) scale by 2^k bitwise.
    (No group of one: its std of 1 does not scale.)"""
    backend, device = on
    ids = _grouping(with_one=False)
    n = ids.numel()
    rewards = torch.randint(0, 2, (n,)).float() + 0.25 * torch.randn(n)
    lengths = torch.randint(1, 50, (n,))
    f = 2.0**k

    def run(method, x):
        return lk.group_advantages(x.to(device), ids.to(device), method=method, eps=0.0, lengths=lengths.to(device),
                                   backend=backend).cpu()  # fmt: skip

    for method in ("grpo", "batch", "grpo_passk", "gaussian"):
        assert torch.equal(run(method, rewards * f), run(method, rewards)), method
    for method in ("dr_grpo", "rloo", "opo"):
        assert torch.equal(run(method, rewards * f), run(method, rewards) * f), method
    values = torch.stack([rewards, torch.randn(n)], 1)
    a, _ = lk.group_stats((values * f).to(device), ids.to(device), backend=backend)
    b, _ = lk.group_stats(values.to(device), ids.to(device), backend=backend)
    a, b = a.cpu(), b.cpu()
    assert torch.equal(a[..., 2:4], b[..., 2:4] * f), "mean and std"
    if backend == "reference":  # its float64 maths, past float64's squares too
        a = ref.group_stats(values.double() * 2.0 ** (10 * k), ids)
        assert torch.equal(a[..., 2:4], ref.group_stats(values.double(), ids)[..., 2:4] * 2.0 ** (10 * k))


# --- group_stats (the per-group statistics of lenkernels.shaping) -------------------------------------


@pytest.mark.parametrize("on", TARGETS, indirect=True)
def test_group_stats_magnitudes(on):
    """Columns of 1e30, 1e-30 and a mix of 1e20 and 1e-20, with a where selection: mean and std as the
    float64 reference's (before: std inf or 0)."""
    backend, device = on
    ids = _grouping()
    n = ids.numel()
    values = torch.stack([torch.randn(n) * 1e30, torch.randn(n) * 1e-30,
                          torch.where(torch.rand(n) > 0.5, 1e20, 1e-20) * torch.randn(n)], 1)  # fmt: skip
    where = (torch.rand(n, 3) > 0.2).float()
    stats, _ = lk.group_stats(values.to(device), ids.to(device), where=where.to(device), backend=backend)
    want = ref.group_stats(values.double(), ids, where)
    big = torch.stack([ref.group_stats(values.double().abs(), ids)[:, :, 5]] * 6, -1) * 8  # sums of <= 7 |x|
    assert_close(stats, want, rtol=STAT_RTOL, scale=big, name=f"group_stats ({backend})")
    assert bool((stats[..., 3].cpu()[want[..., 0] >= 2] > 0).all()), "a std of 0 for distinct values"


@pytest.mark.parametrize("on", TARGETS, indirect=True)
def test_shaping_on_huge_and_tiny_values(on):
    """CANON splits each group at its mean metric and subtracts half means: metrics of 1e30 and
    rewards of 1e-30 (the group means of lenkernels.shaping come from group_stats)."""
    from lenkernels import shaping

    backend, device = on
    ids = _grouping()
    n = ids.numel()
    rewards, metric = torch.randn(n) * 1e-30, torch.randn(n) * 1e30
    got = shaping.canon_advantages(rewards.to(device), ids.to(device), metric.to(device), backend=backend)
    want = shaping.canon_advantages(rewards.double(), ids, metric.double(), backend="reference")
    assert_close(got, want, rtol=STAT_RTOL, scale=8 * rewards.abs().max().double(), name=f"canon ({backend})")


# --- the float64 reference ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", [m for m in METHODS if m != "reinforce_pp_baseline"])
@pytest.mark.parametrize("magnitude", [1e200, 1e-200])
def test_reference_does_not_overflow(method, magnitude):
    """float64 scores of 1e200 (squares past float64's max) and 1e-200 (squares below its subnormals):
    with eps = 0 the reference's advantages are those of the unscaled scores, scaled by 1 (grpo,
    batch, grpo_passk, gaussian) or by the magnitude (the centred methods); no group of one."""
    ids = _grouping(with_one=False)
    n = ids.numel()
    s = torch.randint(0, 2, (n,)).double() + 0.25 * torch.randn(n, dtype=torch.float64)
    lengths = torch.randint(1, 50, (n,))
    got = ref.group_advantages(s * magnitude, ids, method, eps=0.0, lengths=lengths)
    want = ref.group_advantages(s, ids, method, eps=0.0, lengths=lengths)
    if method in ("dr_grpo", "rloo", "opo"):
        want = want * magnitude
    assert bool(torch.isfinite(got).all())
    assert_close(got, want, rtol=1e-12, scale=want.abs().max(), name=method)


@pytest.mark.parametrize("magnitude", [1e200, 1e-200])
def test_reference_whitening_and_group_stats_do_not_overflow(magnitude):
    """reinforce_pp_baseline's whitening of 1e200 scores (var past float64's max) and group_stats'
    mean and std of 1e200 / 1e-200 values."""
    ids = _grouping()
    n = ids.numel()
    s = torch.randn(n, dtype=torch.float64)
    lengths = torch.randint(1, 50, (n,))
    if magnitude > 1:
        got = ref.group_advantages(s * magnitude, ids, "reinforce_pp_baseline", lengths=lengths)
        want = ref.group_advantages(s, ids, "reinforce_pp_baseline", lengths=lengths)
        assert_close(got, want, rtol=1e-6, scale=want.abs().max(), name="reinforce_pp_baseline")
    else:  # var ~ 1e-400 vanishes next to 1e-8: (x - mean) * 1e4
        got = ref.group_advantages(s * magnitude, ids, "reinforce_pp_baseline", lengths=lengths)
        x = ref.group_advantages(s, ids, "dr_grpo")
        w = lengths.double()
        want = (x - (w * x).sum() / w.sum()) * magnitude * 1e4
        assert_close(got, want, rtol=1e-12, scale=want.abs().max(), name="reinforce_pp_baseline, tiny")
    got = ref.group_stats((s * magnitude)[:, None], ids)
    want = ref.group_stats(s[:, None], ids)
    assert_close(got[..., 2:4], want[..., 2:4] * magnitude, rtol=1e-12, scale=want[..., 2:4].abs().max() * magnitude,
                 name="group_stats")  # fmt: skip
