"""Length-aware reward shaping for efficient reasoning (SPEC 5), GPU resident.

Every function takes per-response tensors (correctness, scores, lengths or a ``[B, T]`` response
mask, group ids) and returns tensors on the same device: no ``.item()``, no host sync, no Python
loop over responses or groups. Per-group quantities (accuracy, length min/max/mean/std) come from
one call of the segmented ``lenkernels.group_stats`` kernel, which also computes the response
lengths from the mask (the mask is read once); the per-response formula after it is a handful of
elementwise tensor ops. Shaped rewards are float32 ``[B]`` and are data, not differentiable.

Common arguments:
    correct: ``[B]`` bool, or 0/1 of any dtype (non-zero = correct).
    lengths / mask: the response length ``|y|``, either ``[B]`` lengths (int or float) or a
        ``[B, T]`` response mask (bool/int/float; lengths are its row sums). Exactly one is needed.
    groups: ``[B]`` int group ids in any order (responses to one prompt), or an int group size.
    score: the base reward added to the shaping term; defaults to ``correct`` as 0/1.
    backend: for the per-group kernels, as in ``lenkernels.group_advantages``.
    NaN: a NaN length, target, correctness, ``finished`` flag, mask entry or split metric only reaches
        the result through comparisons, so it is a ValueError on CPU tensors (and on CUDA with
        ``LENKERNELS_DEBUG=1``), as for ``group_advantages``' rewards; on CUDA without debug mode it
        makes every float output of the call NaN (no host sync). NaN scores and entropies propagate
        into the result. ``difficulty_buckets`` returns integers: NaN correctness raises only where
        value checks run.

Functions and the paper each default comes from:
    laser, laser_d, laser_d_targets, difficulty_buckets   LASER / LASER-D (Liu et al., 2025, arXiv:2505.15612)
    dler_rewards, dler_advantages                         DLER truncation penalty (Liu et al., 2025)
    kimi_length_reward                                    Kimi k1.5 (Kimi Team, 2025, arXiv:2501.12599)
    dapo_overlong                                         DAPO soft overlong punishment (Yu et al., 2025, arXiv:2503.14476)
    HAPOHistory, hapo_reward                              HAPO history-aware length reward (Huang et al., 2025)
    grpo_lambda                                           GRPO-lambda (Dai et al., 2025, arXiv:2505.18086)
    concise_r                                             ConciseR L-GRPO (Song and Zheng, 2025)
    dot_truncation                                        DOT dynamic outlier truncation (SPEC 5)
    canon_advantages                                      CANON split-group advantages (SPEC 5)
    pear_reward                                           PEAR phase-entropy reward (SPEC 5, 6)
    ceeh_advantages                                       CEEH difficulty-aware entropy bonus (SPEC 5)

Modules (by what they compute): ``length`` (target and budget length rewards: LASER, LASER-D, DLER,
DAPO), ``group`` (group-relative rewards and advantages: Kimi, GRPO-lambda, ConciseR, DOT, CANON),
``history`` (HAPO), ``entropy`` (PEAR, CEEH); argument handling in ``_args``.
"""

from lenkernels.shaping.entropy import ceeh_advantages, pear_reward
from lenkernels.shaping.group import canon_advantages, concise_r, dot_truncation, grpo_lambda, kimi_length_reward
from lenkernels.shaping.history import HAPOHistory, hapo_reward
from lenkernels.shaping.length import (
    LASER_MODES,  # noqa: F401 (public: the modes of laser, outside __all__ as before)
    dapo_overlong,
    difficulty_buckets,
    dler_advantages,
    dler_rewards,
    laser,
    laser_d,
    laser_d_targets,
)

__all__ = [  # noqa: RUF022 (the order of the module docstring's table)
    "laser",
    "laser_d",
    "laser_d_targets",
    "difficulty_buckets",
    "dler_rewards",
    "dler_advantages",
    "kimi_length_reward",
    "dapo_overlong",
    "HAPOHistory",
    "hapo_reward",
    "grpo_lambda",
    "concise_r",
    "dot_truncation",
    "canon_advantages",
    "pear_reward",
    "ceeh_advantages",
]
