"""CUDA graphs of the decoder layers, for training steps whose shapes never change.

Transformer Engine's modules run a lot of Python per call (FP8 bookkeeping, attention backend checks). On a
fast GPU the host can fall behind the kernels it launches, and the GPU waits. Transformer Engine's
``make_graphed_callables`` records every decoder layer's forward and backward once as CUDA graphs; later steps
replay each with one launch. Embeddings, final norm, LM head and loss stay eager.

When a graph replays (checked on every call, otherwise the layer runs eagerly as before):

- training mode with gradients enabled, and no gradient checkpointing;
- the batch shape and dtype it was recorded with, and plain causal attention (no padding mask);
- the same FP8 state: the model's recipe inside its ``te.autocast``, or BF16 if recorded without FP8; and the
  same ``torch.autocast`` state (the Trainer's ``bf16=True`` turns it on);
- the layer's parameters hold no gradient yet. Replays write parameter gradients straight into the graphs'
  buffers (no copy, no extra memory), which the next replay overwrites; so a forward whose layer still has
  gradients (gradient accumulation, the micro-batches after the first) runs eagerly and adds to them.

The model records the graphs at its first training forward that qualifies (see
:meth:`te_llama.modeling.TELlamaForCausalLM.enable_cuda_graphs`), once: batches of another shape run eagerly,
and only a change of FP8 recipe records them again.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("te_llama")


class CudaGraphError(RuntimeError):
    """CUDA graphs were asked for where they cannot work."""


class _LayerCall(torch.nn.Module):
    """What one graph records: a decoder layer's TE forward with causal attention and a RoPE angle table.

    Standalone (not part of the model), so that TE can replace its ``forward`` with the graph replay while the
    decoder layer keeps its own. The decoder layer is its only child, so its parameters are the graph's.
    """

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states: torch.Tensor, rotary_pos_emb: torch.Tensor) -> torch.Tensor:
        return self.layer.te_forward(hidden_states, rotary_pos_emb, mask=None, mask_type="causal")


class LayerGraph:
    """One decoder layer's recorded forward and backward, and the conditions under which they replay."""

    def __init__(self, call: _LayerCall, shape: torch.Size, dtype: torch.dtype, recipe):
        self.call = call
        self.shape, self.dtype, self.recipe = shape, dtype, recipe
        self.autocast = _autocast_state()
        self.eager_shapes: set[torch.Size] = set()  # other batch shapes seen (logged once each)
        self.params = tuple(p for p in call.parameters() if p.requires_grad)
        self.replays_done = 0

    def replays(self, hidden_states: torch.Tensor, mask_type: str) -> bool:
        """Whether this call can replay the graph (see the module docstring)."""
        if not (mask_type == "causal" and torch.is_grad_enabled() and hidden_states.shape == self.shape
                and hidden_states.dtype == self.dtype and self.call.layer.training
                and _autocast_state() == self.autocast):
            return False
        from transformer_engine.pytorch.quantization import FP8GlobalStateManager

        fp8 = FP8GlobalStateManager.get_fp8_recipe() if FP8GlobalStateManager.is_fp8_enabled() else None
        return fp8 is self.recipe and all(p.grad is None for p in self.params)

    def __call__(self, hidden_states: torch.Tensor, rotary_pos_emb: torch.Tensor) -> torch.Tensor:
        self.replays_done += 1
        return self.call(hidden_states, rotary_pos_emb=rotary_pos_emb)

    def reset(self) -> None:
        self.call.reset()

    def __deepcopy__(self, memo):  # a copied model records its own graphs
        return None


def record_layer_graphs_once(llama_model, tokens_shape: torch.Size, attention_mask: torch.Tensor | None,
                             recipe) -> None:
    """Record the graphs of ``llama_model``'s decoder layers (a HF ``LlamaModel``) for this training batch,
    unless they exist for this FP8 recipe (``None``: BF16) and dtype: one recording serves a run, and batches of
    another shape run eagerly. A padded batch records nothing (its layers run eagerly)."""
    layers = llama_model.layers
    dtype = llama_model.embed_tokens.weight.dtype
    graph = layers[0].cuda_graph
    if graph is not None and graph.dtype == dtype and graph.recipe is recipe:
        if graph.shape[:2] != tokens_shape and tokens_shape not in graph.eager_shapes:
            graph.eager_shapes.add(tokens_shape)
            logger.info("batches of shape %s run eagerly: the CUDA graphs were recorded for %s (call "
                        "enable_cuda_graphs() again to record for the next batch)", tuple(tokens_shape),
                        tuple(graph.shape[:2]))
        return
    if attention_mask is not None and not bool(attention_mask.all()):
        return
    release_layer_graphs(layers)
    graphs = record_layer_graphs(layers, llama_model.rotary_emb, *tokens_shape, llama_model.config.hidden_size,
                                 dtype, recipe)
    for layer, graph in zip(layers, graphs):
        layer.cuda_graph = graph


def release_layer_graphs(layers) -> None:
    """Drop the layers' graphs and return their memory pool."""
    released = False
    for layer in layers:
        if layer.cuda_graph is not None:
            layer.cuda_graph.reset()
            layer.cuda_graph, released = None, True
    if released:
        torch.cuda.empty_cache()


def record_layer_graphs(layers, rotary_emb, batch: int, seq: int, hidden: int, dtype: torch.dtype,
                        recipe) -> list[LayerGraph]:
    """Record forward and backward graphs of ``layers`` for ``[batch, seq]`` token batches; ``recipe`` is the
    TE FP8 recipe the model trains with (``None``: BF16). All graphs share one memory pool, recorded in the
    order they run: forwards first to last, backwards last to first."""
    import transformer_engine.pytorch as te

    layers = list(layers)
    first = layers[0]
    if any(layer.training is False for layer in layers):
        raise CudaGraphError("CUDA graphs are recorded for training: call model.train() first")
    device = next(first.parameters()).device
    positions = torch.arange(seq, device=device)[None]
    _, angles = rotary_emb(torch.empty(0, device=device), positions).te_inputs(None, batch)
    calls = tuple(_LayerCall(layer) for layer in layers)
    sample_args = tuple((torch.randn(batch, seq, hidden, device=device, dtype=dtype, requires_grad=True),)
                        for _ in layers)
    sample_kwargs = tuple({"rotary_pos_emb": angles.clone()} for _ in layers)
    # Under torch.autocast (the Trainer's bf16=True) record with the same autocast dtype; TE refuses autocast's
    # weight-cast cache, which would keep tensors of the recording alive.
    autocast = _autocast_state()
    with torch.autocast("cuda", dtype=autocast or torch.bfloat16, enabled=bool(autocast), cache_enabled=False):
        te.make_graphed_callables(calls, sample_args, sample_kwargs=sample_kwargs, enabled=recipe is not None,
                                  recipe=recipe, clone_param_grads_on_return=False,
                                  post_warmup_hook=_release_warmup_memory)
    torch.cuda.empty_cache()
    logger.info("recorded CUDA graphs of %d decoder layers for batches of %d x %d tokens", len(layers), batch, seq)
    return [LayerGraph(call, torch.Size((batch, seq, hidden)), dtype, recipe) for call in calls]


def _autocast_state() -> torch.dtype | None:
    """torch.autocast's dtype on CUDA where it is on, else ``None``."""
    return torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None


def _release_warmup_memory() -> None:
    # The warm-up runs eagerly on the caching allocator; the graphs then get their own pool. Return the warm-up's
    # cached blocks first, or both would stay reserved.
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
