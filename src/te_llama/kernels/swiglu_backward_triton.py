"""The Triton kernel of :mod:`te_llama.kernels.swiglu_backward`: SwiGLU's backward, quantized to FP8 in the same pass.

One program reads a ``BLOCK_M x BLOCK_N`` tile of the gradient of SwiGLU's output and the matching gate and up
tiles of its input, computes the two input gradients in float32 as Transformer Engine's ``dgated_act_kernel``
does (``silu`` and ``dsilu`` of the gate), rounds them to bfloat16 (the dtype TE's unfused path writes), and
writes them in FP8 twice: row-major for the FC1 dgrad GEMM and transposed for the FC1 wgrad GEMM (Hopper's FP8
GEMMs take only TN layouts). It also folds the tile's max |value| into the delayed-scaling amax, writes
``1/scale`` as the tensor's scale_inv, and, when asked, the tile's column sums for the bias gradient. TE's
path does the same work in two kernels with a bfloat16 copy of the gradient in between.

Imported only when an FP8 backward runs (it imports Triton); on the CPU, ``TRITON_INTERPRET=1`` runs it for the
tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = 32
BLOCK_N = 128
NUM_WARPS = 4
"""Tile and warps: among the fastest tried on H200s at 4,096 and 8,192 x 14,336 (0.20-0.30 and 0.37-0.46 ms against
TE's 0.28-0.30 and 0.55-0.56, depending on the machine; ``benchmarks/results/swiglu_backward_variants_h200.json``,
``swiglu_backward_h200*.json``). Several tiles are within the machines' noise of it; on one machine 64 x 64 with 8
warps was the fastest at 4,096 tokens (0.25 ms against this tile's 0.30). Exact IEEE division in the sigmoid made the kernel slower (it
then bounds the row-major-only kernel) and matched TE's bytes only a little closer (14 instead of 22 of 117 million
differing by one FP8 step)."""
INT32_LIMIT = 2**31
"""Tensors with this many elements or more are indexed with 64-bit offsets (slower)."""


@triton.jit
def _dswiglu_fp8(grad_ptr, act_in_ptr, out_ptr, out_t_ptr, bias_partial_ptr, scale_ptr, scale_inv_ptr, amax_ptr,
                 rows, inner, TRANSPOSE: tl.constexpr, BIAS: tl.constexpr, WIDE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = (m[:, None] < rows) & (n[None, :] < inner)
    if WIDE:  # offsets beyond int32
        row = m.to(tl.int64)[:, None]
        col = n.to(tl.int64)[None, :]
    else:
        row = m[:, None]
        col = n[None, :]

    grad = tl.load(grad_ptr + row * inner + col, mask=inside, other=0.0).to(tl.float32)
    gate = tl.load(act_in_ptr + row * (2 * inner) + col, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(act_in_ptr + row * (2 * inner) + inner + col, mask=inside, other=0.0).to(tl.float32)

    sigmoid = tl.sigmoid(gate)
    silu = gate * sigmoid
    dsilu = gate * (sigmoid * (1.0 - sigmoid)) + sigmoid
    d_gate = (dsilu * grad * up).to(tl.bfloat16).to(tl.float32)
    d_up = (grad * silu).to(tl.bfloat16).to(tl.float32)

    tl.atomic_max(amax_ptr, tl.maximum(tl.max(tl.abs(d_gate)), tl.max(tl.abs(d_up))))
    scale = tl.load(scale_ptr)
    if (pid_m == 0) & (pid_n == 0):
        tl.store(scale_inv_ptr, tl.math.div_rn(1.0, scale))
    q_gate = (d_gate * scale).to(out_ptr.dtype.element_ty)
    q_up = (d_up * scale).to(out_ptr.dtype.element_ty)

    tl.store(out_ptr + row * (2 * inner) + col, q_gate, mask=inside)
    tl.store(out_ptr + row * (2 * inner) + inner + col, q_up, mask=inside)
    if TRANSPOSE:  # out_t is (2 * inner, rows): gate rows first, then up rows
        tl.store(out_t_ptr + col * rows + row, q_gate, mask=inside)
        tl.store(out_t_ptr + (col + inner) * rows + row, q_up, mask=inside)
    if BIAS:  # bias_partial is (row blocks, 2 * inner)
        bias_row = bias_partial_ptr + pid_m.to(tl.int64) * (2 * inner)
        tl.store(bias_row + n, tl.sum(d_gate, axis=0), mask=n < inner)
        tl.store(bias_row + inner + n, tl.sum(d_up, axis=0), mask=n < inner)


def dswiglu_fp8(grad: torch.Tensor, act_in: torch.Tensor, scale: torch.Tensor, amax: torch.Tensor,
                out: torch.Tensor, out_t: torch.Tensor | None, scale_inv: torch.Tensor,
                bias_grad: bool) -> torch.Tensor | None:
    """Fill ``out`` (rows, 2 * inner) and ``out_t`` (2 * inner, rows; ``None``: not needed) with FP8 SwiGLU input
    gradients, ``scale_inv`` with ``1 / scale``, raise ``amax`` to their max |value|.

    ``grad``: (rows, inner), ``act_in``: (rows, 2 * inner), gate first, both contiguous bfloat16; ``out`` and
    ``out_t`` in ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``. Returns the bias gradient (float32,
    2 * inner) when ``bias_grad``, else ``None``.
    """
    rows, inner = grad.shape
    grid = (triton.cdiv(rows, BLOCK_M), triton.cdiv(inner, BLOCK_N))
    partial = torch.empty((grid[0], 2 * inner), dtype=torch.float32, device=grad.device) if bias_grad else None
    _dswiglu_fp8[grid](grad, act_in, out, out if out_t is None else out_t, partial if bias_grad else scale_inv,
                       scale, scale_inv, amax, rows, inner, TRANSPOSE=out_t is not None, BIAS=bias_grad,
                       WIDE=rows * 2 * inner >= INT32_LIMIT, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=NUM_WARPS)
    return partial.sum(dim=0) if bias_grad else None
