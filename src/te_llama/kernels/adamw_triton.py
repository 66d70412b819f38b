"""The Triton kernel of :class:`te_llama.training.adamw.AdamW`: one AdamW update of one parameter.

Each program updates ``BLOCK`` elements: it reads the parameter, its gradient and both moments, computes in
float32 what torch's fused CUDA kernel computes (``aten/src/ATen/native/cuda/fused_adam_utils.cuh``, AdamW mode),
and writes the parameter and moments back in their own dtypes. Imported only when a CUDA step runs (it imports
Triton); on the CPU, ``TRITON_INTERPRET=1`` runs it for the tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048
"""Elements per program, with 8 warps: the fastest tile of a sweep (``docs/performance.md``)."""


@triton.jit
def _adamw_update(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, numel, lr, beta1, beta2, eps, weight_decay,
                  step_size, bias_correction2_sqrt, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < numel
    param = tl.load(param_ptr + offsets, mask=inside).to(tl.float32)
    grad = tl.load(grad_ptr + offsets, mask=inside).to(tl.float32)
    exp_avg = tl.load(exp_avg_ptr + offsets, mask=inside).to(tl.float32)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=inside).to(tl.float32)
    param = param - lr * weight_decay * param
    exp_avg = beta1 * exp_avg + (1 - beta1) * grad
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    denominator = tl.sqrt(exp_avg_sq) / bias_correction2_sqrt + eps
    param = param - step_size * exp_avg / denominator
    tl.store(param_ptr + offsets, param.to(param_ptr.dtype.element_ty), mask=inside)
    tl.store(exp_avg_ptr + offsets, exp_avg.to(exp_avg_ptr.dtype.element_ty), mask=inside)
    tl.store(exp_avg_sq_ptr + offsets, exp_avg_sq.to(exp_avg_sq_ptr.dtype.element_ty), mask=inside)


def adamw_update(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                 lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int) -> None:
    """Update ``param``, ``exp_avg`` and ``exp_avg_sq`` in place (contiguous tensors of one shape)."""
    numel = param.numel()
    _adamw_update[(triton.cdiv(numel, BLOCK),)](
        param, grad, exp_avg, exp_avg_sq, numel, lr, beta1, beta2, eps, weight_decay,
        lr / (1 - beta1**step), (1 - beta2**step) ** 0.5, BLOCK=BLOCK, num_warps=8)
