"""Frozen decoder weights kept in FP8 only (:meth:`te_llama.TELlamaForCausalLM.quantize_frozen_weights`).

A weight that no optimizer steps (PEFT LoRA's frozen base; a model that only generates) never changes, yet an FP8
forward casts it to FP8 at every call and keeps the high-precision parameter beside the cast. Here each such weight
is quantized once and replaces its parameter: a Transformer Engine quantized tensor (``Float8Tensor`` for the
delayed and current recipes, ``Float8BlockwiseQTensor`` for block, ``MXFP8Tensor`` for MXFP8), which TE's modules
take as it is (``quantize_weight`` returns a quantized weight unchanged, as for the weights
``te.quantized_model_init`` makes). One byte per weight instead of two plus the cast, and no cast kernels.

Which weights: ``proj`` (HF's ``o_proj``), ``fc1`` (``gate_proj`` and ``up_proj``) and ``fc2`` (``down_proj``) of
each decoder layer, 88 % of a Llama-3-8B layer's weights. q, k and v stay in high precision and are cast per forward
as before: te-llama keeps them as three parameters (HF's three projections, the views PEFT sizes its adapters from),
and TE 2.20 refuses a quantized weight split over several parameters ("Splitting QuantizedTensor into multiple
params is not supported"). Norms, biases, embeddings and the LM head are untouched.

Scales: the current, block and MXFP8 recipes quantize a weight from its own values at every cast, so their weight
quantizer (TE's ``RecipeState`` for the recipe) gives what each forward's cast would. Delayed scaling scales a
weight from the amax history of its earlier casts; a weight never cast again has none, so these weights are
quantized with current scaling (the scale from the weight's own amax): for an unchanging weight that is the scale
delayed scaling converges to, without its first casts at scale 1.

Usages: the forward reads the row-wise copy; a backward through the weights (LoRA's input gradients) reads the
column-wise one. Per-tensor FP8 (delayed and current scaling) keeps the row-wise copy alone, one byte per weight:
on Hopper TE's backward transposes it where it needs the column-wise copy (the same bytes), and each decoder
layer's backward drops its transposes again when it ends (as the weight cache's row-wise copy does,
:func:`te_llama.training.weight_cache_rowwise.drop_transposes_after_backward`), so one layer's are alive at a time
(and the first layer's, whose input needs no gradient under LoRA: nothing marks the end of its backward); newer GPUs
read the row-wise copy both ways. Block and MXFP8 scales run along one direction, so their column-wise
copy is quantized too where ``for_training``.

What changes for the model: its forwards run in FP8 also in evaluation (a BF16 forward would dequantize every
weight at every call); the weights' values are their FP8 roundings, which :func:`dequantize` turns back into
parameters of the model's dtype and ``save_pretrained`` writes. Everything that would write into these weights
(an optimizer, ``load_state_dict``, PEFT's ``merge_and_unload``) needs :func:`dequantize` first.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

QUANTIZED_WEIGHTS: tuple[tuple[str, str], ...] = (("self_attention.proj", "weight"), ("layernorm_mlp", "fc1_weight"),
                                                  ("layernorm_mlp", "fc2_weight"))
"""(module path inside a decoder layer, parameter name) of the weights kept in FP8."""


class FP8WeightsError(RuntimeError):
    """Decoder weights cannot be kept in FP8 here, or an operation needs their high-precision values."""


def quantized_types() -> tuple[type, ...]:
    """The class of Transformer Engine's quantized tensors, or none where TE is not loaded (nothing is quantized
    then, and TE is not imported to find out)."""
    quantized = getattr(sys.modules.get("transformer_engine.pytorch"), "QuantizedTensor", None)
    return () if quantized is None else (quantized,)


def is_quantized(tensor) -> bool:
    """Whether ``tensor`` is a quantized weight (one of :func:`quantized_types`)."""
    return isinstance(tensor, quantized_types())


def high_precision(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``tensor``, dequantized (to ``dtype``) where it is a quantized weight."""
    return tensor.dequantize(dtype=dtype) if is_quantized(tensor) else tensor


def tensor_addresses(tensor: torch.Tensor) -> tuple[int, ...]:
    """Where ``tensor``'s data lives: its data pointer, or that of a quantized tensor's row-wise data (a quantized
    tensor is a wrapper without storage of its own, whose ``data_ptr()`` raises). Not the column-wise copy: a LoRA
    backward makes and drops it at every step, which would look like the weight moving."""
    if not is_quantized(tensor):
        return (tensor.data_ptr(),)
    return (tensor.get_data_tensors(rowwise_data=True, columnwise_data=False).data_ptr(),)


_FORMATS = {"delayed": "Float8Tensor", "current": "Float8Tensor", "block": "Float8BlockwiseQTensor",
            "mxfp8": "MXFP8Tensor"}


def same_format(recipe_name: str, other: str) -> bool:
    """Whether weights kept in FP8 for one recipe can be read by forwards of another (delayed and current scaling
    both read ``Float8Tensor``)."""
    return _FORMATS[recipe_name] == _FORMATS[other]


def per_tensor(recipe) -> bool:
    """Whether ``recipe``'s weights are per-tensor FP8 (``Float8Tensor``), whose column-wise copy is a transpose."""
    return recipe.delayed() or recipe.float8_current_scaling()


def weight_quantizer(recipe, for_training: bool):
    """A quantizer that makes one weight's FP8 tensor for ``recipe`` (TE's recipe object); see the module docstring
    for delayed scaling and the usages."""
    from transformer_engine.common import recipe as te_recipes
    from transformer_engine.pytorch.quantization import RecipeState

    columnwise = for_training and not per_tensor(recipe)
    if recipe.delayed():
        recipe = te_recipes.Float8CurrentScaling(fp8_format=recipe.fp8_format)
    # TE's slots of a linear module's forward are [input, weight, output]: slot 1 is a weight's quantizer.
    quantizer = RecipeState.create(recipe, mode="forward", num_quantizers=3).make_quantizers()[1]
    quantizer.set_usage(rowwise=True, columnwise=columnwise)
    quantizer.internal = False  # a full QuantizedTensor, which can be a parameter
    return quantizer


def _weights(layers) -> list[tuple[nn.Module, str, str]]:
    """(module, parameter name, qualified name) of every weight kept in FP8 in ``layers``."""
    found = []
    for index, layer in enumerate(layers):
        for path, name in QUANTIZED_WEIGHTS:
            found.append((layer.get_submodule(path), name, f"model.layers.{index}.{path}.{name}"))
    return found


def _replace(module: nn.Module, name: str, value: torch.Tensor) -> None:
    module._parameters[name] = nn.Parameter(value, requires_grad=False)
    getattr(module, "_fp8_workspaces", {}).clear()  # a kept FP8 cast of the old weight: not read again


@torch.no_grad()
def quantize(layers, recipe, for_training: bool) -> int:
    """Replace the frozen weights of ``layers`` (:data:`QUANTIZED_WEIGHTS`) by FP8 tensors for ``recipe``; returns
    how many. Raises :class:`FP8WeightsError`, changing nothing, where one of them is trainable."""
    weights = _weights(layers)
    trainable = [qualified for module, name, qualified in weights if getattr(module, name).requires_grad]
    if trainable:
        raise FP8WeightsError(
            f"{trainable[0]} (and {len(trainable) - 1} more) is trainable: only frozen weights can be kept in FP8 "
            "(nothing could update them). Freeze the decoder first: model.requires_grad_(False) for inference, or "
            "add PEFT LoRA adapters (get_peft_model freezes the base)")
    quantizer = weight_quantizer(recipe, for_training)
    count = 0
    for module, name, _ in weights:
        weight = getattr(module, name)
        if not is_quantized(weight):
            _replace(module, name, quantizer(weight.detach()))
            count += 1
    for layer in layers:
        layer.drops_weight_transposes = per_tensor(recipe)
    _forget_unfused_mlps(layers)
    torch.cuda.empty_cache()
    return count


@torch.no_grad()
def dequantize(layers, dtype: torch.dtype) -> int:
    """Replace every FP8 weight of ``layers`` by a frozen parameter of ``dtype`` holding its values; returns how
    many."""
    count = 0
    for module, name, _ in _weights(layers):
        weight = getattr(module, name)
        if is_quantized(weight):
            _replace(module, name, weight.dequantize(dtype=dtype))
            count += 1
    for layer in layers:
        layer.drops_weight_transposes = False
    _forget_unfused_mlps(layers)
    return count


def _forget_unfused_mlps(layers) -> None:
    # The Linear modules of a LoRA layer's unfused MLP (model/adapters.py) hold the parameters they last ran on,
    # which would keep the replaced weights alive; they are made again at their next call.
    for layer in layers:
        layer.__dict__.pop("_unfused_mlp_steps", None)
