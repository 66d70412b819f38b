"""A pure-PyTorch implementation of the part of ``transformer_engine.pytorch.TransformerLayer`` te-llama uses.

Same constructor arguments, module tree, parameter names and shapes as TE, and the same math:
RMSNorm -> Q/K/V -> (per-head q/k RMSNorm) -> RoPE -> (grouped-query) attention with TE's mask types and sliding
window -> proj -> residual -> RMSNorm -> fc1 (gate first) -> SwiGLU -> fc2 -> residual. It lets te-llama run and be
tested on machines without a GPU, and serves as the oracle in GPU parity tests. It is not a speed path.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As TE: normalise and scale in float32, then cast to the input dtype.
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return y.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """RoPE on ``x`` ``[b, s, h, d]`` with TE's ``[s, 1, 1, d]`` float32 angle table (non-interleaved)."""
    return rotate(x, angles[: x.shape[1]].transpose(0, 1))  # [1, s, 1, d]


def positions_in_sequences(cu_seqlens: torch.Tensor, tokens: int) -> torch.Tensor:
    """Each packed token's position inside its own sequence (``0, 1, ...`` from every ``cu_seqlens`` start)."""
    starts = cu_seqlens[:-1].long().repeat_interleave(cu_seqlens.diff().long(), output_size=tokens)
    return torch.arange(tokens, device=cu_seqlens.device) - starts


def apply_rotary_pos_emb(t: torch.Tensor, freqs: torch.Tensor, tensor_format: str = "sbhd", interleaved: bool = False,
                         fused: bool = False, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """TE's ``apply_rotary_pos_emb`` for the packed ``"thd"`` format (``t`` is ``[tokens, heads, dim]``, ``freqs``
    the ``[max_seqlen, 1, 1, dim]`` angle table, and positions restart at 0 at each ``cu_seqlens`` boundary) and for
    ``"bshd"`` (``t`` is ``[b, s, heads, dim]``, ``freqs`` one angle per position ``[s, 1, 1, dim]``)."""
    if interleaved or tensor_format not in ("thd", "bshd") or (tensor_format == "thd") != (cu_seqlens is not None):
        raise NotImplementedError("the reference apply_rotary_pos_emb implements tensor_format='thd' with "
                                  "cu_seqlens and 'bshd' without, non-interleaved")
    if tensor_format == "bshd":
        return apply_rotary(t, freqs)
    return rotate(t, freqs[positions_in_sequences(cu_seqlens, t.shape[0]), 0])


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """RoPE on ``x`` ``[b, s, h, d]`` with float32 angles broadcastable to ``[b, s, 1, d]``, computed in float32."""
    rot = angles.shape[-1]
    x_rot, x_pass = x[..., :rot].float(), x[..., rot:]
    out = x_rot * angles.cos() + _rotate_half(x_rot) * angles.sin()
    return torch.cat((out.to(x.dtype), x_pass), dim=-1)


class _Parameters(nn.Module):
    """Registers named parameters with TE's names and an init function per parameter."""

    def _add(self, name: str, shape: tuple[int, ...], init: Callable, device, dtype) -> None:
        param = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        if param.device.type != "meta":
            with torch.no_grad():
                init(param)
        self.register_parameter(name, param)


class LayerNormLinear(_Parameters):
    """RMSNorm followed by a linear layer whose weight is stored in named row blocks (query/key/value)."""

    def __init__(self, in_features, splits, eps, bias, init_method, device, dtype):
        super().__init__()
        self.eps = eps
        self.split_names = [name for name, _ in splits]
        self._add("layer_norm_weight", (in_features,), nn.init.ones_, device, dtype)
        for name, size in splits:
            self._add(f"{name}_weight", (size, in_features), init_method, device, dtype)
        self.use_bias = bias
        if bias:
            for name, size in splits:
                self._add(f"{name}_bias", (size,), nn.init.zeros_, device, dtype)

    def forward(self, x: torch.Tensor, is_first_microbatch: bool | None = None) -> torch.Tensor:
        """The blocks' outputs side by side in the last dimension, as TE's (one GEMM there, one per block here)."""
        normed = _rms_norm(x, self.layer_norm_weight, self.eps)
        outputs = []
        for name in self.split_names:
            bias = getattr(self, f"{name}_bias") if self.use_bias else None
            outputs.append(F.linear(normed, getattr(self, f"{name}_weight"), bias))
        return torch.cat(outputs, dim=-1)


class RMSNorm(_Parameters):
    """TE's ``RMSNorm`` module over the last dimension (``weight``), as ``MultiheadAttention`` builds it for
    ``qk_norm_type="RMSNorm"``: one per q and k, normalising each head over ``kv_channels``."""

    def __init__(self, normalized_shape: int, eps: float, device, dtype):
        super().__init__()
        self.eps = eps
        self._add("weight", (normalized_shape,), nn.init.ones_, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rms_norm(x, self.weight, self.eps)


class Linear(_Parameters):
    def __init__(self, in_features, out_features, bias, init_method, device, dtype):
        super().__init__()
        self._add("weight", (out_features, in_features), init_method, device, dtype)
        if bias:
            self._add("bias", (out_features,), nn.init.zeros_, device, dtype)
        else:
            self.bias = None

    def forward(self, x: torch.Tensor, is_first_microbatch: bool | None = None) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class DotProductAttention(nn.Module):
    """Scaled dot-product attention with TE's mask types (``True`` in a mask means masked out)."""

    def __init__(self, num_heads: int, num_gqa_groups: int, kv_channels: int, attention_dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.num_gqa_groups = num_gqa_groups
        self.softmax_scale = 1.0 / math.sqrt(kv_channels)
        self.attention_dropout = attention_dropout

    def forward(self, query_layer, key_layer, value_layer, attention_mask=None, qkv_format: str = "bshd",
                cu_seqlens_q=None, cu_seqlens_kv=None, max_seqlen_q=None, max_seqlen_kv=None,
                attn_mask_type: str = "causal", window_size: tuple[int, int] | None = None) -> torch.Tensor:
        """TE's call: ``bshd`` tensors ``[b, s, heads, d]`` with a mask type, or packed ``thd`` tensors
        ``[tokens, heads, d]`` whose sequences ``cu_seqlens_q`` delimits (``padding_causal``: causal within each
        sequence, nothing across). ``window_size``: TE's sliding window. Returns ``[b, s, heads * d]`` or
        ``[tokens, heads * d]``."""
        if qkv_format == "thd":
            if attn_mask_type != "padding_causal" or cu_seqlens_kv is not None and not torch.equal(cu_seqlens_q,
                                                                                                  cu_seqlens_kv):
                raise ValueError("reference attention implements thd self-attention with 'padding_causal' only")
            tokens = query_layer.shape[0]
            sequence = torch.arange(len(cu_seqlens_q) - 1, device=query_layer.device).repeat_interleave(
                cu_seqlens_q.diff().long(), output_size=tokens)
            same = sequence[:, None] == sequence[None, :]
            # Tokens of one sequence are consecutive, so their distance in the stream is their distance in it.
            allowed = same & torch.ones(tokens, tokens, dtype=torch.bool, device=same.device).tril()
            allowed &= sliding_window(tokens, window_size, same.device)
            q, k, v = (t.unsqueeze(0) for t in (query_layer, key_layer, value_layer))
            return self._attend(q, k, v, allowed)[0]
        q, k, v = query_layer, key_layer, value_layer
        seq = q.shape[1]
        window = sliding_window(seq, window_size, q.device)
        causal = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril() & window
        if attn_mask_type == "causal":
            allowed = causal
        elif attn_mask_type == "padding_causal":
            allowed = causal & ~attention_mask
            allowed = allowed | (torch.eye(seq, dtype=torch.bool, device=q.device) & ~allowed.any(-1, keepdim=True))
        elif attn_mask_type == "arbitrary":  # TE adds the window's masked keys to the mask (get_full_mask)
            allowed = ~attention_mask & window
        else:
            raise ValueError(f"reference attention does not implement mask type {attn_mask_type!r}")
        return self._attend(q, k, v, allowed)

    def _attend(self, q, k, v, allowed: torch.Tensor) -> torch.Tensor:
        # q: [b, s, h, d]; k, v: [b, s, g, d]; allowed broadcasts to [b, h, s, s]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        repeats = self.num_heads // self.num_gqa_groups
        k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        dropout = self.attention_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout, scale=self.softmax_scale)
        return out.transpose(1, 2).flatten(2)


def sliding_window(seq: int, window_size: tuple[int, int] | None, device) -> torch.Tensor:
    """``[seq, seq]`` boolean, ``True`` where query ``i`` may see key ``j``: TE's ``window_size=(left, right)`` is
    ``i - left <= j <= i + right``, ``-1`` (or no window) unbounded."""
    allowed = torch.ones(seq, seq, dtype=torch.bool, device=device)
    if window_size is None:
        return allowed
    left, right = window_size
    distance = torch.arange(seq, device=device)[:, None] - torch.arange(seq, device=device)[None, :]  # i - j
    if left >= 0:
        allowed &= distance <= left
    if right >= 0:
        allowed &= -distance <= right
    return allowed


class MultiheadAttention(nn.Module):
    def __init__(self, hidden_size, num_heads, num_gqa_groups, kv_channels, eps, bias, dropout, init, out_init,
                 device, dtype, qk_norm_type=None, qk_norm_eps=1e-6, qk_norm_before_rope=False):
        super().__init__()
        self.num_heads, self.num_gqa_groups, self.kv_channels = num_heads, num_gqa_groups, kv_channels
        splits = [("query", num_heads * kv_channels), ("key", num_gqa_groups * kv_channels),
                  ("value", num_gqa_groups * kv_channels)]
        self.layernorm_qkv = LayerNormLinear(hidden_size, splits, eps, bias, init, device, dtype)
        if qk_norm_type not in (None, "RMSNorm"):
            raise ValueError(f"reference MultiheadAttention implements qk_norm_type None or 'RMSNorm', got "
                             f"{qk_norm_type!r}")
        self.qk_norm_before_rope = qk_norm_before_rope
        self.q_norm = self.k_norm = None
        if qk_norm_type == "RMSNorm":
            self.q_norm = RMSNorm(kv_channels, qk_norm_eps, device, dtype)
            self.k_norm = RMSNorm(kv_channels, qk_norm_eps, device, dtype)
        self.core_attention = DotProductAttention(num_heads, num_gqa_groups, kv_channels, dropout)
        self.proj = Linear(num_heads * kv_channels, hidden_size, bias, out_init, device, dtype)

    def forward(self, hidden_states, attention_mask=None, attn_mask_type="causal", window_size=None,
                rotary_pos_emb=None, is_first_microbatch=None):
        """TE's call and result: ``(output, bias)``; the bias is already in the output here, so it is ``None``."""
        x = hidden_states
        b, s, _ = x.shape
        q_size, kv_size = self.num_heads * self.kv_channels, self.num_gqa_groups * self.kv_channels
        q, k, v = self.layernorm_qkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(b, s, self.num_heads, self.kv_channels)
        k = k.view(b, s, self.num_gqa_groups, self.kv_channels)
        v = v.view(b, s, self.num_gqa_groups, self.kv_channels)
        if self.q_norm is not None and self.qk_norm_before_rope:
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary_pos_emb is not None:
            q, k = apply_rotary(q, rotary_pos_emb), apply_rotary(k, rotary_pos_emb)
        if self.q_norm is not None and not self.qk_norm_before_rope:
            q, k = self.q_norm(q), self.k_norm(k)
        context = self.core_attention(q, k, v, attention_mask=attention_mask, attn_mask_type=attn_mask_type,
                                      window_size=window_size)
        return self.proj(context), None


class LayerNormMLP(_Parameters):
    """RMSNorm -> fc1 (gate rows first, then up rows) -> SwiGLU -> fc2."""

    def __init__(self, hidden_size, ffn_hidden_size, eps, bias, init, out_init, device, dtype):
        super().__init__()
        self.eps = eps
        self._add("layer_norm_weight", (hidden_size,), nn.init.ones_, device, dtype)
        self._add("fc1_weight", (2 * ffn_hidden_size, hidden_size), init, device, dtype)
        self._add("fc2_weight", (hidden_size, ffn_hidden_size), out_init, device, dtype)
        self.use_bias = bias
        if bias:
            self._add("fc1_bias", (2 * ffn_hidden_size,), nn.init.zeros_, device, dtype)
            self._add("fc2_bias", (hidden_size,), nn.init.zeros_, device, dtype)

    def forward(self, x: torch.Tensor, is_first_microbatch: bool | None = None) -> torch.Tensor:
        normed = _rms_norm(x, self.layer_norm_weight, self.eps)
        fc1 = F.linear(normed, self.fc1_weight, self.fc1_bias if self.use_bias else None)
        gate, up = fc1.chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.fc2_weight, self.fc2_bias if self.use_bias else None)


def _normal(std: float) -> Callable:
    return lambda tensor: nn.init.normal_(tensor, mean=0.0, std=std)


class TransformerLayer(nn.Module):
    """Reference for ``te.pytorch.TransformerLayer`` restricted to the pre-norm Llama configuration."""

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        num_attention_heads: int,
        num_gqa_groups: int | None = None,
        layernorm_epsilon: float = 1e-5,
        hidden_dropout: float = 0.1,
        attention_dropout: float = 0.1,
        init_method: Callable | None = None,
        output_layer_init_method: Callable | None = None,
        layer_number: int | None = None,
        kv_channels: int | None = None,
        self_attn_mask_type: str = "causal",
        params_dtype: torch.dtype | None = None,
        bias: bool = True,
        activation: str = "gelu",
        normalization: str = "LayerNorm",
        device: torch.device | str = "cpu",
        attn_input_format: str = "sbhd",
        fuse_qkv_params: bool = False,
        window_size: tuple[int, int] | None = None,
        qk_norm_type: str | None = None,
        qk_norm_eps: float = 1e-6,
        qk_norm_before_rope: bool = False,
        **unsupported,
    ) -> None:
        super().__init__()
        required = {"activation": (activation, "swiglu"), "normalization": (normalization, "RMSNorm"),
                    "attn_input_format": (attn_input_format, "bshd"), "fuse_qkv_params": (fuse_qkv_params, False)}
        for name, (value, wanted) in required.items():
            if value != wanted:
                raise ValueError(f"reference TransformerLayer supports {name}={wanted!r} only, got {value!r}")
        if unsupported:
            raise TypeError(f"reference TransformerLayer does not implement: {', '.join(sorted(unsupported))}")
        num_gqa_groups = num_gqa_groups or num_attention_heads
        kv_channels = kv_channels or hidden_size // num_attention_heads
        dtype = params_dtype or torch.get_default_dtype()
        init = init_method or _normal(0.023)
        out_init = output_layer_init_method or _normal(0.023)
        self.layer_number = layer_number
        self.self_attn_mask_type = self_attn_mask_type
        self.window_size = window_size
        self.hidden_dropout = hidden_dropout
        self.self_attention = MultiheadAttention(hidden_size, num_attention_heads, num_gqa_groups, kv_channels,
                                                 layernorm_epsilon, bias, attention_dropout, init, out_init,
                                                 device, dtype, qk_norm_type, qk_norm_eps, qk_norm_before_rope)
        self.layernorm_mlp = LayerNormMLP(hidden_size, ffn_hidden_size, layernorm_epsilon, bias, init, out_init,
                                          device, dtype)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        self_attn_mask_type: str | None = None,
        rotary_pos_emb: torch.Tensor | None = None,
        is_first_microbatch: bool | None = None,
        checkpoint_core_attention: bool = False,
        inference_params=None,
    ) -> torch.Tensor:
        if inference_params is not None:
            raise NotImplementedError("the reference TransformerLayer has no KV cache (inference_params)")
        mask_type = self_attn_mask_type or self.self_attn_mask_type
        attention, _ = self.self_attention(hidden_states, attention_mask=attention_mask, attn_mask_type=mask_type,
                                           window_size=self.window_size, rotary_pos_emb=rotary_pos_emb)
        hidden_states = hidden_states + F.dropout(attention, self.hidden_dropout, self.training)
        mlp = self.layernorm_mlp(hidden_states)
        return hidden_states + F.dropout(mlp, self.hidden_dropout, self.training)
