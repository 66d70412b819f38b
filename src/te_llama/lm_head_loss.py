"""LM head + cross-entropy in chunks of tokens, without materialising the logits of the whole batch.

Hugging Face computes ``logits = lm_head(hidden)`` for every token, upcasts them to float32 and runs
cross-entropy; autograd then keeps the float32 logits, their log-softmax and their gradient. For Llama 3's
128,256-token vocabulary and 4,096 tokens that is about 1 GiB of bf16 logits plus three float32 copies of 2 GiB
each at the start of the backward pass, where memory peaks.

:func:`linear_cross_entropy` computes the same loss a chunk of tokens at a time and, while a chunk's logits
exist, their gradient ``(softmax - one_hot) / n`` in float32, cast to the model's dtype as autograd casts it
through HF's ``.float()``. Backward then runs the LM head's two gradient matrix products over the whole batch, as
HF's backward does. On CUDA the per-chunk softmax, loss and gradient run as one ``torch.compile``-fused step
(two passes over the logits instead of eager PyTorch's float32 copy, log-softmax, exp and scaling passes). Memory:
the batch's logit gradient in the model's dtype plus one chunk's logits, instead of HF's logits, their float32
copy, log-softmax and gradient.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger("te_llama")

CHUNK_LOGIT_BYTES = 256 * 2**20
"""Float32 logits held at once: the chunk size is this divided by 4 x vocabulary size, in tokens."""


def chunk_tokens(vocab_size: int) -> int:
    tokens = CHUNK_LOGIT_BYTES // (4 * vocab_size)
    return max(128, tokens // 128 * 128)


def shifted_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token targets as HF's ``ForCausalLMLoss`` builds them: ``labels[:, 1:]`` then ``ignore_index``."""
    return torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def loss_and_logit_grad(logits: torch.Tensor, targets: torch.Tensor, row_scale: torch.Tensor,
                        grad_out: torch.Tensor) -> torch.Tensor:
    """One chunk: ``sum(row_scale * cross_entropy(logits, targets))``, returned, and its gradient with respect to
    the logits, ``(softmax - one_hot) * row_scale`` in float32, written into ``grad_out`` (the model's dtype).

    Written as plain tensor expressions so that ``torch.compile`` fuses it into two passes over the logits (the
    row reductions, then the gradient) instead of eager PyTorch's float32 copies of every intermediate.
    """
    x = logits.float()
    log_normalizer = torch.logsumexp(x, dim=-1, keepdim=True)
    loss = ((log_normalizer[:, 0] - x.gather(1, targets[:, None])[:, 0]) * row_scale).sum()
    probabilities = torch.exp(x - log_normalizer)
    is_target = torch.arange(x.shape[-1], device=x.device)[None, :] == targets[:, None]
    grad_out.copy_(torch.where(is_target, probabilities - 1.0, probabilities) * row_scale[:, None])
    return loss


def loss_and_logit_grad_eager(logits: torch.Tensor, targets: torch.Tensor, row_scale: torch.Tensor,
                              grad_out: torch.Tensor) -> torch.Tensor:
    """:func:`loss_and_logit_grad` with in-place eager operations: one float32 temporary per chunk instead of
    several (used on the CPU and wherever the compiled step is off)."""
    log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    loss = -(log_probs.gather(1, targets[:, None])[:, 0] * row_scale).sum()
    probabilities = log_probs.exp_()
    probabilities.scatter_add_(1, targets[:, None], probabilities.new_full((targets.shape[0], 1), -1.0))
    torch.mul(probabilities, row_scale[:, None], out=grad_out)
    return loss


_compiled_step = None


def _chunk_step(device: torch.device):
    """The compiled chunk step on CUDA (unless ``TE_LLAMA_COMPILE_LOSS=0``), else the eager one."""
    global _compiled_step
    if device.type != "cuda" or os.environ.get("TE_LLAMA_COMPILE_LOSS", "1") == "0":
        return loss_and_logit_grad_eager
    if _compiled_step is None:
        _compiled_step = torch.compile(loss_and_logit_grad, fullgraph=True)
    return _compiled_step


def _disable_compiled_step(error: Exception) -> None:
    global _compiled_step
    logger.warning("torch.compile failed for the LM-head loss (%s: %s); using the eager step, which makes several "
                   "passes over each chunk's logits. Set TE_LLAMA_COMPILE_LOSS=0 to skip the attempt.",
                   type(error).__name__, str(error).splitlines()[0] if str(error) else "")
    _compiled_step = loss_and_logit_grad_eager


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, divisor, ignore_index: int, chunk: int):
        valid = targets != ignore_index
        safe_targets = targets.masked_fill(~valid, 0)
        row_scale = valid.to(torch.float32) / divisor.to(torch.float32)  # d loss / d row loss
        grad_logits = hidden.new_empty(hidden.shape[0], weight.shape[0])
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        step = _chunk_step(hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = hidden[rows] @ weight.t()
            arguments = (logits, safe_targets[rows], row_scale[rows], grad_logits[rows])
            try:
                total += step(*arguments)
            except Exception as error:  # noqa: BLE001 - inductor raises many types; fall back, loudly
                if step is loss_and_logit_grad_eager:
                    raise
                _disable_compiled_step(error)
                step = loss_and_logit_grad_eager
                total += step(*arguments)
        ctx.save_for_backward(grad_logits, hidden, weight)
        return total

    @staticmethod
    def backward(ctx, grad_loss):
        grad_logits, hidden, weight = ctx.saved_tensors
        scale = grad_loss.to(hidden.dtype)
        grad_hidden = (grad_logits @ weight) * scale if ctx.needs_input_grad[0] else None
        grad_weight = grad_logits.t() @ (hidden * scale) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor | None = None, *,
                         shift_labels: torch.Tensor | None = None, num_items_in_batch=None,
                         ignore_index: int = -100, chunk: int | None = None) -> torch.Tensor:
    """``ForCausalLMLoss(hidden @ weight.T, labels)`` computed in chunks (see the module docstring).

    ``labels`` are shifted as HF shifts them; or pass ``shift_labels`` already shifted. The loss is the mean over
    targets that are not ``ignore_index``, or their sum divided by ``num_items_in_batch`` when given (the
    Trainer's normalisation across gradient-accumulation steps).
    """
    if shift_labels is None:
        if labels is None:
            raise ValueError("linear_cross_entropy needs labels or shift_labels")
        shift_labels = shifted_labels(labels, ignore_index)
    targets = shift_labels.reshape(-1).to(hidden.device)
    flat = hidden.reshape(-1, hidden.shape[-1])
    if targets.shape[0] != flat.shape[0]:
        raise ValueError(f"{targets.shape[0]} targets for {flat.shape[0]} hidden states")
    if num_items_in_batch is None:
        divisor = (targets != ignore_index).sum()
    else:
        divisor = torch.as_tensor(num_items_in_batch, device=hidden.device)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # what autocast would do to HF's lm_head
        dtype = torch.get_autocast_dtype(device_type)
        flat, weight = flat.to(dtype), weight.to(dtype)
    with torch.autocast(device_type, enabled=False):
        return _ChunkedLinearCrossEntropy.apply(flat, weight, targets, divisor, ignore_index,
                                                chunk or chunk_tokens(weight.shape[0]))
