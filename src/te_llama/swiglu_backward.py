"""SwiGLU's FP8 backward in one kernel instead of Transformer Engine's two, plugged into TE's ``LayerNormMLP``.

In an FP8 backward pass TE's ``LayerNormMLP`` computes SwiGLU's input gradient in bfloat16 (``dgated_act_kernel``)
and then casts that copy to FP8 with its transpose (``cast_transpose_fusion_kernel``). For one Llama-3-8B layer
at 4,096 tokens that is 352 MB read and 235 MB written, then 235 MB read and 235 MB written again; on an H200
the two kernels took 4.8 + 4.2 ms of a 235 ms forward + backward step (shape B). The kernel in
:mod:`te_llama.swiglu_backward_triton` does both in one pass and writes the same FP8 values (but for a few in
ten million, one FP8 step apart, where its sigmoid rounds differently from TE's). On four H200s it took 0.20-0.30 ms
a layer instead of 0.28-0.30, and shape B's step 231.0 instead of 233.3 ms on average (1 %).

TE looks up, per activation and recipe, an optional "activation backward + bias gradient + quantize" function
(``layernorm_mlp._act_func(activation, recipe)[2]``) and calls it when there is one; it ships such functions for
GELU and ReLU, not for SwiGLU. :func:`install` supplies ours for SwiGLU under delayed scaling (where the gradient
quantizer is a per-tensor ``Float8Quantizer``); every other activation and recipe keeps TE's path. The function
falls back to TE's own two kernels for anything the kernel does not cover. ``TE_LLAMA_FUSED_SWIGLU=0`` turns it
off (for side-by-side measurements).
"""

from __future__ import annotations

import os
import sys

import torch

from te_llama import te_functions

ENV_SWITCH = "TE_LLAMA_FUSED_SWIGLU"


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1") != "0"


def dswiglu_quantize(grad: torch.Tensor, act_in: torch.Tensor, quantizer, **act_params):
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
    # TE discards the bias gradient of a bias-free MLP; its backward holds the FC1 bias as ``fc1_bias``. Where
    # that local cannot be found (another TE version), the bias gradient is computed.
    bias_grad = sys._getframe(1).f_locals.get("fc1_bias", True) is not None

    from te_llama.swiglu_backward_triton import dswiglu_fp8

    out = quantizer.make_empty(act_in.shape, dtype=act_in.dtype, device=act_in.device)
    fp8 = TE_DType_To_Torch[quantizer.dtype]
    transpose = out._transpose.view(fp8) if out._transpose is not None else None
    dbias = dswiglu_fp8(grad, act_in, quantizer.scale, quantizer.amax, out._data.view(fp8), transpose,
                        out._scale_inv, bias_grad)
    if transpose is not None:
        out._transpose_invalid = False
    return (dbias.to(grad.dtype) if dbias is not None else None), out


def _with_fused_swiglu_backward(original):
    """TE's ``_act_func`` with :func:`dswiglu_quantize` as SwiGLU's fused backward under delayed scaling."""

    def act_func(activation: str, recipe=None):
        funcs = original(activation, recipe)
        if activation == "swiglu" and recipe is not None and recipe.delayed() and enabled():
            return funcs[0], funcs[1], dswiglu_quantize
        return funcs

    return act_func


def install() -> bool:
    """Give TE's ``LayerNormMLP`` the fused SwiGLU backward for delayed scaling (idempotent). Returns whether it
    is in place: ``False`` when switched off or when this TE version has no ``_act_func`` to extend."""
    if not enabled():
        return False
    from transformer_engine.pytorch.module import layernorm_mlp

    return te_functions.replace(layernorm_mlp, "_act_func", _with_fused_swiglu_backward, "te_llama_fused_swiglu",
                                "SwiGLU's backward stays TE's two kernels")
