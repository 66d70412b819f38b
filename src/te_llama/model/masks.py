"""Hugging Face attention masks in Transformer Engine's convention.

HF hands decoder layers either nothing (no padding: plain causal attention), a boolean ``[b, 1, q, k]`` mask
where ``True`` means *attend* (SDPA), an additive float mask (eager), or the 2-D padding mask (flash). TE takes
a mask type plus a boolean mask where ``True`` means *masked out*:

- no padding                      -> ``"causal"``, no mask (TE's fastest path);
- right padding (real tokens first) -> ``"padding_causal"`` with a ``[b, 1, 1, k]`` padding mask;
- anything else (left padding, custom masks) -> ``"arbitrary"`` with the full ``[b, 1, q, k]`` mask.

Query rows with nothing to attend to (padding before the first real token) may attend to themselves, so no
row of the softmax is empty: their outputs are padding and ignored, but they must not be NaN.

Layers with a sliding window ``W`` (Mistral, some Qwen configs) get HF's sliding-window mask, where query ``i``
sees keys ``i - W < j <= i``. Such a mask that is only the window over causal attention (and padding) maps onto the
same ``"causal"`` / ``"padding_causal"`` types, TE applying the window itself (its ``window_size``); an
``"arbitrary"`` mask carries the window in its values.

A forward with neither mask nor position ids (a training step on fixed-length blocks) needs no mask at all, but
HF's mask creation still checks the position ids it makes up for packed sequences, which waits for the GPU.
:func:`causal_marker` is a stand-in 4-D mask that HF passes through unchanged (it takes any 4-D mask as prepared)
and that te-llama's layers read as plain causal attention over positions ``0, 1, 2, ...``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TEMask:
    mask_type: str
    """TE's ``self_attn_mask_type``: ``"causal"``, ``"padding_causal"`` or ``"arbitrary"``."""
    mask: torch.Tensor | None
    """Boolean, ``True`` = masked out; ``[b, 1, 1, k]`` for padding, ``[b, 1, q, k]`` for arbitrary."""
    valid_tokens: torch.Tensor | None
    """``[b, s]`` boolean, ``True`` for real tokens; ``None`` when every token is real."""


CAUSAL = TEMask("causal", None, None)


def causal_marker(batch: int, seq: int) -> torch.Tensor:
    """A ``[batch, 1, seq, seq]`` stand-in for "causal, no padding, positions from 0" (no memory, no kernel).

    Only te-llama's decoder layers can read it (:func:`is_causal_marker`); its values say nothing.
    """
    marker = torch.zeros((), dtype=torch.bool).expand(batch, 1, seq, seq)
    marker._te_llama_causal = True
    return marker


def is_causal_marker(mask: torch.Tensor | None) -> bool:
    return getattr(mask, "_te_llama_causal", False)


def _causal(seq: int, device: torch.device, window: int | None = None) -> torch.Tensor:
    """``[seq, seq]``, ``True`` where query ``i`` may see key ``j``: ``j <= i``, and ``i - j < window`` with one."""
    allowed = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    return allowed if window is None else allowed.triu(-(window - 1))


def _from_padding(valid: torch.Tensor, window: int | None = None) -> TEMask:
    if bool(valid.all()):
        return CAUSAL
    right_padded = bool((valid[:, 1:] <= valid[:, :-1]).all())
    if right_padded:
        return TEMask("padding_causal", ~valid[:, None, None, :], valid)
    allowed = _causal(valid.shape[1], valid.device, window) & valid[:, None, None, :]
    return TEMask("arbitrary", _never_empty(allowed), valid)


def _never_empty(allowed: torch.Tensor) -> torch.Tensor:
    """TE mask (True = masked) from an 'allowed' matrix, letting empty rows attend to their own position."""
    seq = allowed.shape[-1]
    diagonal = torch.eye(seq, dtype=torch.bool, device=allowed.device)
    empty_rows = ~allowed.any(dim=-1, keepdim=True)
    return ~(allowed | (diagonal & empty_rows))


def te_mask_from_hf(hf_mask: torch.Tensor | None, batch: int, seq: int, window: int | None = None) -> TEMask:
    """Convert the mask HF passes to decoder layers (for a forward without a KV cache) to TE's form; ``window``:
    the layers' sliding window (HF's ``sliding_window``), which TE's ``window_size`` applies to causal types."""
    if hf_mask is None or is_causal_marker(hf_mask):
        return CAUSAL
    if hf_mask.dim() == 2:
        if hf_mask.shape != (batch, seq):
            raise ValueError(f"attention_mask has shape {tuple(hf_mask.shape)}, expected ({batch}, {seq})")
        return _from_padding(hf_mask.bool(), window)
    if hf_mask.dim() != 4 or hf_mask.shape[-2:] != (seq, seq):
        raise ValueError(
            f"attention mask of shape {tuple(hf_mask.shape)} is not supported: te-llama expects no mask, a 2-D "
            f"padding mask ({batch}, {seq}) or a 4-D mask (batch, 1, {seq}, {seq}) without a KV cache"
        )
    allowed = hf_mask if hf_mask.dtype == torch.bool else hf_mask == 0
    allowed = allowed.expand(batch, 1, seq, seq)
    valid = allowed.any(dim=-2)[:, 0, :]
    standard = _causal(seq, allowed.device, window) & valid[:, None, None, :]
    # Rows of padding queries differ between HF versions and do not matter; compare real query rows only.
    if bool(((allowed == standard) | ~valid[:, None, :, None]).all()):
        return _from_padding(valid, window)
    return TEMask("arbitrary", _never_empty(allowed), valid)
