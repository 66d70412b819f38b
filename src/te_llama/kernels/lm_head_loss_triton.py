"""The Triton kernel of the LM-head loss: one token's cross-entropy and logit gradient per row.

For logits ``[rows, vocab]`` (one row per token), :func:`cross_entropy_rows` writes each row's loss
``(logsumexp(x) - x[target]) * row_scale`` (float32) and its gradient ``(softmax(x) - one_hot(target)) *
row_scale``, rounded to the gradient buffer's dtype once, as :func:`te_llama.model.lm_head_loss.loss_and_logit_grad`
computes them in float32. One program per row: a first pass over the row keeps the running maximum and the sum of
exponentials relative to it (one exponential per element), a second pass writes the gradient, over the logits
themselves in the model. Its speed against the ``torch.compile``d step it replaced: ``docs/performance.md``.
Imported only when a CUDA step runs (it imports Triton); on the CPU, ``TRITON_INTERPRET=1`` runs it for the tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 8192
"""Logits per loop iteration; 8,192 with 16 warps was among the fastest of the settings swept
(``docs/performance.md``)."""
NUM_WARPS = 16


@triton.jit
def _cross_entropy_rows(logits_ptr, grad_ptr, targets_ptr, scale_ptr, loss_ptr, vocab, logits_stride, grad_stride,
                        BLOCK: tl.constexpr):
    row = tl.program_id(0)
    x_row = logits_ptr + tl.cast(row, tl.int64) * logits_stride
    g_row = grad_ptr + tl.cast(row, tl.int64) * grad_stride
    target = tl.load(targets_ptr + row)
    scale = tl.load(scale_ptr + row)
    maximum = -float("inf")
    total = 0.0
    for start in range(0, vocab, BLOCK):
        columns = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + columns, mask=columns < vocab, other=-float("inf")).to(tl.float32)
        new_maximum = tl.maximum(maximum, tl.max(x, axis=0))
        total = total * tl.exp(maximum - new_maximum) + tl.sum(tl.exp(x - new_maximum), axis=0)
        maximum = new_maximum
    log_normalizer = maximum + tl.log(total)
    inside_vocab = (target >= 0) & (target < vocab)  # never read outside the row: a bad label's loss is NaN
    target_logit = tl.load(x_row + target, mask=inside_vocab, other=float("nan")).to(tl.float32)
    tl.store(loss_ptr + row, (log_normalizer - target_logit) * scale)
    for start in range(0, vocab, BLOCK):
        columns = start + tl.arange(0, BLOCK)
        inside = columns < vocab
        x = tl.load(x_row + columns, mask=inside, other=0.0).to(tl.float32)
        probability = tl.exp(x - log_normalizer)
        grad = tl.where(columns == target, probability - 1.0, probability) * scale
        tl.store(g_row + columns, grad.to(g_row.dtype.element_ty), mask=inside)


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, row_scale: torch.Tensor, grad_out: torch.Tensor,
                       loss_out: torch.Tensor) -> None:
    """Write each row's scaled loss into ``loss_out`` (float32, ``[rows]``) and its logit gradient into
    ``grad_out`` (``[rows, vocab]``, any float dtype), which may be ``logits`` itself (each block of a row is read
    before the gradient is written over it). ``logits`` and ``grad_out`` need a contiguous last dim; ``targets``
    must lie in ``[0, vocab)`` (ignored rows carry any valid index and ``row_scale`` 0): a row whose target does
    not gets a NaN loss, and nothing outside the row is read."""
    rows, vocab = logits.shape
    if rows == 0:
        return
    if logits.stride(-1) != 1 or grad_out.stride(-1) != 1:
        raise ValueError("cross_entropy_rows needs logits and grad_out with a contiguous last dim")
    _cross_entropy_rows[(rows,)](logits, grad_out, targets, row_scale, loss_out, vocab, logits.stride(0),
                                 grad_out.stride(0), BLOCK=BLOCK, num_warps=NUM_WARPS)
