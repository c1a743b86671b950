"""Counts the Triton kernels a sequence of launches would compile, without a GPU.

Run in a process where TRITON_INTERPRET is unset: JITFunction.run is replaced by a recorder that
binds the arguments exactly as Triton does (types, pointer alignment, integer specialisation,
constexprs, launch options) and records the compile-cache key instead of compiling/launching.
Usage: ``python -m tests.specializations`` prints a JSON object {kernel name: distinct keys}.
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


def main() -> int:
    with recording() as keys:
        for launches in (token_stats_launches,):
            launches()
    print(json.dumps({name: len(v) for name, v in keys.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
