"""Property-based tests of group_advantages, group_stats and every lenkernels.shaping function: random
batch sizes (0 and 1 included), groupings (ids in any order, negative and spread out, int32/int64,
groups of one, an int group size), score and token-reward layouts, dtypes, strides, masks of every
dtype, lengths, methods and hyper-parameters, on every backend, against the float64 references (or
the documented error). A NaN-filled ``out`` buffer shows any element a kernel forgets to write.

The compiled backends are cheap and get many examples; the Triton interpreter visits one group at
a time, so it gets a few (on a GPU the same tests run the Triton and CUDA kernels).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import lenkernels as lk
from lenkernels import shaping
from lenkernels.reference import advantages as ref
from lenkernels.reference import shaping as ref_shaping
from tests.fuzz import FLOAT_DTYPES, backend_fuzz_tests, cheap_and_gpu, examples
from tests.utils import STAT_RTOL, advantage_scale, assert_close, backend_params, nan_like

BACKENDS = [p.values for p in backend_params("advantages") if not p.marks]
CHEAP, GPU = cheap_and_gpu(BACKENDS)
METHODS = list(ref.METHODS)
MASK_DTYPES = [torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32, torch.bfloat16, torch.float64]


@st.composite
def groupings(draw, n: int):
    """``(groups argument, int64 ids for the reference)``: an int size dividing n, or ids in any order."""
    divisors = [k for k in range(1, n + 1) if n % k == 0] if n else [1, 3]
    if draw(st.booleans()):
        size = draw(st.sampled_from(divisors))
        return size, size
    distinct = draw(st.integers(1, max(n, 1)))  # n distinct ids: every group of one
    offset = draw(st.sampled_from([0, -7, 10**6]))  # ids need not be 0..G-1
    ids = torch.tensor(draw(st.lists(st.integers(0, distinct - 1), min_size=n, max_size=n)), dtype=torch.int64)
    ids = ids * draw(st.sampled_from([1, 37])) + offset
    dtype = draw(st.sampled_from([torch.int64, torch.int32])) if offset != 10**6 else torch.int64
    return ids.to(dtype), ids


def _values(kind: str, shape, g) -> torch.Tensor:
    if kind == "binary":  # the common RL case: ties and all-equal groups
        return torch.randint(0, 2, shape, generator=g).float()
    if kind == "ints":
        return torch.randint(-2, 4, shape, generator=g).float()
    scale = {"small": 0.01, "normal": 1.0, "large": 100.0}[kind]
    return torch.randn(shape, generator=g) * scale


@st.composite
def advantage_cases(draw):
    n = draw(st.sampled_from([0, 1, 2, 3, 5, 8, 13]))
    return {
        "n": n,
        "groups": draw(groupings(n)),
        "method": draw(st.sampled_from(METHODS)),
        "token": draw(st.booleans()),  # [B, T] token rewards (their sum over every position is the score)
        "T": draw(st.integers(1, 9)),
        "dtype": draw(FLOAT_DTYPES),
        "kind": draw(st.sampled_from(["binary", "ints", "small", "normal", "large"])),
        "strided": draw(st.booleans()),
        "mask": draw(st.sampled_from([None, *MASK_DTYPES])),
        "weights": draw(st.sampled_from(["binary", "fractional"])),
        "lengths": draw(st.sampled_from([None, torch.int32, torch.int64, torch.float32])),
        "eps": draw(st.sampled_from([0.0, 1e-6, 1e-4])),
        "norm_by_std": draw(st.booleans()),
        "unbiased": draw(st.booleans()),
        "task_ids": draw(st.booleans()),
        "out": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _build_advantages(c, device):
    g = torch.Generator().manual_seed(c["seed"])
    n, T = c["n"], c["T"]
    rewards = _values(c["kind"], (n, T) if c["token"] else (n,), g).to(c["dtype"])
    mask = None
    if c["mask"] is not None:
        keep = torch.rand(n, T, generator=g) > 0.3
        mask = keep.double() * (torch.rand(n, T, generator=g) + 0.5 if c["weights"] == "fractional" and
                                c["mask"].is_floating_point else 1.0)  # fmt: skip
        mask = mask.to(c["mask"])
    lengths = None if c["lengths"] is None else torch.randint(0, 20, (n,), generator=g).to(c["lengths"])
    task_ids = torch.randint(0, 3, (n,), generator=g) if c["task_ids"] and c["method"] == "gaussian" else None

    op_rewards = rewards
    if c["strided"]:  # a view: rows of a wider buffer, or every other element
        wide = torch.full((n, 2 * T) if c["token"] else (2 * n,), float("nan"), dtype=c["dtype"])
        if c["token"]:
            wide[:, :T] = rewards
            op_rewards = wide[:, :T]
        else:
            wide[::2] = rewards
            op_rewards = wide[::2]
    groups, ids = c["groups"]
    kw = dict(method=c["method"], eps=c["eps"], norm_by_std=c["norm_by_std"], unbiased=c["unbiased"])
    dev = lambda x: None if x is None else x.to(device)  # noqa: E731
    got = dict(rewards=dev(op_rewards), groups=dev(groups) if torch.is_tensor(groups) else groups, mask=dev(mask),
               lengths=dev(lengths), task_ids=dev(task_ids), **kw)  # fmt: skip
    want = dict(rewards=rewards.double(), groups=ids if torch.is_tensor(groups) else groups, mask=mask,
                lengths=lengths, task_ids=task_ids, **kw)  # fmt: skip
    return got, want


def _documented_error(c, want) -> str | None:
    """The ValueError the docstring promises for this input, if any."""
    n = c["n"]
    if want["method"] == "opo" and want["mask"] is None and want["lengths"] is None:
        return "opo"
    if want["method"] in ("batch", "reinforce_pp_baseline") and n == 1:
        return "two"
    if want["method"] == "reinforce_pp_baseline" and n:
        w = want["lengths"] if want["lengths"] is not None else (want["mask"].double().sum(-1) if want["mask"] is not None
                                                                 else None)  # fmt: skip
        if w is not None and float(w.double().sum()) <= 1.0:
            return "reinforce_pp_baseline"
    return None


def _run_advantages(c, backend, device):
    got, want = _build_advantages(c, device)
    error = _documented_error(c, want)
    if error is not None:
        with pytest.raises(ValueError, match=error):
            lk.group_advantages(**got, backend=backend)
        return
    shape = tuple(want["mask"].shape) if want["mask"] is not None else (c["n"],)
    out = nan_like(torch.empty(shape, device=device)) if c["out"] else None
    result = lk.group_advantages(**got, out=out, backend=backend)
    if out is not None:
        assert result is out
    expected = ref.group_advantages(want["rewards"], want["groups"], want["method"], eps=want["eps"], mask=want["mask"],
                                    lengths=want["lengths"], norm_by_std=want["norm_by_std"],
                                    unbiased=want["unbiased"], task_ids=want["task_ids"])  # fmt: skip
    assert result.dtype == torch.float32 and result.shape == expected.shape
    if c["n"] == 0:
        return
    s = ref.scores(want["rewards"])
    ids = ref.group_ids(want["groups"], c["n"])
    w = (want["lengths"].double() if want["lengths"] is not None else
         want["mask"].double().sum(-1) if want["mask"] is not None else torch.ones_like(s))  # fmt: skip
    if want["method"] == "gaussian" and c["token"] and c["dtype"] == torch.float32:
        # ranks come from fp32 row sums: scores the float64 sums tell apart but fp32 ties would move a rank
        ordered = torch.sort(s).values
        gaps = ordered.diff().abs()
        assume(bool((gaps[gaps > 0] > 1e-5 * (ordered.abs().max() + 1)).all()))
    if want["task_ids"] is not None:
        # known issue (reported): the second pass ranks the first pass's values, and a tie run placed
        # symmetrically in its group has mean 2.8e-17 on cpu/reference but exactly 0 on triton, so
        # backends break second-pass ties differently; draws with such values are skipped
        first = ref.gaussian_scores(s, ids)
        assume(bool(((first == 0) | (first.abs() > 1e-6)).all()))
    scale = advantage_scale(want["method"], s, ids, want["eps"], w, want["mask"])
    assert_close(result, expected, rtol=STAT_RTOL, scale=scale, name=f"{want['method']} advantages")
    if want["mask"] is not None:
        assert bool((result.cpu()[want["mask"] == 0] == 0).all()), "masked tokens must be exactly 0"
    degenerate = want["method"] == "batch" and want["eps"] == 0 and float(s.std()) == 0  # 0 / 0: NaN, as the reference
    if want["method"] in ("grpo", "dr_grpo", "rloo", "batch") and not degenerate:
        # all-equal groups (of two or more: one member has baseline 0) give exactly 0, also with
        # eps = 0: no rounding leftover of the mean
        for idx in ref._members(ids):
            if idx.numel() > 1 and bool((s[idx] == s[idx][0]).all()):
                values = result.cpu()[idx]
                assert bool((values == 0).all()), f"all-equal group {idx.tolist()} got {values.tolist()}"


test_fuzz_group_advantages, test_fuzz_group_advantages_gpu_backends = backend_fuzz_tests(
    _run_advantages, advantage_cases(), BACKENDS, 300, 10
)


# --- group_stats ---------------------------------------------------------------------------------


@st.composite
def stats_cases(draw):
    n = draw(st.sampled_from([0, 1, 2, 4, 7, 12]))
    return {
        "n": n,
        "groups": draw(groupings(n)),
        "columns": draw(st.sampled_from([None, 1, 3])),  # None: a [B] vector
        "dtype": draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64])),
        "kind": draw(st.sampled_from(["binary", "ints", "normal", "large"])),
        "where": draw(st.sampled_from([None, torch.bool, torch.float32, torch.int64])),
        "mask": draw(st.sampled_from([None, torch.bool, torch.int32, torch.float32])),
        "T": draw(st.integers(1, 7)),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _run_stats(c, backend, device):
    g = torch.Generator().manual_seed(c["seed"])
    n, cols = c["n"], c["columns"]
    values = _values(c["kind"], (n,) if cols is None else (n, cols), g).to(c["dtype"])
    mask = None if c["mask"] is None else (torch.rand(n, c["T"], generator=g) > 0.4).to(c["mask"])
    n_cols = (1 if cols is None else cols) + (mask is not None)
    where = None if c["where"] is None else (torch.rand(n, n_cols, generator=g) > 0.4).to(c["where"])
    groups, ids = c["groups"]
    dev = lambda x: None if x is None else x.to(device)  # noqa: E731
    stats, lengths = lk.group_stats(dev(values), dev(groups) if torch.is_tensor(groups) else groups, where=dev(where),
                                    mask=dev(mask), backend=backend)  # fmt: skip
    assert stats.shape == (n, n_cols, 6) and stats.dtype == torch.float32
    cols64 = values.double()[:, None] if cols is None else values.double()
    if mask is not None:
        length = mask.double().sum(-1)
        assert lengths.dtype == torch.float32 and torch.equal(lengths.cpu().double(), length)
        cols64 = torch.cat([cols64, length[:, None]], 1)
    else:
        assert lengths is None
    expected = ref.group_stats(cols64, ids if torch.is_tensor(groups) else groups, where)
    # sums of up to n terms of |x|: the fp32 error of sum, mean and std grows with it
    big = ref.group_stats(cols64.abs(), ids if torch.is_tensor(groups) else groups)[:, :, 5:6] * max(n, 1)
    assert_close(stats, expected, rtol=STAT_RTOL, scale=big.expand_as(expected), name="group_stats")


test_fuzz_group_stats, test_fuzz_group_stats_gpu_backends = backend_fuzz_tests(
    _run_stats, stats_cases(), BACKENDS, 200, 8
)


# --- lenkernels.shaping ----------------------------------------------------------------------------

SHAPERS = ["laser", "laser_d", "laser_d_targets", "difficulty_buckets", "dler_rewards", "dler_advantages",
           "kimi_length_reward", "dapo_overlong", "hapo_reward", "grpo_lambda", "concise_r", "dot_truncation",
           "canon_advantages", "pear_reward", "ceeh_advantages"]  # fmt: skip
NO_BACKEND = {"laser", "dapo_overlong", "hapo_reward", "pear_reward", "ceeh_advantages"}


def _rollouts(data, g, n):
    """correct (bool, 0/1 float or int), lengths ([B] int/float or a [B, T] mask of some dtype)."""
    correct = torch.rand(n, generator=g) > data.draw(st.sampled_from([0.0, 0.4, 1.0]), label="share_wrong")
    correct = correct.to(data.draw(st.sampled_from([torch.bool, torch.float32, torch.int64]), label="correct_dtype"))
    source = data.draw(st.sampled_from(["int", "float", "mask"]), label="lengths")
    T = 12
    length = torch.randint(0, T + 1, (n,), generator=g)
    if data.draw(st.booleans(), label="equal_lengths"):
        length = torch.full((n,), 5)  # L_max == L_min, std 0
    if source == "mask":
        mask = (torch.arange(T)[None] < length[:, None])
        mask = mask.to(data.draw(st.sampled_from([torch.bool, torch.int64, torch.float32]), label="mask_dtype"))
        if data.draw(st.booleans(), label="mask_gaps"):  # non-contiguous response tokens: lengths are counts
            mask = mask[:, torch.randperm(T, generator=g)]
        return correct, {"mask": mask}, mask.double().sum(-1)
    if source == "float":
        length = length.float() + torch.rand(n, generator=g).round()  # whole numbers as floats
    return correct, {"lengths": length}, length.double()


def _shape_case(name, data, backend, device):
    """(our result, the float64 reference result, tolerance scale) for one shaping function."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    n = data.draw(st.integers(1, 14), label="n")
    groups, ids = data.draw(groupings(n), label="groups")
    correct, length_kw, length = _rollouts(data, g, n)
    be = {} if name in NO_BACKEND else {"backend": backend}
    dev = lambda x: x.to(device) if torch.is_tensor(x) else x  # noqa: E731
    length_kw = {k: dev(v) for k, v in length_kw.items()}
    groups_op = dev(groups)
    groups_ref = ids if torch.is_tensor(groups) else groups
    c = correct.cpu() != 0
    score_kind = data.draw(st.sampled_from([None, "float", "tensor"]), label="score")
    score = {None: None, "float": 0.5, "tensor": torch.randn(n, generator=g)}[score_kind]

    if name == "laser":
        target = data.draw(st.sampled_from([5, 7.5, "tensor"]), label="target")
        target = torch.randint(0, 13, (n,), generator=g).float() if target == "tensor" else target
        alpha, mode = data.draw(st.sampled_from([0.5, 0.1]), label="alpha"), data.draw(st.sampled_from(shaping.LASER_MODES))
        got = shaping.laser(dev(correct), target_length=dev(target), alpha=alpha, mode=mode, score=dev(score), **length_kw)
        return got, ref_shaping.laser(c, length, target, alpha, mode, score), 1.0
    if name == "laser_d":
        targets = data.draw(st.sampled_from([(3, 6, 9), (12, 0, 5), "tensor"]), label="targets")
        targets_op = dev(torch.tensor([4.0, 8.0, 2.0])) if targets == "tensor" else targets
        targets_ref = (4.0, 8.0, 2.0) if targets == "tensor" else targets
        mode = data.draw(st.sampled_from(shaping.LASER_MODES), label="mode")
        got = shaping.laser_d(dev(correct), groups_op, target_lengths=targets_op, mode=mode, score=dev(score), **length_kw, **be)
        return got, ref_shaping.laser_d(c, groups_ref, length, targets_ref, 0.5, mode, score), 1.0
    if name == "laser_d_targets":
        grid = data.draw(st.sampled_from([[2, 4, 8, 12], [6], [10, 1, 5]]), label="grid")
        rollouts = groups if isinstance(groups, int) and data.draw(st.booleans(), label="default_rollouts") else \
            data.draw(st.integers(1, 8), label="rollouts")  # fmt: skip
        among = data.draw(st.sampled_from(["all", "correct"]), label="among")
        got = shaping.laser_d_targets(dev(correct), groups_op, grid=grid, rollouts=rollouts, among=among, **length_kw, **be)
        return got, ref_shaping.laser_d_targets(c, groups_ref, length, grid, rollouts, among), 1.0
    if name == "difficulty_buckets":
        got = shaping.difficulty_buckets(dev(correct), groups_op, **be)
        assert got.dtype == torch.int64
        return got, ref_shaping.buckets(c, groups_ref), 0.0
    if name == "dler_rewards":
        finished = torch.rand(n, generator=g) > 0.2
        aware = data.draw(st.booleans(), label="difficulty_aware")
        got = shaping.dler_rewards(dev(correct), finished=dev(finished), target_length=8, groups=groups_op,
                                   difficulty_aware=aware, easy_target_length=4, score=dev(score), **length_kw, **be)  # fmt: skip
        return got, ref_shaping.dler(c, length, finished, 8, groups_ref, aware, 4, score), 1.0
    if name == "dler_advantages":
        mask = (torch.arange(12)[None] < length[:, None].long()).float()
        assume(n > 1 and float(mask.sum()) > 1)  # whitening needs two responses and tokens (documented errors)
        got = shaping.dler_advantages(dev(correct), groups_op, mask=dev(mask), target_length=8, score=dev(score), **be)
        rewards = ref_shaping.dler(c, length, None, 8, score=score)
        expected = ref.group_advantages(rewards, groups_ref, "reinforce_pp_baseline", mask=mask)
        return got, expected, 10.0 * (1 + rewards.abs().max())
    if name == "kimi_length_reward":
        weight = data.draw(st.sampled_from([1.0, 0.3]), label="weight")
        got = shaping.kimi_length_reward(dev(correct), groups_op, weight=weight, score=dev(score), **length_kw, **be)
        return got, ref_shaping.kimi(c, groups_ref, length, weight, score), 1.0
    if name == "dapo_overlong":
        max_len, cache = data.draw(st.sampled_from([(10, 4), (12, 12), (8, 1)]), label="limits")
        got = shaping.dapo_overlong(max_length=max_len, cache_length=cache, score=dev(score), **length_kw)
        return got, ref_shaping.dapo_overlong(length, max_len, cache, score), 1.0
    if name == "hapo_reward":
        prompts = torch.randint(0, 4, (n,), generator=g)
        history = shaping.HAPOHistory(4, device=device)
        past = torch.tensor([float("inf"), 3.0, 7.0, 0.0])[torch.randperm(4, generator=g)]
        history.min_length.copy_(past)
        clip = data.draw(st.sampled_from([0.7, 0.2]), label="clip")
        got = shaping.hapo_reward(dev(correct), dev(prompts), history, clip=clip, score=dev(score), **length_kw)
        expected = ref_shaping.hapo(c, prompts, past.double(), length, clip, 1.0, score)
        history.update(dev(correct), dev(prompts), **length_kw)  # then the state, exactly
        assert torch.equal(history.min_length.cpu().double(), ref_shaping.hapo_update(past.double(), c, prompts, length))
        return got, expected, 1.0
    if name == "grpo_lambda":
        fraction = data.draw(st.sampled_from([0.2, 0.5, 1.0]), label="fraction")
        got = shaping.grpo_lambda(dev(correct), groups_op, fraction=fraction, alpha=0.5, **length_kw, **be)
        return got, ref_shaping.grpo_lambda(c, groups_ref, length, fraction, 0.5), 1.0
    if name == "concise_r":
        got = shaping.concise_r(dev(correct), groups_op, max_length=12, alpha=0.7, **length_kw, **be)
        return got, ref_shaping.concise_r(c, groups_ref, length, 12, 0.7), 1.0
    if name == "dot_truncation":
        k, margin = data.draw(st.sampled_from([(3.0, 32), (0.0, 1), (0.5, 2)]), label="k_margin")
        # the cutoff int(mean + k std) is decided in fp32: skip draws whose float64 value is within
        # rounding of an integer (either side would be right)
        for idx in ref._members(ref.group_ids(groups_ref, n)):
            x = length[idx]
            v = float(x.mean() + k * (x.std() if x.numel() > 1 else 0.0))
            assume(abs(v - round(v)) > 1e-4 or abs(v - round(v)) == 0.0)
        new_len, new_mask = shaping.dot_truncation(dev(correct), groups_op, k=k, margin=margin, **length_kw, **be)
        expected = ref_shaping.dot(c, groups_ref, length, k, margin)
        if "mask" in length_kw:
            m = length_kw["mask"].cpu()
            assert new_mask.dtype == m.dtype
            keep = (m != 0) & ((m != 0).cumsum(-1) <= expected[:, None])
            assert torch.equal(new_mask.cpu(), torch.where(keep, m, torch.zeros_like(m)))
        else:
            assert new_mask is None
        return new_len, expected, 1.0
    if name == "canon_advantages":
        rewards = _values(data.draw(st.sampled_from(["binary", "normal"]), label="rewards"), (n,), g)
        metric = _values(data.draw(st.sampled_from(["ints", "normal"]), label="metric"), (n,), g)
        mu = data.draw(st.sampled_from([0.5, 0.0, 1.0, 0.8]), label="mu")
        got = shaping.canon_advantages(dev(rewards), groups_op, dev(metric), mu=mu, **be)
        return got, ref_shaping.canon(rewards, groups_ref, metric, mu), 1.0 + 2 * float(rewards.abs().max())
    if name == "pear_reward":
        think, answer = torch.rand(n, generator=g) * 3, torch.rand(n, generator=g) * 3
        fmt = data.draw(st.sampled_from([0.0, -0.5, "tensor"]), label="format")
        fmt = torch.randn(n, generator=g) if fmt == "tensor" else fmt
        s = 1.0 if score is None else score
        got = shaping.pear_reward(dev(correct), dev(think), dev(answer), alpha=0.7, score=dev(s), format_reward=dev(fmt))
        return got, ref_shaping.pear(c, think, answer, 0.7, s, fmt), 4.0
    if name == "ceeh_advantages":
        per_token = data.draw(st.booleans(), label="per_token")
        adv = torch.randn((n, 5) if per_token else (n,), generator=g)
        ent = torch.rand(adv.shape if data.draw(st.booleans(), label="entropy_per_token") else (n,), generator=g) * 2
        diff = torch.rand(n, generator=g)
        got = shaping.ceeh_advantages(dev(adv), dev(ent), dev(diff), alpha=0.4, kappa=2.0, scale=1.5)
        ent_ref = ent[:, None] if ent.dim() < adv.dim() else ent
        return got, ref_shaping.ceeh(adv, ent_ref, diff, 0.4, 2.0, 1.5), 1.0 + float(adv.abs().max())
    raise AssertionError(name)


def _run_shaping(name, data, backend, device):
    got, expected, scale = _shape_case(name, data, backend, device)
    if got.dtype == torch.int64:
        assert torch.equal(got.cpu(), expected), name
        return
    assert got.dtype == torch.float32 and got.device.type == torch.device(device).type, name
    assert_close(got, expected, rtol=STAT_RTOL, scale=scale, name=name)


@examples(300)
@given(name=st.sampled_from(SHAPERS), backend=st.sampled_from(CHEAP), data=st.data())
def test_fuzz_shaping(name, backend, data):
    _run_shaping(name, data, *backend)


@examples(10)
@given(name=st.sampled_from(sorted(set(SHAPERS) - NO_BACKEND)), backend=st.sampled_from(GPU), data=st.data())
def test_fuzz_shaping_gpu_backends(name, backend, data):
    if backend[0] == "none":
        return
    _run_shaping(name, data, *backend)


def test_every_shaping_function_is_fuzzed():
    assert set(SHAPERS) == set(shaping.__all__) - {"HAPOHistory"}  # HAPOHistory.update: with hapo_reward
