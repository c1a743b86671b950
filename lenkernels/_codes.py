"""Every code the kernels read, declared once: modes, aggregations, estimators, advantage methods,
dtype codes and the layouts of statistics vectors.

The ops pass these integers to every backend; Triton kernels read them as constexpr globals
(``lenkernels.triton.utils.constexprs``), the C++ kernels through the enums of
``csrc/include/lenkernels/*.h``, which ``tests/test_codes.py`` checks against this module (same
members, same values: ``kSeqMeanTokenMean`` is ``Agg.SEQ_MEAN_TOKEN_MEAN``). A backend given a code
outside its enum raises; none defaults silently.

Public string names map onto members with :func:`parse` (``"seq-mean-token-mean"`` ->
``Agg.SEQ_MEAN_TOKEN_MEAN``, ``"ppo"`` -> ``Mode.PPO``).
"""

from __future__ import annotations

import enum

import torch


class DType(enum.IntEnum):
    """Input dtype of a floating tensor (``lk::DType``, common.h)."""

    FLOAT32 = 0
    BFLOAT16 = 1
    FLOAT16 = 2


class Weight(enum.IntEnum):
    """Element type of a mask or length tensor (``lk::Weight``, common.h)."""

    FLOAT32 = 0
    BFLOAT16 = 1
    FLOAT16 = 2
    BOOL = 3
    INT32 = 4
    INT64 = 5


DTYPE_OF = {torch.float32: DType.FLOAT32, torch.bfloat16: DType.BFLOAT16, torch.float16: DType.FLOAT16}
WEIGHT_OF = {
    torch.float32: Weight.FLOAT32, torch.bfloat16: Weight.BFLOAT16, torch.float16: Weight.FLOAT16,
    torch.bool: Weight.BOOL, torch.uint8: Weight.BOOL, torch.int32: Weight.INT32, torch.int64: Weight.INT64,
}  # fmt: skip


# --- policy loss (lk::policy, policy_loss.h) ---------------------------------------------------------


class Mode(enum.IntEnum):
    PPO = 0
    GSPO = 1
    LUSPO = 2
    CISPO = 3
    SAPO = 4
    GMPO = 5
    REINFORCE = 6
    DPPO_TV = 7
    DPPO_KL = 8
    DRO = 9


class KLEstimator(enum.IntEnum):
    K1 = 0
    ABS = 1
    K2 = 2
    K3 = 3


class Agg(enum.IntEnum):
    TOKEN_MEAN = 0
    TOKEN_SUM = 1
    SEQ_MEAN_TOKEN_MEAN = 2
    SEQ_MEAN_TOKEN_SUM = 3
    SEQ_MEAN_TOKEN_SUM_NORM = 4


class NormSource(enum.IntEnum):
    """Where an aggregation's normaliser comes from."""

    NORM_COUNTED = 0
    NORM_TENSOR = 1
    NORM_CONSTANT = 2


class Partial(enum.IntEnum):
    """Partial sums of one block of tokens, reduced in a fixed order into ``Stat``."""

    PART_POLICY = 0
    PART_KL = 1
    PART_ENTROPY = 2
    PART_TOKENS = 3
    PART_CLIP_LOW = 4
    PART_CLIP_HIGH = 5
    PART_CLIP_DUAL = 6
    PART_NEG_LOG_RATIO = 7
    PART_RATIO_MIN = 8
    PART_RATIO_SUM = 9
    PART_RATIO_MAX = 10
    PART_ENTROPY_SUM = 11
    PART_SEQS = 12
    PART_KEPT = 13
    NUM_PARTIALS = 16


class Stat(enum.IntEnum):
    """The policy loss's statistics vector (``PolicyLoss`` fields, in this order)."""

    STAT_LOSS = 0
    STAT_POLICY = 1
    STAT_KL = 2
    STAT_ENTROPY = 3
    STAT_CLIP_LOW = 4
    STAT_CLIP_HIGH = 5
    STAT_CLIP_DUAL = 6
    STAT_APPROX_KL = 7
    STAT_RATIO_MIN = 8
    STAT_RATIO_MEAN = 9
    STAT_RATIO_MAX = 10
    STAT_ENTROPY_MEAN = 11
    STAT_TOKENS = 12
    STAT_SEQS = 13
    STAT_INV_NORM = 14
    STAT_KEPT = 15
    NUM_STATS = 16


class SeqPartial(enum.IntEnum):
    """Per-sequence sums of the segment reduction."""

    SEQ_TOKENS = 0
    SEQ_LOG_RATIO = 1
    SEQ_ADVANTAGE = 2
    SEQ_LOG_WEIGHT = 3
    SEQ_KEPT = 4
    NUM_SEQ_PARTIALS = 8


class SeqValue(enum.IntEnum):
    """Per-sequence values derived from ``SeqPartial``."""

    SEQ_N = 0
    SEQ_X = 1
    SEQ_Y = 2
    SEQ_RATIO = 3
    NUM_SEQ_VALUES = 4


class PolicyParam(enum.IntEnum):
    """The float hyper-parameters of the policy loss as the Triton kernels read them: one fp32
    vector ``params`` in this layout, each member the value of ``PolicyConfig.kernel_scalars()``
    of its lower-cased name (LO / HI: the ratio bounds). Read in a kernel as
    ``tl.load(params_ptr + PARAMS.TAU_POS)``."""

    LO = 0
    HI = 1
    DUAL_C = 2
    TAU_POS = 3
    TAU_NEG = 4
    KL_COEF = 5
    ENTROPY_COEF = 6
    NORM_CONST = 7
    SCALE = 8
    DRO_BETA = 9
    NUM_POLICY_PARAMS = 10


# --- advantages (lk::adv, advantages.h) ---------------------------------------------------------------


class Method(enum.IntEnum):
    GRPO = 0
    DR_GRPO = 1
    RLOO = 2
    REINFORCE_PP_BASELINE = 3
    BATCH = 4
    GAUSSIAN = 5
    GRPO_PASSK = 6
    OPO = 7


class LenSource(enum.IntEnum):
    """Where per-response lengths come from (opo, reinforce_pp_baseline)."""

    LEN_NONE = 0
    LEN_MASK = 1
    LEN_TENSOR = 2


# --- phase statistics (lk::phase, phase_stats.h) --------------------------------------------------------


class Phase(enum.IntEnum):
    NO_PHASE = 0
    THINK = 1
    ANSWER = 2


# --- names -------------------------------------------------------------------------------------------------

# public spelling of a member where it is not the lower-cased member name
_SPELLING = {Agg: lambda m: m.name.lower().replace("_", "-")}


def name_of(member: enum.IntEnum) -> str:
    """The public string of a code (``Agg.TOKEN_MEAN`` -> ``"token-mean"``)."""
    spell = _SPELLING.get(type(member), lambda m: m.name.lower())
    return spell(member)


def names(codes: type[enum.IntEnum]) -> tuple[str, ...]:
    """Public strings of an enum's members, in code order (``NUM_*`` sizes excluded)."""
    return tuple(name_of(m) for m in codes if not m.name.startswith("NUM_"))


def parse(codes: type[enum.IntEnum], value, arg: str) -> enum.IntEnum:
    """The member whose public string is ``value``; ValueError naming ``arg`` otherwise."""
    for m in codes:
        if not m.name.startswith("NUM_") and name_of(m) == value:
            return m
    raise ValueError(f"{arg} must be one of {names(codes)}, got {value!r}")


# --- rollout correction (lk::rollout, rollout_correction.h) -------------------------------------------


class CorrectionLevel(enum.IntEnum):
    """What one importance weight covers (SPEC 8): a token, a sequence (product), or a sequence's
    geometric mean."""

    TOKEN = 0
    SEQUENCE = 1
    GEOMETRIC = 2


class CorrectionMode(enum.IntEnum):
    """What happens to a weight outside ``[threshold_low, threshold]``: clipped (TIS) or rejected (MIS)."""

    TRUNCATE = 0
    MASK = 1


class CorrectionPartial(enum.IntEnum):
    """Per-sequence fp32 partial sums of the correction, reduced in a fixed order into ``CorrectionStat``."""

    PART_WEIGHT_SUM = 0
    PART_WEIGHT_MIN = 1
    PART_WEIGHT_MAX = 2
    PART_NEG_LOG_RATIO_SUM = 3
    PART_K3_SUM = 4
    NUM_CORRECTION_PARTIALS = 8


class CorrectionCount(enum.IntEnum):
    """Per-sequence int64 counts of the correction (exact at any batch size)."""

    COUNT_TOKENS = 0
    COUNT_KEPT = 1
    COUNT_TRUNCATED = 2
    COUNT_NAN = 3
    COUNT_SEQS = 4
    COUNT_MASKED_SEQS = 5
    NUM_CORRECTION_COUNTS = 8


class CorrectionStat(enum.IntEnum):
    """The rollout correction's metrics vector (``RolloutCorrection`` 0-dim fields, in this order)."""

    STAT_WEIGHT_MEAN = 0
    STAT_WEIGHT_MIN = 1
    STAT_WEIGHT_MAX = 2
    STAT_TRUNCATED_FRACTION = 3
    STAT_MASKED_FRACTION = 4
    STAT_MASKED_SEQ_FRACTION = 5
    STAT_MASKED_TOKENS = 6
    STAT_KL_K1 = 7
    STAT_KL_K3 = 8
    NUM_CORRECTION_STATS = 9
