"""One GRPO step end to end with a tiny causal LM, computed twice: eager PyTorch and lenkernels.

The model is a 2-layer Qwen2 (hidden 64, vocabulary 320) built from a config with random weights,
so nothing is downloaded. The toy task: a prompt ``BOS a + b =`` asks for ``(a + b) mod 10``;
a response thinks, closes the thought with ``</think>`` (one token here) and then answers.

1. Rollout: ``model.generate`` samples a group of G responses per prompt (``sequence_bias``
   nudges the random model toward ``</think>``, the digits and EOS, so every outcome occurs).
2. Score with a rule: correct when the answer after ``</think>`` contains the right digit.
3. Old-policy pass (no grad): per-token logprobs and entropy of the responses and the entropy of
   the think / answer phases; reference-model logprobs for the KL term.
4. Shaped reward: PEAR's phase-entropy reward plus the Kimi k1.5 length reward; GRPO advantages.
5. Two policy-gradient iterations on the rollout (GRPO's mu = 2, so the second one has ratios
   away from 1): clipped PPO loss (DAPO's clip-higher) + k3 KL to the reference - entropy bonus,
   backward, optimizer step.

Both pipelines start from the same weights and the same rollout; the script asserts that the
rewards, advantages, losses, every parameter gradient and the updated weights agree, and exits
non-zero otherwise. Run: ``python examples/grpo_step.py`` (``--device cuda`` on a GPU).
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import lenkernels as lk

# the toy vocabulary (ids 20..319 are filler the random model also emits)
PAD, BOS, EOS, THINK_END, PLUS, EQUALS = 0, 1, 2, 3, 4, 5
DIGIT0 = 10  # digits 0..9 are ids 10..19
VOCAB = 320


@dataclass
class Config:
    prompts: int = 3
    group_size: int = 4  # G responses per prompt
    max_new_tokens: int = 24
    temperature: float = 0.9
    clip_low: float = 0.2
    clip_high: float = 0.28  # DAPO clip-higher
    kl_coef: float = 0.01
    entropy_coef: float = 1e-3
    length_weight: float = 0.5  # weight of the Kimi length reward
    iterations: int = 2  # GRPO mu: policy updates per rollout
    lr: float = 0.05
    seed: int = 0


@dataclass
class Rollout:
    input_ids: torch.Tensor  # [B, P + R] prompt and response
    attention_mask: torch.Tensor  # [B, P + R]
    prompt_len: int
    response_ids: torch.Tensor  # [B, R]
    response_mask: torch.Tensor  # [B, R] bool: response tokens up to and including EOS
    answers: torch.Tensor  # [B] the right digit of each response's prompt


def build_model(seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config)
    model.config._attn_implementation = "eager"  # the same attention kernel on every machine
    return model


def rollout(model, cfg: Config, device) -> Rollout:
    g = torch.Generator().manual_seed(cfg.seed + 1)
    a = torch.randint(0, 10, (cfg.prompts,), generator=g)
    b = torch.randint(0, 10, (cfg.prompts,), generator=g)
    prompts = torch.stack([torch.full_like(a, BOS), DIGIT0 + a, torch.full_like(a, PLUS), DIGIT0 + b,
                           torch.full_like(a, EQUALS)], dim=1).to(device)  # fmt: skip
    bias = {(THINK_END,): 3.0, (EOS,): 2.5, **{(DIGIT0 + d,): 2.0 for d in range(10)}}
    torch.manual_seed(cfg.seed + 2)
    with torch.no_grad():
        out = model.generate(
            prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=cfg.temperature, top_k=0,
            max_new_tokens=cfg.max_new_tokens, num_return_sequences=cfg.group_size, sequence_bias=bias,
            pad_token_id=PAD, eos_token_id=EOS,
        )  # fmt: skip
    P = prompts.shape[1]
    response = out[:, P:]
    # response tokens: everything up to and including the first EOS
    eos_seen = torch.cumsum((response == EOS).int(), dim=1)
    mask = (eos_seen == 0) | ((eos_seen == 1) & (response == EOS))
    attention = torch.cat([torch.ones_like(out[:, :P]), mask.long()], dim=1)
    answers = ((a + b) % 10).repeat_interleave(cfg.group_size).to(device)
    return Rollout(out, attention, P, response, mask, answers)


def score(r: Rollout) -> torch.Tensor:
    """Rule-based reward: correct when the answer (the response tokens after the first
    ``</think>``) contains the right digit; no ``</think>``, no answer."""
    ids, mask = r.response_ids, r.response_mask
    hit = (ids == THINK_END) & mask
    t = torch.arange(ids.shape[1], device=ids.device)[None]
    k = torch.where(hit.any(dim=1), hit.int().argmax(dim=1), ids.shape[1])[:, None]
    answer = mask & (t > k)
    return (answer & (ids == DIGIT0 + r.answers[:, None])).any(dim=1)


def response_logits(model, r: Rollout) -> torch.Tensor:
    """``[B, R, V]`` logits predicting each response token (float32 on CPU)."""
    logits = model(input_ids=r.input_ids, attention_mask=r.attention_mask).logits
    return logits[:, r.prompt_len - 1 : -1]


# --- the two implementations ------------------------------------------------------------------------


class Eager:
    """What a trainer writes today with plain PyTorch ops."""

    name = "eager"

    @staticmethod
    def token_stats(logits, ids, temperature):
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)
        return logp.gather(-1, ids[..., None])[..., 0], entropy

    @staticmethod
    def phase_entropy(entropy, ids, mask):
        """Mean entropy before ``</think>`` and after it (0 for an empty phase)."""
        hit = (ids == THINK_END) & mask
        found = hit.any(dim=1)
        t = torch.arange(ids.shape[1], device=ids.device)[None]
        k = torch.where(found, hit.int().argmax(dim=1), torch.full_like(found, ids.shape[1], dtype=torch.long))[:, None]
        think, answer = mask & (t < k), mask & (t > k)

        def mean(sel):
            return (entropy * sel).sum(1) / sel.sum(1).clamp(min=1)

        return mean(think), mean(answer)

    @staticmethod
    def shaped_reward(correct, think_h, answer_h, mask, group_size, length_weight):
        pear = torch.where(correct, torch.clamp(1.0 - torch.clamp(think_h - answer_h, min=0.0), max=1.0), 0.0)
        lengths = mask.sum(1).float().view(-1, group_size)
        lo, hi = lengths.min(1, keepdim=True).values, lengths.max(1, keepdim=True).values
        span = hi - lo
        lam = torch.where(span > 0, 0.5 - (lengths - lo) / torch.where(span > 0, span, 1.0), 0.0).view(-1)
        kimi = torch.where(correct, lam, lam.clamp(max=0.0))
        return pear + length_weight * kimi

    @staticmethod
    def advantages(rewards, group_size):
        r = rewards.double().view(-1, group_size)  # float64 group statistics: equal scores give exactly 0
        centered = r - r.mean(1, keepdim=True)
        return (centered / (r.std(1, keepdim=True) + 1e-6)).view(-1).float()

    @staticmethod
    def loss(logits, ids, old_lp, ref_lp, adv, mask, cfg: Config):
        lp, entropy = Eager.token_stats(logits, ids, cfg.temperature)
        ratio = torch.exp(torch.clamp(lp - old_lp, -20.0, 20.0))
        a = adv[:, None]
        pg = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high))
        delta = torch.clamp(ref_lp - lp, -20.0, 20.0)
        kl = torch.clamp(torch.exp(delta) - delta - 1, -10.0, 10.0)  # verl's low_var_kl
        per_token = pg + cfg.kl_coef * kl - cfg.entropy_coef * entropy
        m = mask.float()
        return (per_token * m).sum() / m.sum()


class Lenkernels:
    """The same step with the lenkernels ops."""

    name = "lenkernels"

    @staticmethod
    def token_stats(logits, ids, temperature):
        return lk.token_logprobs_entropy(logits, ids, temperature=temperature)

    @staticmethod
    def phase_entropy(entropy, ids, mask):
        pe = lk.phase_entropy(entropy, ids, mask, delimiter=[THINK_END])
        return pe.think_mean, pe.answer_mean

    @staticmethod
    def shaped_reward(correct, think_h, answer_h, mask, group_size, length_weight):
        pear = lk.shaping.pear_reward(correct, think_h, answer_h)
        return lk.shaping.kimi_length_reward(correct, group_size, mask=mask, weight=length_weight, score=pear)

    @staticmethod
    def advantages(rewards, group_size):
        return lk.group_advantages(rewards, group_size, method="grpo")

    @staticmethod
    def loss(logits, ids, old_lp, ref_lp, adv, mask, cfg: Config):
        out = lk.policy_loss_from_logits(
            logits, ids, old_lp, adv, mask, temperature=cfg.temperature, mode="ppo", clip_low=cfg.clip_low,
            clip_high=cfg.clip_high, ref_logprobs=ref_lp, kl_coef=cfg.kl_coef, kl_estimator="low_var_kl",
            entropy_coef=cfg.entropy_coef, agg="token-mean",
        )  # fmt: skip
        return out.loss


# --- the step -----------------------------------------------------------------------------------------


@dataclass
class StepResult:
    rewards: torch.Tensor
    advantages: torch.Tensor
    think_entropy: torch.Tensor
    losses: list
    grads: list  # per iteration: {parameter name: gradient}
    params: dict  # after the last update


def grpo_step(model, ref_model, r: Rollout, impl, cfg: Config) -> StepResult:
    ids, mask = r.response_ids, r.response_mask
    with torch.no_grad():
        old_lp, entropy = impl.token_stats(response_logits(model, r), ids, cfg.temperature)
        ref_lp, _ = impl.token_stats(response_logits(ref_model, r), ids, cfg.temperature)
        think_h, answer_h = impl.phase_entropy(entropy, ids, mask)
        rewards = impl.shaped_reward(score(r), think_h, answer_h, mask, cfg.group_size, cfg.length_weight)
        adv = impl.advantages(rewards, cfg.group_size)
    # plain SGD: the update is linear in the gradient, so equal gradients give equal weights
    # (Adam's g / sqrt(v) would amplify rounding noise in parameters whose gradient is ~0)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    losses, grads = [], []
    for _ in range(cfg.iterations):
        optimizer.zero_grad(set_to_none=True)
        loss = impl.loss(response_logits(model, r), ids, old_lp, ref_lp, adv, mask, cfg)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        optimizer.step()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return StepResult(rewards, adv, think_h, losses, grads, params)


def check_close(actual, expected, name, rtol=1e-4):
    """Equal up to float32 rounding: |a - e| <= rtol * (|e| + max|e|) elementwise."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max() if expected.numel() else torch.zeros((), dtype=torch.float64)
    err = (actual - expected).abs()
    bound = rtol * (expected.abs() + scale) + 1e-12
    worst = int((err / bound).argmax()) if err.numel() else 0
    if err.numel() and err.reshape(-1)[worst] > bound.reshape(-1)[worst]:
        raise AssertionError(
            f"{name}: eager and lenkernels differ at flat index {worst}: {expected.reshape(-1)[worst].item():.9g} "
            f"vs {actual.reshape(-1)[worst].item():.9g}"
        )
    return float(err.max()) if err.numel() else 0.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=4)
    args = parser.parse_args(argv)
    cfg = Config(prompts=args.prompts, group_size=args.group_size, seed=args.seed)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    device = torch.device(args.device)

    policy = build_model(cfg.seed).to(device)
    reference = copy.deepcopy(policy).eval()
    r = rollout(policy, cfg, device)
    correct = score(r)
    print(f"rollout: {r.response_ids.shape[0]} responses, {int(r.response_mask.sum())} response tokens, "
          f"{int(correct.sum())} correct, {int(((r.response_ids == THINK_END) & r.response_mask).any(1).sum())} "
          f"with </think>")  # fmt: skip

    results = {}
    for impl in (Eager, Lenkernels):
        model = copy.deepcopy(policy).train()
        results[impl.name] = grpo_step(model, reference, r, impl, cfg)
    eager, fused = results["eager"], results["lenkernels"]

    check_close(fused.think_entropy, eager.think_entropy, "think-phase entropy", rtol=1e-5)
    check_close(fused.rewards, eager.rewards, "shaped rewards", rtol=1e-5)
    check_close(fused.advantages, eager.advantages, "advantages", rtol=1e-4)
    for it, (loss_f, loss_e) in enumerate(zip(fused.losses, eager.losses)):
        check_close(loss_f, loss_e, f"loss, iteration {it}", rtol=1e-5)
        assert fused.grads[it].keys() == eager.grads[it].keys()
        worst = max(check_close(fused.grads[it][n], g, f"d {n}, iteration {it}") for n, g in eager.grads[it].items())
        print(f"iteration {it}: loss eager {loss_e.item():+.7f}  lenkernels {loss_f.item():+.7f}  "
              f"max |grad diff| {worst:.2e} over {len(eager.grads[it])} parameters")  # fmt: skip
    for n, p in eager.params.items():
        check_close(fused.params[n], p, f"updated {n}")
    print(f"rewards: {[round(x, 4) for x in eager.rewards.tolist()]}")
    print(f"advantages: {[round(x, 4) for x in eager.advantages.tolist()]}")
    print("OK: eager and lenkernels agree on rewards, advantages, losses, gradients and updated weights")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
