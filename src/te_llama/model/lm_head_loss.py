"""LM head + cross-entropy without HF's float32 copies of the whole batch's logits.

Hugging Face computes ``logits = lm_head(hidden)`` for every token, upcasts them to float32 and runs
cross-entropy; autograd then keeps the float32 logits, their log-softmax and their gradient. For Llama 3's
128,256-token vocabulary and 4,096 tokens that is about 1 GiB of bf16 logits plus three float32 copies of 2 GiB
each at the start of the backward pass, where memory peaks.

:func:`linear_cross_entropy` computes the same loss and, in the forward, the gradient with respect to the logits,
``(softmax - one_hot) / n`` in float32, cast to the model's dtype as autograd casts it through HF's ``.float()``.
Backward then runs the LM head's two gradient matrix products over the whole batch, as HF's backward does.

- On CUDA (with Triton) the LM head writes the batch's logits straight into the buffer of their gradient, in the
  model's dtype, and one Triton kernel (:mod:`te_llama.kernels.lm_head_loss_triton`) turns each row into its loss and
  gradient in place: one read pass and one read-and-write pass over the logits, no chunking and no other logits
  buffer. Memory: the logit gradient in the model's dtype (HF's bf16 logits, no float32 copy).
- Elsewhere (and with ``step="compiled"`` or ``"eager"``) a chunk of tokens at a time: the chunk's logits go to a
  buffer and a step computes the chunk's loss and gradient: on CUDA a ``torch.compile``-fused step (two passes; the
  kernel's predecessor), on the CPU in-place eager operations. Memory: the logit gradient plus one chunk's logits and
  float32 temporaries.

What the kernel saves against the compiled step: ``docs/performance.md``.
"""

from __future__ import annotations

import logging

import torch

from te_llama.backend import triton_installed

logger = logging.getLogger("te_llama")

CHUNK_LOGIT_BYTES = 256 * 2**20
"""Float32 logits held at once by the eager and compiled steps: the chunk size is this divided by 4 x vocabulary
size, in tokens."""


def chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk for the eager and compiled steps (te-llama's kernel takes the batch in one chunk)."""
    tokens = CHUNK_LOGIT_BYTES // (4 * vocab_size)
    return max(128, tokens // 128 * 128)


def shifted_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token targets as HF's ``ForCausalLMLoss`` builds them: ``labels[:, 1:]`` then ``ignore_index``."""
    return torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def loss_and_logit_grad(logits: torch.Tensor, targets: torch.Tensor, row_scale: torch.Tensor,
                        grad_out: torch.Tensor, loss_out: torch.Tensor) -> None:
    """One chunk: each row's ``row_scale * cross_entropy(logits, targets)`` written into ``loss_out`` (float32),
    and its gradient with respect to the logits, ``(softmax - one_hot) * row_scale`` in float32, written into
    ``grad_out`` (the model's dtype).

    Written as plain tensor expressions so that ``torch.compile`` fuses it into two passes over the logits (the
    row reductions, then the gradient) instead of eager PyTorch's float32 copies of every intermediate.
    """
    x = logits.float()
    log_normalizer = torch.logsumexp(x, dim=-1, keepdim=True)
    loss_out.copy_((log_normalizer[:, 0] - x.gather(1, targets[:, None])[:, 0]) * row_scale)
    probabilities = torch.exp(x - log_normalizer)
    is_target = torch.arange(x.shape[-1], device=x.device)[None, :] == targets[:, None]
    grad_out.copy_(torch.where(is_target, probabilities - 1.0, probabilities) * row_scale[:, None])


def loss_and_logit_grad_eager(logits: torch.Tensor, targets: torch.Tensor, row_scale: torch.Tensor,
                              grad_out: torch.Tensor, loss_out: torch.Tensor) -> None:
    """:func:`loss_and_logit_grad` with in-place eager operations: one float32 temporary per chunk instead of
    several (used on the CPU and wherever neither the kernel nor the compiled step runs)."""
    log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    torch.mul(log_probs.gather(1, targets[:, None])[:, 0], row_scale, out=loss_out).neg_()
    probabilities = log_probs.exp_()
    probabilities.scatter_add_(1, targets[:, None], probabilities.new_full((targets.shape[0], 1), -1.0))
    torch.mul(probabilities, row_scale[:, None], out=grad_out)


def loss_and_logit_grad_kernel(logits: torch.Tensor, targets: torch.Tensor, row_scale: torch.Tensor,
                               grad_out: torch.Tensor, loss_out: torch.Tensor) -> None:
    """:func:`loss_and_logit_grad` by te-llama's Triton kernel (:mod:`te_llama.kernels.lm_head_loss_triton`): one read
    pass for the row reductions and one read and write pass for the gradient, per row."""
    from te_llama.kernels.lm_head_loss_triton import cross_entropy_rows

    cross_entropy_rows(logits, targets, row_scale, grad_out, loss_out)


_compiled_step = None


STEPS = ("auto", "kernel", "compiled", "eager")


def _chunk_step(device: torch.device, step: str = "auto"):
    """The chunk step for ``device``. ``auto``: on CUDA te-llama's Triton kernel (the ``torch.compile``d step where
    Triton is missing), elsewhere the eager step; ``kernel``, ``compiled``, ``eager`` force one (for comparisons)."""
    global _compiled_step
    if step not in STEPS:
        raise ValueError(f"unknown LM-head loss step {step!r}; use one of: {', '.join(STEPS)}")
    if step == "auto":
        step = "eager" if device.type != "cuda" else "kernel" if triton_installed() else "compiled"
    if step == "kernel":
        return loss_and_logit_grad_kernel
    if step == "eager":
        return loss_and_logit_grad_eager
    if _compiled_step is None:
        _compiled_step = torch.compile(loss_and_logit_grad, fullgraph=True)
    return _compiled_step


def _disable_compiled_step(error: Exception) -> None:
    global _compiled_step
    logger.warning("torch.compile failed for the LM-head loss (%s: %s); using the eager step, which makes several "
                   "passes over each chunk's logits.",
                   type(error).__name__, str(error).splitlines()[0] if str(error) else "")
    _compiled_step = loss_and_logit_grad_eager


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, divisor, ignore_index: int, chunk: int | None, step: str):
        valid = targets != ignore_index
        safe_targets = targets.masked_fill(~valid, 0)
        # As HF's cross-entropy does on a GPU, fail on a label outside the vocabulary, without waiting for the GPU
        torch._assert_async(((safe_targets >= 0) & (safe_targets < weight.shape[0])).all(),
                            f"labels must be token ids in [0, {weight.shape[0]}) (the vocabulary) or "
                            f"ignore_index ({ignore_index})")
        row_scale = valid.to(torch.float32) / divisor.to(torch.float32)  # d loss / d row loss
        step = _chunk_step(hidden.device, step)
        grad_logits = hidden.new_empty(hidden.shape[0], weight.shape[0])
        row_losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        # The kernel turns logits into their gradient in place, so the LM head writes them where the gradient goes:
        # no logits buffer, and the batch needs no chunks (one LM-head product, one launch). The other steps take a
        # chunk at a time through one reused buffer.
        in_place = step is loss_and_logit_grad_kernel
        chunk = chunk or (max(1, hidden.shape[0]) if in_place else chunk_tokens(weight.shape[0]))
        logits = None if in_place else hidden.new_empty(min(chunk, hidden.shape[0]), weight.shape[0])
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, min(start + chunk, hidden.shape[0]))
            out = grad_logits[rows] if in_place else logits[:rows.stop - start]
            chunk_logits = torch.matmul(hidden[rows], weight.t(), out=out)
            arguments = (chunk_logits, safe_targets[rows], row_scale[rows], grad_logits[rows], row_losses[rows])
            try:
                step(*arguments)
            except Exception as error:  # noqa: BLE001 - inductor raises many types; fall back, loudly
                if step is not _compiled_step:
                    raise
                _disable_compiled_step(error)
                step = loss_and_logit_grad_eager
                step(*arguments)
        ctx.save_for_backward(grad_logits, hidden, weight)
        return row_losses.sum()

    @staticmethod
    def backward(ctx, grad_loss):
        grad_logits, hidden, weight = ctx.saved_tensors
        scale = grad_loss.to(hidden.dtype)
        grad_hidden = (grad_logits @ weight) * scale if ctx.needs_input_grad[0] else None
        grad_weight = grad_logits.t() @ (hidden * scale) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor | None = None, *,
                         shift_labels: torch.Tensor | None = None, num_items_in_batch=None,
                         ignore_index: int = -100, chunk: int | None = None, step: str = "auto") -> torch.Tensor:
    """``ForCausalLMLoss(hidden @ weight.T, labels)`` computed in chunks (see the module docstring).

    ``labels`` are shifted as HF shifts them; or pass ``shift_labels`` already shifted. The loss is the mean over
    targets that are not ``ignore_index``, or their sum divided by ``num_items_in_batch`` when given (the
    Trainer's normalisation across gradient-accumulation steps). ``step``: which chunk step computes the loss
    (``auto``, ``kernel``, ``compiled``, ``eager``; see :func:`_chunk_step`).
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
        return _ChunkedLinearCrossEntropy.apply(flat, weight, targets, divisor, ignore_index, chunk, step)
