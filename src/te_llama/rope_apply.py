"""Rotary position embedding of TE's attention by one Triton kernel per tensor instead of TE's fused RoPE kernels.

TE's ``MultiheadAttention`` rotates the query and the key by calling its module's ``apply_rotary_pos_emb(...,
fused=True)`` once each. TE's ``fused_rope_forward_kernel`` and ``fused_rope_backward_kernel`` move one 2-byte
element per thread; on an H200 they took 1.7 + 1.8 ms of shape B's step (32 layers, 4,096 tokens), under 2 TB/s.
The kernel in :mod:`te_llama.rope_apply_triton` loads each head's halves as vectors and computes the same float32
math (``x * cos + rotate_half(x) * sin``, ``cos`` and ``sin`` of TE's angle table); its outputs and gradients equal
TE's bit for bit (``tests/gpu/test_rope_apply.py``).

:func:`install` replaces that module-level name with a function that runs the kernel for what it covers
(``bshd``/``sbhd``, one angle table for the batch, not interleaved, no start positions, no context parallelism, a
bfloat16 CUDA tensor whose last dim is contiguous, a power-of-two head dim rotated in full) and calls TE's own
function for everything else. ``TE_LLAMA_FUSED_ROPE=0`` keeps TE's kernels (for side-by-side measurements).
"""

from __future__ import annotations

import os

import torch

from te_llama import te_functions

ENV_SWITCH = "TE_LLAMA_FUSED_ROPE"


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1") != "0"


def covered(t: torch.Tensor, freqs: torch.Tensor, tensor_format: str, start_positions, interleaved: bool,
            cu_seqlens, cp_size: int) -> bool:
    """Whether the kernel computes this call exactly as TE's fused RoPE would."""
    if tensor_format not in ("bshd", "sbhd") or start_positions is not None or interleaved or cu_seqlens is not None:
        return False
    if cp_size != 1 or not t.is_cuda or t.dim() != 4 or t.dtype != torch.bfloat16:
        return False
    dim = t.shape[-1]
    seq = t.shape[1] if tensor_format == "bshd" else t.shape[0]
    return (t.stride(-1) == 1 and dim >= 2 and dim & (dim - 1) == 0 and freqs.dtype == torch.float32
            and freqs.is_contiguous() and freqs.dim() == 4 and freqs.shape[1:] == (1, 1, dim)
            and freqs.shape[0] >= seq and freqs.device == t.device)


def _as_bshd(t: torch.Tensor, tensor_format: str) -> torch.Tensor:
    return t if tensor_format == "bshd" else t.transpose(0, 1)


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor, freqs: torch.Tensor, tensor_format: str) -> torch.Tensor:
        from te_llama.rope_apply_triton import rope

        out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
        rope(_as_bshd(t, tensor_format), freqs, _as_bshd(out, tensor_format))
        ctx.save_for_backward(freqs)
        ctx.tensor_format = tensor_format
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        from te_llama.rope_apply_triton import rope

        (freqs,) = ctx.saved_tensors
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()
        grad_in = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
        rope(_as_bshd(grad, ctx.tensor_format), freqs, _as_bshd(grad_in, ctx.tensor_format), backward=True)
        return grad_in, None, None


def apply_rope(t: torch.Tensor, freqs: torch.Tensor, tensor_format: str = "bshd") -> torch.Tensor:
    """RoPE of ``t`` (``[b, s, h, d]`` or ``[s, b, h, d]``) with TE's angle table ``freqs`` (``[s2, 1, 1, d]``
    float32), differentiable; the call must be :func:`covered`."""
    return _RoPE.apply(t, freqs, tensor_format)


def _route_covered_calls(original):
    """TE's ``apply_rotary_pos_emb`` with the calls the kernel covers sent to :func:`apply_rope`."""

    def apply_rotary_pos_emb(t, freqs, tensor_format="sbhd", start_positions=None, interleaved=False, fused=False,
                             cu_seqlens=None, cp_size=1, cp_rank=0):
        if fused and enabled() and covered(t, freqs, tensor_format, start_positions, interleaved, cu_seqlens,
                                           cp_size):
            return apply_rope(t, freqs, tensor_format)
        return original(t, freqs, tensor_format=tensor_format, start_positions=start_positions,
                        interleaved=interleaved, fused=fused, cu_seqlens=cu_seqlens, cp_size=cp_size,
                        cp_rank=cp_rank)

    return apply_rotary_pos_emb


def install() -> bool:
    """Route TE attention's RoPE through the kernel (idempotent; ``TE_LLAMA_FUSED_ROPE`` is read at each call).
    Returns whether it is in place: ``False`` when this TE version has no module-level ``apply_rotary_pos_emb`` in
    its attention module."""
    from transformer_engine.pytorch.attention import multi_head_attention

    return te_functions.replace(multi_head_attention, "apply_rotary_pos_emb", _route_covered_calls, "te_llama_rope",
                                "RoPE stays TE's kernels")
