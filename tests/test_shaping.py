"""lenkernels.shaping against the float64 reference (SPEC 5).

Functions with per-group quantities run the group_stats kernel: they are checked on every backend
(small shapes: the Triton interpreter visits one group at a time). Elementwise functions are checked
on CPU tensors (and CUDA ones when a GPU is present).
"""

from __future__ import annotations

import math

import pytest
import torch

import lenkernels as lk
from lenkernels import shaping
from lenkernels.reference import advantages as ref_adv
from lenkernels.reference import shaping as ref
from tests.utils import HAS_CUDA, STAT_RTOL, assert_close, backend_params

BACKENDS = backend_params("advantages")
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
T = 11  # odd: lengths from the mask never fill a tile


def _groups():
    """Shuffled, spread-out ids; sizes 1 (a prompt with one response), 3 (the 2/3 bucket edge) and 4-6."""
    sizes = torch.tensor([3, 1, 5, 4, 6, 3])
    ids = torch.repeat_interleave(torch.randperm(500)[: sizes.numel()] * 11 - 100, sizes)
    return ids[torch.randperm(ids.numel())]


def _rollouts(device, n=None):
    ids = _groups() if n is None else torch.arange(n) // 4
    n = ids.numel()
    correct = torch.rand(n) > 0.45
    mask = torch.zeros(n, T, dtype=torch.int64)
    length = torch.randint(1, T + 1, (n,))
    mask[torch.arange(T)[None, :] < length[:, None]] = 1
    return ids.to(device), correct.to(device), mask.to(device), length


def _close(actual, expected, name, scale=1.0):
    assert actual.dtype == torch.float32 and actual.shape == expected.shape, (actual.dtype, actual.shape)
    assert_close(actual, expected, rtol=STAT_RTOL, scale=scale, name=name)


# --- LASER family ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", shaping.LASER_MODES)
def test_laser(device, mode):
    n = 40
    correct = torch.rand(n) > 0.5
    lengths = torch.randint(0, 20, (n,))
    score = torch.randn(n)
    target = torch.randint(0, 20, (n,)).float()
    for tgt in (10, target):  # a scalar target and per-response targets; L == target hits the edge
        out = shaping.laser(correct.to(device), target_length=tgt if isinstance(tgt, int) else tgt.to(device),
                            lengths=lengths.to(device), mode=mode, score=score.to(device))  # fmt: skip
        _close(out, ref.laser(correct, lengths, tgt, 0.5, mode, score), f"laser {mode}")
    mask = (torch.arange(T)[None, :] < lengths.clamp(max=T)[:, None]).to(device)
    out = shaping.laser(correct.to(device), target_length=5, mask=mask, mode=mode)
    _close(out, ref.laser(correct, lengths.clamp(max=T), 5, 0.5, mode), "laser from mask")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_difficulty_buckets(backend, device):
    """Integer thresholds: 2 of 3 correct is high (>= 2/3), 1 of 3 medium (>= 1/3), 0 of 3 low."""
    ids = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3], device=device)
    correct = torch.tensor([1, 1, 0, 1, 0, 0, 0, 0, 0, 1], device=device)
    out = shaping.difficulty_buckets(correct, ids, backend=backend).cpu()
    assert torch.equal(out, torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 0]))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_laser_d(backend, device):
    ids, correct, mask, length = _rollouts(device)
    targets = (3, 6, 9)
    out = shaping.laser_d(correct, ids, target_lengths=targets, mask=mask, backend=backend)
    expected = ref.laser_d(correct.cpu(), ids.cpu(), length, targets)
    _close(out, expected, "laser_d")
    out = shaping.laser_d(correct, ids, target_lengths=torch.tensor(targets, device=device), lengths=length.to(device),
                          mode="hybrid", backend=backend)  # fmt: skip
    _close(out, ref.laser_d(correct.cpu(), ids.cpu(), length, targets, mode="hybrid"), "laser_d hybrid")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_laser_d_targets(backend, device):
    ids, correct, mask, length = _rollouts(device, n=48)  # 12 prompts x 4 monitor rollouts
    grid = [2, 4, 6, 8, 10]
    for among in ("all", "correct"):
        out = shaping.laser_d_targets(correct, 4, grid=grid, mask=mask, among=among, backend=backend)
        _close(out, ref.laser_d_targets(correct.cpu(), 4, length, grid, 4, among), f"targets among {among}")
    # one bucket only (everything correct): the others are empty and get max(grid)
    out = shaping.laser_d_targets(torch.ones_like(correct), ids, grid=torch.tensor(grid, device=device),
                                  lengths=length.to(device), rollouts=4, backend=backend)  # fmt: skip
    assert out[1] == 10 and out[2] == 10
    _close(out, ref.laser_d_targets(torch.ones(48, dtype=torch.bool), ids.cpu(), length, grid, 4), "targets")


# --- DLER, Kimi, DAPO ---------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_dler(backend, device):
    ids, correct, mask, length = _rollouts(device)
    finished = (torch.rand(ids.numel()) > 0.2).to(device)
    out = shaping.dler_rewards(correct, mask=mask, finished=finished, target_length=7)
    _close(out, ref.dler(correct.cpu(), length, finished.cpu(), 7), "dler")
    out = shaping.dler_rewards(correct, mask=mask, target_length=8, groups=ids, difficulty_aware=True,
                               easy_target_length=4, backend=backend)  # fmt: skip
    _close(out, ref.dler(correct.cpu(), length, None, 8, ids.cpu(), True, 4), "dler difficulty-aware")
    adv = shaping.dler_advantages(correct, ids, mask=mask, target_length=8, backend=backend)
    rewards = ref.dler(correct.cpu(), length, None, 8)
    expected = ref_adv.group_advantages(rewards, ids.cpu(), "reinforce_pp_baseline", mask=mask.cpu())
    _close(adv, expected, "dler advantages", scale=10.0)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_kimi_length_reward(backend, device):
    ids, correct, mask, length = _rollouts(device)
    out = shaping.kimi_length_reward(correct, ids, mask=mask, backend=backend)
    _close(out, ref.kimi(correct.cpu(), ids.cpu(), length), "kimi")
    equal = torch.full((ids.numel(),), 5, device=device)  # L_max == L_min: no length reward at all
    out = shaping.kimi_length_reward(correct, ids, lengths=equal, weight=0.3, score=2.0, backend=backend)
    assert bool((out == 2.0).all())


@pytest.mark.parametrize("device", DEVICES)
def test_dapo_overlong(device):
    lengths = torch.tensor([0, 100, 101, 150, 200, 201, 10_000], device=device)
    out = shaping.dapo_overlong(lengths=lengths, max_length=200, cache_length=100).cpu()
    _close(out, ref.dapo_overlong(lengths.cpu(), 200, 100), "dapo")
    assert out[1] == 0.0 and out[4] == -1.0 and out[5] == -1.0 and out[3] == -0.5
    out = shaping.dapo_overlong(lengths=lengths, score=torch.ones(7, device=device))
    assert bool((out.cpu() == 1.0).all()), "defaults 20480 / 4096: nothing here is overlong"


# --- HAPO ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_hapo_across_steps(device):
    history = shaping.HAPOHistory(5, device=device)
    history_ref = torch.full((5,), float("inf"), dtype=torch.float64)
    for step in range(3):
        n = 16
        ids = torch.randint(0, 5, (n,))
        correct = torch.rand(n) > 0.4
        lengths = torch.randint(1, 40, (n,))
        out = shaping.hapo_reward(correct.to(device), ids.to(device), history, lengths=lengths.to(device))
        _close(out, ref.hapo(correct, ids, history_ref, lengths), f"hapo step {step}")
        if step == 0:
            assert bool((out.cpu() == correct.float()).all()), "no history yet: no length reward"
        history.update(correct.to(device), ids.to(device), lengths=lengths.to(device))
        history_ref = ref.hapo_update(history_ref, correct, ids, lengths)
        assert torch.equal(history.min_length.cpu().double(), history_ref)


@pytest.mark.parametrize("device", DEVICES)
def test_hapo_reward_shape(device):
    """f = cos(pi/2 L/h): 1 at L = 0, 0 at L = h, -1 from 2h on; correct clipped at -0.7, wrong <= 0."""
    history = shaping.HAPOHistory(1, device=device)
    history.update(torch.ones(1, device=device), torch.zeros(1, dtype=torch.long, device=device),
                   lengths=torch.tensor([10.0], device=device))  # fmt: skip
    lengths = torch.tensor([0.0, 10.0, 20.0, 15.0, 0.0, 30.0], device=device)
    correct = torch.tensor([1, 1, 1, 1, 0, 0], device=device)
    out = shaping.hapo_reward(correct, torch.zeros(6, dtype=torch.long, device=device), history, lengths=lengths,
                              score=0.0).cpu()  # fmt: skip
    assert torch.allclose(out, torch.tensor([1.0, 0.0, -0.7, -0.7, 0.0, -1.0]), atol=1e-6)


def test_hapo_prompt_out_of_range():
    history = shaping.HAPOHistory(3)
    with pytest.raises(ValueError, match="prompt_ids"):
        shaping.hapo_reward(torch.ones(2), torch.tensor([0, 3]), history, lengths=torch.ones(2))
    with pytest.raises(ValueError, match="prompt_ids"):
        history.update(torch.ones(2), torch.tensor([-1, 0]), lengths=torch.ones(2))


# --- GRPO-lambda, ConciseR, DOT, CANON --------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_grpo_lambda(backend, device):
    ids, correct, mask, length = _rollouts(device)
    for fraction in (0.2, 0.5):
        out = shaping.grpo_lambda(correct, ids, mask=mask, fraction=fraction, backend=backend)
        _close(out, ref.grpo_lambda(correct.cpu(), ids.cpu(), length, fraction), f"grpo_lambda {fraction}")
    # ties at the boundary all get in: 4 groups, accuracies (1, 1, 0.5, 0): top 0.2 -> both perfect groups
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3], device=device)
    correct = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0], device=device)
    lengths = torch.tensor([3, 5, 4, 4, 1, 2, 3, 4], device=device)
    out = shaping.grpo_lambda(correct, ids, lengths=lengths, backend=backend).cpu()
    s = 1 - 0.5 * torch.sigmoid(torch.tensor([-1.0, 1.0]) / math.sqrt(2.0))
    assert torch.allclose(out[:2], s) and bool((out[2:4] == 0.75).all()), "std 0 -> z = 0 -> 1 - alpha/2"
    assert torch.equal(out[4:], torch.tensor([1.0, 0.0, 0.0, 0.0]))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_concise_r(backend, device):
    ids, correct, mask, length = _rollouts(device)
    correct[ids == ids[0]] = True  # at least one all-correct group
    out = shaping.concise_r(correct, ids, max_length=T, mask=mask, alpha=0.5, backend=backend)
    _close(out, ref.concise_r(correct.cpu(), ids.cpu(), length, T, 0.5), "concise_r")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_dot_truncation(backend, device):
    ids = torch.tensor([0] * 6 + [1] * 3, device=device)
    correct = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0, 1], device=device)
    lengths = torch.tensor([10, 11, 9, 10, 12, 400, 10, 500, 10], device=device)
    new, none = shaping.dot_truncation(correct, ids, lengths=lengths, k=1.0, backend=backend)
    assert none is None
    _close(new, ref.dot(correct.cpu(), ids.cpu(), lengths.cpu(), 1.0), "dot lengths")
    assert new[5] < 400 and new[7] == 500, "only all-correct groups are truncated"
    # a mask with holes: the first `length` valid tokens are kept
    ids, correct, _, _ = _rollouts(device)
    correct[:] = True
    mask = (torch.rand(ids.numel(), T) > 0.3).to(torch.float32).to(device)
    length = mask.cpu().sum(-1)
    new, new_mask = shaping.dot_truncation(correct, ids, mask=mask, k=0.0, margin=2, backend=backend)
    expected = ref.dot(correct.cpu(), ids.cpu(), length, 0.0, 2)
    _close(new, expected, "dot from mask")
    assert new_mask.dtype == mask.dtype and torch.equal(new_mask.cpu().sum(-1), expected.float())
    assert bool((new_mask.cpu() <= mask.cpu()).all()), "truncation only removes tokens"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_canon(backend, device):
    ids = _groups()
    n = ids.numel()
    rewards = torch.randint(0, 2, (n,)).float()
    metric = torch.randn(n)
    metric[ids == ids[0]] = 1.5  # one group with a single half: inter falls back to intra
    for mu in (0.5, 0.8):
        out = shaping.canon_advantages(rewards.to(device), ids.to(device), metric.to(device), mu=mu, backend=backend)
        _close(out, ref.canon(rewards, ids, metric, mu), f"canon mu={mu}")


# --- PEAR, CEEH ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_pear(device):
    n = 30
    correct = torch.rand(n) > 0.5
    think, answer = torch.rand(n) * 2, torch.rand(n)
    out = shaping.pear_reward(correct.to(device), think.to(device), answer.to(device))
    _close(out, ref.pear(correct, think, answer), "pear")
    out = shaping.pear_reward(correct.to(device), think.to(device), answer.to(device), alpha=2.0,
                              score=torch.full((n,), 1.5, device=device), format_reward=-0.5)  # fmt: skip
    _close(out, ref.pear(correct, think, answer, 2.0, torch.full((n,), 1.5), -0.5), "pear options")


@pytest.mark.parametrize("device", DEVICES)
def test_ceeh(device):
    adv = torch.randn(6, 5)
    entropy = torch.rand(6, 5) * 3
    difficulty = torch.rand(6)
    out = shaping.ceeh_advantages(adv.to(device), entropy.to(device).requires_grad_(True), difficulty.to(device))
    _close(out, ref.ceeh(adv, entropy, difficulty), "ceeh per token", scale=adv.abs())
    assert not out.requires_grad, "sg(H): the bonus is not differentiated"
    out = shaping.ceeh_advantages(adv[:, 0].to(device), entropy[:, 0].to(device), difficulty.to(device), kappa=4.0)
    _close(out, ref.ceeh(adv[:, 0], entropy[:, 0], difficulty, kappa=4.0), "ceeh per response", scale=1.0)
    out = shaping.ceeh_advantages(adv.to(device), entropy[:, 0].to(device), difficulty.to(device), scale=0.5)
    _close(out, ref.ceeh(adv, entropy[:, :1], difficulty, scale=0.5), "ceeh broadcast", scale=1.0)


# --- errors, compile, device residency ---------------------------------------------------------


def test_bad_input():
    c = torch.ones(4)
    L = torch.ones(4)
    with pytest.raises(ValueError, match="lengths.*mask"):
        shaping.laser(c, target_length=3)
    with pytest.raises(ValueError, match="lengths.*mask"):
        shaping.laser(c, target_length=3, lengths=L, mask=torch.ones(4, 2))
    with pytest.raises(ValueError, match="mode"):
        shaping.laser(c, target_length=3, lengths=L, mode="soft")
    with pytest.raises(ValueError, match="lengths"):
        shaping.laser(c, target_length=3, lengths=torch.ones(5))
    with pytest.raises(ValueError, match="target_length"):
        shaping.laser(c, target_length=torch.ones(3), lengths=L)
    with pytest.raises(ValueError, match="target_lengths"):
        shaping.laser_d(c, 2, target_lengths=(1, 2), lengths=L)
    with pytest.raises(ValueError, match="rollouts"):
        shaping.laser_d_targets(c, torch.tensor([0, 0, 1, 1]), grid=[1, 2], lengths=L)
    with pytest.raises(ValueError, match="grid"):
        shaping.laser_d_targets(c, 2, grid=[], lengths=L)
    with pytest.raises(ValueError, match="groups"):
        shaping.dler_rewards(c, lengths=L, difficulty_aware=True)
    with pytest.raises(ValueError, match="groups"):
        shaping.kimi_length_reward(c, 3, lengths=L)
    with pytest.raises(ValueError, match="cache_length"):
        shaping.dapo_overlong(lengths=L, max_length=10, cache_length=20)
    with pytest.raises(TypeError, match="history"):
        shaping.hapo_reward(c, torch.zeros(4, dtype=torch.long), None, lengths=L)
    with pytest.raises(TypeError, match="prompt_ids"):
        shaping.hapo_reward(c, torch.zeros(4), shaping.HAPOHistory(2), lengths=L)
    with pytest.raises(ValueError, match="num_prompts"):
        shaping.HAPOHistory(0)
    with pytest.raises(ValueError, match="max_length"):
        shaping.concise_r(c, 2, lengths=L, max_length=0)
    with pytest.raises(ValueError, match="metric"):
        shaping.canon_advantages(c, 2, torch.ones(3))
    with pytest.raises(ValueError, match="think_entropy"):
        shaping.pear_reward(c, torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="entropy"):
        shaping.ceeh_advantages(torch.ones(4, 3), torch.ones(4, 2), torch.ones(4))
    with pytest.raises(ValueError, match="difficulty"):
        shaping.ceeh_advantages(torch.ones(4, 3), torch.ones(4, 3), torch.ones(3))
    with pytest.raises(ValueError, match="kappa"):
        shaping.ceeh_advantages(torch.ones(4), torch.ones(4), torch.ones(4), kappa=0.0)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    ids, correct, mask, _ = _rollouts(device)

    def step(c, m):
        a = shaping.laser_d(c, ids, target_lengths=(4, 6, 8), mask=m, backend=backend)
        b = shaping.grpo_lambda(c, ids, mask=m, backend=backend)
        new_len, new_mask = shaping.dot_truncation(c, ids, mask=m, backend=backend)
        return a.sum() + b.sum() + new_len.sum() + new_mask.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert torch.allclose(step(correct, mask), compiled(correct, mask))


@pytest.mark.skipif(not HAS_CUDA, reason="host syncs only exist with a GPU")
def test_no_host_sync_on_gpu():
    """Every shaping function and group_advantages stays on the GPU: a synchronising call raises."""
    ids, correct, mask, _ = _rollouts("cuda")
    history = shaping.HAPOHistory(1000, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        for method in ("grpo", "reinforce_pp_baseline", "gaussian", "grpo_passk", "opo", "batch"):
            lk.group_advantages(correct.float(), ids, method=method, mask=mask)
        shaping.laser_d(correct, ids, target_lengths=(4, 6, 8), mask=mask)
        shaping.laser_d_targets(correct, ids, grid=[2, 4, 8], mask=mask, rollouts=4)
        shaping.dler_advantages(correct, ids, mask=mask, difficulty_aware=True)
        shaping.kimi_length_reward(correct, ids, mask=mask)
        shaping.grpo_lambda(correct, ids, mask=mask)
        shaping.concise_r(correct, ids, mask=mask, max_length=T)
        shaping.dot_truncation(correct, ids, mask=mask)
        shaping.canon_advantages(correct.float(), ids, mask.float().sum(-1))
        shaping.hapo_reward(correct, ids.abs() % 1000, history, mask=mask)
        history.update(correct, ids.abs() % 1000, mask=mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")
