"""Counts the Triton kernels a sequence of launches would compile, without a GPU.

Run in a process where TRITON_INTERPRET is unset: JITFunction.run is replaced by a recorder that
binds the arguments exactly as Triton does (types, pointer alignment, integer specialisation,
constexprs, launch options) and records the compile-cache key instead of compiling/launching.
Usage: ``python -m tests.specializations`` prints a JSON object {kernel name: distinct keys}; every
``*_kernel`` of lenkernels.triton is listed (0: no launch reached it). One ``*_launches`` function per
op family calls its host launchers with 50 sizes and hyper-parameter values.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections import defaultdict


@contextlib.contextmanager
def recording():
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime import jit

    backend = make_backend(GPUTarget("cuda", 90, 32))
    keys: dict[str, set] = defaultdict(set)
    binders = {}
    original = jit.JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        binder = binders.get(self)
        if binder is None:
            binder = binders[self] = jit.create_function_from_signature(self.signature, self.params, backend)
        _, specialization, options = binder(*args, **kwargs)
        keys[self.fn.__name__].add(jit.compute_cache_key({}, specialization, options))

    jit.JITFunction.run = run
    try:
        yield keys
    finally:
        jit.JITFunction.run = original


def token_stats_launches():
    """50 sequence lengths, vocabularies within a bucket, temperatures, ignore indices, dtypes."""
    import torch

    from lenkernels.ops.token_stats import token_stats_bwd, token_stats_fwd
    from lenkernels.ops.token_stats_extra import _token_stats_extra_backward, token_stats_extra_fwd

    for i in range(50):
        n = 1 + 37 * i  # 1 .. 1814 rows: split and unsplit plans
        vocab = 151_936 + (i % 5) * 7 if i % 2 else 32_000 + i  # sizes within the >= 4096 bucket
        for dtype in (torch.bfloat16, torch.float32):
            logits = torch.empty(n, vocab, dtype=dtype)
            ids = torch.zeros(n, dtype=torch.long)
            temp = torch.full((1,), 0.5 + i / 50) if i % 3 else torch.full((n,), 0.7)
            lp, ent, lse, mz = token_stats_fwd(logits, ids, temp, -100 - i, "triton")
            g = torch.empty(n)
            token_stats_bwd(logits, ids, temp, lse, mz, g, torch.empty(1).expand(n) if i % 4 else g, -100 - i, "triton", logits)
            # the SPEC 7 outputs (lenkernels.token_stats): their own kernels, the same plan
            out = token_stats_extra_fwd(logits, ids, temp, -100 - i, "triton")
            _token_stats_extra_backward(logits, ids, temp, out[2], out[3], out[5], out[6], *([g] * 6), -100 - i, "triton")


def policy_loss_launches():
    """50 batch sizes, sequence lengths and hyper-parameter values on two configurations of the
    compile-time flags (padded PPO with every optional input; packed GSPO with a tensor normaliser),
    two logprob dtypes; and the KL estimator kernels on 50 lengths."""
    import torch

    from lenkernels._codes import Agg, Mode, NormSource
    from lenkernels.ops.policy_loss import kl_penalty_bwd, kl_penalty_fwd, policy_loss_bwd, policy_loss_fwd
    from lenkernels.ops.policy_loss_args import PolicyConfig, PolicyInputs, kl_config

    for i in range(50):
        b, t = 1 + i % 7, 1 + 41 * i  # 1 .. 2010 tokens per row: every tile-size bucket
        lengths = torch.tensor([(7 * i + 3 * j) % 97 for j in range(b)])
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        n = int(cu[-1]) + i % 3  # tokens after the last sequence
        for dtype in (torch.bfloat16, torch.float32):
            f32 = dict(dtype=torch.float32)
            lp, old, ref = (torch.zeros(b, t, dtype=dtype) for _ in range(3))
            ent, w = torch.zeros(b, t, dtype=dtype), torch.zeros(b, t, dtype=dtype)
            mask = torch.ones(b, t, dtype=torch.bool)
            threshold = torch.full((1,), 0.5 + i / 10, dtype=torch.float64)
            inputs = PolicyInputs(lp, old, torch.zeros(b, **f32), mask, None, ref, ent, w, threshold, None)
            config = PolicyConfig(Mode.PPO, 0.1 + i / 100, 0.2 + i / 90, 1.5 + i / 10, 1.0, 1.05, Agg.TOKEN_MEAN,
                                  kl_coef=0.01 * i, entropy_coef=0.002 * i, dp_size=1.0 + i % 4)  # fmt: skip
            stats, seq = policy_loss_fwd(inputs, config, "triton")
            policy_loss_bwd(inputs, config, "triton", stats, seq, torch.ones(16), True)
            flat = torch.zeros(n, dtype=dtype)
            inputs = PolicyInputs(flat, flat.clone(), torch.zeros(b, **f32), None, cu, None, None, None, None,
                                  torch.full((1,), 3.0 + i, **f32))  # fmt: skip
            config = PolicyConfig(Mode.GSPO, 3e-4 + i * 1e-5, 4e-4 + i * 1e-5, 2.0 + i, 1.0 + i / 50, 1.05 + i / 40,
                                  Agg.SEQ_MEAN_TOKEN_MEAN, norm_source=NormSource.NORM_TENSOR)  # fmt: skip
            stats, seq = policy_loss_fwd(inputs, config, "triton")
            policy_loss_bwd(inputs, config, "triton", stats, seq, torch.ones(16), False)
            x = torch.zeros(1 + 97 * i, dtype=dtype)
            kl_penalty_fwd(x, x, kl_config("low_var_kl", True), "triton")
            kl_penalty_bwd(torch.zeros(x.shape), x, x, kl_config("k3+", True), "triton")


def advantages_launches():
    """50 batch sizes, group counts, token lengths, eps and flag values (norm_by_std, unbiased) on a
    fixed set of method/layout configurations (the compile-time flags), and group_stats likewise."""
    import torch

    from lenkernels.ops import advantages as ops

    for i in range(50):
        n, t = 2 + 7 * i, 1 + 13 * (i % 20)
        ids = torch.arange(n) % (1 + i % 9)  # 1 .. 9 groups, sizes change with n
        rewards, mask = torch.zeros(n, t), torch.ones(n, t, dtype=torch.bool)
        scores = torch.zeros(n)
        lengths = torch.ones(n, dtype=torch.int32)
        eps, norm, unbiased = 1e-6 * (i + 1), bool(i % 2), bool(i % 3)
        for method in ("grpo", "reinforce_pp_baseline", "gaussian"):  # token rewards + mask, group ids
            ops.group_advantages_fwd(rewards, ids, 0, mask, None, None, method, eps, norm, unbiased, "triton",
                                     torch.empty(n, t))  # fmt: skip
        size = 1 + i % 2  # contiguous groups of a size dividing n (n is even when i is even)
        if n % size == 0:
            ops.group_advantages_fwd(scores.to(torch.bfloat16), None, size, None, lengths, None, "opo", eps, norm,
                                     unbiased, "triton", torch.empty(n))  # fmt: skip
        ops.group_advantages_fwd(scores, ids, 0, None, None, None, "batch", eps, norm, unbiased, "triton", torch.empty(n))
        ops.group_stats_fwd(torch.zeros(n, 2), torch.ones(n, 3), ids, 0, mask, "triton", torch.empty(n, 3, 6),
                            torch.empty(n))  # fmt: skip
        if n % 2 == 0:
            ops.group_stats_fwd(scores[:, None], None, None, 2, None, "triton", torch.empty(n, 1, 6), torch.empty(0))


def linear_stats_launches(count: int = 50):
    """``count`` row counts, hidden sizes, vocabularies, temperatures and tile positions (a few tiles
    per backward call, at varying offsets), for two dtypes with and without a bias."""
    import torch

    from lenkernels.ops.linear_stats import linear_stats_bwd, linear_stats_fwd

    for i in range(count):
        n, d, v = 1 + 29 * i, 16 + 8 * (i % 5), 100 + 37 * i
        for dtype in (torch.bfloat16, torch.float32):
            h, w = torch.zeros(n, d, dtype=dtype), torch.zeros(v, d, dtype=dtype)
            b = torch.zeros(v, dtype=dtype) if i % 2 else None
            ids = torch.zeros(n, dtype=torch.long)
            temp = torch.full((1,), 0.5 + i / 16) if i % 3 else torch.full((n,), 0.7)
            _, _, lse, mz = linear_stats_fwd(h, w, b, ids, temp, 1 << 30, "triton")
            g = torch.zeros(n)
            linear_stats_bwd(h, w, b, ids, temp, lse, mz, g, g, n * v // 3 + 1, "triton", True, True, b is not None)


def phase_stats_launches():
    """50 token counts, sequence counts, channel counts, delimiter lengths and thresholds, for two
    value dtypes, with and without the top-entropy mask."""
    import torch

    from lenkernels.ops.phase_stats import phase_stats_bwd, phase_stats_fwd
    from lenkernels.ops.sequence_stats import sequence_stats_fwd

    for i in range(50):
        n_seq, n = 1 + i % 6, 5 + 83 * i
        cu = torch.linspace(0, n - i % 3, n_seq + 1).long()
        ids, valid = torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.bool)
        delim = torch.arange(1 + i % 3)
        for dtype in (torch.bfloat16, torch.float32):
            channels = 1 + i % 2
            values = torch.zeros(channels, n, dtype=dtype)
            outs = [torch.empty(channels, n_seq) for _ in range(4)] + [torch.empty(n_seq, dtype=torch.long) for _ in range(3)]
            outs.append(torch.empty(n_seq, dtype=torch.bool))
            phase_stats_fwd(values, ids, valid, cu, delim, "triton", outs)
            grads = [torch.zeros(channels, n_seq) for _ in range(4)]
            phase_stats_bwd(valid, cu, outs[6], outs[4], outs[5], delim.numel(), grads, "triton", torch.empty_like(values))
            seq_outs = [torch.empty(n_seq, dtype=torch.long)] + [torch.empty(n_seq) for _ in range(4)]
            quantile = torch.full((1,), 0.1 * i) if i % 2 else None
            sequence_stats_fwd(values[0], valid, cu, 0.3 + i / 7, quantile, "triton",
                               seq_outs + [torch.empty(n, dtype=torch.bool)])  # fmt: skip


def rollout_correction_launches():
    """50 token and sequence counts, thresholds and clamps, every level x mode, with and without a
    veto, for two input dtypes."""
    import torch

    from lenkernels._codes import CorrectionLevel, CorrectionMode
    from lenkernels.ops.rollout_correction import CorrectionConfig, _outputs, rollout_correction_fwd

    for i in range(50):
        n_seq, n = 1 + i % 7, 3 + 41 * i
        cu = torch.linspace(0, n - i % 3, n_seq + 1).long()
        valid = torch.ones(n, dtype=torch.bool)
        cfg = CorrectionConfig(CorrectionLevel(i % 3), CorrectionMode((i // 3) % 2), 0.1 + i / 100, 2.0 + i / 10,
                               10.0 + i, i % 4 == 0, 0.01 * (i + 1), 5.0 + i)  # fmt: skip
        for dtype in (torch.bfloat16, torch.float32):
            old = torch.zeros(n, dtype=dtype)
            rollout_correction_fwd(old, old, valid, cu, cfg, "triton", _outputs(old, i % 2 == 0))


FAMILIES = {
    "token_stats": token_stats_launches,
    "policy_loss": policy_loss_launches,
    "advantages": advantages_launches,
    "linear_stats": linear_stats_launches,
    "phase_stats": phase_stats_launches,
    "rollout_correction": rollout_correction_launches,
}


def all_kernels() -> set[str]:
    """Names of every ``*_kernel`` Triton function in lenkernels.triton (a kernel no launch above
    reaches shows up with 0 keys)."""
    import importlib
    import pkgutil

    from triton.runtime import jit

    import lenkernels.triton as package

    names = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        names |= {n for n, v in vars(module).items() if isinstance(v, jit.JITFunction) and n.endswith("_kernel")}
    return names


def main() -> int:
    with recording() as keys:
        for launches in FAMILIES.values():
            launches()
    counts = {name: len(v) for name, v in keys.items()}
    counts.update({name: 0 for name in all_kernels() - set(counts)})
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
