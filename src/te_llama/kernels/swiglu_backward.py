"""SwiGLU's FP8 backward in one kernel instead of Transformer Engine's two, for TE's ``LayerNormMLP``.

In an FP8 backward pass TE's ``LayerNormMLP`` computes SwiGLU's input gradient in bfloat16 and then casts that copy
to FP8 with its transpose: two passes over 235 MB for one Llama-3-8B layer at 4,096 tokens. The kernel in
:mod:`te_llama.kernels.swiglu_backward_triton` does both in one pass and writes the same FP8 values (but for a few in
ten million, one FP8 step apart, where its sigmoid rounds differently from TE's). What it saves: ``docs/performance.md``.

TE looks up, per activation and recipe, an optional "activation backward + bias gradient + quantize" function
(``layernorm_mlp._act_func(activation, recipe)[2]``); it ships such functions for GELU and ReLU, not for SwiGLU.
:func:`fused_swiglu_backward` (installed by :mod:`te_llama.te_patches`) supplies ours for SwiGLU, only for a
delayed-scaling recipe that :func:`mark_recipe` marked (the recipe of a te-llama model); every other activation,
recipe and model keeps TE's path, and calls the kernel does not cover go to TE's own two kernels.
"""

from __future__ import annotations

import functools

import torch

_MARK = "_te_llama_swiglu_bias_grad"  # on a te-llama model's recipe: whether its MLP has a bias to take a gradient


def mark_recipe(recipe, mlp_bias: bool) -> None:
    """Let TE's SwiGLU backward under ``recipe`` (one model's own recipe object) run the fused kernel."""
    object.__setattr__(recipe, _MARK, bool(mlp_bias))  # TE's recipes are pydantic dataclasses


def dswiglu_quantize(grad: torch.Tensor, act_in: torch.Tensor, quantizer, bias_grad: bool = True, **act_params):
    """``(bias gradient, FP8 input gradient)`` of SwiGLU, the contract of TE's fused activation-backward functions.

    ``grad``: gradient of SwiGLU's output (rows, inner); ``act_in``: SwiGLU's input (rows, 2 * inner), gate
    first; ``quantizer``: the FC1 gradient's ``Float8Quantizer``, its usages already set by TE.
    """
    from transformer_engine.pytorch.constants import TE_DType_To_Torch
    from transformer_engine.pytorch.tensor.float8_tensor import Float8Quantizer

    import transformer_engine_torch as tex  # loadable once transformer_engine.pytorch is imported

    fits = (not act_params and type(quantizer) is Float8Quantizer and quantizer.rowwise_usage
            and grad.dtype == act_in.dtype == torch.bfloat16 and grad.dim() == act_in.dim() == 2
            and act_in.shape == (grad.shape[0], 2 * grad.shape[1]) and grad.is_contiguous()
            and act_in.is_contiguous())
    if not fits:  # TE's own path: the gradient in bfloat16, then cast (with transpose and bias gradient)
        return tex.bgrad_quantize(tex.dswiglu(grad, act_in, None), quantizer)
    from te_llama.kernels.swiglu_backward_triton import dswiglu_fp8

    out = quantizer.make_empty(act_in.shape, dtype=act_in.dtype, device=act_in.device)
    fp8 = TE_DType_To_Torch[quantizer.dtype]
    transpose = out._transpose.view(fp8) if out._transpose is not None else None
    dbias = dswiglu_fp8(grad, act_in, quantizer.scale, quantizer.amax, out._data.view(fp8), transpose,
                        out._scale_inv, bias_grad)
    if transpose is not None:
        out._transpose_invalid = False
    return (dbias.to(grad.dtype) if dbias is not None else None), out


def fused_swiglu_backward(original):
    """TE's ``_act_func`` with :func:`dswiglu_quantize` as SwiGLU's fused backward for recipes :func:`mark_recipe`
    marked (TE discards the bias gradient of a bias-free MLP, so the mark says whether to compute it)."""

    def act_func(activation: str, recipe=None):
        funcs = original(activation, recipe)
        bias_grad = getattr(recipe, _MARK, None)
        if activation == "swiglu" and bias_grad is not None and recipe.delayed():
            return funcs[0], funcs[1], functools.partial(dswiglu_quantize, bias_grad=bias_grad)
        return funcs

    return act_func
