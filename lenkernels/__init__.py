"""lenkernels: fused token statistics, policy losses and advantages for RL on language models."""

from lenkernels._backend import BackendUnavailableError, explain as explain_backend
from lenkernels._checks import UnsupportedTransformError
from lenkernels.ops.token_stats import (
    TokenStats,
    token_entropy,
    token_logprobs,
    token_logprobs_entropy,
    token_stats,
)
from lenkernels.ops.linear_stats import linear_logprobs_entropy
from lenkernels.ops.linear_token_stats import linear_token_stats
from lenkernels.ops.advantages import group_advantages, group_stats
from lenkernels import shaping
from lenkernels.ops.policy_loss import PolicyLoss, kl_penalty, policy_loss, policy_loss_from_logits
from lenkernels.ops.phase_stats import (
    PhaseEntropy,
    PhaseStats,
    TokenStatsWithPhases,
    phase_entropy,
    phase_stats,
    token_stats_with_phases,
)
from lenkernels.ops.sequence_stats import SequenceStats, sequence_stats
from lenkernels.ops.rollout_correction import RolloutCorrection, rollout_correction
from lenkernels.ops.cov_select import cov_select

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "UnsupportedTransformError",
    "explain_backend",
    "token_entropy",
    "token_logprobs",
    "token_logprobs_entropy",
    "token_stats",
    "TokenStats",
    "linear_logprobs_entropy",
    "linear_token_stats",
    "PolicyLoss",
    "kl_penalty",
    "policy_loss",
    "policy_loss_from_logits",
    "group_advantages",
    "group_stats",
    "shaping",
    "PhaseEntropy",
    "PhaseStats",
    "SequenceStats",
    "TokenStatsWithPhases",
    "phase_entropy",
    "phase_stats",
    "sequence_stats",
    "token_stats_with_phases",
    "RolloutCorrection",
    "rollout_correction",
    "cov_select",
]
