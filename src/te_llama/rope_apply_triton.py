"""The Triton kernel of :mod:`te_llama.rope_apply`: rotary position embedding of one ``[b, s, h, d]`` tensor.

One program rotates ``BLOCK_T`` tokens, all heads, both halves of each head: it loads the two halves as
``[BLOCK_T, BLOCK_H, d/2]`` tiles (each head's halves are contiguous runs of ``d/2`` elements, so the loads are
vector loads whatever the token and head strides), computes ``cos`` and ``sin`` of the angle table once per token
and half and applies them to every head, in float32 as Transformer Engine's ``fused_rope_forward_kernel`` does, and
writes a contiguous output. The backward is the same pass with the rotation transposed. TE's kernel computes the
angles once per token too but loads and stores one 2-byte element per thread.

Imported only when the kernel runs on a GPU (it imports Triton); on the CPU, ``TRITON_INTERPRET=1`` runs it for
the tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE_ELEMENTS = 2048
"""Elements a program rotates (tokens x heads x head_dim), at least one token's heads: one token of Llama-3-8B's
32 query heads (4,096 elements), two tokens of its 8 key heads. With ``NUM_WARPS`` the fastest of 20 settings on an
H200 (``benchmarks/results/rope_apply_tiles_h200.json``): at 4,096 tokens 0.029 ms forward and 0.060 ms backward for
one layer's query and key, against TE's 0.045 and 0.078; 4 warps took 0.036 and 0.067."""
NUM_WARPS = 2
INT32_LIMIT = 2**31
"""Tensors whose last element lies this many elements or more from the first are indexed with 64-bit offsets."""


@triton.jit
def _rope(x_ptr, angles_ptr, out_ptr, tokens, seq, heads, stride_b, stride_s, stride_h, out_stride_b, out_stride_s,
          out_stride_h, BACKWARD: tl.constexpr, WIDE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
          HALF: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # tokens, batch-major
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, HALF)
    t_ok = t < tokens
    if WIDE:
        t = t.to(tl.int64)
    b_idx = t // seq
    s_idx = t % seq
    inside = t_ok[:, None, None] & (h < heads)[None, :, None] & (d < HALF)[None, None, :]
    src = x_ptr + (b_idx * stride_b + s_idx * stride_s)[:, None, None] + (h * stride_h)[None, :, None] \
        + d[None, None, :]
    x1 = tl.load(src, mask=inside, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=inside, other=0.0).to(tl.float32)

    angle = angles_ptr + (s_idx * (2 * HALF))[:, None, None] + d[None, None, :]
    angle_ok = t_ok[:, None, None] & (d < HALF)[None, None, :]
    a1 = tl.load(angle, mask=angle_ok, other=0.0)
    a2 = tl.load(angle + HALF, mask=angle_ok, other=0.0)
    cos1 = tl.cos(a1)
    sin1 = tl.sin(a1)
    cos2 = tl.cos(a2)
    sin2 = tl.sin(a2)
    if BACKWARD:  # the transposed rotation
        y1 = x1 * cos1 + x2 * sin2
        y2 = x2 * cos2 - x1 * sin1
    else:  # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)
        y1 = x1 * cos1 - x2 * sin1
        y2 = x2 * cos2 + x1 * sin2

    dst = out_ptr + (b_idx * out_stride_b + s_idx * out_stride_s)[:, None, None] + (h * out_stride_h)[None, :, None] \
        + d[None, None, :]
    tl.store(dst, y1.to(out_ptr.dtype.element_ty), mask=inside)
    tl.store(dst + HALF, y2.to(out_ptr.dtype.element_ty), mask=inside)


def rope(x: torch.Tensor, angles: torch.Tensor, out: torch.Tensor, backward: bool = False) -> torch.Tensor:
    """Write RoPE of ``x`` (``[b, s, h, d]``, last dim contiguous, any other strides) into ``out`` (same shape,
    last dim contiguous); ``backward``: the gradient's rotation (the transpose). ``angles``: contiguous float32
    ``[s2, 1, 1, d]``, ``s2 >= s``, the angle of element ``j`` of a head at position ``i`` (TE's ``freqs``); ``d``
    a power of two."""
    batch, seq, heads, dim = x.shape
    tokens = batch * seq
    block_h = triton.next_power_of_2(heads)
    block_t = max(1, min(TILE_ELEMENTS // (block_h * dim), triton.next_power_of_2(tokens)))
    grid = (triton.cdiv(tokens, block_t),)
    _rope[grid](x, angles, out, tokens, seq, heads, x.stride(0), x.stride(1), x.stride(2), out.stride(0),
                out.stride(1), out.stride(2), BACKWARD=backward,
                WIDE=max(_last_offset(x), _last_offset(out), angles.numel() - 1) >= INT32_LIMIT, BLOCK_T=block_t,
                BLOCK_H=block_h, HALF=dim // 2, num_warps=NUM_WARPS)
    return out


def _last_offset(t: torch.Tensor) -> int:
    """The largest element offset a kernel indexing ``t`` by its strides computes."""
    return sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
