"""One sweep of bad input over every public function (``lenkernels.__all__`` and
``lenkernels.shaping``): wrong types, dtypes, shapes and devices, bad hyper-parameters, empty batches,
groups of one, NaN/inf inputs and out-of-range ids.

Each bad call must raise ValueError/TypeError naming the argument, or give the result SPEC.md
defines: NaN where a NaN went in, never a plausible finite number. The table ``APIS`` holds a valid
call per function; the generic sweeps derive their cases from it (every tensor argument replaced by
a list, moved to another device, given a complex dtype; every number replaced by a string, NaN and
inf), the explicit cases cover what is specific to a function. ``test_every_public_function_is_swept``
fails when a public function is added without a row here.

Devices: "another device" is the meta device (no GPU needed). Value checks run on CPU tensors; on
CUDA tensors they need ``LENKERNELS_DEBUG=1`` (tested with it set, and without it for the NaN
fallback of the kernels).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import pytest
import torch

import lenkernels as lk
from lenkernels import shaping
from tests.utils import HAS_CUDA, backend_params

NAN, INF = float("nan"), float("inf")


class Derived(NamedTuple):
    """An override computed from the valid call's arguments (e.g. ``ids`` as float)."""

    fn: Callable[[dict], object]


class Case(NamedTuple):
    id: str
    overrides: dict
    exc: type | tuple
    match: str

    def apply(self, kw: dict) -> dict:
        values = {k: (v.fn(kw) if isinstance(v, Derived) else v) for k, v in self.overrides.items()}
        kw.update(values)
        return kw


def case(id_, exc, match, **overrides) -> Case:
    return Case(id_, overrides, exc, match)


def d(fn) -> Derived:
    return Derived(fn)


@dataclass
class Api:
    """A public function, a factory of a valid call (``make(device)`` -> kwargs) and its specifics."""

    name: str
    fn: Callable
    make: Callable[[str], dict]
    family: str | None = None  # op family for the backend matrix; None: no backend argument
    numbers: tuple = ()  # (argument, extra overrides, inf allowed)
    seq_ok: tuple = ()  # arguments that legitimately accept a Python sequence
    ref: str | None = None  # the tensor whose device decides the backend (default: the first argument)
    cases: list = field(default_factory=list)

    def good(self, device: str, backend: str | None) -> dict:
        kw = self.make(device)
        if self.family is not None and backend is not None:
            kw["backend"] = backend
        return kw

    def call(self, kw: dict):
        return self.fn(**kw)

    @property
    def first(self) -> str:
        return self.ref or next(iter(inspect.signature(self.fn).parameters))


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- valid calls ---------------------------------------------------------------------------------


def _token(device):
    g = _gen()
    return dict(logits=torch.randn(2, 3, 11, generator=g).to(device), ids=torch.randint(0, 11, (2, 3), generator=g).to(device),
                temperature=0.7)  # fmt: skip


def _token_all(device):
    """A token_stats call asking for every output (the extended kernels)."""
    return {**_token(device), "outputs": ("logprob", "entropy", "sum_p2", "argmax", "mean_logit")}


def _linear(device):
    g = _gen()
    return dict(hidden=torch.randn(2, 3, 8, generator=g).to(device), weight=torch.randn(11, 8, generator=g).to(device),
                ids=torch.randint(0, 11, (2, 3), generator=g).to(device), bias=torch.randn(11, generator=g).to(device),
                temperature=0.7, chunk_size=16)  # fmt: skip


def _linear_all(device):
    """A linear_token_stats call asking for every output, through a logit scale and a soft cap."""
    return {**_linear(device), "outputs": ("logprob", "entropy", "sum_p2", "argmax", "mean_logit"),
            "logit_scale": 0.5, "softcap": 6.0}  # fmt: skip


def _linear_cases():
    """The bad inputs of an op on the last hidden state (linear_logprobs_entropy, linear_token_stats)."""
    return [
        case("hidden_int", TypeError, "hidden", hidden=d(lambda kw: kw["hidden"].long())),
        case("weight_shape", ValueError, "weight", weight=d(lambda kw: kw["weight"][:, :7])),
        case("weight_1d", ValueError, "weight", weight=d(lambda kw: kw["weight"][0])),
        case("weight_no_rows", ValueError, "weight", weight=d(lambda kw: kw["weight"][:0]), bias=None),
        case("weight_dtype", TypeError, "weight", weight=d(lambda kw: kw["weight"].half())),
        case("bias_shape", ValueError, "bias", bias=d(lambda kw: kw["bias"][:10])),
        case("bias_dtype", TypeError, "bias", bias=d(lambda kw: kw["bias"].half())),
        case("ids_float", TypeError, "ids", ids=d(lambda kw: kw["ids"].float())),
        case("ids_shape", ValueError, "ids", ids=d(lambda kw: kw["ids"][0])),
        case("ids_too_large", ValueError, "ids", ids=d(lambda kw: kw["ids"].clone().fill_(11))),
        case("ids_negative", ValueError, "ids", ids=d(lambda kw: kw["ids"].clone().fill_(-7))),
        case("chunk_size_zero", ValueError, "chunk_size", chunk_size=0),
        case("chunk_size_float", (TypeError, ValueError), "chunk_size", chunk_size=16.0),
        case("temperature_zero", ValueError, "temperature", temperature=0),
        case("ignore_index_float", TypeError, "ignore_index", ignore_index=-1.5),
    ]  # fmt: skip


def _policy(device):
    g = _gen()
    lp = -torch.rand(3, 6, generator=g)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, 4:] = False
    return dict(
        logprobs=lp.to(device), old_logprobs=(lp + 0.1 * torch.randn(3, 6, generator=g)).to(device),
        advantages=torch.randn(3, generator=g).to(device), mask=mask.to(device),
        ref_logprobs=(lp + 0.2 * torch.randn(3, 6, generator=g)).to(device), kl_coef=0.1,
        entropy=torch.rand(3, 6, generator=g).to(device), entropy_coef=0.01,
        importance_weights=(torch.rand(3, 6, generator=g) + 0.5).to(device), clip_dual=3.0,
    )  # fmt: skip


def _kl(device):
    g = _gen()
    lp = -torch.rand(3, 5, generator=g)
    return dict(logprobs=lp.to(device), ref_logprobs=(lp + torch.randn(3, 5, generator=g)).to(device), estimator="k3")


def _from_logits(device):
    g = _gen()
    return dict(
        logits=torch.randn(2, 4, 9, generator=g).to(device), ids=torch.randint(0, 9, (2, 4), generator=g).to(device),
        old_logprobs=(-torch.rand(2, 4, generator=g) * 3).to(device), advantages=torch.randn(2, generator=g).to(device),
        mask=torch.ones(2, 4, dtype=torch.bool).to(device), temperature=0.9,
    )  # fmt: skip


def _advantages(device):
    g = _gen()
    return dict(rewards=torch.randn(6, generator=g).to(device), groups=torch.tensor([4, 1, 4, 1, 9, 9]).to(device),
                mask=torch.ones(6, 5, dtype=torch.bool).to(device))  # fmt: skip


def _group_stats(device):
    g = _gen()
    return dict(values=torch.randn(6, 2, generator=g).to(device), groups=torch.tensor([4, 1, 4, 1, 9, 9]).to(device),
                where=torch.ones(6, 3, dtype=torch.bool).to(device), mask=torch.ones(6, 5, dtype=torch.bool).to(device))  # fmt: skip


DELIM = [5, 6]


def _phase_ids():
    ids = torch.tensor([[1, 2, 5, 6, 3, 4, 2], [5, 6, 1, 1, 1, 0, 0]])
    return ids, torch.tensor([[1] * 7, [1] * 5 + [0, 0]], dtype=torch.bool)


def _phase(device, name="values"):
    ids, mask = _phase_ids()
    return {name: torch.rand(2, 7, generator=_gen()).to(device), "ids": ids.to(device), "mask": mask.to(device),
            "delimiter": DELIM}  # fmt: skip


def _token_phases(device):
    ids, mask = _phase_ids()
    return dict(logits=torch.randn(2, 7, 8, generator=_gen()).to(device), ids=ids.to(device), mask=mask.to(device),
                delimiter=DELIM, temperature=0.8)  # fmt: skip


def _sequence(device):
    _, mask = _phase_ids()
    return dict(entropy=torch.rand(2, 7, generator=_gen()).to(device), mask=mask.to(device), threshold=0.5,
                top_entropy_quantile=0.2)  # fmt: skip


GROUPS = [0, 0, 0, 1, 1, 1, 2, 2]


def _rollouts(device, **extra):
    g = _gen()
    correct = torch.tensor([1, 0, 1, 1, 1, 1, 0, 0], dtype=torch.bool)
    lengths = torch.randint(1, 9, (8,), generator=g)
    return dict(correct=correct.to(device), lengths=lengths.to(device), **extra)


def _history(device):
    h = shaping.HAPOHistory(5, device=device)
    h.min_length[:3] = torch.tensor([4.0, 6.0, 2.0], device=device)
    return h


def _hapo(device):
    return dict(**_rollouts(device), prompt_ids=torch.tensor([0, 0, 1, 1, 2, 3, 4, 4]).to(device), history=_history(device))


def _hapo_update(device):
    kw = _hapo(device)
    history = kw.pop("history")
    return dict(history=history, **kw)


def _update(history, **kw):
    history.update(**kw)
    return history.min_length


def _canon(device):
    g = _gen()
    return dict(rewards=torch.randn(8, generator=g).to(device), groups=torch.tensor(GROUPS).to(device),
                metric=torch.rand(8, generator=g).to(device))  # fmt: skip


def _pear(device):
    g = _gen()
    return dict(correct=torch.tensor([1, 0, 1, 1]).to(device), think_entropy=torch.rand(4, generator=g).to(device),
                answer_entropy=torch.rand(4, generator=g).to(device))  # fmt: skip


def _ceeh(device):
    g = _gen()
    return dict(advantages=torch.randn(4, 5, generator=g).to(device), entropy=torch.rand(4, 5, generator=g).to(device),
                difficulty=torch.rand(4, generator=g).to(device))  # fmt: skip


def _groups_cases(name="groups"):
    """The same checks for every argument that takes group ids or a group size (8 responses)."""

    def as_float(kw):
        return kw[name].float() if torch.is_tensor(kw[name]) else torch.zeros(8)

    return [
        case(f"{name}_float", TypeError, name, **{name: d(as_float)}),
        case(f"{name}_bool", TypeError, name, **{name: True}),
        case(f"{name}_str", TypeError, name, **{name: "uid"}),
        case(f"{name}_size_zero", ValueError, name, **{name: 0}),
        case(f"{name}_size_not_dividing", ValueError, name, **{name: 5}),
        case(f"{name}_shape", ValueError, name, **{name: d(lambda kw: torch.zeros(3, dtype=torch.long, device=_device(kw)))}),
    ]


def _one_token(mask: torch.Tensor) -> torch.Tensor:
    """A mask with a single valid token in the whole batch."""
    out = torch.zeros_like(mask)
    out[0, 0] = True
    return out


def _device(kw) -> torch.device:
    return next(v for v in kw.values() if torch.is_tensor(v)).device


def _length_cases():
    return [
        case("neither_lengths_nor_mask", ValueError, "lengths", lengths=None),
        case("both_lengths_and_mask", ValueError, "lengths", mask=d(lambda kw: torch.ones(8, 3, device=_device(kw)))),
        case("lengths_shape", ValueError, "lengths", lengths=d(lambda kw: kw["lengths"][:5])),
        case("mask_shape", ValueError, "mask", lengths=None, mask=d(lambda kw: torch.ones(7, 3, device=_device(kw)))),
        case("correct_2d", ValueError, "correct", correct=d(lambda kw: kw["correct"].reshape(2, 4))),
    ]


def _cov(device):
    """A cov_select call (clip_cov, its own generator) where the band holds candidates."""
    g = _gen()
    lp = -torch.rand(4, 9, generator=g) * 3
    return dict(logprobs=lp.to(device), advantages=torch.randn(4, 9, generator=g).to(device),
                mask=(torch.rand(4, 9, generator=g) > 0.3).float().to(device), method="clip_cov", ratio=0.2, lb=-1.0,
                ub=5.0, old_logprobs=(lp + 0.1 * torch.randn(4, 9, generator=g)).to(device), clip_low=0.2,
                clip_high=0.28, generator=_gen(1))  # fmt: skip


def _rollout_corr(device):
    g = _gen()
    old = -torch.rand(3, 6, generator=g) * 2
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False
    return dict(old_logprobs=old.to(device), rollout_logprobs=(old + 0.3 * torch.randn(3, 6, generator=g)).to(device),
                mask=mask.to(device), mode="mask", threshold=2.0, threshold_low=0.5, veto=(0.05, 20.0))


def _packed_corr(**extra):
    """Overrides turning the padded rollout_correction call into a packed one (18 tokens)."""
    flat = {k: d(lambda kw, k=k: kw[k].reshape(-1)) for k in ("old_logprobs", "rollout_logprobs", "mask")}
    return {**flat, **extra}

# fmt: off
# the checks of logits, ids and temperature that both token ops make
_TOKEN_CASES = [
    case("logits_int", TypeError, "logits", logits=d(lambda kw: kw["logits"].long())),
    case("empty_vocab", ValueError, "vocabulary", logits=d(lambda kw: kw["logits"][..., :0])),
    case("ids_float", TypeError, "ids", ids=d(lambda kw: kw["ids"].float())),
    case("ids_shape", ValueError, "ids", ids=d(lambda kw: kw["ids"][:, :2])),
    case("ids_too_large", ValueError, "ids", ids=d(lambda kw: kw["ids"].clone().fill_(11))),
    case("ids_negative", ValueError, "ids", ids=d(lambda kw: kw["ids"].clone().fill_(-1))),
    case("temperature_zero", ValueError, "temperature", temperature=0.0),
]

def _sparse_ids(kw, width=3, fill=0, dtype=torch.long):
    """``[*ids.shape, width]`` ids for gather_ids / kept_ids (the ids themselves, so kept sets hold them)."""
    ids = kw["ids"]
    out = ids.unsqueeze(-1).expand(*ids.shape, width).clone() if fill is None else torch.full_like(ids, fill).unsqueeze(-1).expand(*ids.shape, width).clone()
    return out.to(dtype)


# the sparse parameters of token_stats / linear_token_stats (SPEC 7: top-k, gathered, kept set)
_SPARSE_CASES = [
    case("top_k_negative", ValueError, "top_k", outputs=("topk",), top_k=-1),
    case("top_k_past_vocab", ValueError, "top_k", outputs=("topk",), top_k=12),
    case("top_k_float", TypeError, "top_k", outputs=("topk",), top_k=2.0),
    case("topk_without_top_k", ValueError, "top_k", outputs=("topk",)),
    case("top_k_without_topk", ValueError, "topk", top_k=2),
    case("gathered_without_gather_ids", ValueError, "gather_ids", outputs=("gathered",)),
    case("gather_ids_float", TypeError, "gather_ids", outputs=("gathered",), gather_ids=d(lambda kw: _sparse_ids(kw, dtype=torch.float32))),
    case("gather_ids_shape", ValueError, "gather_ids", outputs=("gathered",), gather_ids=d(lambda kw: _sparse_ids(kw)[0])),
    case("gather_ids_too_large", ValueError, "gather_ids", outputs=("gathered",), gather_ids=d(lambda kw: _sparse_ids(kw, fill=11))),
    case("gather_ids_negative", ValueError, "gather_ids", outputs=("gathered",), gather_ids=d(lambda kw: _sparse_ids(kw, fill=-2))),
    case("gather_ids_on_meta", ValueError, "gather_ids", outputs=("gathered",), gather_ids=d(lambda kw: _sparse_ids(kw).to("meta"))),
    case("kept_ids_and_sampling", ValueError, "sampling", outputs=("kept",), kept_ids=d(lambda kw: _sparse_ids(kw, fill=None)),
         sampling={"top_k": 2}),
    case("kept_ids_empty", ValueError, "kept_ids", outputs=("kept",), kept_ids=d(lambda kw: _sparse_ids(kw, width=0))),
    case("kept_without_set", ValueError, "kept", outputs=("kept",)),
    case("sampling_not_dict", TypeError, "sampling", outputs=("kept",), sampling=[("top_k", 2)]),
    case("sampling_unknown_key", ValueError, "sampling", outputs=("kept",), sampling={"top_n": 2}),
    case("sampling_top_p_zero", ValueError, "top_p", outputs=("kept",), sampling={"top_p": 0.0}),
    case("sampling_top_p_nan", ValueError, "top_p", outputs=("kept",), sampling={"top_p": NAN}),
    case("sampling_min_p_negative", ValueError, "min_p", outputs=("kept",), sampling={"min_p": -0.5}),
    case("sampling_top_k_negative", ValueError, "top_k", outputs=("kept",), sampling={"top_k": -3}),
]

APIS = [
    Api("token_logprobs_entropy", lk.token_logprobs_entropy, _token, "token_stats",
        numbers=(("temperature", {}, False),), cases=[
            *_TOKEN_CASES,
            case("logits_0d", ValueError, "logits", logits=d(lambda kw: kw["logits"][0, 0, 0])),
            case("temperature_negative", ValueError, "temperature", temperature=-0.5),
            case("temperature_shape", ValueError, "temperature", temperature=d(lambda kw: torch.ones(4, device=_device(kw)))),
            case("temperature_int_tensor", TypeError, "temperature", temperature=d(lambda kw: torch.ones(2, 3, dtype=torch.long,
                                                                                            device=_device(kw)))),
            case("temperature_tensor_nan", ValueError, "temperature",
                 temperature=d(lambda kw: torch.tensor([[1.0], [NAN]], device=_device(kw)))),
            case("temperature_tensor_zero", ValueError, "temperature",
                 temperature=d(lambda kw: torch.tensor([[1.0], [0.0]], device=_device(kw)))),
            case("ignore_index_float", TypeError, "ignore_index", ignore_index=-100.0),
            case("ignore_index_str", TypeError, "ignore_index", ignore_index="-100"),
        ]),
    Api("token_stats", lk.token_stats, _token_all, "token_stats", numbers=(("temperature", {}, False),),
        seq_ok=("outputs",), cases=[
            *_TOKEN_CASES,
            case("ignore_index_float", TypeError, "ignore_index", ignore_index=-100.0),
            case("outputs_unknown", ValueError, "output", outputs=("logprob", "nope")),
            case("outputs_empty", ValueError, "outputs", outputs=()),
            case("outputs_str", TypeError, "outputs", outputs="sum_p2"),
            case("process_group_object", TypeError, "process_group", process_group=object()),
            *_SPARSE_CASES,
        ]),
    Api("token_logprobs", lk.token_logprobs, _token, "token_stats", cases=[
        case("ids_too_large", ValueError, "ids", ids=d(lambda kw: kw["ids"].clone().fill_(11))),
        case("temperature_nan", ValueError, "temperature", temperature=NAN),
    ]),
    Api("token_entropy", lk.token_entropy, _token, "token_stats", cases=[
        case("ids_shape", ValueError, "ids", ids=d(lambda kw: kw["ids"][:1])),
        case("temperature_inf", ValueError, "temperature", temperature=INF),
        case("logits_float64", TypeError, "logits", logits=d(lambda kw: kw["logits"].double()),
             backend=d(lambda kw: "cpu" if kw.get("backend") in (None, "reference") else kw["backend"])),
    ]),
    Api("linear_logprobs_entropy", lk.linear_logprobs_entropy, _linear, "linear_stats",
        numbers=(("temperature", {}, False),), cases=_linear_cases()),
    Api("linear_token_stats", lk.linear_token_stats, _linear_all, "token_stats_extra",
        numbers=(("temperature", {}, False), ("logit_scale", {}, False), ("softcap", {}, False)), cases=[
            *_linear_cases(),
            case("softcap_zero", ValueError, "softcap", softcap=0.0),
            case("outputs_str", TypeError, "outputs", outputs="logprob"),
            case("outputs_unknown", ValueError, "outputs", outputs=("logprob", "nope")),
            case("compute_dtype", TypeError, "compute_dtype", compute_dtype=torch.int32),
            *_SPARSE_CASES,
        ]),
    Api("policy_loss", lk.policy_loss, _policy, "policy_loss",
        numbers=(("clip_low", {}, False), ("clip_high", {}, False), ("clip_dual", {}, False), ("tau_pos", {}, False),
                 ("tau_neg", {}, False), ("kl_coef", {}, False), ("entropy_coef", {}, False),
                 ("top_entropy_quantile", {}, False), ("entropy_threshold", {}, False),
                 ("num_tokens", {}, False), ("num_seqs", {"agg": "seq-mean-token-mean"}, False),
                 ("norm_length", {"agg": "seq-mean-token-sum-norm"}, False)),
        cases=[
            case("empty_batch", ValueError, "empty", **{k: d(lambda kw, k=k: kw[k][:0]) for k in
                 ("logprobs", "old_logprobs", "advantages", "mask", "ref_logprobs", "entropy", "importance_weights")}),
            case("empty_rows", ValueError, "empty", **{k: d(lambda kw, k=k: kw[k][:, :0]) for k in
                 ("logprobs", "old_logprobs", "mask", "ref_logprobs", "entropy", "importance_weights")}),
            case("logprobs_int", TypeError, "logprobs", logprobs=d(lambda kw: kw["logprobs"].long())),
            case("logprobs_3d", ValueError, "logprobs", logprobs=d(lambda kw: kw["logprobs"][None])),
            case("old_logprobs_shape", ValueError, "old_logprobs", old_logprobs=d(lambda kw: kw["old_logprobs"][:, 1:])),
            case("advantages_shape", ValueError, "advantages", advantages=d(lambda kw: kw["advantages"][:2])),
            case("advantages_int", TypeError, "advantages", advantages=d(lambda kw: kw["advantages"].long())),
            case("mask_shape", ValueError, "mask", mask=d(lambda kw: kw["mask"][:2])),
            case("mask_not_binary", ValueError, "mask", mask=d(lambda kw: kw["mask"].float() * 0.5)),
            case("ref_logprobs_shape", ValueError, "ref_logprobs", ref_logprobs=d(lambda kw: kw["ref_logprobs"].t())),
            case("ref_logprobs_missing", ValueError, "ref_logprobs", ref_logprobs=None),
            case("entropy_missing", ValueError, "entropy", entropy=None),
            case("entropy_shape", ValueError, "entropy", entropy=d(lambda kw: kw["entropy"][:, :2])),
            case("importance_weights_shape", ValueError, "importance_weights",
                 importance_weights=d(lambda kw: kw["importance_weights"][0])),
            case("mode", ValueError, "mode", mode="trpo"),
            case("agg", ValueError, "agg", agg="mean"),
            case("kl_estimator", ValueError, "kl_estimator", kl_estimator="k4"),
            case("kl_estimator_type", TypeError, "kl_estimator", kl_estimator=3),
            case("kl_clamp_type", TypeError, "kl_clamp", kl_clamp="yes"),
            case("clip_low_negative", ValueError, "clip_low", clip_low=-0.1),
            case("clip_low_above_one", ValueError, "clip_low", clip_low=1.2),
            case("clip_dual_below_one", ValueError, "clip_dual", clip_dual=0.5),
            case("clip_dual_wrong_mode", ValueError, "clip_dual", mode="cispo"),
            case("tau_zero", ValueError, "tau_pos", tau_pos=0.0),
            case("quantile_above_one", ValueError, "top_entropy_quantile", top_entropy_quantile=1.5),
            case("quantile_zero", ValueError, "top_entropy_quantile", top_entropy_quantile=0.0),
            case("entropy_threshold_shape", ValueError, "entropy_threshold",
                 entropy_threshold=d(lambda kw: torch.ones(2, device=_device(kw)))),
            case("num_tokens_wrong_agg", ValueError, "num_tokens", num_tokens=10, agg="token-sum"),
            case("num_seqs_wrong_agg", ValueError, "num_seqs", num_seqs=3),
            case("num_tokens_zero", ValueError, "num_tokens", num_tokens=0),
            case("num_tokens_tensor_zero", ValueError, "num_tokens", num_tokens=d(lambda kw: torch.zeros(1, device=_device(kw)))),
            case("num_tokens_tensor_shape", ValueError, "num_tokens", num_tokens=d(lambda kw: torch.ones(2, device=_device(kw)))),
            case("norm_length_wrong_agg", ValueError, "norm_length", norm_length=100),
            case("dp_size_zero", ValueError, "dp_size", dp_size=0),
            case("dp_size_float", (TypeError, ValueError), "dp_size", dp_size=2.0),
            case("cu_seqlens_with_padded", ValueError, "logprobs", cu_seqlens=d(lambda kw: torch.tensor([0, 18], device=_device(kw)))),
            case("cu_seqlens_float", TypeError, "cu_seqlens", **{k: d(lambda kw, k=k: kw[k].reshape(-1)) for k in
                 ("logprobs", "old_logprobs", "mask", "ref_logprobs", "entropy", "importance_weights")},
                 cu_seqlens=d(lambda kw: torch.tensor([0.0, 6.0, 18.0], device=_device(kw))),
                 advantages=d(lambda kw: kw["advantages"][:2])),
            case("cu_seqlens_decreasing", ValueError, "cu_seqlens", **{k: d(lambda kw, k=k: kw[k].reshape(-1)) for k in
                 ("logprobs", "old_logprobs", "mask", "ref_logprobs", "entropy", "importance_weights")},
                 cu_seqlens=d(lambda kw: torch.tensor([0, 9, 6, 18], device=_device(kw)))),
            case("cu_seqlens_past_end", ValueError, "cu_seqlens", **{k: d(lambda kw, k=k: kw[k].reshape(-1)) for k in
                 ("logprobs", "old_logprobs", "mask", "ref_logprobs", "entropy", "importance_weights")},
                 cu_seqlens=d(lambda kw: torch.tensor([0, 9, 12, 19], device=_device(kw)))),
            case("packed_norm_length_missing", ValueError, "norm_length", **{k: d(lambda kw, k=k: kw[k].reshape(-1)) for k in
                 ("logprobs", "old_logprobs", "mask", "ref_logprobs", "entropy", "importance_weights")},
                 cu_seqlens=d(lambda kw: torch.tensor([0, 9, 12, 18], device=_device(kw))), agg="seq-mean-token-sum-norm"),
        ]),
    Api("kl_penalty", lk.kl_penalty, _kl, "policy_loss", cases=[
        case("ref_logprobs_shape", ValueError, "ref_logprobs", ref_logprobs=d(lambda kw: kw["ref_logprobs"][:2])),
        case("logprobs_int", TypeError, "logprobs", logprobs=d(lambda kw: kw["logprobs"].long())),
        case("estimator", ValueError, "kl_estimator", estimator="k7"),
        case("estimator_type", TypeError, "kl_estimator", estimator=None),
        case("clamp_type", TypeError, "clamp", clamp=1),
    ]),
    Api("policy_loss_from_logits", lk.policy_loss_from_logits, _from_logits, "policy_loss",
        numbers=(("temperature", {}, False), ("clip_low", {}, False)), cases=[
            case("entropy_given", TypeError, "entropy", entropy=d(lambda kw: kw["old_logprobs"])),
            case("ids_too_large", ValueError, "ids", ids=d(lambda kw: kw["ids"].clone().fill_(9))),
            case("ids_shape", ValueError, "ids", ids=d(lambda kw: kw["ids"][:, :3])),
            case("old_logprobs_shape", ValueError, "old_logprobs", old_logprobs=d(lambda kw: kw["old_logprobs"][:1])),
            case("mode", ValueError, "mode", mode="dpo"),
            case("unknown_argument", TypeError, "colour", colour="red"),
        ]),
    Api("group_advantages", lk.group_advantages, _advantages, "advantages", numbers=(("eps", {}, False),), cases=[
        *[c for c in _groups_cases() if c.id != "groups_size_not_dividing"],
        case("groups_size_not_dividing", ValueError, "groups", groups=4),
        case("rewards_int", TypeError, "rewards", rewards=d(lambda kw: kw["rewards"].long())),
        case("rewards_3d", ValueError, "rewards", rewards=d(lambda kw: kw["rewards"].reshape(6, 1, 1)),
             mask=None),
        case("rewards_0d", ValueError, "rewards", rewards=d(lambda kw: kw["rewards"][0])),
        case("method", ValueError, "method", method="ppo"),
        case("eps_negative", ValueError, "eps", eps=-1e-6),
        case("mask_shape", ValueError, "mask", mask=d(lambda kw: kw["mask"][:5])),
        case("mask_1d", ValueError, "mask", mask=d(lambda kw: kw["mask"][:, 0])),
        case("token_rewards_mask_shape", ValueError, "mask", rewards=d(lambda kw: torch.randn(6, 4, device=_device(kw)))),
        case("lengths_shape", ValueError, "lengths", lengths=d(lambda kw: torch.ones(5, device=_device(kw)))),
        case("lengths_negative", ValueError, "lengths", lengths=d(lambda kw: -torch.ones(6, device=_device(kw)))),
        case("opo_needs_lengths", ValueError, "opo", method="opo", mask=None),
        case("task_ids_wrong_method", ValueError, "task_ids", task_ids=d(lambda kw: kw["groups"])),
        case("task_ids_shape", ValueError, "task_ids", method="gaussian", task_ids=d(lambda kw: kw["groups"][:3])),
        case("batch_of_one", ValueError, "two", method="batch", rewards=d(lambda kw: kw["rewards"][:1]), groups=1,
             mask=None),
        case("rpp_one_token", ValueError, "reinforce_pp_baseline", method="reinforce_pp_baseline",
             mask=d(lambda kw: _one_token(kw["mask"]))),
        case("out_dtype", TypeError, "out", out=d(lambda kw: torch.empty(6, 5, dtype=torch.float64, device=_device(kw)))),
        case("out_shape", ValueError, "out", out=d(lambda kw: torch.empty(6, device=_device(kw)))),
        case("out_stride", ValueError, "out", out=d(lambda kw: torch.empty(5, 6, device=_device(kw)).t())),
        case("rewards_nan", ValueError, "rewards", rewards=d(lambda kw: kw["rewards"].clone().index_fill_(
             0, torch.tensor([2], device=_device(kw)), NAN))),
        case("rewards_inf", ValueError, "rewards", rewards=d(lambda kw: kw["rewards"].clone().index_fill_(
             0, torch.tensor([5], device=_device(kw)), -INF))),
        case("token_rewards_nan", ValueError, "rewards", rewards=d(lambda kw: torch.randn(6, 5, device=_device(kw))
             .index_fill_(1, torch.tensor([3], device=_device(kw)), NAN))),
    ]),
    Api("group_stats", lk.group_stats, _group_stats, "advantages", cases=[
        *[c for c in _groups_cases() if c.id != "groups_size_not_dividing"],
        case("groups_size_not_dividing", ValueError, "groups", groups=4),
        case("values_int", TypeError, "values", values=d(lambda kw: kw["values"].long())),
        case("values_3d", ValueError, "values", values=d(lambda kw: kw["values"][..., None])),
        case("where_shape", ValueError, "where", where=d(lambda kw: kw["where"][:, :2])),
        case("mask_shape", ValueError, "mask", mask=d(lambda kw: kw["mask"][:4])),
    ]),
    Api("phase_stats", lk.phase_stats, _phase, "phase_stats", seq_ok=("delimiter",), ref="ids", cases=[
        case("values_int", TypeError, "values", values=d(lambda kw: kw["values"].long())),
        case("values_shape", ValueError, "values", values=d(lambda kw: kw["values"][:, :5])),
        case("ids_float", TypeError, "ids", ids=d(lambda kw: kw["ids"].float())),
        case("ids_1d_without_cu_seqlens", ValueError, "ids", ids=d(lambda kw: kw["ids"].reshape(-1)),
             values=d(lambda kw: kw["values"].reshape(-1)), mask=None),
        case("mask_shape", ValueError, "mask", mask=d(lambda kw: kw["mask"][:1])),
        case("delimiter_text", TypeError, "delimiter", delimiter="</think>"),
        case("delimiter_empty", ValueError, "delimiter", delimiter=[]),
        case("delimiter_negative", ValueError, "delimiter", delimiter=[5, -1]),
        case("delimiter_float", TypeError, "delimiter", delimiter=[5.0]),
        case("delimiter_bool", TypeError, "delimiter", delimiter=[True]),
        case("delimiter_float_tensor", TypeError, "delimiter", delimiter=torch.tensor([5.0])),
        case("delimiter_2d", ValueError, "delimiter", delimiter=torch.tensor([[5, 6]])),
        case("delimiter_none", TypeError, "delimiter", delimiter=None),
        case("cu_seqlens_float", TypeError, "cu_seqlens", ids=d(lambda kw: kw["ids"].reshape(-1)),
             values=d(lambda kw: kw["values"].reshape(-1)), mask=None,
             cu_seqlens=d(lambda kw: torch.tensor([0.0, 14.0], device=_device(kw)))),
        case("cu_seqlens_decreasing", ValueError, "cu_seqlens", ids=d(lambda kw: kw["ids"].reshape(-1)),
             values=d(lambda kw: kw["values"].reshape(-1)), mask=None,
             cu_seqlens=d(lambda kw: torch.tensor([0, 9, 3, 14], device=_device(kw)))),
        case("cu_seqlens_past_end", ValueError, "cu_seqlens", ids=d(lambda kw: kw["ids"].reshape(-1)),
             values=d(lambda kw: kw["values"].reshape(-1)), mask=None,
             cu_seqlens=d(lambda kw: torch.tensor([0, 15], device=_device(kw)))),
        case("cu_seqlens_with_padded", ValueError, "ids", cu_seqlens=d(lambda kw: torch.tensor([0, 14], device=_device(kw)))),
    ]),
    Api("phase_entropy", lk.phase_entropy, lambda dev: _phase(dev, "entropy"), "phase_stats", seq_ok=("delimiter",),
        ref="ids", cases=[
            case("entropy_int", TypeError, "entropy", entropy=d(lambda kw: kw["entropy"].long())),
            case("entropy_shape", ValueError, "entropy", entropy=d(lambda kw: kw["entropy"][:1])),
            case("delimiter_text", TypeError, "delimiter", delimiter="</think>"),
        ]),
    Api("token_stats_with_phases", lk.token_stats_with_phases, _token_phases, "phase_stats", seq_ok=("delimiter",),
        numbers=(("temperature", {}, False),), cases=[
            case("ids_too_large", ValueError, "ids", ids=d(lambda kw: kw["ids"].clone().fill_(8))),
            case("logits_int", TypeError, "logits", logits=d(lambda kw: kw["logits"].long())),
            case("mask_shape", ValueError, "mask", mask=d(lambda kw: kw["mask"][:, :3])),
            case("delimiter_empty", ValueError, "delimiter", delimiter=()),
        ]),
    Api("sequence_stats", lk.sequence_stats, _sequence, "phase_stats",
        numbers=(("threshold", {}, True), ("top_entropy_quantile", {}, False)), cases=[
            case("entropy_int", TypeError, "entropy", entropy=d(lambda kw: kw["entropy"].long())),
            case("mask_shape", ValueError, "mask", mask=d(lambda kw: kw["mask"][:, :2])),
            case("quantile_above_one", ValueError, "top_entropy_quantile", top_entropy_quantile=1.01),
            case("quantile_negative", ValueError, "top_entropy_quantile", top_entropy_quantile=-0.1),
            case("process_group_without_quantile", ValueError, "process_group", top_entropy_quantile=None,
                 process_group=object()),
            case("entropy_1d_without_cu_seqlens", ValueError, "entropy", entropy=d(lambda kw: kw["entropy"].reshape(-1)),
                 mask=None),
        ]),
    Api("rollout_correction", lk.rollout_correction, _rollout_corr, "rollout_correction",
        numbers=(("threshold", {}, True), ("threshold_low", {}, False), ("log_clamp", {}, True)), cases=[
            case("old_logprobs_int", TypeError, "old_logprobs", old_logprobs=d(lambda kw: kw["old_logprobs"].long())),
            case("rollout_logprobs_shape", ValueError, "rollout_logprobs",
                 rollout_logprobs=d(lambda kw: kw["rollout_logprobs"][:, :3])),
            case("mask_shape", ValueError, "mask", mask=d(lambda kw: kw["mask"][:1])),
            case("mask_not_binary", ValueError, "mask", mask=d(lambda kw: kw["mask"].float() * 0.5)),
            case("level", ValueError, "level", level="batch"),
            case("mode", ValueError, "mode", mode="clip"),
            case("threshold_zero", ValueError, "threshold", threshold=0.0),
            case("threshold_low_above_threshold", ValueError, "threshold_low", threshold_low=3.0),
            case("threshold_low_negative", ValueError, "threshold_low", threshold_low=-0.1),
            case("veto_number", TypeError, "veto", veto=0.5),
            case("veto_order", ValueError, "veto", veto=(2.0, 0.5)),
            case("veto_nan", ValueError, "veto", veto=(NAN, 2.0)),
            case("veto_str", TypeError, "veto", veto=("0.1", 2.0)),
            case("log_clamp_zero", ValueError, "log_clamp", log_clamp=0.0),
            case("empty_batch", ValueError, "empty", **{k: d(lambda kw, k=k: kw[k][:0]) for k in
                 ("old_logprobs", "rollout_logprobs", "mask")}),
            case("old_logprobs_1d_without_cu_seqlens", ValueError, "old_logprobs", **_packed_corr()),
            case("cu_seqlens_with_padded", ValueError, "old_logprobs",
                 cu_seqlens=d(lambda kw: torch.tensor([0, 18], device=_device(kw)))),
            case("cu_seqlens_float", TypeError, "cu_seqlens",
                 **_packed_corr(cu_seqlens=d(lambda kw: torch.tensor([0.0, 6.0, 18.0], device=_device(kw))))),
            case("cu_seqlens_decreasing", ValueError, "cu_seqlens",
                 **_packed_corr(cu_seqlens=d(lambda kw: torch.tensor([0, 9, 6, 18], device=_device(kw))))),
            case("cu_seqlens_past_end", ValueError, "cu_seqlens",
                 **_packed_corr(cu_seqlens=d(lambda kw: torch.tensor([0, 9, 19], device=_device(kw))))),
        ]),
    Api("cov_select", lk.cov_select, _cov,
        numbers=(("ratio", {}, False), ("lb", {}, True), ("ub", {}, True), ("clip_low", {}, False),
                 ("clip_high", {}, False)), cases=[
            case("logprobs_int", TypeError, "logprobs", logprobs=d(lambda kw: kw["logprobs"].long())),
            case("advantages_shape", ValueError, "advantages", advantages=d(lambda kw: kw["advantages"][:, :3])),
            case("mask_shape", ValueError, "mask", mask=d(lambda kw: kw["mask"][:2])),
            case("mask_not_binary", ValueError, "mask", mask=d(lambda kw: kw["mask"] * 0.5)),
            case("method", ValueError, "method", method="top_cov"),
            case("ratio_zero", ValueError, "ratio", ratio=0.0),
            case("kl_cov_ratio_above_one", ValueError, "ratio", method="kl_cov", ratio=1.5),
            case("old_logprobs_missing", ValueError, "old_logprobs", old_logprobs=None),
            case("old_logprobs_shape", ValueError, "old_logprobs", old_logprobs=d(lambda kw: kw["old_logprobs"][:3])),
            case("clip_low_above_one", ValueError, "clip_low", clip_low=1.5),
            case("generator_seed", TypeError, "generator", generator=7),
        ]),
    Api("explain_backend", lk.explain_backend, lambda dev: dict(family="token_stats", device=dev), cases=[
        case("device_unknown", (ValueError, TypeError, RuntimeError), "tpu", device="tpu"),
    ]),
    # --- lenkernels.shaping ---
    Api("laser", shaping.laser, lambda dev: _rollouts(dev, target_length=4),
        numbers=(("target_length", {}, False), ("alpha", {}, False)), cases=[
            *_length_cases(),
            case("mode", ValueError, "mode", mode="soft"),
            case("target_length_shape", ValueError, "target_length", target_length=d(lambda kw: torch.ones(3, device=_device(kw)))),
            case("score_shape", ValueError, "score", score=d(lambda kw: torch.ones(3, device=_device(kw)))),
            case("score_str", TypeError, "score", score="1"),
        ]),
    Api("laser_d", shaping.laser_d, lambda dev: _rollouts(dev, groups=torch.tensor(GROUPS).to(dev), target_lengths=(3, 5, 7)),
        family="advantages", numbers=(("alpha", {}, False),), seq_ok=("target_lengths",), cases=[
            *_length_cases(), *_groups_cases(),
            case("target_lengths_two", ValueError, "target_lengths", target_lengths=(3, 5)),
            case("target_lengths_nan", ValueError, "target_lengths", target_lengths=(3, NAN, 5)),
            case("target_lengths_tensor_shape", ValueError, "target_lengths",
                 target_lengths=d(lambda kw: torch.ones(2, device=_device(kw)))),
            case("mode", ValueError, "mode", mode="soft"),
        ]),
    Api("laser_d_targets", shaping.laser_d_targets, lambda dev: _rollouts(dev, groups=4, grid=[2, 4, 6]),
        family="advantages", seq_ok=("grid",), cases=[
            *[c for c in _length_cases() if c.id != "both_lengths_and_mask"],
            *[c._replace(overrides={**c.overrides, "rollouts": 4}) for c in _groups_cases()
              if c.id not in ("groups_size_not_dividing", "groups_shape", "groups_float")],
            case("grid_empty", ValueError, "grid", grid=[]),
            case("grid_text", TypeError, "grid", grid=["4"]),
            case("grid_nan", ValueError, "grid", grid=[2, NAN]),
            case("grid_2d", ValueError, "grid", grid=d(lambda kw: torch.ones(2, 2, device=_device(kw)))),
            case("rollouts_needed", ValueError, "rollouts", groups=d(lambda kw: torch.tensor(GROUPS, device=_device(kw)))),
            case("rollouts_zero", ValueError, "rollouts", rollouts=0),
            case("among", ValueError, "among", among="wrong"),
        ]),
    Api("difficulty_buckets", shaping.difficulty_buckets,
        lambda dev: dict(correct=_rollouts(dev)["correct"], groups=torch.tensor(GROUPS).to(dev)), family="advantages",
        cases=[*_groups_cases(), case("correct_2d", ValueError, "correct", correct=d(lambda kw: kw["correct"].reshape(2, 4)))]),
    Api("dler_rewards", shaping.dler_rewards,
        lambda dev: _rollouts(dev, groups=torch.tensor(GROUPS).to(dev), difficulty_aware=True,
                              finished=torch.tensor([1, 1, 0, 1, 1, 1, 1, 0]).to(dev)),
        family="advantages", numbers=(("target_length", {}, False), ("easy_target_length", {}, False)), cases=[
            *_length_cases(), *_groups_cases(),
            case("groups_needed", ValueError, "groups", groups=None),
            case("finished_shape", ValueError, "finished", finished=d(lambda kw: torch.ones(3, device=_device(kw)))),
        ]),
    Api("dler_advantages", shaping.dler_advantages,
        lambda dev: dict(correct=_rollouts(dev)["correct"], groups=torch.tensor(GROUPS).to(dev),
                         mask=(torch.arange(6)[None] < torch.randint(1, 7, (8, 1), generator=_gen())).to(dev)),
        family="advantages", numbers=(("target_length", {}, False),), cases=[
            *_groups_cases(),
            case("mask_shape", ValueError, "mask", mask=d(lambda kw: kw["mask"][:5])),
            case("mask_missing", (ValueError, TypeError), "mask", mask=None),
        ]),
    Api("kimi_length_reward", shaping.kimi_length_reward, lambda dev: _rollouts(dev, groups=torch.tensor(GROUPS).to(dev)),
        family="advantages", numbers=(("weight", {}, False),), cases=[*_length_cases(), *_groups_cases()]),
    Api("dapo_overlong", shaping.dapo_overlong,
        lambda dev: dict(lengths=_rollouts(dev)["lengths"], max_length=8, cache_length=3),
        numbers=(("max_length", {}, False), ("cache_length", {}, False)), cases=[
            case("neither_lengths_nor_mask", ValueError, "lengths", lengths=None),
            case("both_lengths_and_mask", ValueError, "lengths", mask=d(lambda kw: torch.ones(8, 3, device=_device(kw)))),
            case("lengths_2d", ValueError, "lengths", lengths=d(lambda kw: kw["lengths"].reshape(2, 4))),
            case("cache_above_max", ValueError, "cache_length", cache_length=9),
            case("max_length_zero", ValueError, "max_length", max_length=0),
            case("score_shape", ValueError, "score", score=d(lambda kw: torch.ones(3, device=_device(kw)))),
        ]),
    Api("hapo_reward", shaping.hapo_reward, _hapo, numbers=(("clip", {}, False), ("weight", {}, False)), cases=[
        *_length_cases(),
        case("history_type", TypeError, "history", history=None),
        case("prompt_ids_float", TypeError, "prompt_ids", prompt_ids=d(lambda kw: kw["prompt_ids"].float())),
        case("prompt_ids_shape", ValueError, "prompt_ids", prompt_ids=d(lambda kw: kw["prompt_ids"][:3])),
        case("prompt_ids_out_of_range", ValueError, "prompt_ids", prompt_ids=d(lambda kw: kw["prompt_ids"] + 1)),
        case("prompt_ids_negative", ValueError, "prompt_ids", prompt_ids=d(lambda kw: kw["prompt_ids"] - 1)),
    ]),
    Api("HAPOHistory.update", _update, _hapo_update, cases=[
        *[c for c in _length_cases() if c.id != "correct_2d"],
        case("prompt_ids_out_of_range", ValueError, "prompt_ids", prompt_ids=d(lambda kw: kw["prompt_ids"] * 3)),
        case("prompt_ids_float", TypeError, "prompt_ids", prompt_ids=d(lambda kw: kw["prompt_ids"].double())),
    ]),
    Api("HAPOHistory", shaping.HAPOHistory, lambda dev: dict(num_prompts=4, device=dev), cases=[
        case("num_prompts_zero", ValueError, "num_prompts", num_prompts=0),
        case("num_prompts_float", (TypeError, ValueError), "num_prompts", num_prompts=4.0),
        case("num_prompts_bool", (TypeError, ValueError), "num_prompts", num_prompts=True),
    ]),
    Api("grpo_lambda", shaping.grpo_lambda, lambda dev: _rollouts(dev, groups=torch.tensor(GROUPS).to(dev)),
        family="advantages", numbers=(("fraction", {}, False), ("alpha", {}, False)),
        cases=[*_length_cases(), *_groups_cases()]),
    Api("concise_r", shaping.concise_r, lambda dev: _rollouts(dev, groups=torch.tensor(GROUPS).to(dev), max_length=10),
        family="advantages", numbers=(("max_length", {}, False), ("alpha", {}, False)), cases=[
            *_length_cases(), *_groups_cases(), case("max_length_negative", ValueError, "max_length", max_length=-3)]),
    Api("dot_truncation", shaping.dot_truncation, lambda dev: _rollouts(dev, groups=torch.tensor(GROUPS).to(dev)),
        family="advantages", numbers=(("k", {}, False), ("margin", {}, False)),
        cases=[*_length_cases(), *_groups_cases()]),
    Api("canon_advantages", shaping.canon_advantages, _canon, family="advantages", numbers=(("mu", {}, False),), cases=[
        *_groups_cases(),
        case("metric_shape", ValueError, "metric", metric=d(lambda kw: kw["metric"][:7])),
        case("rewards_2d", ValueError, "rewards", rewards=d(lambda kw: kw["rewards"].reshape(2, 4))),
    ]),
    Api("pear_reward", shaping.pear_reward, _pear, numbers=(("alpha", {}, False),), cases=[
        case("think_entropy_shape", ValueError, "think_entropy", think_entropy=d(lambda kw: kw["think_entropy"][:3])),
        case("answer_entropy_shape", ValueError, "answer_entropy", answer_entropy=d(lambda kw: kw["answer_entropy"][None])),
        case("format_reward_shape", ValueError, "format_reward", format_reward=d(lambda kw: torch.ones(2, device=_device(kw)))),
    ]),
    Api("ceeh_advantages", shaping.ceeh_advantages, _ceeh,
        numbers=(("alpha", {}, False), ("kappa", {}, False), ("scale", {}, False)), cases=[
            case("entropy_shape", ValueError, "entropy", entropy=d(lambda kw: kw["entropy"][:, :2])),
            case("difficulty_shape", ValueError, "difficulty", difficulty=d(lambda kw: kw["difficulty"][:3])),
            case("kappa_zero", ValueError, "kappa", kappa=0.0),
            case("advantages_0d", ValueError, "advantages", advantages=d(lambda kw: kw["advantages"][0, 0])),
        ]),
]
# fmt: on


# --- generic sweeps -------------------------------------------------------------------------------


def _type_mutations(api: Api) -> list[Case]:
    """Every tensor argument given as a nested list: TypeError naming it."""
    kw = api.make("cpu")
    return [case(f"{name}_as_list", TypeError, name, **{name: v.tolist()})
            for name, v in kw.items() if torch.is_tensor(v) and name not in api.seq_ok]  # fmt: skip


def _device_mutations(api: Api) -> list[Case]:
    """Every tensor argument but the first on another device (meta): ValueError naming it."""
    kw = api.make("cpu")
    return [case(f"{name}_on_meta", ValueError, name, **{name: v.to("meta")})
            for name, v in kw.items() if torch.is_tensor(v) and name != api.first]  # fmt: skip


def _dtype_mutations(api: Api) -> list[Case]:
    """Every floating tensor argument as complex: TypeError naming it."""
    kw = api.make("cpu")
    return [case(f"{name}_complex", TypeError, name, **{name: v.to(torch.complex64)})
            for name, v in kw.items() if torch.is_tensor(v) and v.is_floating_point()]  # fmt: skip


def _number_mutations(api: Api) -> list[Case]:
    """Every number argument as a string (TypeError/ValueError), NaN and inf (ValueError), naming it."""
    out = []
    for name, extra, inf_ok in api.numbers:
        out.append(case(f"{name}_str", (TypeError, ValueError), name, **extra, **{name: "0.5"}))
        out.append(case(f"{name}_nan", ValueError, name, **extra, **{name: NAN}))
        if not inf_ok:
            out.append(case(f"{name}_inf", ValueError, name, **extra, **{name: INF}))
    return out


def _flag_mutations(api: Api) -> list[Case]:
    """Every parameter whose default is a bool given as a string or an int: TypeError naming it
    (``inplace_backward="no"`` is truthy and would overwrite the logits)."""
    out = []
    for name, p in inspect.signature(api.fn).parameters.items():
        if isinstance(p.default, bool):
            out.append(case(f"{name}_str", TypeError, name, **{name: "no"}))
            out.append(case(f"{name}_int", TypeError, name, **{name: int(p.default)}))
    return out


def _backend_mutations(api: Api) -> list[Case]:
    return [case("backend_unknown", ValueError, "backend", backend="tpu")] if api.family else []


SWEEPS = {"type": _type_mutations, "device": _device_mutations, "dtype": _dtype_mutations,
          "number": _number_mutations, "flag": _flag_mutations, "backend": _backend_mutations, "explicit": lambda api: api.cases}  # fmt: skip


def _outputs(result) -> list[torch.Tensor]:
    """The floating tensors of a result (tensor, tuple or NamedTuple, nested)."""
    if torch.is_tensor(result):
        return [result] if result.is_floating_point() else []
    if isinstance(result, (tuple, list)):
        return [t for r in result for t in _outputs(r)]
    return []


def _nan_mutations(api: Api) -> list[Case]:
    """A NaN in element 0 of every floating tensor argument (and of float lengths)."""
    kw = api.make("cpu")
    out = []
    for name, v in kw.items():
        if torch.is_tensor(v) and (v.is_floating_point() or name == "lengths"):
            out.append(case(f"{name}_nan", ValueError, name, **{name: d(lambda call, name=name: _with_nan(call[name]))}))
    return out


def _with_nan(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.float32 if not x.is_floating_point() else x.dtype).clone()
    x.view(-1)[0] = NAN
    return x


# --- the tests ------------------------------------------------------------------------------------


def _matrix(api: Api):
    """(backend, device) pairs to run ``api`` on: its family's backends, or the devices."""
    if api.family is None:
        return [("none", "cpu")] + ([("none", "cuda")] if HAS_CUDA else [])
    return [p.values for p in backend_params(api.family) if not p.marks]


def _params(with_backends=True):
    out = []
    for api in APIS:
        for backend, device in (_matrix(api) if with_backends else [("none", "cpu")]):
            out.append(pytest.param(api, backend, device, id=f"{api.name}-{backend}"))
    return out


def _failures(api: Api, cases, backend: str, device: str) -> list[str]:
    """Runs every case; returns a line per case that did not raise the expected error."""
    wrong = []
    for bad in cases:
        kw = bad.apply(api.good(device, None if backend == "none" else backend))
        try:
            api.call(kw)
        except Exception as exc:  # noqa: BLE001 (the type is what is being tested)
            if not isinstance(exc, bad.exc) or bad.match not in str(exc):
                wrong.append(f"{bad.id}: {type(exc).__name__}: {str(exc)[:160]}")
            continue
        wrong.append(f"{bad.id}: no error (expected {bad.exc} naming {bad.match!r})")
    return wrong


def test_every_public_function_is_swept():
    """A public function added without a row in APIS fails here."""
    public = {n for n in lk.__all__ if callable(getattr(lk, n)) and not isinstance(getattr(lk, n), type)}
    public |= {n for n in lk.__all__ if isinstance(getattr(lk, n), type) and not issubclass(getattr(lk, n), tuple)}
    public -= {"BackendUnavailableError", "UnsupportedTransformError"}  # raised, not called
    public |= set(shaping.__all__) | {"HAPOHistory.update"}
    swept = {api.name for api in APIS}
    assert public <= swept, f"public functions without a bad-input sweep: {sorted(public - swept)}"


@pytest.mark.parametrize("api,backend,device", _params())
def test_valid_call_runs(api, backend, device):
    """The base of every sweep is a valid call (otherwise each error below could be a coincidence)."""
    api.call(api.good(device, None if backend == "none" else backend))


@pytest.mark.parametrize("api,backend,device", _params())
@pytest.mark.parametrize("sweep", list(SWEEPS))
def test_bad_arguments_raise_naming_them(api, backend, device, sweep, monkeypatch):
    """Each case raises ValueError/TypeError whose message names the argument, on every backend.
    Value checks (ids in range, NaN rewards, ...) on CUDA tensors need debug mode."""
    if device == "cuda":
        monkeypatch.setenv("LENKERNELS_DEBUG", "1")
    elif backend == "triton" and sweep in ("type", "dtype", "flag", "backend"):
        pytest.skip("checked before dispatch, as on the cpu and reference backends (the interpreter is slow)")
    wrong = _failures(api, SWEEPS[sweep](api), backend, device)
    assert not wrong, f"{api.name} ({backend}):\n  " + "\n  ".join(wrong)


@pytest.mark.parametrize("api,backend,device", _params())
@pytest.mark.parametrize("checks", ["value_checks", "no_value_checks"])
def test_nan_input_propagates_or_raises(api, backend, device, checks, monkeypatch):
    """A NaN in any floating input (or float lengths) either raises ValueError naming the argument
    or reaches the result as NaN/inf: never a plausible finite result. ``no_value_checks`` runs the
    path of CUDA tensors outside debug mode (no data-dependent check may sync the host there), on
    whatever device is at hand."""
    if checks == "no_value_checks":
        monkeypatch.setattr(lk._checks, "value_checks", lambda device: False)
    if device == "cuda":
        monkeypatch.delenv("LENKERNELS_DEBUG", raising=False)
    wrong = []
    for bad in _nan_mutations(api):
        kw = bad.apply(api.good(device, None if backend == "none" else backend))
        try:
            result = api.call(kw)
        except ValueError as exc:
            if bad.match not in str(exc):
                wrong.append(f"{bad.id}: ValueError not naming {bad.match!r}: {exc}")
            continue
        outs = _outputs(result)
        if outs and all(bool(torch.isfinite(o).all()) for o in outs):
            wrong.append(f"{bad.id}: every output finite")
    assert not wrong, f"{api.name} ({backend}):\n  " + "\n  ".join(wrong)


def test_explain_backend_unknown_family():
    with pytest.raises(ValueError, match="family"):
        lk.explain_backend("no_such_family")


# --- empty batches, groups of one, NaN locality -------------------------------------------------


def _empty_calls(device):
    """Valid calls on a batch of zero responses / tokens (B = 0, or N = 0 packed)."""
    long0 = torch.zeros(0, dtype=torch.long, device=device)
    bool0 = torch.zeros(0, dtype=torch.bool, device=device)
    e = torch.zeros(0, device=device)
    rollouts = dict(correct=bool0, lengths=long0)
    return {
        "token_logprobs_entropy": dict(logits=torch.randn(0, 3, 7, device=device), ids=torch.zeros(0, 3, dtype=torch.long, device=device)),
        "token_logprobs": dict(logits=torch.randn(0, 7, device=device), ids=long0),
        "token_stats": dict(logits=torch.randn(0, 3, 7, device=device), ids=torch.zeros(0, 3, dtype=torch.long, device=device),
                            outputs=("sum_p2", "argmax", "mean_logit")),
        "token_entropy": dict(logits=torch.randn(4, 0, 7, device=device)),
        "linear_logprobs_entropy": dict(hidden=torch.randn(0, 5, device=device), weight=torch.randn(7, 5, device=device), ids=long0),
        "linear_token_stats": dict(hidden=torch.randn(0, 5, device=device), weight=torch.randn(7, 5, device=device), ids=long0,
                                   outputs=("sum_p2", "argmax"), softcap=3.0),
        "kl_penalty": dict(logprobs=e, ref_logprobs=e),
        "group_advantages": dict(rewards=torch.zeros(0, 4, device=device), groups=long0,
                                 mask=torch.zeros(0, 4, dtype=torch.bool, device=device)),
        "group_stats": dict(values=e, groups=long0),
        "phase_stats": dict(values=torch.rand(0, 5, device=device), ids=torch.zeros(0, 5, dtype=torch.long, device=device), delimiter=[1]),
        "phase_entropy": dict(entropy=e, ids=long0, delimiter=[1], cu_seqlens=torch.zeros(1, dtype=torch.long, device=device)),
        "token_stats_with_phases": dict(logits=torch.randn(0, 5, 4, device=device), ids=torch.zeros(0, 5, dtype=torch.long, device=device),
                                        delimiter=[1]),
        "sequence_stats": dict(entropy=torch.rand(0, 5, device=device), top_entropy_quantile=0.2),
        "cov_select": dict(logprobs=e.reshape(0, 4), advantages=e.reshape(0, 4), old_logprobs=e.reshape(0, 4)),
        "laser": dict(**rollouts, target_length=3),
        "laser_d": dict(**rollouts, groups=long0, target_lengths=(1, 2, 3)),
        "laser_d_targets": dict(**rollouts, groups=long0, grid=[1, 2], rollouts=4),
        "difficulty_buckets": dict(correct=bool0, groups=long0),
        "dler_rewards": dict(**rollouts, groups=long0, difficulty_aware=True),
        "dler_advantages": dict(correct=bool0, groups=long0, mask=torch.zeros(0, 3, device=device)),
        "kimi_length_reward": dict(**rollouts, groups=long0),
        "dapo_overlong": dict(lengths=long0),
        "hapo_reward": dict(**rollouts, prompt_ids=long0, history=shaping.HAPOHistory(3, device=device)),
        "HAPOHistory.update": dict(**rollouts, prompt_ids=long0, history=shaping.HAPOHistory(3, device=device)),
        "grpo_lambda": dict(**rollouts, groups=long0),
        "concise_r": dict(**rollouts, groups=long0, max_length=5),
        "dot_truncation": dict(**rollouts, groups=long0),
        "canon_advantages": dict(rewards=e, groups=long0, metric=e),
        "pear_reward": dict(correct=bool0, think_entropy=e, answer_entropy=e),
        "ceeh_advantages": dict(advantages=e, entropy=e, difficulty=e),
    }


# functions for which an empty batch is an error, not an empty result (SPEC: a loss needs tokens)
EMPTY_IS_ERROR = {
    "policy_loss": lambda dev: dict(logprobs=torch.zeros(0, 4, device=dev), old_logprobs=torch.zeros(0, 4, device=dev),
                                    advantages=torch.zeros(0, device=dev)),
    "policy_loss_from_logits": lambda dev: dict(logits=torch.zeros(0, 4, 5, device=dev),
                                                ids=torch.zeros(0, 4, dtype=torch.long, device=dev),
                                                old_logprobs=torch.zeros(0, 4, device=dev),
                                                advantages=torch.zeros(0, device=dev)),
    "rollout_correction": lambda dev: dict(old_logprobs=torch.zeros(0, 4, device=dev),
                                           rollout_logprobs=torch.zeros(0, 4, device=dev)),
}  # fmt: skip
NOT_BATCHED = {"explain_backend", "HAPOHistory"}


@pytest.mark.parametrize("api,backend,device", _params())
def test_empty_batch(api, backend, device):
    """B = 0 gives empty results of the right shapes (0-d summaries NaN or the documented constant),
    or, for the losses, a ValueError saying the batch is empty. Every batched function is listed."""
    if api.name in NOT_BATCHED:
        return
    if api.name in EMPTY_IS_ERROR:
        kw = EMPTY_IS_ERROR[api.name](device)
        if api.family is not None:
            kw["backend"] = backend
        with pytest.raises(ValueError, match="empty"):
            api.call(kw)
        return
    kw = _empty_calls(device)[api.name]
    if api.family is not None:
        kw["backend"] = backend
    result = api.call(kw)
    if api.name == "HAPOHistory.update":  # nothing to learn from: the history is unchanged
        assert bool(torch.isinf(result).all())
        return
    tensors = [t for t in (result if isinstance(result, tuple) else (result,)) if torch.is_tensor(t)]
    tensors += [t for r in (result if isinstance(result, tuple) else ()) if isinstance(r, tuple) for t in r]
    assert tensors, "no tensor came back"
    for t in tensors:
        if t.dim() == 0:  # a batch summary (sequence_stats' threshold): no token -> NaN
            assert bool(torch.isnan(t)), t
        elif api.name != "laser_d_targets":
            assert 0 in t.shape, f"{api.name}: non-empty output of shape {tuple(t.shape)}"
    if api.name == "laser_d_targets":  # no response in any bucket: every target is max(grid)
        assert result.tolist() == [2.0, 2.0, 2.0]


def _backends(family):
    return [p for p in backend_params(family) if not p.marks]


@pytest.mark.parametrize("backend,device", _backends("token_stats"))
def test_nan_logit_stays_in_its_row(backend, device):
    """SPEC 1: a NaN logit, a +inf logit or a row of all -inf make that row's statistics NaN; the
    other rows keep exactly the values they have without it."""
    logits = torch.randn(5, 9).to(device)
    ids = torch.tensor([1, 2, 3, 4, 5]).to(device)
    clean = lk.token_logprobs_entropy(logits, ids, backend=backend)
    bad = logits.clone()
    bad[1, 7] = NAN
    bad[3, 0] = INF
    bad[4] = -INF
    lp, ent = lk.token_logprobs_entropy(bad, ids, backend=backend)
    for got, ref in ((lp, clean[0]), (ent, clean[1])):
        assert bool(torch.isnan(got[[1, 3, 4]]).all()), got
        assert torch.equal(got[[0, 2]], ref[[0, 2]])


@pytest.mark.parametrize("backend,device", _backends("linear_stats"))
def test_nan_hidden_row_stays_in_its_row(backend, device):
    hidden, weight = torch.randn(4, 6).to(device), torch.randn(13, 6).to(device)
    ids = torch.tensor([0, 5, 12, 3]).to(device)
    clean = lk.linear_logprobs_entropy(hidden, weight, ids, backend=backend)
    bad = hidden.clone()
    bad[2, 1] = NAN
    lp, ent = lk.linear_logprobs_entropy(bad, weight, ids, backend=backend)
    for got, ref in ((lp, clean[0]), (ent, clean[1])):
        assert bool(torch.isnan(got[2])) and torch.equal(got[[0, 1, 3]], ref[[0, 1, 3]])
    w = weight.clone()
    w[7, 0] = NAN  # every row reads every vocabulary row
    lp, ent = lk.linear_logprobs_entropy(hidden, w, ids, backend=backend)
    assert bool(torch.isnan(lp).all()) and bool(torch.isnan(ent).all())


@pytest.mark.parametrize("backend,device", _backends("policy_loss"))
def test_policy_loss_nan_masked_is_ignored_valid_is_reported(backend, device):
    """NaN/inf in masked positions never reach a result (bitwise the same loss and gradient); a NaN in
    a valid position makes the loss NaN."""
    kw = _policy(device)
    kw["backend"] = backend

    def run(**over):
        args = {**kw, **over}
        x = args.pop("logprobs").clone().requires_grad_(True)
        out = lk.policy_loss(x, **args)
        (grad,) = torch.autograd.grad(out.loss, x)
        return out, grad

    clean, g_clean = run()
    garbage = {}
    for name in ("logprobs", "old_logprobs", "ref_logprobs", "entropy", "importance_weights"):
        x = kw[name].clone()
        x[0, 4], x[0, 5] = NAN, -INF  # mask[0, 4:] is False
        garbage[name] = x
    out, grad = run(**garbage)
    assert torch.equal(out.loss, clean.loss) and torch.equal(grad, g_clean)
    for name in ("logprobs", "old_logprobs", "advantages", "ref_logprobs", "entropy", "importance_weights"):
        x = kw[name].clone()
        x.view(-1)[1] = NAN  # a valid position (and sequence 0's advantage)
        out, _ = run(**{name: x})
        assert bool(torch.isnan(out.loss)), name


@pytest.mark.parametrize("backend,device", _backends("policy_loss"))
def test_kl_penalty_nan_stays_in_its_element(backend, device):
    kw = _kl(device)
    for est in ("k1", "abs", "k2", "k3", "k3+"):
        clean = lk.kl_penalty(kw["logprobs"], kw["ref_logprobs"], est, backend=backend)
        lp = kw["logprobs"].clone()
        lp[1, 2] = NAN
        got = lk.kl_penalty(lp, kw["ref_logprobs"], est, backend=backend)
        assert bool(torch.isnan(got[1, 2]))
        keep = torch.ones_like(got, dtype=torch.bool)
        keep[1, 2] = False
        assert torch.equal(got[keep], clean[keep]), est


@pytest.mark.parametrize("backend,device", _backends("advantages"))
def test_group_stats_nan_stays_in_its_group(backend, device):
    """The documented contract: a NaN among a group's selected members makes its mean, std, min and
    max NaN (count and sum as they come); other groups are untouched."""
    values = torch.randn(8, 2).to(device)
    groups = torch.tensor(GROUPS).to(device)
    clean, _ = lk.group_stats(values, groups, backend=backend)
    bad = values.clone()
    bad[4, 1] = NAN  # group 1, column 1
    stats, _ = lk.group_stats(bad, groups, backend=backend)
    in_group = groups == 1
    assert bool(torch.isnan(stats[in_group][:, 1, 2:]).all())
    assert torch.equal(stats[in_group][:, 1, 0], clean[in_group][:, 1, 0])
    assert torch.equal(stats[in_group][:, 0], clean[in_group][:, 0])
    assert torch.equal(stats[~in_group], clean[~in_group])


@pytest.mark.parametrize("backend,device", _backends("phase_stats"))
def test_phase_nan_stays_in_its_phase(backend, device):
    """A NaN value in a think token makes that sequence's think mean/sum NaN; its answer phase and
    the other sequences are untouched; a NaN in a masked token is never read."""
    kw = _phase(device)
    clean = lk.phase_stats(**kw, backend=backend)
    values = kw["values"].clone()
    values[0, 1] = NAN  # sequence 0, think phase (the delimiter starts at column 2)
    values[1, 6] = NAN  # masked
    got = lk.phase_stats(**{**kw, "values": values}, backend=backend)
    assert bool(torch.isnan(got.think_mean[0])) and bool(torch.isnan(got.think_sum[0]))
    assert torch.equal(got.think_mean[1], clean.think_mean[1])
    assert torch.equal(got.answer_mean, clean.answer_mean) and torch.equal(got.answer_sum, clean.answer_sum)
    for name in ("think_count", "answer_count", "delimiter_pos", "found"):
        assert torch.equal(getattr(got, name), getattr(clean, name))


@pytest.mark.parametrize("backend,device", _backends("advantages"))
def test_groups_of_one(backend, device):
    """SPEC 4: a group of one has baseline 0 and std 1 (verl), in every method."""
    eps = 1e-6
    s = torch.tensor([0.5, -2.0, 3.0, 0.0]).to(device)
    singles = torch.tensor([7, 3, 9, 1]).to(device)
    expected = {
        "grpo": s / (1 + eps), "dr_grpo": s, "rloo": s, "opo": s, "gaussian": torch.zeros_like(s),
        "grpo_passk": s / (1 + eps),  # the best (only) member gets r_max - r_second, r_second = 0
    }  # fmt: skip
    for method, want in expected.items():
        extra = {"lengths": torch.tensor([3, 1, 0, 2]).to(device)} if method == "opo" else {}
        got = lk.group_advantages(s, singles, method=method, eps=eps, backend=backend, **extra)
        assert torch.allclose(got, want.float(), rtol=1e-6, atol=0), (method, got, want)
        assert torch.equal(got, lk.group_advantages(s, 1, method=method, eps=eps, backend=backend, **extra)), method
    stats, _ = lk.group_stats(s, singles, backend=backend)
    want = torch.stack([torch.ones_like(s), s, s, torch.zeros_like(s), s, s], -1)
    assert torch.equal(stats[:, 0], want)
    # shaping on groups of one: Kimi's span is 0 (reward 0), a lone correct response is all-correct
    correct = torch.tensor([True, False, True, True]).to(device)
    lengths = torch.tensor([3, 1, 4, 2]).to(device)
    kimi = shaping.kimi_length_reward(correct, singles, lengths=lengths, backend=backend)
    assert torch.equal(kimi, correct.float())
    concise = shaping.concise_r(correct, singles, lengths=lengths, max_length=8, backend=backend)
    assert torch.allclose(concise, torch.where(correct, 1 + (1 - lengths / 8), 0.0).float())


OUT_OF_RANGE = {  # function: (the id argument, the output its row goes to)
    "token_logprobs_entropy": ("ids", lambda out: out[0]),
    "linear_logprobs_entropy": ("ids", lambda out: out[0]),
    "linear_token_stats": ("ids", lambda out: out.logprob),
    "token_stats_with_phases": ("ids", lambda out: out.logprobs),
    "hapo_reward": ("prompt_ids", lambda out: out),
}


@pytest.mark.parametrize("name", list(OUT_OF_RANGE))
@pytest.mark.parametrize("checks", ["value_checks", "no_value_checks"])
def test_out_of_range_ids_raise_or_give_nan(name, checks, monkeypatch):
    """An id outside the vocabulary (a prompt id outside the history) raises ValueError naming it
    where value checks run; without them (CUDA outside debug mode: no host sync) the kernels, the
    Triton ones included, give NaN for exactly that row and the right numbers elsewhere."""
    arg, pick = OUT_OF_RANGE[name]
    api = next(a for a in APIS if a.name == name)
    if checks == "no_value_checks":
        monkeypatch.setattr(lk._checks, "value_checks", lambda device: False)
    else:
        monkeypatch.setenv("LENKERNELS_DEBUG", "1")  # value checks on CUDA tensors too
    for backend, device in _matrix(api):
        clean = api.good(device, None if backend == "none" else backend)
        expected = pick(api.call(dict(clean)))
        kw = dict(clean)
        ids = kw[arg].clone()
        flat = ids.view(-1)
        flat[1] = 10**6 if name != "hapo_reward" else 99
        kw[arg] = ids
        try:
            got = pick(api.call(kw))
        except ValueError as exc:
            assert arg in str(exc), exc
            continue
        except (RuntimeError, IndexError) as exc:
            # the reference backend (plain PyTorch, not a hot path) indexes with the id: an indexing
            # error (a device-side assert on CUDA) is an error too, never a number
            assert backend == "reference" and checks == "no_value_checks", exc
            continue
        assert checks == "no_value_checks" or backend == "none", f"{name} ({backend}): no error with value checks"
        got, want = got.reshape(-1), expected.reshape(-1)
        assert bool(torch.isnan(got[1])), f"{name} ({backend}): {got[1]} for an out-of-range id"
        rest = torch.ones_like(got, dtype=torch.bool)
        rest[1] = False
        assert torch.equal(got[rest], want[rest]), f"{name} ({backend}): other rows changed"
