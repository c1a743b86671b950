"""No recompiles: 50 sequence lengths, batch sizes, vocabularies within a bucket and hyper-parameter
values compile a bounded number of Triton kernels (counted from Triton's own cache keys, no GPU
needed; the launches are in tests/specializations.py, one function per op family).

A kernel's bound is the product of what legitimately selects a compiled variant in those launches:
the input dtypes, the configurations of compile-time flags (mode, layout, optional inputs) and the
bucketed tile sizes (STYLE 4). Any count past it means a size or a value became part of the key.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

DTYPES = 2  # every family launches bf16 and fp32 inputs (advantages: fp32 scores, one bf16 configuration)
BLOCK_BUCKETS = 4  # policy loss / KL tiles: next power of two of the mean length, clamped to 128 .. 1024
# the logits-streaming token_stats kernels: rows on 16-byte boundaries or not (the ALIGNED flag,
# 16-byte accesses; V = 151 936 + 7 and 32 000 + i give both), one boolean whatever the sizes
ALIGNMENTS = 2

BOUNDS = {
    "token_stats_fwd_kernel": DTYPES * ALIGNMENTS,
    "token_stats_finalize_kernel": DTYPES,
    "token_stats_bwd_kernel": DTYPES * ALIGNMENTS,
    # lenkernels.token_stats's SPEC 7 outputs: separate kernels (the two-output ones stay as they are)
    "token_stats_extra_fwd_kernel": DTYPES * ALIGNMENTS,
    "token_stats_extra_finalize_kernel": DTYPES,
    "token_stats_extra_bwd_kernel": DTYPES * ALIGNMENTS,
    # padded PPO (lengths 1 .. 2010: every tile bucket) + packed GSPO (short sequences: one bucket at
    # least, all four at most)
    "policy_loss_fwd_kernel": DTYPES * (BLOCK_BUCKETS + 1),
    "policy_loss_bwd_kernel": DTYPES * (BLOCK_BUCKETS + 1),
    "policy_loss_seq_kernel": DTYPES * BLOCK_BUCKETS,  # GSPO only
    "policy_loss_finalize_kernel": 2,  # reads fp32 partials; (aggregation, normaliser source) of the two configurations
    "kl_penalty_fwd_kernel": DTYPES * BLOCK_BUCKETS,
    "kl_penalty_bwd_kernel": DTYPES * BLOCK_BUCKETS,
    # grpo, reinforce_pp_baseline (length weights from the mask), opo (lengths, contiguous groups, bf16
    # scores), batch (raw scores written): four flag sets of one kernel
    "group_advantages_kernel": 4,
    "gaussian_rank_kernel": 1,
    "batch_moments_kernel": 2,  # with and without token weights
    "batch_moments_finalize_kernel": 2,  # reinforce_pp_baseline and batch
    "advantages_broadcast_kernel": 3,  # mask only, mask + batch scale, batch scale only
    "group_stats_kernel": 2,  # (2 columns + lengths from a mask, selection, ids) and (1 column, contiguous)
    "linear_stats_fwd_kernel": DTYPES * 2,  # with and without a bias
    "linear_stats_bwd_kernel": DTYPES * 2,
    "linear_stats_finalize_kernel": 1,
    "phase_stats_fwd_kernel": DTYPES,
    "phase_stats_bwd_kernel": DTYPES,
    "sequence_stats_fwd_kernel": DTYPES * 2,  # with and without the top-entropy mask
    # level (token, sequence, geometric) x mode (truncate, mask) x veto: compile-time codes
    "rollout_correction_fwd_kernel": DTYPES * 3 * 2 * 2,
    "rollout_correction_finalize_kernel": 1,
}


def test_bounded_specializations():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.specializations"], capture_output=True, text=True, env=env, timeout=600,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert counts, "no launch was recorded"
    not_launched = sorted(name for name, n in counts.items() if n == 0)
    assert not not_launched, f"kernels no launch in tests/specializations.py reaches: {not_launched}"
    unbounded = sorted(set(counts) - set(BOUNDS))
    assert not unbounded, f"kernels without a bound here (add one, with the reason): {unbounded}"
    too_many = {name: (n, BOUNDS[name]) for name, n in counts.items() if n > BOUNDS[name]}
    assert not too_many, f"kernels recompiled per size or value (keys, bound): {too_many}"


def test_program_ids_are_64_bit():
    """Offsets past 2^31 elements need 64-bit index arithmetic: every program id (and program count)
    in every Triton kernel is widened before it is multiplied into an offset."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1] / "lenkernels" / "triton"
    narrow = []
    for path in sorted(root.glob("*.py")):
        source = path.read_text()
        for match in re.finditer(r"tl\.(program_id|num_programs)\(\s*\d\s*\)", source):
            if not source[match.end() :].startswith(".to(tl.int64)"):
                line = source.count("\n", 0, match.start()) + 1
                narrow.append(f"{path.name}:{line}: {match.group(0)}")
    assert not narrow, "32-bit program ids: " + ", ".join(narrow)
