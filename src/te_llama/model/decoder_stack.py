"""``TELlamaModel`` (and ``TEMistralModel``, ``TEQwen2Model``, ``TEQwen3Model``): HF's decoder stack of each family
whose forward runs the decoder layers the way te-llama set them up (:class:`TEDecoderStack`).

What must hold whenever the decoder layers run lives here, in the decoder stack's forward, and not in the causal-LM
head's, so it holds whoever calls the stack: ``model(...)``, ``generate()``, or ``model.model(...)`` directly, as
TRL's fused LM head and Liger-style patches do. One pass (:meth:`TEDecoderStack.forward`):

1. refuse ``torch.nn.DataParallel`` replicas (:func:`te_llama.training.distributed.refuse_data_parallel`);
2. mark fixed-length batches as plain causal, skipping HF's mask creation (:mod:`te_llama.model.masks`), and turn
   padded or packed batches into TE's padding-free ``thd`` stream (:mod:`te_llama.model.packed`), which also pads
   the token count FP8 needs;
3. check FP8's token-count alignment where no stream pads it (:func:`te_llama.training.fp8.check_token_alignment`),
   or have the KV-cache path pad it (:class:`te_llama.model.kv_cache.TokenRows`);
4. record or arm the CUDA graphs: the training step's (:mod:`te_llama.training.cuda_graphs`; for whole rows or for
   fixed-size packed blocks), or on HF's static cache the decode step's (:mod:`te_llama.generation.decode_graphs`);
5. choose TE's ``is_first_microbatch`` for the FP8 weight cache (:mod:`te_llama.training.weight_cache`), and in
   ``generate()`` (:meth:`TEDecoderStack.generation_call`);
6. run HF's forward under ``te.autocast`` with the model's recipe (:func:`te_llama.training.fp8.autocast`).
"""

from __future__ import annotations

import functools
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LlamaModel, MistralModel, Qwen2Model, Qwen3Model

from te_llama import te_patches
from te_llama.generation.decode_graphs import DecodeGraphs, FP8Step
from te_llama.model.adapters import has_adapters
from te_llama.model.layer import DecoderLayerAdapter
from te_llama.model.masks import causal_marker
from te_llama.model.packed import packed_sequences
from te_llama.training import cuda_graphs as graphs
from te_llama.training.distributed import refuse_data_parallel
from te_llama.training.fp8 import (FP8Config, autocast, check_token_alignment, resolve_recipe_name,
                                   token_alignment)
from te_llama.training.weight_cache import FP8WeightCache


def _uses_cache(kwargs: dict) -> bool:
    """Whether this forward runs on HF's KV cache (``generate()``, ``use_cache=True``; kv_cache.py)."""
    return bool(kwargs.get("use_cache")) or any(kwargs.get(key) is not None for key in ("cache", "past_key_values"))


@dataclass
class StackSettings:
    """A model's choices for its decoder layers, set through ``TELlamaForCausalLM``'s methods."""

    fp8_config: FP8Config | None = None
    fp8_recipe: Any = None  # TE's recipe object built from fp8_config; its identity is the FP8 state's key
    cuda_graphs: bool = False
    graph_peers: graphs.GraphPeers = field(default_factory=graphs.GraphPeers)
    cache_fp8_weights: bool = False
    weight_cache: FP8WeightCache | None = None
    generation_forwards: int | None = None
    """Forwards so far of the ``generate()`` call in progress, ``None`` outside one (:meth:`generation_call`)."""
    decode_graphs: DecodeGraphs | None = None
    weights_in_fp8: str | None = None
    """The recipe the frozen weights are kept in FP8 for (:mod:`te_llama.training.fp8_weights`), else ``None``."""

    def fp8_active(self, training: bool) -> bool:
        """Whether a forward in this mode runs in FP8 (training; evaluation with ``in_eval``, or with the weights kept
        in FP8, which a BF16 forward would dequantize at every call)."""
        return self.fp8_recipe is not None and (training or self.fp8_config.in_eval or self.weights_in_fp8 is not None)

    @property
    def fp8_recipe_name(self) -> str | None:
        return None if self.fp8_config is None else resolve_recipe_name(self.fp8_config)


class TEDecoderStack:
    """What te-llama adds to a family's HF decoder stack (``LlamaModel``, ``MistralModel``, ...: embeddings,
    ``TELlamaDecoderLayer``s, final norm): it runs the layers under :class:`StackSettings`. Put it first among the
    bases, before HF's class, whose forward it wraps."""

    _can_record_outputs = {"hidden_states": DecoderLayerAdapter}
    """HF's ``output_hidden_states`` records the outputs of te-llama's layers (HF's own names ``LlamaDecoderLayer``,
    which these are not). No attention weights: TE's fused attention, as HF's SDPA, computes none."""

    def __init__(self, config):
        super().__init__(config)
        self.te_settings = StackSettings()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, *args, **kwargs):
        refuse_data_parallel(self)
        embeds = kwargs.get("inputs_embeds")
        tokens = input_ids if input_ids is not None else embeds[..., 0] if embeds is not None else None
        if (tokens is not None and not args and not _uses_cache(kwargs)
                and (attention_mask is None or attention_mask.dim() == 2)):
            packed = self._packed(tokens, attention_mask, position_ids, kwargs)
            if packed is not None:
                kwargs["packed_sequences"] = packed
            attention_mask = causal_marker(*tokens.shape)  # the layers need no HF mask (and HF no host sync)
        decode_graphs = self.te_settings.decode_graphs
        if decode_graphs is not None and _uses_cache(kwargs) and decode_graphs.serves(self, kwargs):
            kwargs["decode_graphs"] = decode_graphs  # HF hands it on to every decoder layer
        with self._decoder_pass(tokens, attention_mask, kwargs):
            return super().forward(input_ids, attention_mask, position_ids, *args, **kwargs)

    def _packed(self, tokens: torch.Tensor, attention_mask, position_ids, kwargs: dict):
        """The batch as TE's padding-free stream, or ``None`` where it is whole rows (:mod:`te_llama.model.packed`)."""
        alignment = self._token_alignment(self.te_settings.fp8_active(self.training))
        if attention_mask is None and position_ids is None and kwargs.get("cu_seq_lens_q") is None:
            if tokens.numel() % alignment == 0:
                return None  # the common training step, decided without reading the data
        return packed_sequences(tokens, attention_mask, position_ids, kwargs.get("cu_seq_lens_q"), alignment)

    @contextmanager
    def _decoder_pass(self, tokens: torch.Tensor | None, attention_mask, kwargs: dict):
        """Steps 3-6 of the module docstring; may add ``is_first_microbatch`` to ``kwargs`` (HF hands its keyword
        arguments on to every layer)."""
        settings = self.te_settings
        training = self.training and torch.is_grad_enabled()
        fp8 = settings.fp8_active(self.training)
        if _uses_cache(kwargs):  # the KV-cache path pads its tokens for FP8 (kv_cache.TokenRows)
            kwargs["fp8_token_alignment"] = self._token_alignment(fp8)
        elif fp8 and kwargs.get("packed_sequences") is None:
            check_token_alignment(settings.fp8_recipe_name, tokens)
        caches = fp8 and training and settings.cache_fp8_weights
        if fp8 and not training and settings.generation_forwards is not None:
            kwargs.setdefault("is_first_microbatch", _generation_cast(settings.generation_forwards))
            settings.generation_forwards += 1
        if fp8 and kwargs.get("decode_graphs") is not None:  # what a recorded FP8 decode step needs to know
            kwargs["fp8_decode_step"] = FP8Step(settings.fp8_recipe_name, kwargs["fp8_token_alignment"],
                                                kwargs.get("is_first_microbatch"))
        with ExitStack() as stack:
            stack.enter_context(te_patches.rowwise_weight_cache_scope(caches))  # also while graphs are recorded
            graph = (self._graph_for(tokens, attention_mask, fp8, caches, kwargs.get("packed_sequences"))
                     if settings.cuda_graphs and training else None)
            if caches:
                kwargs.setdefault("is_first_microbatch", self.weight_cache().is_first_microbatch(
                    settings.fp8_recipe, always_cache=graph is not None and graph.caches_weights))
            stack.enter_context(autocast(settings.fp8_recipe if fp8 else None))
            stack.enter_context(graphs.armed(graph, wants_layer_outputs=any(
                kwargs.get(key, getattr(self.config, key, False))
                for key in ("output_hidden_states", "output_attentions"))))
            try:
                yield
            except BaseException:
                self.fp8_weights_changed()  # the cast this forward was to keep may not have happened
                raise

    @contextmanager
    def generation_call(self):
        """While open (one ``generate()`` call), FP8 forwards cast the layers' weights once and then reuse the cast:
        nothing changes the weights between the steps of one call. The cast stays allocated until the next one."""
        settings = self.te_settings
        outer, settings.generation_forwards = settings.generation_forwards, 0
        try:
            yield
        finally:
            settings.generation_forwards = outer

    def _token_alignment(self, fp8: bool) -> int:
        """What this forward's token count must be a multiple of: FP8 GEMMs' alignment, or 1 in BF16."""
        return token_alignment(self.te_settings.fp8_recipe_name) if fp8 else 1

    def _graph_for(self, tokens: torch.Tensor, attention_mask, fp8: bool, caches: bool, packed=None):
        """The CUDA graph this training forward may replay, recorded first where needed (or ``None``); ``packed``:
        the batch as a padding-free stream, where it is one."""
        settings = self.te_settings
        if has_adapters(self.layers):
            raise graphs.CudaGraphError("CUDA graphs do not record PEFT adapters yet: call "
                                        "model.disable_cuda_graphs() before adding LoRA adapters")
        # Graphs record TE's weight caching once the cache keeps casts (weights seen unchanged between two
        # forwards): a graph recorded with caching casts the row-wise copy and transposes it in the backward
        # even where every forward follows an optimizer step, a byte more per weight than TE's plain cast.
        graphs.record_layer_graphs_once(
            self, tokens.shape, attention_mask, settings.fp8_recipe if fp8 else None,
            cache_weights=caches and self.weight_cache().keeps_casts(settings.fp8_recipe),
            group=settings.graph_peers.group, packed=packed)
        return self.layers[0].cuda_graph

    def weight_cache(self) -> FP8WeightCache:
        """When training forwards cast the FP8 weights and when they reuse the cast."""
        if self.te_settings.weight_cache is None:
            self.te_settings.weight_cache = FP8WeightCache(self.layers.parameters())
        return self.te_settings.weight_cache

    def fp8_weights_changed(self) -> None:
        if self.te_settings.weight_cache is not None:
            self.te_settings.weight_cache.weights_changed()


def _generation_cast(forward: int) -> bool | None:
    """TE's ``is_first_microbatch`` for forward number ``forward`` of a ``generate()`` call: the first casts as
    usual (delayed scaling has no amax of these weights before it, so a cast kept from it would keep scale 1), the
    second casts and keeps the cast, the others reuse it."""
    return None if forward == 0 else forward == 1


def _forward_of(hf_stack: type):
    """:meth:`TEDecoderStack.forward` under ``hf_stack.forward``'s name, signature and docstring (a function of its
    own per family, as ``functools.wraps`` writes onto the function it wraps)."""

    @functools.wraps(hf_stack.forward)
    def forward(self, *args, **kwargs):
        return TEDecoderStack.forward(self, *args, **kwargs)

    return forward


class TELlamaModel(TEDecoderStack, LlamaModel):
    """``LlamaModel`` that runs its ``TELlamaDecoderLayer``s under :class:`StackSettings`."""

    forward = _forward_of(LlamaModel)


class TEMistralModel(TEDecoderStack, MistralModel):
    """``MistralModel`` that runs its ``TELlamaDecoderLayer``s under :class:`StackSettings`."""

    forward = _forward_of(MistralModel)


class TEQwen2Model(TEDecoderStack, Qwen2Model):
    """``Qwen2Model`` that runs its ``TELlamaDecoderLayer``s under :class:`StackSettings`."""

    forward = _forward_of(Qwen2Model)


class TEQwen3Model(TEDecoderStack, Qwen3Model):
    """``Qwen3Model`` that runs its ``TELlamaDecoderLayer``s under :class:`StackSettings`."""

    forward = _forward_of(Qwen3Model)


STACKS: dict[str, type] = {"llama": TELlamaModel, "mistral": TEMistralModel, "qwen2": TEQwen2Model,
                           "qwen3": TEQwen3Model}
"""Each family's stack by ``model_type`` (what :func:`te_llama.model.patching.replace_decoder_layer` swaps in)."""
