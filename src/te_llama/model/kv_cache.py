"""The decoder layer with Hugging Face's KV cache: what ``generate()`` (and any forward with ``use_cache=True``) runs.

TE's fused ``TransformerLayer`` takes the whole sequence at once and keeps no keys and values. A forward that
carries an HF ``Cache`` (``DynamicCache``, ``StaticCache``, ..., whatever ``generate()`` made) therefore runs the
layer's TE modules one by one, with the cache between them:

    layernorm_qkv (TE) -> q/k norm (TE, Qwen3) -> RoPE at each row's positions -> cache.update(k, v) -> SDPA over
    the cached keys and values, with HF's mask -> proj (TE) -> residual -> layernorm_mlp (TE) -> residual

So greedy decoding, sampling, beam search (HF reorders its own cache), left-padded batches, stopping criteria,
streamers and ``pipeline()`` work as in HF, on HF's cache objects. Using HF's ``Cache`` rather than TE's
``InferenceParams`` keeps every cache type and cache operation ``generate()`` knows. With a sliding window HF's mask
already holds it, and HF's cache may keep only the window's keys; SDPA uses both as given. PEFT adapters apply here
too (:mod:`te_llama.model.adapters`). Forwards without a cache (training, scoring) keep TE's fused layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from te_llama.model.adapters import attention_adapters, mlp_output, plus_bias, qkv_heads
from te_llama.model.masks import is_causal_marker
from te_llama.model.reference_layer import rotate
from te_llama.model.rope import RotaryAngles, angles_at


def sdpa_mask(hf_mask: torch.Tensor | None, query_length: int) -> tuple[torch.Tensor | None, bool]:
    """(boolean mask, ``True`` = attend, or ``None``; ``is_causal``) for SDPA from the mask HF made.

    HF gives ``None`` where plain causal attention is right (no padding, and the queries are the whole sequence or
    one token). A query row with nothing to attend to (left padding) may attend to everything: its output is
    padding, but it must not be NaN."""
    if hf_mask is None or is_causal_marker(hf_mask):
        return None, query_length > 1
    allowed = hf_mask if hf_mask.dtype == torch.bool else hf_mask == 0
    return allowed | ~allowed.any(dim=-1, keepdim=True), False


class TokenRows:
    """The ``b * s`` tokens of a ``[b, s, ...]`` forward as rows, padded with zero rows to a multiple of
    ``alignment``: FP8 GEMMs need the token count divisible by 16 (32 for MXFP8), and a decode step has one token per
    row. Each token's row is computed on its own, so the padding changes no real token's output."""

    def __init__(self, b: int, s: int, alignment: int = 1):
        self.b, self.s, self.pad = b, s, -(b * s) % alignment

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[b, s, ...]`` as ``[b * s + pad, ...]``."""
        rows = x.reshape(self.b * self.s, *x.shape[2:])
        return F.pad(rows, (0, 0) * (rows.dim() - 1) + (0, self.pad)) if self.pad else rows

    def real(self, rows: torch.Tensor) -> torch.Tensor:
        """The real tokens of ``rows`` back as ``[b, s, ...]``."""
        return rows[:self.b * self.s].reshape(self.b, self.s, *rows.shape[1:])


def forward_with_cache(layer: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                       rotary: RotaryAngles, cache, adapters: dict[str, nn.Module],
                       token_alignment: int = 1, is_first_microbatch: bool | None = None) -> torch.Tensor:
    """One decoder layer on ``hidden_states`` ``[b, s, hidden]``, reading and extending ``cache``; TE's modules see
    the tokens padded to ``token_alignment`` (:class:`TokenRows`) and cast or reuse their FP8 weights as
    ``is_first_microbatch`` says."""
    attention = layer.self_attention
    b, s, _ = hidden_states.shape
    rows = TokenRows(b, s, token_alignment)
    with attention_adapters(attention, adapters):
        q, k, v = (rows.real(t) for t in qkv_heads(layer, rows.padded(hidden_states), is_first_microbatch))
        angles = angles_at(rotary.position_ids.expand(b, s), rotary.inv_freq)[:, :, None, :]  # each row's positions
        q, k = rotate(q, angles), rotate(k, angles)  # float32, as TE's fused RoPE
        keys, values = cache.update(k.transpose(1, 2), v.transpose(1, 2), layer.layer_idx)
        mask, is_causal = sdpa_mask(attention_mask, s)
        context = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=mask, is_causal=is_causal, enable_gqa=True,
            dropout_p=layer.attention_dropout if layer.training else 0.0,
            scale=attention.core_attention.softmax_scale)
        context = rows.padded(context.transpose(1, 2).reshape(b, s, -1))
        projected = attention.proj(context, is_first_microbatch=is_first_microbatch)
        hidden_states = hidden_states + rows.real(plus_bias(projected))
    return hidden_states + rows.real(mlp_output(layer, rows.padded(hidden_states), adapters, is_first_microbatch))
