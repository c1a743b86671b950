"""verl's top-K on-policy distillation loss (``verl.trainer.distillation.fsdp.losses
.compute_forward_kl_topk``, ``loss_mode="forward_kl_topk"``; the FSDP/FSDP2/VeOmni strategies) with
the student's statistics from one ``lenkernels.token_stats`` call.

verl computes ``log_softmax`` of the student's ``[B, T, V]`` logits (a second ``[B, T, V]`` tensor,
kept for backward), then ``torch.topk`` of it and a gather at the teacher's ids; its opt-in
``use_chunked_topk`` path avoids that buffer with a Python loop of float32 chunk copies (verl
measures ~6x the time). The drop-in asks ``token_stats`` for ``"topk"`` (the student's own top-K ids,
for the overlap diagnostics) and ``"gathered"`` (its log-probabilities at the teacher's ids): one
read of the logits for the statistics plus one for the top-K selection, no ``[B, T, V]``
intermediate, and one gradient write backward. The rest (probability masses, the clamp, the forward
KL over the top-K, the overlap diagnostics) is verl's arithmetic on ``[B, T, K]`` tensors, written
out below; both of verl's paths (``use_chunked_topk`` or not) give the same numbers, and so does
this one.

Differences, deliberate: the student's log-probabilities are float32 maths rounded once to the
logits' dtype (verl's default path rounds ``log_softmax`` in the logits' dtype, its chunked path
computes in float32 like this one); ties among the student's top-K logits go to the lower id
(``torch.topk`` picks any), which only the overlap diagnostics see.
"""

from __future__ import annotations

import importlib

import torch

IGNORE = -100  # no target id here: every row is an ignored row of token_stats


def compute_forward_kl_topk(
    student_logits: torch.Tensor,
    teacher_topk_log_probs: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    config,
    data_format: str,
) -> dict[str, torch.Tensor]:
    """Drop-in for verl's ``compute_forward_kl_topk``: the forward KL between the teacher's and the
    student's distributions restricted to the teacher's top-K ids, per token, and its diagnostics.

    Args:
        student_logits: ``[bsz, seqlen / sp, V]`` (verl passes ``[1, total_nnz / sp, V]``).
        teacher_topk_log_probs, teacher_topk_ids: nested ``[bsz, j, K]`` (verl's ``teacher_logprobs``
            and ``teacher_ids``).
        config: verl's ``DistillationConfig`` (``distillation_loss.log_prob_min_clamp`` is read).
        data_format: ``"thd"`` or ``"bshd"`` (as verl: not used by the computation).

    Returns:
        verl's dict, each ``[bsz, seqlen / sp]``: ``distillation_losses`` (float32),
        ``student_mass`` and ``teacher_mass`` (the log-probabilities' dtypes), ``overlap_count``
        (int64), ``overlap_token_advantage`` (float32).
    """
    from lenkernels.ops.token_stats import token_stats

    if not (teacher_topk_log_probs.is_nested and teacher_topk_ids.is_nested):
        raise ValueError("teacher_topk_log_probs and teacher_topk_ids must be nested tensors (verl's teacher outputs)")
    teacher_lp = teacher_topk_log_probs.values().unsqueeze(0)
    teacher_ids = teacher_topk_ids.values().unsqueeze(0)
    ulysses = importlib.import_module("verl.utils.ulysses")
    if ulysses.get_ulysses_sequence_parallel_world_size() > 1:
        teacher_lp = ulysses.slice_input_tensor(teacher_lp, dim=1)
        teacher_ids = ulysses.slice_input_tensor(teacher_ids, dim=1)
    if not (teacher_lp.shape[:2] == teacher_ids.shape[:2] == student_logits.shape[:2]):
        raise ValueError(
            f"the teacher's top-K {tuple(teacher_ids.shape)} and the student's logits {tuple(student_logits.shape)} "
            "must cover the same tokens"
        )
    k = teacher_ids.shape[-1]
    ids = torch.full(student_logits.shape[:-1], IGNORE, dtype=torch.int64, device=student_logits.device)
    stats = token_stats(
        student_logits, ids, outputs=("topk", "gathered"), top_k=k, gather_ids=teacher_ids,
        backend="reference" if student_logits.dtype == torch.float64 else None,
    )  # fmt: skip
    student_lp = stats.gathered_logprobs.to(student_logits.dtype)
    student_mass = student_lp.exp().sum(dim=-1)
    teacher_mass = teacher_lp.exp().sum(dim=-1)
    floor = config.distillation_loss.log_prob_min_clamp
    if floor is not None:
        student_lp, teacher_lp = student_lp.clamp_min(floor), teacher_lp.clamp_min(floor)
    p_teacher = teacher_lp.float().exp()
    token_kl = p_teacher * (teacher_lp.float() - student_lp.float())
    # overlap of the two top-K sets ("Rethinking On-Policy Distillation of LLMs", arXiv:2604.13016)
    overlap = (teacher_ids.unsqueeze(-1) == stats.topk_ids.unsqueeze(-2)).any(dim=-1)
    count = overlap.sum(dim=-1)
    token_adv = teacher_lp.exp() * (teacher_lp - student_lp)
    adv_sum = (-token_adv * overlap).sum(dim=-1)
    advantage = torch.where(count > 0, adv_sum / count.clamp_min(1), torch.zeros_like(adv_sum))
    return {
        "distillation_losses": token_kl.sum(dim=-1),
        "student_mass": student_mass,
        "teacher_mass": teacher_mass,
        "overlap_count": count,
        "overlap_token_advantage": advantage,
    }
