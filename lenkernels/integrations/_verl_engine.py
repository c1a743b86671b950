"""verl's FSDP actor-engine path (``verl.workers.engine.fsdp.transformer_impl.FSDPEngineWithLMHead``):
``prepare_model_outputs``, the step that turns the model's logits into the per-token log-probs,
entropy and Σπ² the losses read, as one lenkernels op; and for ``use_fused_kernels`` the model
forwards of ``verl.models.transformers.dense_common`` (``linear_logprobs_entropy``, or
``linear_token_stats`` when Σπ² is asked for) with ``prepare_model_inputs`` passing them verl's
per-sample temperature and the Σπ² request. Import them from :mod:`lenkernels.integrations.verl`,
which patches them into verl."""

from __future__ import annotations

import functools

import torch

from lenkernels import _backend, _checks
from lenkernels.integrations import _cast
from lenkernels.integrations._verl_token_stats import _logprobs_dtype
from lenkernels.ops import linear_stats as _linear_stats
from lenkernels.ops import token_stats as _ops
from lenkernels.ops.linear_token_stats import linear_token_stats

ENGINE_MODULE = "verl.workers.engine.fsdp.transformer_impl"
ENGINE_CLASS = "FSDPEngineWithLMHead"

_IGNORE = -100  # the padded branch's id at padding positions: logprob 0 there, no logprob gradient
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# verl's own methods, remembered by remember_original() before patch() swaps the drop-ins in
_verl_original = None  # prepare_model_outputs
_verl_inputs = None  # prepare_model_inputs


def engine_class():
    """verl's ``FSDPEngineWithLMHead`` (imports verl's FSDP engine module, which needs ``peft``)."""
    import importlib

    return getattr(importlib.import_module(ENGINE_MODULE), ENGINE_CLASS)


def remember_original(cls) -> None:
    """Keeps verl's ``prepare_model_outputs`` / ``prepare_model_inputs`` of ``cls`` (unless they are
    already these drop-ins): the configurations the drop-ins do not cover run them."""
    global _verl_original, _verl_inputs
    method = cls.__dict__.get("prepare_model_outputs")
    if method is not None and method is not prepare_model_outputs:
        _verl_original = method
    method = cls.__dict__.get("prepare_model_inputs")
    if method is not None and method is not prepare_model_inputs:
        _verl_inputs = method


def _original():
    if _verl_original is None:
        remember_original(engine_class())
    return _verl_original


def _flag(micro_batch, key: str, default):
    from verl.utils import tensordict_utils as tu

    return tu.get_non_tensor_data(data=micro_batch, key=key, default=default)


def _covered(output, micro_batch) -> tuple[torch.Tensor, tuple[str, ...]] | None:
    """``(logits, outputs)`` when the drop-in computes this call, None for verl's own method."""
    from verl.utils.dataset.dataset_utils import DatasetPadMode

    if _flag(micro_batch, "use_fused_kernels", False):  # the model already returned log-probs
        return None
    distillation = _flag(micro_batch, "distillation_use_topk", False) or _flag(micro_batch, "distillation_only", False)
    if distillation and not _flag(micro_batch, "use_remove_padding", True):
        return None  # verl's padded branch packs the logits for the distillation loss: its method
    if _flag(micro_batch, "pad_mode", DatasetPadMode.NO_PADDING) != DatasetPadMode.NO_PADDING:
        return None  # verl raises NotImplementedError
    logits = getattr(output, "logits", None)
    # type() is: a DTensor (tensor-parallel logits sharded over V) or any other subclass is verl's
    if type(logits) is not torch.Tensor or logits.dtype not in _DTYPES or logits.dim() < 2:
        return None
    wanted = () if _flag(micro_batch, "distillation_only", False) else ("logprob",)
    if _flag(micro_batch, "calculate_entropy", False):
        wanted += ("entropy",)
    if _flag(micro_batch, "calculate_sum_pi_squared", False):
        wanted += ("sum_p2",)
    family = _ops.EXTRA_FAMILY if "sum_p2" in wanted else _ops.FAMILY
    try:
        _backend.resolve(None, family, logits.device)
    except _backend.BackendUnavailableError:  # e.g. NPU tensors: no lenkernels kernel runs there
        return None
    return logits, wanted


def _stats(logits, ids, temperature, wanted, *, shared: bool = False):
    """One lenkernels op over ``logits``: ``(logprob | None, entropy | None, sum_p2 | None)`` in
    float32 (no op when nothing is wanted). Log-probs alone write their gradient into ``logits``
    where that is safe (as verl's flash-attn cross-entropy does), otherwise into one new ``[..., V]``
    buffer; never when ``shared`` (another op, e.g. the distillation loss, reads ``logits`` too)."""
    if not wanted:
        return None, None, None
    if wanted == ("logprob",):
        inplace = not shared and _checks.inplace_hazard(logits) is None
        lp, _ = _ops.token_logprobs_entropy(logits, ids, temperature=temperature, ignore_index=_IGNORE,
                                            return_entropy=False, inplace_backward=inplace)  # fmt: skip
        return lp, None, None
    s = _ops.token_stats(logits, ids, temperature=temperature, ignore_index=_IGNORE, outputs=wanted)
    return s.logprob, s.entropy, s.sum_p2


def _distillation_outputs(logits, output_args, micro_batch, logits_processor_func, unit: bool, packed) -> dict:
    """verl's top-K distillation outputs of a packed micro-batch: its loss closure
    (``logits_processor_func``: ``compute_topk_loss``, whose FSDP ``compute_forward_kl_topk`` is
    lenkernels' under ``patch()``) on the temperature-scaled logits, as verl's method calls it, each
    output gathered, unpadded and nested."""
    import importlib

    scale = importlib.import_module(ENGINE_MODULE)._scale_logits_by_temperature
    scaled = scale(logits, output_args["temperature_rmpad"].unsqueeze(-1), is_unit_temperature=unit)
    outputs = logits_processor_func(student_logits=scaled.unsqueeze(0), data=micro_batch)
    cu_seqlens = micro_batch["input_ids"].offsets()
    out = {}
    for key, value in outputs.items():
        value = value.squeeze(0)
        if value.shape != (logits.shape[0],):
            raise ValueError(f"the distillation output {key!r} has shape {tuple(value.shape)}, not [{logits.shape[0]}]")
        out[key] = torch.nested.nested_tensor_from_jagged(packed(value), cu_seqlens)
    return out


def _temperature(temperature: torch.Tensor, unit: bool):
    # verl divides by temperature.clamp(min=1e-8) and skips the division for a host scalar of 1
    return 1.0 if unit else temperature.clamp(min=1e-8)


def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
    """verl's ``FSDPEngineWithLMHead.prepare_model_outputs`` with one read of the logits.

    verl scales the ``[N, V]`` logits by the per-sample temperature (a new ``[N, V]`` tensor), then
    reads them once for Σπ² (two logsumexps), once or more for the entropy and once more for the
    log-probs, and its backward sums one ``[N, V]`` gradient per statistic. Here one lenkernels
    op (``token_stats(logits, ids, temperature=<per token>, outputs=...)``) computes the
    log-probs, the entropy (``calculate_entropy``) and Σπ² (``calculate_sum_pi_squared``) from the
    unscaled logits, with the temperature applied in fp32 inside the kernel: one read of the
    logits forward, one gradient written backward.

    Top-K distillation (``distillation_use_topk``, packed micro-batches): verl's loss closure
    (``logits_processor_func``) runs on the temperature-scaled logits as in verl's method (with
    ``patch()`` its ``compute_forward_kl_topk`` is lenkernels': one ``token_stats`` for the student's
    top-K and its log-probs at the teacher's ids), and the statistics above come from the one op
    (no log-probs with ``distillation_only``).

    Args and returns: verl's. ``output.logits`` is ``[1, total_nnz (/ sp + pad), V]`` packed
    (``use_remove_padding=True``) or ``[B, max_len, V]`` padded; ``output_args`` holds
    ``input_ids_rmpad_rolled``, ``temperature_rmpad`` / ``temperature`` and ``pad_size`` as
    ``prepare_model_inputs`` made them. Returns ``{"log_probs", "entropy"?, "sum_pi_squared"?}``,
    each a nested jagged tensor over ``micro_batch["input_ids"].offsets()``, with Ulysses
    gather/unpad through ``self._gather_and_unpad_packed`` as verl does.

    Result dtypes are verl's: log-probs as ``logprobs_from_logits`` (float32 on CUDA with
    flash-attn, else the logits' dtype), entropy in the logits' dtype (float32 with
    ``entropy_from_logits_with_chunking``), Σπ² in the logits' dtype. The values are float32
    maths rounded once; verl rounds the temperature to the logits' dtype and divides in it (a
    bfloat16 difference only). ``entropy_checkpointing`` needs nothing: the op saves no
    ``[N, V]`` intermediate.

    With ``use_fused_kernels`` and ``calculate_sum_pi_squared`` (which verl refuses: its fused
    forwards have no Σπ²), when the engine's model runs lenkernels' fused forward: the model
    returned ``log_probs``, ``entropy`` and ``sum_pi_squared`` (``linear_token_stats``, asked for by
    the patched ``prepare_model_inputs``), and this wraps them as verl's fused branch does, Σπ²
    with the gather/unpad (packed) or padding mask (padded) of the other two; its dtype is the
    entropy's (the hidden dtype with the torch backend, float32 with triton).

    verl's own method runs, unchanged, for what this does not cover: ``use_fused_kernels`` without
    Σπ² or without lenkernels' fused forward (the model returned log-probs already, and verl
    raises for Σπ²), top-K distillation of padded micro-batches (``use_remove_padding=False``),
    tensor-parallel ``DTensor`` logits (sharded over V), float64 logits,
    a ``pad_mode`` other than ``NO_PADDING`` (verl raises), and devices no lenkernels backend
    runs on (e.g. NPU).

    Example (what the engine's ``forward_step`` runs once ``lenkernels.integrations.verl.patch()``
    is active)::

        model_output = engine.prepare_model_outputs(output=raw_output, output_args=output_args,
                                                    micro_batch=micro_batch, logits_processor_func=None)
        model_output["log_probs"]      # nested [B, j1], float32 for float32 logits
    """
    sum_p2 = getattr(output, "sum_pi_squared", None)  # returned by lenkernels' fused forward when asked
    if sum_p2 is not None and _fused_sum_p2(micro_batch, getattr(self, "module", None)):
        return _fused_outputs(self, output, output_args, micro_batch)
    plan = _covered(output, micro_batch)
    if plan is None:
        return _original()(self, output, output_args, micro_batch, logits_processor_func)
    logits, wanted = plan
    unit = output_args.get("temperature_is_one", False)
    cu_seqlens = micro_batch["input_ids"].offsets()
    nested = torch.nested.nested_tensor_from_jagged

    model_output = {}
    if _flag(micro_batch, "use_remove_padding", True):
        logits = logits.squeeze(0)  # [total_nnz (/ sp + pad), V]
        ids = output_args["input_ids_rmpad_rolled"]
        pad_size = output_args["pad_size"]

        def packed(x):
            return self._gather_and_unpad_packed(x, pad_size)

        distill = _flag(micro_batch, "distillation_use_topk", False)
        if distill:
            model_output = _distillation_outputs(logits, output_args, micro_batch, logits_processor_func, unit, packed)
        temperature = _temperature(output_args["temperature_rmpad"], unit)
        lp, h, sp2 = _stats(logits, ids, temperature, wanted, shared=distill)

        entropy_dtype = torch.get_default_dtype() if self.engine_config.entropy_from_logits_with_chunking else None
    else:  # [B, T, V] padded, no sequence parallelism (as in verl)
        batch, width = logits.shape[0], logits.shape[1]
        valid = torch.arange(width, device=logits.device) < cu_seqlens.diff().to(logits.device).unsqueeze(1)
        ids = torch.full((batch, width), _IGNORE, dtype=torch.int64, device=logits.device)
        ids[valid] = output_args["input_ids_rmpad_rolled"].to(torch.int64)  # row-major: the packed order
        temperature = output_args["temperature"].to(logits.device).reshape(batch, 1)  # [B, 1] -> every token
        lp, h, sp2 = _stats(logits, ids, _temperature(temperature, unit), wanted)

        def packed(x):
            return x[valid]

        entropy_dtype = None

    if lp is not None:
        model_output["log_probs"] = nested(packed(_cast(lp, _logprobs_dtype(logits))), cu_seqlens)
    if h is not None:
        model_output["entropy"] = nested(packed(_cast(h, entropy_dtype or logits.dtype)), cu_seqlens)
    if sp2 is not None:
        model_output["sum_pi_squared"] = nested(packed(_cast(sp2, logits.dtype)), cu_seqlens)
    return model_output


def _fused_outputs(self, output, output_args, micro_batch):
    """verl's ``use_fused_kernels`` branch of ``prepare_model_outputs`` (no distillation), with
    ``output.sum_pi_squared`` beside ``log_probs`` / ``entropy``: nested over the micro-batch's offsets."""
    cu_seqlens = micro_batch["input_ids"].offsets()
    names = ("log_probs", "entropy", "sum_pi_squared") if _flag(micro_batch, "calculate_entropy", False) else \
        ("log_probs", "sum_pi_squared")  # fmt: skip
    if _flag(micro_batch, "use_remove_padding", True):  # [1, total_nnz (/ sp + pad)]

        def packed(x):
            return self._gather_and_unpad_packed(x.squeeze(0), output_args["pad_size"])

    else:  # [B, max_len]: the valid tokens of each row, row-major (the packed order)
        lengths = cu_seqlens.diff()
        valid = torch.arange(output.log_probs.shape[1], device=output.log_probs.device) < lengths.unsqueeze(1)

        def packed(x):
            return x[valid]

    return {name: torch.nested.nested_tensor_from_jagged(packed(getattr(output, name)), cu_seqlens) for name in names}


# --- use_fused_kernels: the model's forward returns log-probs and entropy from the hidden state ----
#
# verl's monkey_patch.patch_forward_with_backends sets the model class's forward to
# verl.models.transformers.dense_common.forward_with_torch_backend ("torch"/"liger") or
# forward_with_triton_backend ("triton") for text models, importing them when it runs: patch()
# replaces those two module attributes, so a model built while patched runs the two below.

FORWARD_MODULE = "verl.models.transformers.dense_common"
FORWARDS = ("forward_with_torch_backend", "forward_with_triton_backend")
_verl_forwards: dict = {}  # verl's forwards, remembered by remember_forwards() before patch() swaps these in
# the keyword the patched prepare_model_inputs adds to the model inputs when the micro-batch asks for
# Σπ² with fused kernels: the token_stats outputs the lenkernels forward pops and computes
OUTPUTS_KWARG = "lenkernels_outputs"


def remember_forwards(module) -> None:
    """Keeps verl's two fused forwards of ``dense_common`` (for the cases the drop-ins leave to them)."""
    for name in FORWARDS:
        fn = getattr(module, name, None)
        if fn is not None and fn not in (forward_with_torch_backend, forward_with_triton_backend):
            _verl_forwards[name] = fn


def _verl_forward(name: str):
    if name not in _verl_forwards:
        import importlib

        remember_forwards(importlib.import_module(FORWARD_MODULE))
    return _verl_forwards[name]


@functools.cache
def output_class():
    """verl's ``CausalLMOutputForPPO`` with a ``sum_pi_squared`` field (``[1, total_nnz]`` packed,
    ``[B, max_len]`` padded, like ``entropy``): what the fused forwards return when asked for Σπ²."""
    from dataclasses import dataclass

    from verl.models.transformers.dense_common import CausalLMOutputForPPO

    @dataclass
    class CausalLMOutputForPPOWithSumPiSquared(CausalLMOutputForPPO):
        sum_pi_squared: torch.FloatTensor | None = None

    CausalLMOutputForPPOWithSumPiSquared.__module__ = __name__
    return CausalLMOutputForPPOWithSumPiSquared


def _fused_forward(self, name, entropy_dtype, kwargs):
    from verl.models.transformers.dense_common import CausalLMOutputForPPO, forward_base_model

    weight, bias = self.lm_head.weight, getattr(self.lm_head, "bias", None)
    temperature = kwargs["temperature"]
    wanted = kwargs.pop(OUTPUTS_KWARG, None)  # set by the patched prepare_model_inputs for Σπ²
    # tensor-parallel (DTensor) LM heads, float64 and devices without a lenkernels backend: verl's
    plain = type(weight) in (torch.Tensor, torch.nn.Parameter) and weight.dtype in _DTYPES
    family = _linear_stats.FAMILY if wanted is None else _ops.EXTRA_FAMILY
    try:
        plain = plain and _backend.resolve(None, family, weight.device) is not None
    except _backend.BackendUnavailableError:
        plain = False
    if not plain:
        if isinstance(temperature, torch.Tensor) or wanted is not None:
            raise NotImplementedError("per-sample temperature or Σπ² with use_fused_kernels need lenkernels' fused "
                                      "forward, which does not run on this LM head (DTensor, float64 or device)")  # fmt: skip
        return _verl_forward(name)(self, **kwargs)
    if not kwargs["return_dict"]:
        raise NotImplementedError(f"{name} has to return_dict")
    outputs = forward_base_model(
        self, input_ids=kwargs["input_ids"], attention_mask=kwargs["attention_mask"],
        position_ids=kwargs["position_ids"], past_key_values=kwargs["past_key_values"],
        inputs_embeds=kwargs["inputs_embeds"], use_cache=kwargs["use_cache"],
        output_attentions=kwargs["output_attentions"], output_hidden_states=kwargs["output_hidden_states"],
        cache_position=kwargs["cache_position"],
    )  # fmt: skip
    hidden_states = outputs[0]
    if kwargs["shift_labels"] is not None:  # the engine's globally rolled labels (Ulysses SP)
        labels = kwargs["shift_labels"]
    elif kwargs["labels"] is not None:
        labels = torch.roll(kwargs["labels"], shifts=-1, dims=-1)
    elif kwargs["input_ids"] is not None:
        labels = torch.roll(kwargs["input_ids"], shifts=-1, dims=-1)
    else:
        raise RuntimeError(f"To use {name}, either labels or input_ids must be provided.")
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.clamp(min=1e-8)
    out_dtype = entropy_dtype or hidden_states.dtype
    device = hidden_states.device.type
    if torch.is_autocast_enabled(device):  # verl's matmul runs in the autocast dtype: so do the operands here
        low = torch.get_autocast_dtype(device)
        hidden_states, weight = hidden_states.to(low), weight.to(low)
        bias = None if bias is None else bias.to(low)
    fields = {"past_key_values": outputs.past_key_values, "hidden_states": outputs.hidden_states,
              "attentions": outputs.attentions}  # fmt: skip
    if wanted is None:
        log_probs, entropy = _linear_stats.linear_logprobs_entropy(
            hidden_states, weight, labels.to(torch.int64), bias=bias, temperature=temperature
        )
        return CausalLMOutputForPPO(log_probs=log_probs, entropy=_cast(entropy, out_dtype), **fields)
    # row chunks of logits through the token_stats kernels, checkpointed: no [N, V] tensor is kept
    st = linear_token_stats(hidden_states, weight, labels.to(torch.int64), bias=bias, temperature=temperature,
                            outputs=wanted)  # fmt: skip
    entropy = None if st.entropy is None else _cast(st.entropy, out_dtype)
    return output_class()(log_probs=st.logprob, entropy=entropy, sum_pi_squared=_cast(st.sum_p2, out_dtype), **fields)


def _forward_doc(fn):
    fn.__doc__ = f"""verl's ``dense_common.{fn.__name__}`` (the model forward of ``use_fused_kernels``
    for text models) with ``lenkernels.linear_logprobs_entropy``: log-probs and entropy from the last
    hidden state and the LM head (its bias included) without ``[N, V]`` logits.

    Same signature and output (``CausalLMOutputForPPO`` with ``log_probs`` float32 and ``entropy``
    {"in the hidden dtype" if fn.__name__.endswith("torch_backend") else "float32"} of the labels'
    shape, as verl's). ``temperature`` may also be a tensor broadcastable to the labels (per
    token ``[1, total_nnz]`` packed, per sequence ``[B, 1]`` padded): the patched
    ``prepare_model_inputs`` passes verl's per-sample temperature that way. Σπ², which verl's fused
    forwards lack: with ``{OUTPUTS_KWARG}=("logprob", "entropy"?, "sum_p2")`` (popped from the
    keyword arguments; the patched ``prepare_model_inputs`` passes it for ``calculate_sum_pi_squared``)
    the forward runs ``lenkernels.linear_token_stats`` instead (row chunks of logits through the
    ``token_stats`` kernels, each checkpointed: one chunk of logits held, never ``[N, V]``) and
    returns :func:`output_class` (``CausalLMOutputForPPO`` plus ``sum_pi_squared``, in the entropy's
    dtype; ``entropy`` None when not asked for). A tensor-parallel (DTensor) or float64 LM head, or a
    device without a lenkernels backend, runs verl's forward (a tensor temperature or
    ``{OUTPUTS_KWARG}`` then raises NotImplementedError). Example:
    ``model.__class__.forward = {fn.__name__}``, as verl's ``patch_forward_with_backends`` does once
    patched.
    """
    return fn


def _backend_forward(name: str, entropy_dtype: torch.dtype | None):
    """verl's forward ``name`` (both of verl's fused forwards have this signature), the entropy in
    ``entropy_dtype`` (None: the hidden dtype)."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, cache_position=None, logits_to_keep=0, temperature=1.0, shift_labels=None,
                **loss_kwargs):  # fmt: skip
        # locals() holds the arguments and this closure's two variables
        kwargs = {k: v for k, v in locals().items() if k not in ("self", "loss_kwargs", "name", "entropy_dtype")}
        return _fused_forward(self, name, entropy_dtype, {**kwargs, **loss_kwargs})

    forward.__name__ = forward.__qualname__ = name
    return _forward_doc(forward)


forward_with_torch_backend = _backend_forward("forward_with_torch_backend", None)
forward_with_triton_backend = _backend_forward("forward_with_triton_backend", torch.float32)


def _runs_lenkernels_forward(module) -> bool:
    """Whether the engine's model (bare, FSDP1-wrapped or FSDP2) runs one of the forwards above."""
    for m in (module, getattr(module, "_fsdp_wrapped_module", None), getattr(module, "module", None)):
        if m is not None and getattr(type(m), "forward", None) in (forward_with_torch_backend,
                                                                   forward_with_triton_backend):  # fmt: skip
            return True
    return False


def _fused_sum_p2(micro_batch, module) -> bool:
    """Whether a ``use_fused_kernels`` micro-batch asks for Σπ² (no distillation) of a model that
    runs lenkernels' fused forward: the case the patched engine methods add to verl's."""
    return bool(
        _flag(micro_batch, "use_fused_kernels", False) and _flag(micro_batch, "calculate_sum_pi_squared", False)
        and not _flag(micro_batch, "distillation_use_topk", False) and not _flag(micro_batch, "distillation_only", False)
        and _runs_lenkernels_forward(module)
    )  # fmt: skip


def prepare_model_inputs(self, micro_batch):
    """verl's ``FSDPEngineWithLMHead.prepare_model_inputs``, plus, with ``use_fused_kernels`` when
    the model runs lenkernels' fused forward, per-sample temperature (verl asserts a scalar) and Σπ²
    (verl raises in ``prepare_model_outputs``).

    Returns verl's ``(model_inputs, output_args)``. For a per-sample temperature it runs verl's
    method with ``use_fused_kernels`` off (its packing, static pad and Ulysses slicing of the
    per-token temperature) and adds the fused forward's arguments as verl does, with
    ``temperature`` the per-token tensor ``[1, total_nnz (/ sp + pad)]`` packed or ``[B, 1]``
    padded. For ``calculate_sum_pi_squared`` (no distillation) it adds
    ``model_inputs["lenkernels_outputs"] = ("logprob", "entropy", "sum_p2")`` (no ``"entropy"``
    without ``calculate_entropy``), which the fused forward pops to return ``sum_pi_squared``.
    Everything else (scalar temperatures without Σπ², verl's own fused forward, which would refuse
    a tensor) is verl's method.
    Example: ``model_inputs, output_args = engine.prepare_model_inputs(micro_batch)``.
    """
    original = _verl_inputs
    if original is None:
        remember_original(engine_class())
        original = _verl_inputs
    module = getattr(self, "module", None)
    if not (_flag(micro_batch, "use_fused_kernels", False) and _runs_lenkernels_forward(module)):
        return original(self, micro_batch)
    per_sample = isinstance(_flag(micro_batch, "temperature", None), torch.Tensor)
    sum_p2 = _fused_sum_p2(micro_batch, module)
    if not (per_sample or sum_p2):
        return original(self, micro_batch)
    if per_sample:
        from verl.utils import tensordict_utils as tu

        unfused = micro_batch.copy()  # shallow: the caller's micro-batch keeps use_fused_kernels
        tu.assign_non_tensor_data(unfused, "use_fused_kernels", False)
        model_inputs, output_args = original(self, unfused)
        if _flag(micro_batch, "use_remove_padding", True):
            model_inputs["temperature"] = output_args["temperature_rmpad"].unsqueeze(0)
            model_inputs["shift_labels"] = output_args["input_ids_rmpad_rolled"].unsqueeze(0)
        else:
            model_inputs["temperature"] = output_args["temperature"].unsqueeze(-1)
        model_inputs["return_dict"] = True
    else:
        model_inputs, output_args = original(self, micro_batch)
    if sum_p2:
        entropy = ("entropy",) if _flag(micro_batch, "calculate_entropy", False) else ()
        model_inputs[OUTPUTS_KWARG] = ("logprob", *entropy, "sum_p2")
    return model_inputs, output_args
