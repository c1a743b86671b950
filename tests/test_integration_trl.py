"""lenkernels.integrations.trl against the installed TRL: the token statistics of
trl.trainer.utils, GRPOTrainer's loss (its real ``_compute_loss`` method, run on a trainer state
built here, against ``grpo_compute_loss``) and its advantage scaling, on random inputs; and
patch() swapping them in and out.

Needs ``pip install trl`` (tested with 1.16).
"""

from __future__ import annotations

import math
import sys
import types
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tests.utils import assert_close, assert_same_training, grpo_run, trainer_close, trainer_module

trl_utils = trainer_module("trl.trainer.utils")
grpo_module = trainer_module("trl.trainer.grpo_trainer")
GRPOTrainer = grpo_module.GRPOTrainer

from lenkernels.integrations import _trl_token_stats as lk_ts
from lenkernels.integrations import trl as lk_trl

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ORIGINAL_COMPUTE_LOSS = GRPOTrainer.__dict__["_compute_loss"]


# --- token statistics --------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("masked", [False, True], ids=["all_rows", "row_mask"])
@pytest.mark.parametrize(
    "lead,vocab",
    [
        ((3, 11), 263),  # padded [B, T, V] completions, prime V
        ((29,), 1_000),  # packed [N, V]
    ],
)
def test_selective_log_softmax_and_entropy_match_trl(device, temperature, masked, lead, vocab):
    logits = (torch.randn(*lead, vocab) * 3).to(device)
    index = torch.randint(0, vocab, lead, device=device)
    row_mask = (torch.rand(lead, device=device) > 0.3) if masked else None
    if masked:  # masked rows hold padding ids that must never be read
        index = index.masked_fill(~row_mask, -100)
        trl_index = index.clamp(min=0)  # TRL's CPU path gathers before masking
    else:
        trl_index = index
    g_lp, g_h = torch.randn(lead, device=device), torch.randn(lead, device=device)

    def run(fn, idx, **kw):
        x = logits.clone().requires_grad_(True)
        lp, h = fn(x, idx, temperature=temperature, row_mask=row_mask, **kw)
        (lp * g_lp + h * g_h).sum().backward()
        return lp, h, x.grad

    ours = run(lk_trl.selective_log_softmax_and_entropy, index)
    theirs = run(trl_utils.selective_log_softmax_and_entropy, trl_index)
    assert ours[0].dtype == ours[1].dtype == torch.float32
    for a, b, name in zip(ours, theirs, ("logprobs", "entropy", "d logits")):
        trainer_close(a, b, name)

    x = logits.clone().requires_grad_(True)
    y = logits.clone().requires_grad_(True)
    lp = lk_trl.selective_log_softmax(x, index, temperature, row_mask)
    lp_t = trl_utils.selective_log_softmax(y, trl_index, temperature, row_mask)
    trainer_close(lp, lp_t, "selective_log_softmax")
    (lp * g_lp).sum().backward()
    (lp_t * g_lp).sum().backward()
    trainer_close(x.grad, y.grad, "selective_log_softmax d logits")
    trainer_close(
        lk_trl.entropy_from_logits(logits, chunk_size=5), trl_utils.entropy_from_logits(logits, chunk_size=5), "entropy"
    )


@pytest.mark.parametrize("device", DEVICES)
def test_selective_log_softmax_top_k(device):
    """K ids per row (``index`` of shape [..., K]), with a row mask of that shape."""
    logits = torch.randn(4, 6, 97, device=device) * 2
    index = torch.randint(0, 97, (4, 6, 5), device=device)
    row_mask = torch.rand(4, 6, 5, device=device) > 0.25
    g = torch.randn(4, 6, 5, device=device)
    grads = []
    for fn in (lk_trl.selective_log_softmax, trl_utils.selective_log_softmax):
        x = logits.clone().requires_grad_(True)
        out = fn(x, index, 0.8, row_mask)
        (out * g).sum().backward()
        grads.append((out, x.grad))
    trainer_close(grads[0][0], grads[1][0], "top-k logprobs")
    trainer_close(grads[0][1], grads[1][1], "top-k d logits")


def test_entropy_requires_grad_false_and_errors():
    logits, index = torch.randn(5, 40, requires_grad=True), torch.randint(0, 40, (5,))
    lp, h = lk_trl.selective_log_softmax_and_entropy(logits, index, entropy_requires_grad=False)
    assert lp.requires_grad and not h.requires_grad
    for fn in (lk_trl.selective_log_softmax, trl_utils.selective_log_softmax):
        with pytest.raises(ValueError, match="temperature must be positive"):
            fn(logits, index, temperature=0.0)
    with pytest.raises(ValueError, match="index"):
        lk_trl.selective_log_softmax(logits, torch.zeros(5, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        lk_trl.entropy_from_logits(logits, chunk_size=0)


def test_token_stats_trace_under_torch_compile():
    torch._dynamo.reset()
    logits, index = torch.randn(9, 53), torch.randint(0, 53, (9,))

    def step(x):
        return lk_trl.selective_log_softmax(x, index, 0.9).sum() + lk_trl.entropy_from_logits(x).sum()

    trainer_close(torch.compile(step, backend="aot_eager", fullgraph=True)(logits), step(logits), "compiled")


class FakeTensor:
    """The metadata TRL's kernel selection reads (a CUDA tensor's, on a machine without one)."""

    def __init__(self, shape, dtype, device="cuda", last_stride=1):
        self.shape, self.dtype, self.device, self._last = torch.Size(shape), dtype, torch.device(device), last_stride

    @property
    def ndim(self):
        return len(self.shape)

    def dim(self):
        return len(self.shape)

    def stride(self, dim):
        return self._last


def test_output_dtype_follows_trls_kernel_selection():
    """The drop-ins return float32 exactly where TRL runs its fused Triton kernel (which returns
    float32) and the logits' dtype where TRL's eager path runs: the selection mirrors TRL's own
    ``_supports_trl_loss_kernel`` (checked here on CUDA tensors' metadata, without a GPU)."""
    trl_fused = trl_utils._supports_trl_loss_kernel
    cases = 0
    for device in ("cuda", "cpu"):
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            for lead in ((7,), (2, 7), (2, 3, 7)):
                for last_stride in (1, 2):
                    logits = FakeTensor(lead + (50,), dtype, device, last_stride)
                    options = [(None, None)]
                    for index_dtype in (torch.int64, torch.int32, torch.int16):
                        index = FakeTensor(lead, index_dtype, device)
                        options.append((index, None))
                        options.append((FakeTensor(lead + (3,), index_dtype, device), None))  # top-K ids
                        for mask_dtype in (torch.bool, torch.int64, torch.float32):
                            options.append((index, FakeTensor(lead, mask_dtype, device)))
                    for index, row_mask in options:
                        expected = trl_utils.is_triton_available() and trl_fused(logits, index, row_mask)
                        assert lk_ts._fused_in_trl(logits, index, row_mask) == expected, (logits.__dict__, index)
                        assert lk_ts._trl_dtype(logits, index, row_mask) == (torch.float32 if expected else dtype)
                        cases += 1
    assert cases > 500


# --- advantage scaling -------------------------------------------------------------------------


def trl_advantages(rewards, num_generations, scale_rewards):
    """GRPOTrainer's sum_then_normalize block (TRL 1.16, _generate_and_score_completions) restated
    with TRL's own nanstd: the eager baseline."""
    mean = torch.nanmean(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations)
    if scale_rewards in ("group", "none"):
        if num_generations > 1:
            std = trl_utils.nanstd(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations)
        else:
            std = torch.zeros_like(rewards)
    else:
        std = trl_utils.nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("num_generations", [1, 3, 8])  # 1: TRL's eval with one generation; 3: odd G
def test_grpo_advantages_match_trl(device, scale, num_generations):
    B = num_generations * 5
    rewards = torch.randint(0, 3, (B,)).float() * 0.5 + torch.randn(B) * (torch.rand(B) > 0.5)
    rewards[:num_generations] = 1.0  # an all-equal group: exactly 0 in every mode
    if num_generations > 1:
        rewards[num_generations] = float("nan")  # a completion no reward function scored
        rewards[2 * num_generations : 3 * num_generations - 1] = float("nan")  # a group with one scored member
    rewards = rewards.to(device)
    ours = lk_trl.grpo_advantages(rewards, num_generations, scale)
    theirs = trl_advantages(rewards, num_generations, scale)
    assert ours.dtype == torch.float32 and ours.shape == (B,)
    trainer_close(ours, theirs, f"{scale} advantages", rtol=1e-5)
    assert bool((ours[:num_generations] == 0).all())


def test_grpo_advantages_aliases_and_errors():
    rewards = torch.rand(12)
    trainer_close(lk_trl.grpo_advantages(rewards, 4, True), lk_trl.grpo_advantages(rewards, 4, "group"), "True")
    trainer_close(lk_trl.grpo_advantages(rewards, 4, False), lk_trl.grpo_advantages(rewards, 4, "none"), "False")
    with pytest.raises(ValueError, match="scale_rewards"):
        lk_trl.grpo_advantages(rewards, 4, "prompt")
    with pytest.raises(ValueError, match="rewards"):
        lk_trl.grpo_advantages(rewards.view(3, 4), 4)


# --- GRPOTrainer._compute_loss -------------------------------------------------------------------


class Accelerator:
    """One process: the collectives TRL's loss calls are identities."""

    num_processes, process_index, sync_gradients = 1, 0, True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


class TrainerState:
    """The state GRPOTrainer._compute_loss reads, with GRPOTrainer's own helper methods. The forward
    pass returns given per-token logprobs and entropies (leaves the test differentiates)."""

    get_high_entropy_mask = GRPOTrainer.__dict__["get_high_entropy_mask"]
    get_off_policy_mask = GRPOTrainer.__dict__["get_off_policy_mask"]
    get_gamma_weights = GRPOTrainer.__dict__["get_gamma_weights"]

    def __init__(self, logps, entropies, **config):
        self.logps = logps.clone().requires_grad_(True)
        self.entropies = entropies.clone().requires_grad_(True)
        args = dict(delta=None, use_bias_correction_kl=True, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
                    steps_per_generation=4, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
                    vespo_lambda_neg=2.0, entropy_target=0.5, entropy_coef_delta=0.001, entropy_coef_min=0.0,
                    entropy_coef_max=0.1)  # fmt: skip
        state = dict(loss_type="dapo", importance_sampling_level="token", epsilon_low=0.2, epsilon_high=0.28, beta=0.0,
                     top_entropy_quantile=1.0, off_policy_mask_threshold=None, use_vllm=False,
                     vllm_importance_sampling_correction=False, entropy_coef=0.0, use_adaptive_entropy=False,
                     aux_loss_enabled=False, router_aux_loss_coef=0.0, max_completion_length=logps.shape[1] + 3,
                     current_gradient_accumulation_steps=2, training=True)  # fmt: skip
        for key, value in config.items():
            (args if key in args else state)[key] = value
        self.model = SimpleNamespace(training=state.pop("training"))
        self.__dict__.update(state)
        self.args = SimpleNamespace(**args)
        self._entropy_bonus_enabled = self.entropy_coef != 0.0 or self.use_adaptive_entropy
        self._last_world_entropy, self._entropy_window_stats = float("inf"), None
        self.accelerator = Accelerator()
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **kwargs):  # fmt: skip
        assert logits_to_keep == self.logps.shape[1] and input_ids.shape[1] == attention_mask.shape[1]
        return self.logps, (self.entropies if compute_entropy else None), None


def grpo_inputs(B, P, T, device):
    """A GRPO micro-batch: an empty completion and a one-token completion on purpose; old,
    sampling and reference logprobs spread enough to clip; a tool mask on one completion."""
    completion_mask = (torch.rand(B, T) > 0.2).long()
    completion_mask[0] = 0
    completion_mask[1] = 0
    completion_mask[1, T // 2] = 1
    logps = -torch.rand(B, T) * 3
    inputs = dict(
        prompt_ids=torch.randint(0, 50, (B, P)), prompt_mask=torch.ones(B, P, dtype=torch.long),
        completion_ids=torch.randint(0, 50, (B, T)), completion_mask=completion_mask, advantages=torch.randn(B),
        old_per_token_logps=logps + torch.randn(B, T) * 0.4, ref_per_token_logps=logps + torch.randn(B, T) * 0.3,
        sampling_per_token_logps=logps + torch.randn(B, T) * 0.3, importance_sampling_ratio=torch.rand(B, T) + 0.5,
        num_items_in_batch=torch.tensor(3 * int(completion_mask.sum())),
    )  # fmt: skip
    inputs = {k: v.to(device) for k, v in inputs.items()}
    return inputs, logps.to(device), (torch.rand(B, T) * 2).to(device)


OPTIONS = {
    "plain": {},
    # KL with TRL's default bias correction, the top-entropy mask and the entropy bonus
    "kl_entropy": dict(beta=0.04, top_entropy_quantile=0.4, entropy_coef=0.01),
    # plain k3 KL, INTELLECT-2's delta, vLLM importance ratios, DeepSeek-V3.2's off-policy mask
    "kl_delta_is": dict(
        beta=0.04,
        use_bias_correction_kl=False,
        delta=1.5,
        use_vllm=True,
        vllm_importance_sampling_correction=True,
        off_policy_mask_threshold=0.1,
    ),
    "eval": dict(training=False, entropy_coef=0.02),
}


def same_metrics(ours: dict, theirs: dict):
    assert list(ours) == list(theirs), (list(ours), list(theirs))
    for key in theirs:
        assert len(ours[key]) == len(theirs[key]), key
        for a, b in zip(ours[key], theirs[key]):
            assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), (key, a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", sorted(OPTIONS))
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", lk_trl.LOSS_TYPES)
def test_compute_loss_matches_trl(device, options, level, loss_type):
    inputs, logps, entropies = grpo_inputs(6, 3, 19, device)
    config = dict(loss_type=loss_type, importance_sampling_level=level, **OPTIONS[options])
    theirs, ours = TrainerState(logps, entropies, **config), TrainerState(logps, entropies, **config)
    loss_t = ORIGINAL_COMPUTE_LOSS(theirs, None, inputs)
    loss = lk_trl.grpo_compute_loss(ours, None, inputs)
    (loss_t * 0.9).backward()
    (loss * 0.9).backward()
    terms = float(inputs["advantages"].abs().max()) + 1.0  # |A r| and the O(1) KL / entropy terms
    trainer_close(loss, loss_t, "loss", scale=terms)
    trainer_close(ours.logps.grad, theirs.logps.grad, "d logps")
    if theirs.entropies.grad is not None:
        trainer_close(ours.entropies.grad, theirs.entropies.grad, "d entropies")
    else:
        assert ours.entropies.grad is None or bool((ours.entropies.grad == 0).all())
    mode = "train" if ours.model.training else "eval"
    same_metrics(ours._metrics[mode], theirs._metrics[mode])
    fused = lk_trl._why_not_fused(ours) is None
    assert fused == (loss_type != "sapo" or level == "token")  # the rest runs TRL's original


@pytest.mark.parametrize("options", ["plain", "kl_entropy", "kl_delta_is"])
@pytest.mark.parametrize(
    "loss_type,level",
    # (sapo with sequence-level ratios runs TRL's own method: nothing of lenkernels to test)
    [(t, lv) for t in lk_trl.LOSS_TYPES for lv in ("token", "sequence") if (t, lv) != ("sapo", "sequence")],
)
def test_compute_loss_float64_matches_trl(options, loss_type, level):
    """float64 log-probabilities (a float64 model) and inputs: TRL computes its loss in float64,
    and so does the drop-in (the kernels take no float64), to TRL's digits."""
    inputs, logps, entropies = grpo_inputs(6, 3, 19, "cpu")
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    logps, entropies = logps.double(), entropies.double()
    config = dict(loss_type=loss_type, importance_sampling_level=level, **OPTIONS[options])
    theirs, ours = TrainerState(logps, entropies, **config), TrainerState(logps, entropies, **config)
    loss_t = ORIGINAL_COMPUTE_LOSS(theirs, None, inputs)
    loss = lk_trl.grpo_compute_loss(ours, None, inputs)
    loss_t.backward()
    loss.backward()
    assert loss.dtype == loss_t.dtype == torch.float64 and loss.shape == loss_t.shape
    terms = float(inputs["advantages"].abs().max()) + 1.0
    # TRL's SAPO temperatures come from torch.where over Python floats: float32 numbers (1.05 is
    # a relative 4e-8 off); everything else is float64 on both sides
    rtol = 1e-7 if loss_type == "sapo" else 1e-10
    assert_close(loss, loss_t, rtol=rtol, atol=rtol * 1e-2 * terms, name="loss")
    assert ours.logps.grad.dtype == torch.float64
    assert_close(ours.logps.grad, theirs.logps.grad, rtol=rtol, atol=1e-13, name="d logps")
    if theirs.entropies.grad is not None:
        assert_close(ours.entropies.grad, theirs.entropies.grad, rtol=rtol, atol=1e-13, name="d entropies")
    mode = "train" if ours.model.training else "eval"
    same_metrics(ours._metrics[mode], theirs._metrics[mode])
    assert lk_trl._why_not_fused(ours) is None  # the drop-in's loss, not TRL's fallback


def test_cispo_bound_below_one_and_unsupported_configs():
    """CISPO with epsilon_high < 1 (a ratio cap below 1) and the configurations that fall back."""
    inputs, logps, entropies = grpo_inputs(5, 2, 13, "cpu")
    for config in (dict(loss_type="cispo", epsilon_high=0.6), dict(loss_type="vespo"),
                   dict(loss_type="dapo", use_adaptive_entropy=True, entropy_coef=0.01),
                   dict(loss_type="bnpo", delta=1.1)):  # fmt: skip
        theirs, ours = TrainerState(logps, entropies, **config), TrainerState(logps, entropies, **config)
        loss_t, loss = ORIGINAL_COMPUTE_LOSS(theirs, None, inputs), lk_trl.grpo_compute_loss(ours, None, inputs)
        loss_t.backward()
        loss.backward()
        trainer_close(loss, loss_t, f"{config} loss", scale=float(inputs["advantages"].abs().max()) + 1.0)
        trainer_close(ours.logps.grad, theirs.logps.grad, f"{config} d logps")
    assert lk_trl._why_not_fused(TrainerState(logps, entropies, loss_type="vespo")) == "loss_type='vespo'"


def test_grpo_loss_argument_errors():
    lp, mask, adv = -torch.rand(3, 4), torch.ones(3, 4), torch.randn(3)
    with pytest.raises(ValueError, match="loss_type"):
        lk_trl.grpo_loss(lp, None, adv, mask, loss_type="vespo")
    with pytest.raises(ValueError, match="importance sampling level"):
        lk_trl.grpo_loss(lp, None, adv, mask, importance_sampling_level="group")
    with pytest.raises(ValueError, match="num_items_in_batch"):
        lk_trl.grpo_loss(lp, None, adv, mask, loss_type="dapo")
    with pytest.raises(ValueError, match="max_completion_length"):
        lk_trl.grpo_loss(lp, None, adv, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="ref_per_token_logps"):
        lk_trl.grpo_loss(lp, None, adv, mask, loss_type="bnpo", beta=0.1)
    with pytest.raises(NotImplementedError, match="sapo"):
        lk_trl.grpo_loss(lp, None, adv, mask, loss_type="sapo", importance_sampling_level="sequence")


def test_grpo_loss_local_top_entropy_quantile_equals_a_given_mask():
    """Standalone use: top_entropy_quantile computes TRL's mask here (one process)."""
    inputs, logps, entropies = grpo_inputs(6, 2, 17, "cpu")
    mask = inputs["completion_mask"]
    state = TrainerState(logps, entropies)
    given = state.get_high_entropy_mask(entropies, mask, 1 - 0.3)
    kw = dict(loss_type="bnpo", entropies=entropies, entropy_coef=0.05)
    a = lk_trl.grpo_loss(
        logps, inputs["old_per_token_logps"], inputs["advantages"], mask, top_entropy_quantile=0.3, **kw
    )
    b = lk_trl.grpo_loss(logps, inputs["old_per_token_logps"], inputs["advantages"], mask, entropy_mask=given, **kw)
    assert torch.equal(a.entropy_mask, given)
    trainer_close(a.loss, b.loss, "loss")


# --- patch() -------------------------------------------------------------------------------------

NAMES = ("selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy")


def test_import_does_not_patch():
    assert not lk_trl.is_patched()
    for name in NAMES:
        assert getattr(trl_utils, name) is not getattr(lk_trl, name)
    assert GRPOTrainer.__dict__["_compute_loss"] is ORIGINAL_COMPUTE_LOSS


def test_patch_and_unpatch(monkeypatch):
    before = {name: getattr(trl_utils, name) for name in NAMES}
    replaced = lk_trl.patch()
    try:
        assert f"{lk_trl._TRAINER}._compute_loss" in replaced
        for name in NAMES:
            assert getattr(trl_utils, name) is getattr(lk_trl, name)
        assert GRPOTrainer._compute_loss is lk_trl.grpo_compute_loss
        # TRL's own selective_log_softmax_and_entropy calls the patched functions too
        logits, index = torch.randn(4, 30), torch.randint(0, 30, (4,))
        trainer_close(
            trl_utils.selective_log_softmax(logits, index), before["selective_log_softmax"](logits, index), "patched"
        )
        late = types.ModuleType("trl._lenkernels_probe")  # imported while patched, by `from ... import`
        late.selective_log_softmax = trl_utils.selective_log_softmax
        monkeypatch.setitem(sys.modules, late.__name__, late)
    finally:
        lk_trl.unpatch()
    assert not lk_trl.is_patched()
    for name in NAMES:
        assert getattr(trl_utils, name) is before[name]
    assert late.selective_log_softmax is before["selective_log_softmax"]
    assert GRPOTrainer.__dict__["_compute_loss"] is ORIGINAL_COMPUTE_LOSS


def test_patched_trainer_runs_the_fused_loss_and_falls_back():
    inputs, logps, entropies = grpo_inputs(4, 2, 11, "cpu")
    with lk_trl.patched(exclude=("entropy_from_logits",)) as replaced:
        assert not any(r.endswith(".entropy_from_logits") for r in replaced)
        assert trl_utils.entropy_from_logits is not lk_trl.entropy_from_logits
        for config in (dict(loss_type="grpo"), dict(loss_type="vespo")):
            state, reference = TrainerState(logps, entropies, **config), TrainerState(logps, entropies, **config)
            loss = GRPOTrainer._compute_loss(state, None, inputs)  # the method patch() installed
            trainer_close(loss, ORIGINAL_COMPUTE_LOSS(reference, None, inputs), f"{config}")
    assert GRPOTrainer.__dict__["_compute_loss"] is ORIGINAL_COMPUTE_LOSS
    with pytest.raises(ValueError, match="does not replace"):
        lk_trl.patch(exclude=("compute_loss",))
    assert not lk_trl.is_patched()


def test_real_grpo_trainer_with_the_patch(tmp_path, monkeypatch):
    """TRL's own GRPOTrainer (tiny random Qwen2, a word-level tokenizer built here, a length-penalised
    rule reward, beta > 0 with its reference model, mu = 2) trains two steps unpatched and with the
    fused loss: the same logged losses and metrics and the same weights (Adam, TRL's default), with
    the fused loss really in use. The fused LM head is left as TRL's here: it is compared with TRL's
    in tests/test_integration_trl_head.py."""
    pytest.importorskip("datasets", reason="GRPOTrainer needs the datasets package")
    calls = []
    fused = lk_trl.grpo_loss
    monkeypatch.setattr(lk_trl, "grpo_loss", lambda *a, **k: calls.append(k["loss_type"]) or fused(*a, **k))
    for loss_type in ("dapo", "grpo"):
        config = dict(loss_type=loss_type, beta=0.02, num_iterations=2, epsilon_high=0.28, learning_rate=1e-2)
        expected = grpo_run(tmp_path / f"{loss_type}-t", None, **config)
        run = grpo_run(tmp_path / loss_type, lk_trl.patched(exclude=("ChunkedLogProbFunction",)), **config)
        assert calls.count(loss_type) == 2, calls  # the fused loss ran on both steps
        assert_same_training(run, expected, loss_type, rtol=1e-4)
