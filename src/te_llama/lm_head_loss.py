"""LM head + cross-entropy in chunks of tokens, without materialising the logits of the whole batch.

Hugging Face computes ``logits = lm_head(hidden)`` for every token, upcasts them to float32 and runs
cross-entropy; autograd then keeps the float32 logits, their log-softmax and their gradient. For Llama 3's
128,256-token vocabulary and 4,096 tokens that is about 1 GiB of bf16 logits plus three float32 copies of 2 GiB
each at the start of the backward pass, where memory peaks.

:func:`linear_cross_entropy` computes the same loss a chunk of tokens at a time and, while a chunk's float32
log-probabilities exist, their gradient ``(softmax - one_hot) / n``, cast to the model's dtype as autograd casts
it through HF's ``.float()``. Backward then runs the LM head's two gradient matrix products over the whole batch,
as HF's backward does. Memory: the batch's logit gradient in the model's dtype plus one chunk's float32
log-probabilities (about 256 MiB), instead of HF's logits, their float32 copy, log-softmax and gradient.
"""

from __future__ import annotations

import torch

CHUNK_LOGIT_BYTES = 256 * 2**20
"""Float32 logits held at once: the chunk size is this divided by 4 x vocabulary size, in tokens."""


def chunk_tokens(vocab_size: int) -> int:
    tokens = CHUNK_LOGIT_BYTES // (4 * vocab_size)
    return max(128, tokens // 128 * 128)


def shifted_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token targets as HF's ``ForCausalLMLoss`` builds them: ``labels[:, 1:]`` then ``ignore_index``."""
    return torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, divisor, ignore_index: int, chunk: int):
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        valid = targets != ignore_index
        safe_targets = targets.masked_fill(~valid, 0)[:, None]
        row_scale = valid.to(torch.float32) / divisor.to(torch.float32)  # d loss / d row loss
        grad_logits = hidden.new_empty(hidden.shape[0], weight.shape[0]) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            log_probs = torch.log_softmax(hidden[rows] @ weight.t(), dim=-1, dtype=torch.float32)
            total -= (log_probs.gather(1, safe_targets[rows])[:, 0] * row_scale[rows]).sum()
            if need_grad:  # d loss / d logits = (softmax - one_hot) * row scale, cast once to the model dtype
                probabilities = log_probs.exp_()
                probabilities.scatter_add_(1, safe_targets[rows], -valid[rows, None].to(torch.float32))
                torch.mul(probabilities, row_scale[rows, None], out=grad_logits[rows])
            del log_probs
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
