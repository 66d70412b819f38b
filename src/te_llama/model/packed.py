"""Padded and packed batches on TE's fused attention, padding-free: the real tokens as TE's ``thd`` layout.

A batch whose rows are one sequence each, with no padding, runs TE's fused layer on ``[b, s, hidden]`` with a
plain causal mask (the fastest path). Every other batch layout is turned into one stream of real tokens,
``[tokens, hidden]``, with ``cu_seqlens`` marking where each sequence starts (:class:`PackedSequences`):

- right or left padding: padding tokens are dropped, each row's real tokens are one sequence;
- rows of packed documents: a document starts where ``position_ids`` do not count up by one (HF's
  ``DataCollatorWithFlattening``, TRL's ``padding_free=True``), or where ``cu_seq_lens_q`` says (the collator's
  ``return_flash_attn_kwargs=True``);
- under FP8, a batch whose token count TE's FP8 GEMMs cannot take is padded inside: a sequence of zeros is
  appended to the stream and dropped again.

Each sequence attends only to itself (TE's ``padding_causal`` mask on ``thd``) and its RoPE positions restart at
0: attention scores depend only on the distance between tokens, so any positions that count up by one within a
sequence give HF's result. The layer runs TE's modules one by one on the stream (``layernorm_qkv`` -> RoPE ->
``DotProductAttention(qkv_format="thd")`` -> ``proj`` -> ``layernorm_mlp``, with the family's q/k norm and sliding
window) and writes the outputs back into the batch; padding positions keep their input. PEFT adapters apply as in
the fused layer.

Finding the sequences reads ``position_ids`` and the mask on the host once per forward (HF's own mask creation
does the same); the layers of that forward share the result.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import torch
from torch import nn

from te_llama.model.adapters import attention_adapters, mlp_output, plus_bias, qkv_heads
from te_llama.model.reference_layer import positions_in_sequences
from te_llama.model.rope import RotaryAngles, angle_table


@dataclass(frozen=True)
class PackedSequences:
    """Where a batch's real tokens are and which sequence each belongs to."""

    batch_shape: tuple[int, int]
    """``(b, s)`` of the batch the stream comes from."""
    token_index: torch.Tensor | None
    """Positions of the real tokens in the flattened batch, in order; ``None`` when every token is real."""
    cu_seqlens: torch.Tensor
    """int32 ``[sequences + 1]``: where each sequence starts in the stream, then the stream's length (alignment
    padding included, as a last sequence)."""
    max_seqlen: int
    real_tokens: int
    """Tokens taken from the batch; the stream may be longer by the alignment padding."""
    stream_tokens: int
    """The stream's length, ``cu_seqlens[-1]`` (kept on the host: reading the device tensor would wait for the GPU)."""

    @property
    def sequences(self) -> int:
        return len(self.cu_seqlens) - 1

    @property
    def every_token_real(self) -> bool:
        """Whether the stream is the whole batch, nothing dropped and nothing appended (as for fixed-size blocks of
        packed documents): then its token count is fixed by the batch's shape."""
        b, s = self.batch_shape
        return self.token_index is None and self.real_tokens == self.stream_tokens == b * s

    def with_capacity(self, capacity: int, max_seqlen: int) -> PackedSequences:
        """These sequences in fixed shapes, as a CUDA graph takes them: ``cu_seqlens`` of ``capacity + 1`` entries
        (empty sequences at the end) and ``max_seqlen`` the bound ``max_seqlen``."""
        padding = self.cu_seqlens[-1:].expand(capacity - self.sequences)
        return replace(self, cu_seqlens=torch.cat((self.cu_seqlens, padding)), max_seqlen=max_seqlen)

    def pack(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[b, s, hidden]`` -> ``[stream_tokens, hidden]``."""
        flat = hidden_states.flatten(0, 1)
        stream = flat if self.token_index is None else flat.index_select(0, self.token_index)
        padding = self.stream_tokens - self.real_tokens
        return torch.cat((stream, stream.new_zeros(padding, stream.shape[1]))) if padding else stream

    def unpack(self, stream: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """The stream's outputs in the batch's places; positions without a real token keep ``hidden_states``."""
        stream = stream[: self.real_tokens]
        if self.token_index is None:
            return stream.view_as(hidden_states)
        return hidden_states.flatten(0, 1).index_copy(0, self.token_index, stream).view_as(hidden_states)


def packed_sequences(tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     position_ids: torch.Tensor | None = None, cu_seq_lens: torch.Tensor | None = None,
                     alignment: int = 1) -> PackedSequences | None:
    """The sequences of a batch of ``tokens`` ``[b, s]``, or ``None`` when it is ``b`` whole sequences of ``s``
    tokens, ``b * s`` divisible by ``alignment`` (TE's fused layer on ``[b, s]`` then). ``attention_mask``: HF's 2-D
    padding mask; ``cu_seq_lens``: sequence starts in the flattened batch, as ``DataCollatorWithFlattening`` gives
    them."""
    (b, s), device = tokens.shape, tokens.device
    if cu_seq_lens is not None:
        bounds = cu_seq_lens.tolist()
        if bounds[0] != 0 or bounds[-1] != b * s or any(x >= y for x, y in zip(bounds, bounds[1:])):
            raise ValueError(f"cu_seq_lens_q {bounds} does not split the batch's {b * s} tokens into sequences")
        index = None
    else:
        valid = (attention_mask.bool() if attention_mask is not None
                 else torch.ones(b, s, dtype=torch.bool, device=device))
        positions = (position_ids.expand(b, s) if position_ids is not None
                     else torch.arange(s, device=device).expand(b, s))
        starts = valid.clone()
        starts[:, 1:] &= (positions[:, 1:] != positions[:, :-1] + 1) | ~valid[:, :-1]
        flat_valid, flat_starts = valid.flatten(), starts.flatten()
        index = flat_valid.nonzero().squeeze(1)  # two reads on the host: the real tokens, the starts
        if len(index) == 0:
            return None  # nothing but padding: no output is read
        if len(index) == b * s:
            index = None
        else:
            flat_starts = flat_starts.index_select(0, index)
        bounds = [*flat_starts.nonzero().squeeze(1).tolist(), int(flat_starts.shape[0])]
        if index is None and len(bounds) == b + 1 and (b * s) % alignment == 0:
            return None  # whole rows: a sequence starts at each row and nowhere else
    lengths = [y - x for x, y in zip(bounds, bounds[1:])]
    real = bounds[-1]
    if real % alignment:
        lengths.append(-real % alignment)  # a sequence of zeros makes the stream a length FP8's GEMMs take
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    return PackedSequences((b, s), index, cu, max(lengths), real, sum(lengths))


def token_angle_table(packed: PackedSequences, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE angles of each token of the stream at its position in its own sequence, ``[stream_tokens, 1, 1, dim]``
    float32: computed on the device from ``cu_seqlens`` alone (no host read), as a CUDA graph's input."""
    return angle_table(positions_in_sequences(packed.cu_seqlens, packed.stream_tokens), inv_freq)


def _rotary(layer: nn.Module, x: torch.Tensor, table: torch.Tensor, packed: PackedSequences,
            per_token: bool) -> torch.Tensor:
    if layer.backend == "te":
        from transformer_engine.pytorch.attention.rope import apply_rotary_pos_emb
    else:
        from te_llama.model.reference_layer import apply_rotary_pos_emb
    if per_token:  # the stream as one row whose table holds every token's own angles
        return apply_rotary_pos_emb(x[None], table, tensor_format="bshd", fused=True)[0]
    return apply_rotary_pos_emb(x, table, tensor_format="thd", fused=True, cu_seqlens=packed.cu_seqlens)


def forward_packed(layer: nn.Module, hidden_states: torch.Tensor, packed: PackedSequences,
                   rotary: RotaryAngles | None, adapters: dict[str, nn.Module], is_first_microbatch: bool | None,
                   token_angles: torch.Tensor | None = None, weights_cached: bool | None = None) -> torch.Tensor:
    """One decoder layer on the real tokens of ``hidden_states`` ``[b, s, hidden]`` (see the module docstring).

    ``token_angles``: RoPE from this per-token table (:func:`token_angle_table`) instead of the table from 0 that
    TE's ``thd`` RoPE indexes by ``cu_seqlens``: what a CUDA graph of packed batches runs, whose ``cu_seqlens`` ends
    in empty sequences, over which TE's ``thd`` RoPE kernel spends its grid. ``weights_cached``: as in
    :meth:`te_llama.model.layer.DecoderLayerAdapter.te_forward`."""
    attention = layer.self_attention
    cached = is_first_microbatch is not None if weights_cached is None else weights_cached
    x = packed.pack(layer.drop_cached_transposes(hidden_states, cached))
    per_token = token_angles is not None
    table = token_angles if per_token else rotary.angle_table_from_zero(packed.max_seqlen)
    with attention_adapters(attention, adapters):
        q, k, v = qkv_heads(layer, x, is_first_microbatch)
        q, k = _rotary(layer, q, table, packed, per_token), _rotary(layer, k, table, packed, per_token)
        context = attention.core_attention(
            q, k, v, qkv_format="thd", attn_mask_type="padding_causal", cu_seqlens_q=packed.cu_seqlens,
            cu_seqlens_kv=packed.cu_seqlens, max_seqlen_q=packed.max_seqlen, max_seqlen_kv=packed.max_seqlen,
            window_size=layer.window_size)  # Mistral's sliding window, within each sequence
        x = x + plus_bias(attention.proj(context.reshape(x.shape[0], -1), is_first_microbatch=is_first_microbatch))
    return packed.unpack(x + mlp_output(layer, x, adapters, is_first_microbatch), hidden_states)
