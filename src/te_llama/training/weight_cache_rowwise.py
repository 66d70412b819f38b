"""The cached FP8 weights keep only their row-wise copy; each layer's backward makes the transpose and drops it.

On Hopper an FP8 GEMM reads both operands along their inner dimension, so Transformer Engine makes two FP8 copies
of each weight: the row-wise one for the forward and its transpose for the backward's input gradient (the
"column-wise" copy). With TE's weight caching (``is_first_microbatch``, chosen by :mod:`te_llama.training.weight_cache`)
both copies stay cached from one forward to the next: 13 GiB for Llama-3-8B's 7B decoder parameters, held
through the whole step on top of what the step needs anyway (``docs/fp8.md`` says what that did to the allocator).

Here only the row-wise copy is cached (6.5 GiB for 7B parameters):

- forward: just before TE's ``quantize_weight`` looks up or refreshes a cached weight, the weight's quantizer is
  told that no column-wise copy is wanted (``set_usage(columnwise=False)``), so a refresh casts the row-wise copy
  alone and a reuse finds the cache valid without a transpose;
- backward: TE asks each weight for its column-wise copy (``update_usage(columnwise_usage=True)``) and, as it is
  missing, transposes the row-wise FP8 bytes (``tex.fp8_transpose``): the bytes the cast would have written,
  so the results are the same as with TE's own two-copy cache, bit for bit;
- after each decoder layer's backward, :func:`drop_transposes_after_backward` drops the layer's transposes
  again, so one layer's transposes are alive at a time.

Traffic per weight byte and pass without weight updates: one FP8 byte read and one written for the transpose,
instead of none (both copies cached) or a bf16 read and two FP8 writes (a cast every pass); a pass that refreshes
the cache casts the row-wise copy and transposes it later (one byte more than TE's cast of both at once).

Only per-tensor FP8 weights (delayed and current scaling) on GPUs without FP8 GEMMs in other layouts (Hopper)
have a separate transpose; the block-scaled recipes and other GPUs keep TE's own caching. The replacement of TE's
``quantize_weight`` is installed and scoped by :mod:`te_llama.te_patches`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def rowwise_when_cached(original: Callable, active: Callable[[], bool]) -> Callable:
    """TE's ``quantize_weight`` (keyword arguments only, as TE's) that asks for the row-wise copy alone when the
    weight is cached and ``active()`` (a te-llama forward with the weight cache on)."""
    from transformer_engine.pytorch.quantized_tensor import QuantizedTensor
    from transformer_engine.pytorch.tensor.float8_tensor import Float8CurrentScalingQuantizer, Float8Quantizer
    from transformer_engine.pytorch.utils import is_non_tn_fp8_gemm_supported

    per_tensor = (Float8Quantizer, Float8CurrentScalingQuantizer)  # the quantizers whose tensors keep a transpose

    def quantize_weight(**kwargs):
        quantizer = kwargs.get("quantizer")
        cached = kwargs.get("workspace") is not None or kwargs.get("cache", False)
        if (cached and active() and isinstance(quantizer, per_tensor)
                and not isinstance(kwargs.get("tensor"), QuantizedTensor) and not is_non_tn_fp8_gemm_supported()):
            quantizer.set_usage(columnwise=False)
        return original(**kwargs)

    return quantize_weight


def cached_weights(module: torch.nn.Module) -> list:
    """The per-tensor FP8 weights TE has cached in ``module`` and its submodules (``Float8TensorStorage``s), and
    the weights kept in FP8 among their parameters (:mod:`te_llama.training.fp8_weights`)."""
    from transformer_engine.pytorch.tensor.storage.float8_tensor_storage import Float8TensorStorage

    return [weight for child in module.modules()
            for weight in (*getattr(child, "_fp8_workspaces", {}).values(), *child._parameters.values())
            if isinstance(weight, Float8TensorStorage)]


def drop_transposes(layer: torch.nn.Module) -> int:
    """Drop the column-wise copies of ``layer``'s cached FP8 weights; returns how many were dropped."""
    dropped = 0
    for workspace in cached_weights(layer):
        if workspace._transpose is not None:
            workspace.update_usage(columnwise_usage=False)
            dropped += 1
    return dropped


class _DropTransposesAfterBackward(torch.autograd.Function):
    """Identity on a layer's input; its backward, which runs once the whole layer's backward is done, drops the
    layer's transposes."""

    @staticmethod
    def forward(ctx, hidden_states: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
        ctx.layer = layer
        return hidden_states.view_as(hidden_states)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        drop_transposes(ctx.layer)
        return grad, None


def drop_transposes_after_backward(layer: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """``hidden_states`` (the layer's input), marked so that the layer's transposes are dropped after its
    backward; unchanged where no gradient flows."""
    if not (torch.is_grad_enabled() and hidden_states.requires_grad):
        return hidden_states
    return _DropTransposesAfterBackward.apply(hidden_states, layer)
