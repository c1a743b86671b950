"""lenkernels.integrations.verl's engine drop-in against verl 0.9.1's real FSDP engine method
(``FSDPEngineWithLMHead.prepare_model_outputs``), called on an engine object holding only the
attributes that method reads, with the outputs of a tiny random Qwen2: patched and unpatched give
the same log-probs, entropy and Σπ² (same keys, nested offsets, dtypes) and the same gradients in
the logits and the model's parameters, while the patched method reads the ``[N, V]`` logits in
exactly one op forward and writes one gradient backward. With ``use_fused_kernels`` the patched
model forwards (no ``[N, V]`` logits) give what verl's unfused path gives, per-sample temperature
and Σπ² (which verl's fused path refuses) included.

Needs verl's FSDP engine module to import: verl (``--no-deps``) plus ``peft`` (in the test extra).
"""

from __future__ import annotations

import contextlib
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tests.utils import GRAD_RTOL, STAT_RTOL, assert_close, trainer_module

verl_F = trainer_module("verl.utils.torch_functional")
impl = trainer_module("verl.workers.engine.fsdp.transformer_impl")
tu = trainer_module("verl.utils.tensordict_utils")
transformers = pytest.importorskip("transformers")

from lenkernels.integrations import _verl_engine
from lenkernels.integrations import verl as lk_verl

Engine = impl.FSDPEngineWithLMHead
VERL_METHOD = Engine.__dict__["prepare_model_outputs"]
V = 512
# a 1-token sequence (nothing to shift into), odd lengths, one longer than the static pad bucket
LENGTHS = (7, 1, 20, 12)
KEYS = ("log_probs", "entropy", "sum_pi_squared")


def engine(*, pad_to_length=False, chunking=False):
    """verl's engine object with only what prepare_model_inputs/outputs read (sequence parallel 1)."""
    eng = object.__new__(Engine)
    eng.engine_config = types.SimpleNamespace(
        entropy_from_logits_with_chunking=chunking, entropy_checkpointing=False, entropy_from_logits_chunk_size=2048
    )
    eng.compute_entropy_from_logits = (
        verl_F.entropy_from_logits_with_chunking if chunking else verl_F.entropy_from_logits
    )
    eng.use_ulysses_sp = False
    eng.pad_to_length = pad_to_length  # bucketed static pad: pad_size > 0 to strip in the packed branch
    eng.pad_to_length_bucket = 16
    return eng


def micro_batch(*, rmpad=True, entropy=True, sum_p2=True, temperature="per-sample", **flags):
    ids = torch.nested.nested_tensor([torch.randint(0, V, (n,)) for n in LENGTHS], layout=torch.jagged)
    pos = torch.nested.nested_tensor([torch.arange(n) for n in LENGTHS], layout=torch.jagged)
    # per-sample temperatures, all different (verl's rollout may sample each prompt differently)
    # (a host float is verl's non-tensor form of one temperature for the whole batch)
    temp = {"temperature": torch.rand(len(LENGTHS)) * 1.2 + 0.4} if temperature == "per-sample" else {}
    scalar = {} if temp else {"temperature": temperature}
    return tu.get_tensordict(
        {"input_ids": ids, "position_ids": pos, **temp},
        {"use_remove_padding": rmpad, "calculate_entropy": entropy, "calculate_sum_pi_squared": sum_p2, **scalar,
         **flags},
    )  # fmt: skip


def qwen2():
    cfg = transformers.Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return transformers.Qwen2ForCausalLM(cfg).float()


def run(eng, mb, output, output_args, cotangents=None):
    """``prepare_model_outputs`` as the engine runs it (patched or not: whatever is on the class)."""
    out = eng.prepare_model_outputs(output=output, output_args=output_args, micro_batch=mb, logits_processor_func=None)
    if cotangents is None:
        cotangents = {k: torch.randn(v.values().shape) for k, v in out.items()}
    loss = sum((v.values().float() * cotangents[k]).sum() for k, v in out.items())
    return out, loss, cotangents


def same_outputs(ours, theirs, dtype_rtol=STAT_RTOL):
    assert list(ours) == list(theirs)
    for key in theirs:
        a, e = ours[key], theirs[key]
        assert a.is_nested and a.layout == torch.jagged, key
        assert torch.equal(a.offsets(), e.offsets()), key
        assert a.dtype == e.dtype, (key, a.dtype, e.dtype)
        # fp32 sums over V of terms up to |lse| + |z| in size: an absolute floor at that scale
        scale = float(e.values().detach().abs().max())
        assert_close(a.values(), e.values(), rtol=dtype_rtol, scale=scale, name=key)


# --- the real model: values and parameter gradients ----------------------------------------------


@pytest.mark.parametrize("rmpad", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize(
    "entropy,sum_p2,temperature",
    [
        (True, True, "per-sample"),  # all three statistics from one op
        (True, False, "per-sample"),  # verl's actor update with an entropy bonus
        (False, False, "per-sample"),  # log-probs only: the in-place-backward path
        (False, True, 1.0),  # host temperature 1: verl skips the division (temperature_is_one)
    ],
)
def test_qwen2_outputs_and_parameter_gradients_match_verl(rmpad, entropy, sum_p2, temperature):
    model = qwen2()
    eng = engine(pad_to_length=rmpad)
    mb = micro_batch(rmpad=rmpad, entropy=entropy, sum_p2=sum_p2, temperature=temperature)
    model_inputs, output_args = eng.prepare_model_inputs(mb)
    assert not rmpad or output_args["pad_size"] > 0  # the packed case strips a static pad

    def forward_backward(cotangents=None):
        model.zero_grad(set_to_none=True)
        out, loss, cotangents = run(eng, mb, model(**model_inputs, use_cache=False), output_args, cotangents)
        loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}, cotangents

    theirs, grads_v, cot = forward_backward()
    assert list(theirs) == [k for k, on in zip(KEYS, (True, entropy, sum_p2)) if on]
    with lk_verl.patched():
        assert Engine.__dict__["prepare_model_outputs"] is lk_verl.prepare_model_outputs
        ours, grads, _ = forward_backward(cot)
    same_outputs(ours, theirs)
    for name, g in grads_v.items():
        # sums over tokens (and V, for the LM head) of fp32 terms: an absolute floor at their scale
        assert_close(grads[name], g, rtol=GRAD_RTOL[torch.float32] * 10, scale=float(g.abs().max()), name=name)


# --- passes over the logits, gradient writes and peak memory -------------------------------------


class LogitsTraffic(TorchDispatchMode):
    """Records every op (views excluded) that reads a tensor of at least ``numel`` elements (the
    ``[N, V]`` logits, a scaled copy of them, a gradient of their size) and every one that writes
    one. A custom op is one entry: the ops inside its implementation run below this mode."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.reads, self.writes = numel, [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            big = lambda xs: any(isinstance(x, torch.Tensor) and x.numel() >= self.numel for x in tree_leaves(xs))
            if big((args, kwargs)):
                self.reads.append(str(func))
            if big(out):
                self.writes.append(str(func))
        return out


def peak_bytes(fn) -> int:
    """Peak of the bytes allocated by torch while ``fn`` runs, above what was live before: the
    running sum of the profiler's allocation/free events (CPU tensors; tracemalloc cannot see them)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())  # fmt: skip
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("rmpad", [True, False], ids=["packed", "padded"])
def test_one_read_forward_one_gradient_write_backward(rmpad):
    eng = engine()
    mb = micro_batch(rmpad=rmpad)
    _, output_args = eng.prepare_model_inputs(mb)
    shape = (1, sum(LENGTHS), V) if rmpad else (len(LENGTHS), max(LENGTHS), V)
    rows = shape[0] * shape[1]
    logits = (torch.randn(shape) * 3).requires_grad_(True)
    output = types.SimpleNamespace(logits=logits)

    def measure(cot=None):
        with LogitsTraffic(rows * V) as mode:
            out, loss, cot = run(eng, mb, output, output_args, cot)
            fwd = list(mode.reads)
            n_writes = len(mode.writes)
            (grad,) = torch.autograd.grad(loss, logits)
        bwd_reads, bwd_writes = mode.reads[len(fwd) :], mode.writes[n_writes:]
        fwd_peak = peak_bytes(lambda: run(eng, mb, output, output_args, cot))
        total_peak = peak_bytes(lambda: torch.autograd.grad(run(eng, mb, output, output_args, cot)[1], logits))
        return out, grad, cot, fwd, bwd_reads, bwd_writes, fwd_peak, total_peak

    theirs, grad_v, cot, fwd_v, bwd_v, writes_v, fwd_peak_v, peak_v = measure()
    with lk_verl.patched():
        ours, grad, _, fwd, bwd, writes, fwd_peak, peak = measure(cot)
    same_outputs(ours, theirs)
    assert_close(grad, grad_v, rtol=GRAD_RTOL[torch.float32] * 10, scale=float(grad_v.abs().max()), name="d logits")

    nv = rows * V * logits.element_size()
    print(f"\n[{'packed' if rmpad else 'padded'} {tuple(shape)} fp32, N*V*4 = {nv} B] "
          f"verl: {len(fwd_v)} ops read the logits forward, {len(bwd_v)} backward, {len(writes_v)} write [N, V] "
          f"backward; peak {fwd_peak_v / nv:.2f} N*V*4 forward, {peak_v / nv:.2f} forward+backward | "
          f"patched: {fwd} / {bwd} / {writes}; peak {fwd_peak / nv:.2f} forward, {peak / nv:.2f} forward+backward")  # fmt: skip
    assert len(fwd_v) >= 2 and len(writes_v) >= 2
    assert fwd == ["lenkernels.token_stats_extra.default"]
    assert bwd == writes == ["lenkernels.token_stats_extra_backward.default"]
    # the forward keeps no [N, V] tensor; the backward allocates one gradient
    assert fwd_peak < 0.1 * nv < fwd_peak_v
    assert peak < 1.1 * nv < peak_v


# --- top-K on-policy distillation (packed micro-batches) -------------------------------------------

TOPK = 6


def distillation_batch(*, only: bool, entropy: bool):
    """A packed micro-batch with the teacher's top-K (nested ``[B, j, K]``) and verl's distillation
    loss closure as the logits processor (``distillation_ppo_loss`` bound to the configs, as verl's
    actor binds it)."""
    import functools

    losses = trainer_module("verl.trainer.distillation.losses")
    cfg = trainer_module("verl.workers.config")
    mb = micro_batch(entropy=entropy, sum_p2=False, distillation_use_topk=True, distillation_only=only)
    teacher = [torch.log_softmax(torch.randn(n, V) * 2, -1).topk(TOPK, -1) for n in LENGTHS]
    mb["teacher_logprobs"] = torch.nested.nested_tensor([t.values for t in teacher], layout=torch.jagged)
    mb["teacher_ids"] = torch.nested.nested_tensor([t.indices for t in teacher], layout=torch.jagged)
    actor = cfg.ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1)
    dcfg = cfg.DistillationConfig(distillation_loss=cfg.DistillationLossConfig(
        loss_mode="forward_kl_topk", topk=TOPK, use_policy_gradient=False))  # fmt: skip
    return mb, functools.partial(losses.distillation_ppo_loss, actor, dcfg)


@pytest.mark.parametrize("only,entropy", [(False, True), (True, False)], ids=["with-logprobs", "distillation-only"])
def test_distillation_outputs_and_gradients_match_verl(only, entropy):
    """verl's method computes the distillation outputs (its log_softmax + topk), entropy and
    log-probs in separate passes; patched, one token_stats op gives the statistics and the loss
    closure runs lenkernels' compute_forward_kl_topk: same outputs, same parameter gradients."""
    model = qwen2()
    eng = engine()  # verl refuses pad_to_length with top-K distillation
    mb, processor = distillation_batch(only=only, entropy=entropy)
    model_inputs, output_args = eng.prepare_model_inputs(mb)

    def forward_backward(cotangents=None):
        model.zero_grad(set_to_none=True)
        output = model(**model_inputs, use_cache=False)
        out = eng.prepare_model_outputs(output=output, output_args=output_args, micro_batch=mb,
                                        logits_processor_func=processor)  # fmt: skip
        if cotangents is None:
            cotangents = {k: torch.randn(v.values().shape) for k, v in out.items() if v.is_floating_point()}
        loss = sum((out[k].values() * c).sum() for k, c in cotangents.items())
        loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}, cotangents

    theirs, grads_v, cot = forward_backward()
    assert "distillation_losses" in theirs and ("log_probs" in theirs) != only
    with lk_verl.patched():
        ours, grads, _ = forward_backward(cot)
    assert list(ours) == list(theirs)
    for key in theirs:
        a, e = ours[key], theirs[key]
        assert a.dtype == e.dtype and torch.equal(a.offsets(), e.offsets()), key
        if not e.is_floating_point():  # overlap_count: ties at the K-th logit may differ (none here)
            assert torch.equal(a.values(), e.values()), key
            continue
        assert_close(a.values(), e.values(), rtol=STAT_RTOL, scale=float(e.values().abs().max()), name=key)
    for name, g in grads_v.items():
        assert_close(grads[name], g, rtol=GRAD_RTOL[torch.float32] * 10, scale=float(g.abs().max()), name=name)


def test_distillation_passes_over_the_logits():
    """verl reads the packed [N, V] logits in 9 ops forward (scaling, softmax, logsumexp, entropy's
    mul/sum, log_softmax, topk, two gathers) and 15 backward; patched: the scaling verl's loss
    closure takes, the student's top-K, the sparse statistics and the one statistics op forward."""
    eng = engine()
    mb, processor = distillation_batch(only=False, entropy=True)
    _, output_args = eng.prepare_model_inputs(mb)
    n = sum(LENGTHS)
    logits = (torch.randn(1, n, V) * 3).requires_grad_(True)
    output = types.SimpleNamespace(logits=logits)
    with lk_verl.patched(), LogitsTraffic(n * V) as mode:
        out = eng.prepare_model_outputs(output=output, output_args=output_args, micro_batch=mb,
                                        logits_processor_func=processor)  # fmt: skip
        fwd = list(mode.reads)
        torch.autograd.grad(sum(v.values().sum() for v in out.values() if v.is_floating_point()), logits)
    assert fwd == ["aten.div.Tensor", "lenkernels.topk_ids.default", "lenkernels.token_stats_sparse.default",
                   "lenkernels.token_stats.default"]  # fmt: skip
    assert len(mode.reads) - len(fwd) <= 4


# --- dtypes and the configurations left to verl ----------------------------------------------------


@pytest.mark.parametrize("chunking", [False, True])
def test_bfloat16_logits_keep_verl_dtypes(chunking):
    """bfloat16 logits: log-probs and Σπ² in bfloat16, entropy in bfloat16 (float32 with verl's
    chunked entropy), as verl's. The values are verl's float32 maths on the same logits rounded
    once: verl's own bfloat16 run rounds the temperature and every intermediate (its entropy, a
    difference of two numbers near logsumexp, is off by bfloat16's spacing there, 0.06 at 16)."""
    eng = engine(chunking=chunking)
    mb = micro_batch()
    _, output_args = eng.prepare_model_inputs(mb)
    logits = (torch.randn(1, sum(LENGTHS), V) * 3).bfloat16()
    theirs, _, _ = run(eng, mb, types.SimpleNamespace(logits=logits), output_args)
    exact, _, _ = run(eng, mb, types.SimpleNamespace(logits=logits.float()), output_args)
    with lk_verl.patched():
        ours, _, _ = run(eng, mb, types.SimpleNamespace(logits=logits), output_args)
    assert ours["entropy"].dtype == (torch.float32 if chunking else torch.bfloat16)
    assert [(k, v.dtype) for k, v in ours.items()] == [(k, v.dtype) for k, v in theirs.items()]
    rounded = {k: torch.nested.nested_tensor_from_jagged(v.values().to(ours[k].dtype), v.offsets())
               for k, v in exact.items()}  # fmt: skip
    same_outputs(ours, rounded, dtype_rtol=2.0**-8)


def test_configurations_it_does_not_cover_run_verls_method():
    """use_fused_kernels (the model returned log-probs), distillation, float64 logits: verl's own
    method runs (bit for bit; it calls verl_F's functions, patched or not) and no lenkernels op reads
    the logits."""
    eng = engine()
    mb = micro_batch(use_fused_kernels=True, sum_p2=False)
    mb_inputs = micro_batch(sum_p2=False)
    _, output_args = eng.prepare_model_inputs(mb_inputs)
    n = sum(LENGTHS)
    fused = types.SimpleNamespace(log_probs=-torch.rand(1, n), entropy=torch.rand(1, n))
    f64 = types.SimpleNamespace(logits=torch.randn(1, n, V, dtype=torch.float64))
    cases = [(mb, fused), (mb_inputs, f64), (micro_batch(sum_p2=False, distillation_only=True), f64)]
    with lk_verl.patched(), pytest.raises(NotImplementedError, match="sum_pi_squared"):
        # Σπ² with fused kernels: verl's error stays when the model runs verl's fused forward (no Σπ²)
        eng.prepare_model_outputs(fused, output_args, micro_batch(use_fused_kernels=True), None)
    with lk_verl.patched():
        for m, out in cases:
            theirs = VERL_METHOD(eng, out, output_args, m, None)  # (with the patched verl_F functions)
            with LogitsTraffic(1) as mode:
                ours = eng.prepare_model_outputs(out, output_args, m, None)
            assert not [op for op in mode.reads if op.startswith("lenkernels")]
            assert list(ours) == list(theirs)
            for key in theirs:
                assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key].values(), theirs[key].values())


def test_patch_swaps_the_engine_method_and_restores_it():
    assert "prepare_model_outputs" in lk_verl.PATCHED_ENGINE_NAMES
    assert Engine.__dict__["prepare_model_outputs"] is VERL_METHOD
    dense = trainer_module("verl.models.transformers.dense_common")
    verl_forward = dense.forward_with_torch_backend
    replaced = lk_verl.patch()
    try:
        assert "verl.workers.engine.fsdp.transformer_impl.FSDPEngineWithLMHead.prepare_model_outputs" in replaced
        assert Engine.__dict__["prepare_model_outputs"] is lk_verl.prepare_model_outputs
        assert Engine.__dict__["prepare_model_inputs"] is lk_verl.prepare_model_inputs
        assert dense.forward_with_torch_backend is lk_verl.forward_with_torch_backend
        # the value head's own method is not touched
        assert impl.FSDPEngineWithValueHead.__dict__["prepare_model_outputs"] is not lk_verl.prepare_model_outputs
    finally:
        lk_verl.unpatch()
    assert Engine.__dict__["prepare_model_outputs"] is VERL_METHOD
    assert dense.forward_with_torch_backend is verl_forward
    with lk_verl.patched(exclude=("prepare_model_outputs",)):
        assert Engine.__dict__["prepare_model_outputs"] is VERL_METHOD
        assert verl_F.entropy_from_logits is lk_verl.entropy_from_logits
    assert _verl_engine._original() is VERL_METHOD


# --- use_fused_kernels: the model forward from the hidden state -----------------------------------


@pytest.fixture
def qwen2_forward_restored():
    """verl's patch_forward_with_backends sets the model *class*'s forward: put it back after the test."""
    cls = transformers.Qwen2ForCausalLM
    saved = cls.__dict__["forward"]
    yield
    cls.forward = saved


@pytest.mark.parametrize("rmpad", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("fused_backend", ["torch", "triton"])
def test_fused_kernels_run_lenkernels_with_per_sample_temperature(rmpad, fused_backend, qwen2_forward_restored):
    """use_fused_kernels with per-sample temperatures (verl asserts a scalar): patched, verl's
    patch_forward_with_backends installs lenkernels' forward (linear_logprobs_entropy, no [N, V]
    logits) and the engine passes the per-token temperature; log-probs, entropy and parameter
    gradients match verl's unfused engine path on the same batch."""
    monkey_patch = trainer_module("verl.models.transformers.monkey_patch")
    model = qwen2()
    eng = engine(pad_to_length=rmpad)
    eng.module = model
    mb = micro_batch(rmpad=rmpad, entropy=True, sum_p2=False)
    fused = mb.copy()
    tu.assign_non_tensor_data(fused, "use_fused_kernels", True)

    def forward_backward(batch, cotangents=None):
        model.zero_grad(set_to_none=True)
        model_inputs, output_args = eng.prepare_model_inputs(batch)
        out, loss, cotangents = run(eng, batch, model(**model_inputs, use_cache=False), output_args, cotangents)
        loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}, cotangents, model_inputs

    cot = None
    if not rmpad:
        # verl's padded fused forward rolls each padded row (the last token's label is then a pad or
        # the row's first token), its unfused path the packed batch (the next sequence's first
        # token): a label no loss reads. Those positions get no cotangent and are not compared.
        last = torch.tensor(LENGTHS).cumsum(0) - 1
        cot = {k: torch.randn(sum(LENGTHS)).index_fill_(0, last, 0.0) for k in KEYS[:2]}
    theirs, grads_v, cot, _ = forward_backward(mb, cot)
    with pytest.raises(AssertionError, match="per sample temperature"):
        eng.prepare_model_inputs(fused)  # verl's own fused path refuses it
    with lk_verl.patched():
        with pytest.raises(AssertionError, match="per sample temperature"):
            eng.prepare_model_inputs(fused)  # patched, but the model still runs verl's forward
        monkey_patch.patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend=fused_backend)
        assert type(model).forward is getattr(lk_verl, f"forward_with_{fused_backend}_backend")
        ours, grads, _, model_inputs = forward_backward(fused, cot)
    assert isinstance(model_inputs["temperature"], torch.Tensor) and model_inputs["temperature"].numel() > 1
    # verl's fused forwards return float32 entropy with triton, the hidden dtype with torch: float32 here
    if not rmpad:
        keep = torch.ones(sum(LENGTHS), dtype=torch.bool).index_fill_(0, last, False)
        ours, theirs = ({k: torch.nested.nested_tensor_from_jagged(v.values() * keep, v.offsets()) for k, v in d.items()}
                        for d in (ours, theirs))  # fmt: skip
    same_outputs(ours, theirs)
    for name, g in grads_v.items():
        assert_close(grads[name], g, rtol=GRAD_RTOL[torch.float32] * 10, scale=float(g.abs().max()), name=name)


def test_fused_forward_under_autocast_matches_verls(qwen2_forward_restored):
    """verl's engine runs the model under bfloat16 autocast: its fused forward multiplies in
    bfloat16 whatever the parameters' dtype, and so does the drop-in (same output dtypes; values
    within bfloat16's rounding of the logits, which verl also divides by T in bfloat16)."""
    dense = trainer_module("verl.models.transformers.dense_common")
    model = qwen2()
    ids, pos = torch.randint(0, V, (1, 30)), torch.arange(30)[None]
    outs = []
    for patched in (False, True):
        with lk_verl.patched() if patched else contextlib.nullcontext(), torch.autocast("cpu", dtype=torch.bfloat16):
            type(model).forward = dense.forward_with_torch_backend
            outs.append(model(input_ids=ids, position_ids=pos, temperature=0.7, return_dict=True, use_cache=False))
    theirs, ours = outs
    for name in ("log_probs", "entropy"):
        a, e = getattr(ours, name), getattr(theirs, name)
        assert a.dtype == e.dtype and a.shape == e.shape, name
        # bfloat16 logits (spacing 2^-8 relative) of size up to |z|: errors of that order per term
        assert_close(a, e, rtol=2.0**-6, scale=float(e.detach().abs().max()), name=name)


@pytest.mark.parametrize("rmpad", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize(
    "fused_backend,entropy,temperature",
    [
        ("torch", True, "per-sample"),  # all three statistics, the per-token temperature
        ("triton", False, "per-sample"),  # Σπ² without entropy (verl's triton forward: float32 entropy)
        ("torch", True, 0.7),  # a host temperature: verl's prepare_model_inputs plus the Σπ² request
    ],
)
def test_fused_kernels_sum_pi_squared_match_verls_unfused_path(rmpad, fused_backend, entropy, temperature,
                                                               qwen2_forward_restored):  # fmt: skip
    """use_fused_kernels with calculate_sum_pi_squared (verl raises NotImplementedError: its fused
    forwards have no Σπ²): patched, the engine asks lenkernels' fused forward for Σπ², which runs
    linear_token_stats (token_stats kernels over checkpointed row chunks) and returns it beside the
    log-probs and entropy; all of them and the parameter gradients match verl's unfused engine path
    on the same batch. Unpatched, or patched with verl's forward on the model, verl's error stays."""
    monkey_patch = trainer_module("verl.models.transformers.monkey_patch")
    model = qwen2()
    eng = engine(pad_to_length=rmpad)
    eng.module = model
    mb = micro_batch(rmpad=rmpad, entropy=entropy, sum_p2=True, temperature=temperature)
    fused = mb.copy()
    tu.assign_non_tensor_data(fused, "use_fused_kernels", True)
    n = sum(LENGTHS)

    def forward_backward(batch, cotangents=None):
        model.zero_grad(set_to_none=True)
        model_inputs, output_args = eng.prepare_model_inputs(batch)
        with LogitsTraffic(1) as mode:
            output = model(**model_inputs, use_cache=False)
        out, loss, cotangents = run(eng, batch, output, output_args, cotangents)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        return out, grads, cotangents, model_inputs, output, mode.reads

    keys = [k for k, on in zip(KEYS, (True, entropy, True)) if on]
    cot = {k: torch.randn(n) for k in keys}
    last = torch.tensor(LENGTHS).cumsum(0) - 1
    if not rmpad:
        # the padded fused forward's label at each sequence's last token is not the unfused path's (see
        # test_fused_kernels_run_lenkernels_with_per_sample_temperature): no cotangent, not compared
        cot["log_probs"].index_fill_(0, last, 0.0)
    theirs, grads_v, _, _, _, _ = forward_backward(mb, cot)
    assert list(theirs) == keys

    dummy = types.SimpleNamespace(log_probs=-torch.rand(1, n), entropy=torch.rand(1, n))
    with pytest.raises(NotImplementedError, match="sum_pi_squared"):
        eng.prepare_model_outputs(dummy, {}, fused, None)  # unpatched: verl's error
    with lk_verl.patched():
        if temperature != "per-sample":  # (verl's prepare_model_inputs asserts a scalar temperature)
            model_inputs, _ = eng.prepare_model_inputs(fused)  # the model runs verl's forward:
            assert _verl_engine.OUTPUTS_KWARG not in model_inputs  # no Σπ² request
        with pytest.raises(NotImplementedError, match="sum_pi_squared"):
            eng.prepare_model_outputs(dummy, {}, fused, None)  # and verl's error stays
        monkey_patch.patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend=fused_backend)
        assert type(model).forward is getattr(lk_verl, f"forward_with_{fused_backend}_backend")
        ours, grads, _, model_inputs, output, reads = forward_backward(fused, cot)
    wanted = ("logprob", "entropy", "sum_p2") if entropy else ("logprob", "sum_p2")
    assert model_inputs[_verl_engine.OUTPUTS_KWARG] == wanted
    assert isinstance(model_inputs["temperature"], torch.Tensor) == (temperature == "per-sample")
    assert type(output) is _verl_engine.output_class() and (output.entropy is None) == (not entropy)
    # linear_token_stats' chunked path (the token_stats kernels), not linear_logprobs_entropy's
    assert "lenkernels.token_stats_extra.default" in reads and "lenkernels.linear_stats.default" not in reads
    if not rmpad:
        keep = torch.ones(n, dtype=torch.bool).index_fill_(0, last, False)
        ours["log_probs"], theirs["log_probs"] = (
            torch.nested.nested_tensor_from_jagged(d["log_probs"].values() * keep, d["log_probs"].offsets())
            for d in (ours, theirs)
        )
    same_outputs(ours, theirs)
    for name, g in grads_v.items():
        assert_close(grads[name], g, rtol=GRAD_RTOL[torch.float32] * 10, scale=float(g.abs().max()), name=name)


def test_fused_sum_pi_squared_under_autocast(qwen2_forward_restored):
    """Under the engine's bfloat16 autocast the Σπ² forward multiplies in bfloat16 like the
    log-probs one: its statistics are verl's unfused ones on the model's own bfloat16 logits (divided
    by T in float32 here), in the entropy's dtype."""
    dense = trainer_module("verl.models.transformers.dense_common")
    model = qwen2()
    ids, pos = torch.randint(0, V, (1, 30)), torch.arange(30)[None]
    with lk_verl.patched(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        type(model).forward = dense.forward_with_torch_backend
        ours = model(input_ids=ids, position_ids=pos, temperature=0.7, return_dict=True, use_cache=False,
                     **{_verl_engine.OUTPUTS_KWARG: ("logprob", "entropy", "sum_p2")})  # fmt: skip
    assert logits.dtype == torch.bfloat16 and ours.sum_pi_squared.dtype == ours.entropy.dtype
    z = logits.float() / 0.7
    expected = {
        "log_probs": torch.log_softmax(z, -1).gather(-1, torch.roll(ids, -1, -1)[..., None])[..., 0],
        "entropy": verl_F.entropy_from_logits(z),
        "sum_pi_squared": verl_F.calculate_sum_pi_squared_from_logits(z),
    }
    for name, e in expected.items():
        a = getattr(ours, name)
        assert_close(a, e.to(a.dtype), rtol=STAT_RTOL, scale=float(e.detach().abs().max()), name=name)
