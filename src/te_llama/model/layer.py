"""``TELlamaDecoderLayer``: a Transformer Engine ``TransformerLayer`` configured as the decoder layer of a Llama-family
model (Llama, Mistral, Qwen2, Qwen3: :mod:`te_llama.model.families`).

The class derives from ``transformer_engine.pytorch.TransformerLayer`` on the TE backend and from the
pure-PyTorch reference (:mod:`te_llama.model.reference_layer`) otherwise; :func:`decoder_layer_class` builds it for a
backend. It takes ``(config, layer_idx)`` like HF's ``LlamaDecoderLayer`` and accepts the call HF's
``LlamaModel`` (or ``MistralModel``, ...) makes, so it can be swapped in while the model is built.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from te_llama import te_patches
from te_llama.backend import Backend, resolve_backend, transformer_layer_base
from te_llama.model.adapters import AdapterError, active_adapters, add_projection_sites, forward_with_adapters
from te_llama.model.families import UnsupportedConfigError, check_config  # noqa: F401 (where callers import them)
from te_llama.model.families import Biases, attention_window, te_kwargs
from te_llama.model.kv_cache import forward_with_cache
from te_llama.model.packed import forward_packed
from te_llama.model.rope import RotaryAngles, softmax_scale
from te_llama.training.distributed import is_sharded


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def transformer_layer_kwargs(config, layer_idx: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Arguments of ``TransformerLayer`` that make it compute the decoder layer of the config's family."""
    std = config.initializer_range

    def init_method(tensor: torch.Tensor) -> torch.Tensor:
        return torch.nn.init.normal_(tensor, mean=0.0, std=std)

    return dict(
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.intermediate_size,
        num_attention_heads=config.num_attention_heads,
        num_gqa_groups=config.num_key_value_heads,
        kv_channels=head_dim(config),
        layernorm_epsilon=config.rms_norm_eps,
        hidden_dropout=0.0,
        attention_dropout=config.attention_dropout,
        init_method=init_method,
        output_layer_init_method=init_method,
        layer_number=layer_idx + 1,  # TE counts layers from 1
        self_attn_mask_type="causal",
        params_dtype=dtype,
        activation="swiglu",
        normalization="RMSNorm",
        device=device,
        attn_input_format="bshd",
        fuse_qkv_params=False,
        **te_kwargs(config),  # bias, and per family: window_size, qk_norm_*
    )


def _absent_biases_as_zeros(layer: torch.nn.Module, biases: Biases) -> None:
    """Make the biases that TE's one ``bias`` switch created and HF's model lacks (Qwen2: o and the MLP) zeros.

    Each becomes a non-persistent zero buffer under its parameter's name. TE's modules read it by attribute as before,
    and adding zero changes no value; as no parameter it is in no optimizer, ``state_dict()``, checkpoint or weight
    table, and nothing can train it away from zero. The gradient TE's backward may still compute for it goes nowhere
    (a buffer takes none)."""
    if not biases.te_switch:
        return
    groups = ((biases.qkv, layer.self_attention.layernorm_qkv, ("query_bias", "key_bias", "value_bias")),
              (biases.proj, layer.self_attention.proj, ("bias",)),
              (biases.mlp, layer.layernorm_mlp, ("fc1_bias", "fc2_bias")))
    for present, module, names in groups:
        for name in () if present else names:
            param = module._parameters.pop(name)
            module.register_buffer(name, torch.zeros_like(param.detach()), persistent=False)


def _set_softmax_scale(core_attention: torch.nn.Module, scale: float) -> None:
    # TE keeps the scale on DotProductAttention and on each of its backends (flash, fused, unfused).
    for module in core_attention.modules():
        if hasattr(module, "softmax_scale"):
            module.softmax_scale = scale


class DecoderLayerAdapter:
    """Maps the family's config onto TransformerLayer and HF's decoder-layer call onto TE's forward."""

    backend: Backend
    cuda_graph = None
    """The model's :class:`te_llama.training.cuda_graphs.StackGraph` once it has recorded CUDA graphs, else ``None``."""
    drops_weight_transposes = False
    """The layer's weights are kept in per-tensor FP8 (:mod:`te_llama.training.fp8_weights`): its backward drops the
    transposes it made of them."""

    def __init__(self, config, layer_idx: int):
        biases = check_config(config).biases(config)
        device = torch.get_default_device()
        if self.backend == "te" and device.type == "cpu":
            device = torch.device("cuda")
        super().__init__(**transformer_layer_kwargs(config, layer_idx, device, torch.get_default_dtype()))
        _absent_biases_as_zeros(self, biases)
        self.layer_idx = layer_idx
        self.attention_window = attention_window(config)
        """HF's sliding window ``W`` or ``None``; HF's masks are read with it (TE's ``window_size``: ``(W - 1, 0)``)."""
        self.head_dim = head_dim(config)
        self.attention_dropout = float(config.attention_dropout)
        scale = softmax_scale(config)
        if abs(scale * head_dim(config) ** 0.5 - 1.0) > 1e-12:
            _set_softmax_scale(self.self_attention.core_attention, scale)
        add_projection_sites(self, config, biases)  # HF's self_attn.q_proj ... mlp.down_proj, for PEFT (adapters.py)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        position_embeddings: RotaryAngles | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        cache = kwargs.pop("cache", None)
        if cache is None:  # transformers < 5.20 names it past_key_values
            cache = kwargs.pop("past_key_values", None)
        decode_graphs = kwargs.get("decode_graphs")  # a generate() decode step (te_llama.generation.decode_graphs)
        if decode_graphs is not None and cache is not None:
            output = decode_graphs.layer_forward(self.layer_idx, hidden_states, attention_mask, position_embeddings,
                                                 cache, kwargs.get("fp8_decode_step"))
            if output is not None:
                return output
        if not isinstance(position_embeddings, RotaryAngles):
            raise TypeError(
                "TELlamaDecoderLayer expects position_embeddings from te_llama.model.rope.TERotaryEmbedding; build the "
                "model with TELlamaForCausalLM or inside te_llama.replace_decoder_layer()"
            )
        adapters = active_adapters(self)
        if adapters and is_sharded(self):
            raise AdapterError("PEFT adapters added to a model sharded with FSDP2 would train unsharded and "
                               "unreduced, differently in every process; train LoRA with DDP (no shard_model)")
        if cache is not None:  # generate(), or any forward with use_cache=True (kv_cache.py)
            return forward_with_cache(self, hidden_states, attention_mask, position_embeddings, cache, adapters,
                                      kwargs.get("fp8_token_alignment", 1), kwargs.get("is_first_microbatch"))
        packed = kwargs.get("packed_sequences")
        if packed is not None:  # padded or packed rows, as TE's thd stream (packed.py)
            if self.cuda_graph is not None and not adapters:
                output = self.cuda_graph.packed_layer_forward(self.layer_idx, hidden_states, packed,
                                                              position_embeddings, kwargs.get("is_first_microbatch"))
                if output is not None:
                    return output
            return forward_packed(self, hidden_states, packed, position_embeddings, adapters,
                                  kwargs.get("is_first_microbatch"))
        mask, angles = position_embeddings.te_inputs(attention_mask, hidden_states.shape[0], self.attention_window)
        if adapters:
            return forward_with_adapters(self, adapters, hidden_states, angles, mask.mask, mask.mask_type,
                                         kwargs.get("is_first_microbatch"))
        if self.cuda_graph is not None:
            output = self.cuda_graph.layer_forward(self.layer_idx, hidden_states, mask.mask_type, angles,
                                                   kwargs.get("is_first_microbatch"))
            if output is not None:
                return output
        return self.te_forward(hidden_states, angles, mask.mask, mask.mask_type, kwargs.get("is_first_microbatch"))

    def te_forward(self, hidden_states: torch.Tensor, rotary_pos_emb: torch.Tensor, mask: torch.Tensor | None,
                   mask_type: str, is_first_microbatch: bool | None = None,
                   weights_cached: bool | None = None) -> torch.Tensor:
        """TE's ``TransformerLayer.forward`` with the inputs in TE's form (what a CUDA graph records).

        ``weights_cached``: the FP8 weights come from TE's cache (:mod:`te_llama.training.weight_cache`), so the layer's
        backward makes their transposes and then drops them (:mod:`te_llama.training.weight_cache_rowwise`). ``None``:
        whether ``is_first_microbatch`` is given; a CUDA graph recorded with weight caching passes ``True``."""
        if weights_cached is None:
            weights_cached = is_first_microbatch is not None
        hidden_states = self.drop_cached_transposes(hidden_states, weights_cached)
        return super().forward(hidden_states, attention_mask=mask, self_attn_mask_type=mask_type,
                               rotary_pos_emb=rotary_pos_emb, is_first_microbatch=is_first_microbatch)


    def drop_cached_transposes(self, hidden_states: torch.Tensor, weights_cached: bool) -> torch.Tensor:
        """``hidden_states``, marked so that this layer's backward drops the transposes of cached FP8 weights it made
        (:mod:`te_llama.training.weight_cache_rowwise`) or of its weights kept in FP8, where that applies."""
        cached = weights_cached and te_patches.installed("rowwise_weight_cache")
        if self.backend == "te" and (cached or self.drops_weight_transposes):
            from te_llama.training.weight_cache_rowwise import drop_transposes_after_backward

            return drop_transposes_after_backward(self, hidden_states)
        return hidden_states


@functools.cache
def _build(backend: Backend) -> type:
    base = transformer_layer_base(backend)
    return type(
        "TELlamaDecoderLayer",
        (DecoderLayerAdapter, GradientCheckpointingLayer, base),
        {"__module__": __name__, "__qualname__": "TELlamaDecoderLayer", "backend": backend,
         "__doc__": f"Llama-family decoder layer on {base.__module__}.{base.__qualname__}."},
    )


def decoder_layer_class(backend: str | None = None) -> type:
    """``TELlamaDecoderLayer`` for ``backend`` (``None``: ``$TE_LLAMA_BACKEND`` or automatic)."""
    return _build(resolve_backend(backend))
