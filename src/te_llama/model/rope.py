"""Rotary position embeddings in the form Transformer Engine consumes: one angle table per forward pass.

Hugging Face computes ``cos``/``sin`` of shape ``[batch, seq, head_dim]`` once per forward and hands them to
every decoder layer. TE's fused RoPE kernel instead takes the angles, ``[seq, 1, 1, head_dim]`` in float32, and
applies ``x * cos + rotate_half(x) * sin`` itself. :class:`TERotaryEmbedding` subclasses HF's rotary module so the
inverse frequencies (default, linear, dynamic, llama3, yarn, longrope) and their dynamic updates come from
transformers itself; it returns a :class:`RotaryAngles` that layers turn into TE inputs.

HF multiplies ``cos`` and ``sin`` by an attention factor (yarn's mscale, longrope's factor). Scaling both ``q``
and ``k`` by ``a`` scales the attention logits by ``a**2``, which the layer folds into TE's softmax scale.
"""

from __future__ import annotations

import math

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from te_llama.model.masks import TEMask, te_mask_from_hf


class UnsupportedPositionsError(ValueError):
    """position_ids that TE's fused RoPE (one table shared by the batch) cannot express."""


def rope_attention_scaling(config) -> float:
    """The factor HF multiplies cos and sin by for this config's RoPE type (1.0 for most types)."""
    rope_type = config.rope_parameters.get("rope_type", "default")
    if rope_type == "default":
        return 1.0
    _, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config)
    return float(attention_scaling)


def softmax_scale(config) -> float:
    """TE's softmax scale that reproduces HF's attention with its RoPE attention factor."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return rope_attention_scaling(config) ** 2 / math.sqrt(head_dim)


def shared_positions(position_ids: torch.Tensor, valid_tokens: torch.Tensor | None) -> torch.Tensor:
    """One row of positions that gives every row of the batch its own attention scores.

    RoPE attention scores depend only on the distance between query and key. Rows whose real tokens are a
    shifted copy of ``0, 1, 2, ...`` (left or right padding, generation with an offset) therefore share one
    table. Rows with other patterns (several packed documents per row) cannot; such batches normally run as a
    padding-free stream (:mod:`te_llama.model.packed`) and reach this only with a 4-D mask of the user's own.
    """
    if position_ids.shape[0] == 1:
        return position_ids[0]
    first = position_ids[0]
    if torch.equal(position_ids, first.expand_as(position_ids)):
        return first
    steps = torch.arange(position_ids.shape[1], device=position_ids.device)
    offsets = position_ids - steps
    if valid_tokens is None:
        valid_tokens = torch.ones_like(position_ids, dtype=torch.bool)
    sentinel = torch.iinfo(offsets.dtype).max
    row_offset = offsets.masked_fill(~valid_tokens, sentinel).min(dim=1, keepdim=True).values
    if not bool(((offsets == row_offset) | ~valid_tokens).all()):
        raise UnsupportedPositionsError(
            "position_ids differ between rows in a way that is not a shift of 0, 1, 2, ... (e.g. several packed "
            "documents per row) in a forward with a 4-D attention mask of your own, where TE's fused RoPE shares one "
            "angle table across the batch. Pass the 2-D padding mask (or none) instead: te-llama then runs each "
            "document on its own, padding-free."
        )
    return steps


def angle_table(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """TE's RoPE input: the angle of each position and rotary dim, ``[seq, 1, 1, head_dim]`` float32, both halves
    of a head the same (HF's ``rotate_half`` convention)."""
    return angles_at(positions, inv_freq)[:, None, None, :].contiguous()


def angles_at(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """The float32 RoPE angle of each position (any shape) and rotary dim: ``[*positions.shape, head_dim]``."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device, torch.float32)
    return torch.cat((freqs, freqs), dim=-1)


class RotaryAngles:
    """Per-forward RoPE state: the inverse frequencies and the batch's position ids.

    Every decoder layer of one forward pass receives the same object, so the TE inputs derived from it (the
    angle table and the converted attention mask) are computed once and memoised here.
    """

    def __init__(self, inv_freq: torch.Tensor, position_ids: torch.Tensor):
        self.inv_freq = inv_freq
        self.position_ids = position_ids
        self._memo: tuple[object, int | None, TEMask, torch.Tensor] | None = None
        self._from_zero: torch.Tensor | None = None

    def te_inputs(self, attention_mask: torch.Tensor | None, batch: int,
                  window: int | None = None) -> tuple[TEMask, torch.Tensor]:
        """(TE mask, angle table ``[seq, 1, 1, head_dim]`` float32) for this forward's HF attention mask, made by
        HF for layers with sliding window ``window`` (or full causal attention)."""
        if self._memo is not None and self._memo[0] is attention_mask and self._memo[1] == window:
            return self._memo[2], self._memo[3]
        seq = self.position_ids.shape[-1]
        mask = te_mask_from_hf(attention_mask, batch, seq, window)
        angles = angle_table(shared_positions(self.position_ids, mask.valid_tokens), self.inv_freq)
        self._memo = (attention_mask, window, mask, angles)
        return mask, angles

    def angle_table_from_zero(self, length: int) -> torch.Tensor:
        """The angle table of positions ``0 .. length - 1`` (packed sequences restart there), computed once per
        forward."""
        if self._from_zero is None or self._from_zero.shape[0] < length:
            self._from_zero = angle_table(torch.arange(length, device=self.inv_freq.device), self.inv_freq)
        return self._from_zero[:length]


class TERotaryEmbedding(LlamaRotaryEmbedding):
    """HF's Llama rotary module (same buffers, same dynamic updates) that returns :class:`RotaryAngles`.

    It serves every family: Mistral's, Qwen2's and Qwen3's rotary modules are transformers' copies of Llama's code
    (its "modular" files), the same inverse frequencies and updates."""

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> RotaryAngles:
        return RotaryAngles(self.inv_freq.to(device=x.device, dtype=torch.float32), position_ids.to(x.device))
