"""verl drop-ins: the token statistics, KL, aggregation, policy losses and outcome advantages of
verl (``verl.utils.torch_functional`` and ``verl.trainer.ppo.core_algos``, tested with verl 0.9.1)
with verl's signatures and return conventions, computed by the lenkernels ops.

Use one function directly, or swap them all into an installed verl::

    from lenkernels.integrations import verl as lk_verl

    lk_verl.patch()          # every process that computes losses: verl's Ray workers included
    ...                      # verl now runs lenkernels' kernels
    lk_verl.unpatch()

For a verl training run the swap is one command-line override: Ray then calls ``patch()`` in
every worker process before any actor is built::

    python -m verl.trainer.main_ppo ... \
        +ray_kwargs.ray_init.runtime_env.worker_process_setup_hook=lenkernels.integrations.verl.patch

(``ray.init(runtime_env={"worker_process_setup_hook": "lenkernels.integrations.verl.patch"})`` in
a custom driver). ``patch()`` replaces the functions on their modules, on every loaded verl module
that imported them with ``from ... import``, and in ``POLICY_LOSS_REGISTRY`` /
``ADV_ESTIMATOR_REGISTRY``. verl captures ``entropy_from_logits`` when an actor engine is built
(``torch.compile`` of it), so the patch must come before that, as the setup hook does.

What is covered (``PATCHED_NAMES``): ``logprobs_from_logits``, ``entropy_from_logits``,
``entropy_from_logits_with_chunking``, ``kl_penalty``, ``agg_loss``; the policy losses
``vanilla``, ``gspo``, ``sapo``, ``gpg``, ``geo_mean``, ``cispo`` (``POLICY_LOSSES``) and
``dppo_tv``, ``dppo_kl``, ``dro``, ``clip_cov``, ``kl_cov`` (``EXTRA_POLICY_LOSSES``), plus
``compute_policy_loss_reinforce``, which ``bypass_mode`` calls; the outcome advantages ``grpo``,
``grpo_vectorized``, ``rloo``, ``rloo_vectorized``, ``reinforce_plus_plus_baseline``, ``opo``,
``grpo_passk`` and ``gpg``. Each policy loss is one fused ``lenkernels.policy_loss`` call (DPPO
and DRO are modes of it); ``clip_cov`` / ``kl_cov`` first select their tokens with
``lenkernels.cov_select`` (verl's selection, torch's RNG drawn exactly as verl draws it, so the
same tokens under the same seed) and then make one fused call: Clip-Cov's 0/1 keep mask is the
op's importance weights, KL-Cov's ``|log_ratio|`` term on the selected tokens is the op's ``abs``
KL term against ``where(selected, old_log_prob, log_prob)`` (see ``_verl_objectives._kl_cov``).
verl's rollout correction (``rollout_corr_helper``: ``compute_rollout_correction_and_rejection_mask``,
which ``compute_rollout_correction_and_add_to_batch`` and ``bypass_mode``'s loss call, and
``compute_offpolicy_metrics``; ``ROLLOUT_CORRECTION_NAMES``) takes its importance weights and KL
estimates from one ``lenkernels.rollout_correction`` pass and brings its ~40 metrics to the host in
one transfer (verl: one ``.item()`` each, per micro-batch in bypass mode); see
``_verl_rollout_correction``. Top-K on-policy distillation (``loss_mode="forward_kl_topk"``):
``compute_forward_kl_topk`` of ``verl.trainer.distillation.fsdp.losses``
(``PATCHED_DISTILLATION_NAMES``) takes the student's top-K ids and its log-probabilities at the
teacher's ids from one ``token_stats`` call (no ``[B, T, V]`` log-softmax; see
``_verl_distillation``). verl's other registry entries (``bypass_mode``'s own wrapper, ``gae``,
``remax``, ``reinforce_plus_plus``, ``gdpo``, the optimal-token baselines) stay verl's.

The path verl's trainer runs (``PATCHED_ENGINE_NAMES``): where verl's FSDP engine module imports
(it needs ``peft``), ``patch()`` also replaces ``FSDPEngineWithLMHead.prepare_model_outputs``, the
engine step that turns the model's logits into log-probs, entropy and Σπ². verl scales the
``[N, V]`` logits by the per-sample temperature and reads them once per statistic (its compiled
entropy, ``calculate_sum_pi_squared_from_logits``, ``logprobs_from_logits``); the drop-in computes
all of them with one ``token_stats`` op (temperature inside the kernel): one read of the logits
forward, one gradient written backward; a packed top-K distillation micro-batch adds verl's loss
closure on the scaled logits (its ``compute_forward_kl_topk`` patched too). Padded distillation,
tensor-parallel ``DTensor`` logits and float64 logits stay verl's method (see
``prepare_model_outputs``). With ``use_fused_kernels`` the
model's forward returns the log-probs and entropy from the hidden state: ``patch()`` replaces
verl's two text-model forwards (``dense_common.forward_with_torch_backend`` /
``forward_with_triton_backend``, which ``patch_forward_with_backends`` installs on the model class
when the model is built) with ``lenkernels.linear_logprobs_entropy`` ones, and
``prepare_model_inputs`` then passes verl's per-sample temperature, which verl's fused path
refuses; when the micro-batch asks for Σπ² (``calculate_sum_pi_squared``, which verl refuses with
fused kernels) the forward computes it with ``lenkernels.linear_token_stats``, still without the
``[N, V]`` logits. Vision-language models keep verl's fused forwards.

Conventions kept: shapes, tuples, the metric dicts (Python floats, one host sync per loss call,
as verl's ``.item()`` calls), defaults, the errors verl raises for missing global normalisers, and
the dtypes: every drop-in accepts float32, bfloat16, float16 and float64 inputs and returns the
dtype verl's code returns for them (``logprobs_from_logits``: float32 on CUDA where verl uses
flash-attn's cross-entropy, else the logits' dtype; ``entropy_from_logits``: the logits' dtype;
``entropy_from_logits_with_chunking``: float32; losses, KL and advantages: verl's type promotion
of its arithmetic, e.g. a bfloat16 loss matrix aggregated under a float mask is float32). The
kernels compute in float32 and the result is cast (so a bfloat16 result is float32 maths rounded
once, where verl rounds every intermediate); float64 inputs are computed in float64, through
lenkernels' float64 reference definitions, to float64 precision.
Differences, all deliberate:

- ``agg_loss`` over an all-masked (or empty) batch gives 0 where verl divides 0 by 0 (NaN:
  ``token-mean``, and the seq-mean modes without ``global_batch_size``); the mask must hold 0/1
  (a weighting belongs in ``rollout_is_weights``). The policy losses aggregate the same way.
- The ``ppo_kl`` metric of ``vanilla``/``sapo``/``cispo``/``dppo_tv``/``dppo_kl`` is the
  unclamped mean of ``old - new`` (verl clamps the log-ratio to +-20 first; they differ only
  beyond that). Conversely ``clip_cov``/``kl_cov`` take the ratio ``exp(clamp(l, +-20))`` where
  verl takes ``exp(l)``: they differ only for a token more than 20 nats off (verl's ratio is then
  past 4.8e8, or inf).
- ``kl_cov``'s covariances are computed where the inputs are; verl copies them to the CPU first.
  On the CPU the selection is verl's bit for bit; on a GPU a rounding difference of a mean can
  swap two tokens whose covariances tie to within an ulp. In half precision DPPO's trust-region
  test runs in float32 on the half values (verl's in the half dtype), so a token on the region's
  edge can fall on the other side.
- Where verl ``assert``s (no ``config.policy_loss``, ``clip_cov_ratio``/``kl_cov_ratio`` <= 0) the
  drop-ins raise ValueError; ``kl_cov_ratio`` > 1 (verl's ``topk`` fails) and a DPPO
  ``clip_ratio_c`` <= 0 (meaningless) are ValueErrors too.
- A GRPO group whose scores are all equal gets exactly 0 (verl divides a rounding residue by eps).
- float64 inputs get the exact float64 value where verl mixes float32 numbers into its float64
  arithmetic (``grpo``'s std 1 of a group of one, plus eps; ``grpo_vectorized``'s group means
  and stds; the whitening's Bessel factor of an integer or float32 mask's count) or adds 1e-8 to
  counts (``seq-mean-token-mean``, ``geo_mean``, whitening means): a relative 1e-8 to 1e-7 apart.
- An empty vocabulary (``V = 0``) is a ValueError (verl's entropy of no logits is -inf).
- Rollout correction: ``k3_kl`` is ``mean(expm1(δ) − δ)``, where verl's ``exp(δ) − δ − 1`` cancels
  for small ``δ`` (a few percent off at ``δ ~ 1e-3`` in float32); ``rollout_is_eff_sample_size`` is
  ``inf`` when every applied weight is 0 (verl raises ZeroDivisionError); the inputs must be
  ``[batch, length]`` (verl's sequence sums assume it).
"""

from __future__ import annotations

from lenkernels.integrations import ModulePatch, Replacement, _check_exclude, _export

# The drop-ins live in private modules by what they compute: _verl_token_stats (verl.utils.
# torch_functional), _verl_losses (KL, agg_loss, the PPO-family policy losses), _verl_objectives
# (dppo_tv, dppo_kl, dro, clip_cov, kl_cov), _verl_advantages (the outcome advantages),
# _verl_rollout_correction (rollout_corr_helper) and _verl_engine (the FSDP engine's output path).
# This module re-exports them (as their home: ``__module__``, see the end) and patches them into verl.
from lenkernels.integrations._verl_advantages import (
    ADVANTAGE_ESTIMATORS,
    compute_gpg_outcome_advantage,
    compute_grpo_outcome_advantage,
    compute_grpo_passk_outcome_advantage,
    compute_grpo_vectorized_outcome_advantage,
    compute_opo_outcome_advantage,
    compute_reinforce_plus_plus_baseline_outcome_advantage,
    compute_rloo_outcome_advantage,
    compute_rloo_vectorized_outcome_advantage,
)
from lenkernels.integrations._verl_distillation import compute_forward_kl_topk
from lenkernels.integrations._verl_engine import (
    forward_with_torch_backend,
    forward_with_triton_backend,
    prepare_model_inputs,
    prepare_model_outputs,
)
from lenkernels.integrations._verl_losses import (
    POLICY_LOSSES,
    agg_loss,
    compute_policy_loss_cispo,
    compute_policy_loss_geo_mean,
    compute_policy_loss_gpg,
    compute_policy_loss_gspo,
    compute_policy_loss_reinforce,
    compute_policy_loss_sapo,
    compute_policy_loss_vanilla,
    kl_penalty,
)
from lenkernels.integrations._verl_objectives import (
    EXTRA_POLICY_LOSSES,
    compute_policy_loss_clip_cov,
    compute_policy_loss_dppo_kl,
    compute_policy_loss_dppo_tv,
    compute_policy_loss_dro,
    compute_policy_loss_kl_cov,
)
from lenkernels.integrations._verl_rollout_correction import (
    compute_offpolicy_metrics,
    compute_rollout_correction_and_rejection_mask,
)
from lenkernels.integrations._verl_token_stats import (
    entropy_from_logits,
    entropy_from_logits_with_chunking,
    logprobs_from_logits,
)

__all__ = [
    "logprobs_from_logits",
    "entropy_from_logits",
    "entropy_from_logits_with_chunking",
    "kl_penalty",
    "agg_loss",
    "compute_policy_loss_vanilla",
    "compute_policy_loss_gspo",
    "compute_policy_loss_sapo",
    "compute_policy_loss_gpg",
    "compute_policy_loss_geo_mean",
    "compute_policy_loss_cispo",
    "compute_policy_loss_dppo_tv",
    "compute_policy_loss_dppo_kl",
    "compute_policy_loss_clip_cov",
    "compute_policy_loss_kl_cov",
    "compute_policy_loss_dro",
    "compute_policy_loss_reinforce",
    "compute_grpo_outcome_advantage",
    "compute_grpo_vectorized_outcome_advantage",
    "compute_rloo_outcome_advantage",
    "compute_rloo_vectorized_outcome_advantage",
    "compute_reinforce_plus_plus_baseline_outcome_advantage",
    "compute_opo_outcome_advantage",
    "compute_grpo_passk_outcome_advantage",
    "compute_gpg_outcome_advantage",
    "compute_rollout_correction_and_rejection_mask",
    "compute_offpolicy_metrics",
    "compute_forward_kl_topk",
    "prepare_model_outputs",
    "prepare_model_inputs",
    "forward_with_torch_backend",
    "forward_with_triton_backend",
    "POLICY_LOSSES",
    "EXTRA_POLICY_LOSSES",
    "ADVANTAGE_ESTIMATORS",
    "PATCHED_NAMES",
    "PATCHED_ENGINE_NAMES",
    "ROLLOUT_CORRECTION_NAMES",
    "PATCHED_DISTILLATION_NAMES",
    "patch",
    "unpatch",
    "patched",
    "is_patched",
]


# --- patching --------------------------------------------------------------------------------

_TF = "verl.utils.torch_functional"
_CORE = "verl.trainer.ppo.core_algos"
_ROLLOUT = "verl.trainer.ppo.rollout_corr_helper"
ROLLOUT_CORRECTION_NAMES = ("compute_rollout_correction_and_rejection_mask", "compute_offpolicy_metrics")


def _replacements() -> list[Replacement]:
    reps = [Replacement(_TF, name, globals()[name])
            for name in ("logprobs_from_logits", "entropy_from_logits", "entropy_from_logits_with_chunking")]  # fmt: skip
    reps += [Replacement(_CORE, name, globals()[name]) for name in ("kl_penalty", "agg_loss")]
    reps += [Replacement(_CORE, f.__name__, f) for f in (*POLICY_LOSSES.values(), *EXTRA_POLICY_LOSSES.values())]
    reps.append(Replacement(_CORE, "compute_policy_loss_reinforce", compute_policy_loss_reinforce))
    reps += [Replacement(_CORE, f.__name__, f) for f in ADVANTAGE_ESTIMATORS.values()]
    reps += [Replacement(_ROLLOUT, name, globals()[name]) for name in ROLLOUT_CORRECTION_NAMES]
    reps += _engine_replacements()
    reps += _distillation_replacements()
    return reps


_DISTILLATION = "verl.trainer.distillation.fsdp.losses"


def _distillation_replacements() -> list[Replacement]:
    """verl's top-K distillation loss (``PATCHED_DISTILLATION_NAMES``), where its module imports."""
    import importlib

    try:
        importlib.import_module(_DISTILLATION)
    except ImportError:
        return []
    return [Replacement(_DISTILLATION, "compute_forward_kl_topk", compute_forward_kl_topk)]


def _engine_replacements() -> list[Replacement]:
    """verl's FSDP engine path (``PATCHED_ENGINE_NAMES``), when verl's FSDP engine module imports (it
    needs ``peft``; where it does not import, verl cannot build that engine either)."""
    import importlib

    from lenkernels.integrations import _verl_engine as eng

    try:
        cls = eng.engine_class()
        forwards = importlib.import_module(eng.FORWARD_MODULE)
    except ImportError:
        return []
    eng.remember_original(cls)
    eng.remember_forwards(forwards)
    owner = f"{eng.ENGINE_MODULE}.{eng.ENGINE_CLASS}"
    return [Replacement(owner, "prepare_model_outputs", prepare_model_outputs),
            Replacement(owner, "prepare_model_inputs", prepare_model_inputs),
            Replacement(eng.FORWARD_MODULE, "forward_with_torch_backend", forward_with_torch_backend),
            Replacement(eng.FORWARD_MODULE, "forward_with_triton_backend", forward_with_triton_backend)]  # fmt: skip


def _registries() -> list[dict]:
    import importlib

    core = importlib.import_module(_CORE)
    return [core.POLICY_LOSS_REGISTRY, core.ADV_ESTIMATOR_REGISTRY]


PATCHED_NAMES = tuple(
    ["logprobs_from_logits", "entropy_from_logits", "entropy_from_logits_with_chunking", "kl_penalty", "agg_loss"]
    + [f.__name__ for f in (*POLICY_LOSSES.values(), *EXTRA_POLICY_LOSSES.values())]
    + ["compute_policy_loss_reinforce"]
    + [f.__name__ for f in ADVANTAGE_ESTIMATORS.values()]
    + list(ROLLOUT_CORRECTION_NAMES)
)
"""The verl function names ``patch()`` replaces (pass any of them in ``exclude`` to keep verl's)."""

PATCHED_ENGINE_NAMES = (
    "prepare_model_outputs",
    "prepare_model_inputs",
    "forward_with_torch_backend",
    "forward_with_triton_backend",
)
"""What ``patch()`` replaces on verl's FSDP actor-engine path when that engine's module imports:
methods of ``FSDPEngineWithLMHead`` and the fused-kernel model forwards of
``verl.models.transformers.dense_common``; ``exclude`` takes them too. Kept apart from
``PATCHED_NAMES``, whose names are all functions of ``verl.utils.torch_functional``,
``verl.trainer.ppo.core_algos`` and ``verl.trainer.ppo.rollout_corr_helper``."""

PATCHED_DISTILLATION_NAMES = ("compute_forward_kl_topk",)
"""verl's on-policy distillation loss ``patch()`` replaces where ``verl.trainer.distillation.fsdp.losses``
imports (``loss_mode="forward_kl_topk"`` of the FSDP strategies, which verl looks up on that module
when it computes the loss); ``exclude`` takes it too."""

_PATCH = ModulePatch("verl", _replacements, _registries)


def patch(exclude=()) -> list[str]:
    """Swaps the lenkernels drop-ins into the installed verl (this process only).

    Args:
        exclude: names from ``PATCHED_NAMES``, ``PATCHED_ENGINE_NAMES`` or ``PATCHED_DISTILLATION_NAMES``
            to leave as verl's (e.g.
            ``("logprobs_from_logits",)``).

    Returns:
        The replaced attributes (``"verl.trainer.ppo.core_algos.agg_loss"``, registry entries, ...).

    Calls nest: each ``patch()`` needs an ``unpatch()``; verl's functions come back on the last.
    Raises ImportError when verl is not installed.
    """
    _check_exclude(exclude, PATCHED_NAMES + PATCHED_ENGINE_NAMES + PATCHED_DISTILLATION_NAMES)
    return _PATCH.apply(exclude)


def unpatch() -> None:
    """Restores verl's functions (everywhere ``patch()`` put the drop-ins)."""
    _PATCH.restore()


def patched(exclude=()):
    """Context manager: ``with patched(): ...`` runs the block with the drop-ins swapped in."""
    _check_exclude(exclude, PATCHED_NAMES + PATCHED_ENGINE_NAMES + PATCHED_DISTILLATION_NAMES)
    return _PATCH.scope(exclude)


def is_patched() -> bool:
    """Whether ``patch()`` is in effect in this process."""
    return _PATCH.active


_export(globals())
