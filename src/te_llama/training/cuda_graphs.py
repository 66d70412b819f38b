"""CUDA graphs of the decoder layers, for training steps whose shapes never change.

Transformer Engine's modules run a lot of Python per call (FP8 bookkeeping, attention backend checks). On a
fast GPU the host can fall behind the kernels it launches, and the GPU waits. Transformer Engine's
``make_graphed_callables`` records the forward of the decoder layers, one after the other, and their backward
as CUDA graphs; later steps replay them with a few launches. Embeddings, final norm, LM head and loss stay eager.

Two graphs per direction: the first layer, then all the others (:func:`split_stack`; under DDP the others in
:data:`DDP_PARTS` graphs, below). Not one per layer: a graph keeps its input and output buffers for its lifetime,
and per layer those made Llama-3-8B's step reserve more memory than HF's. Not one for the whole stack either: while
the host launched it, the GPU, with only the embedding to run, waited; now it runs the first layer during the launch
of the rest (``docs/cuda-graphs.md``).

HF's ``LlamaModel`` still calls every decoder layer: the first one replays the graphs, which compute all of
them, and the others hand on the graphs' output (they check that they received exactly it). Forward hooks on
the layers after the first therefore see the stack's output; a forward that asks for per-layer outputs
(``output_hidden_states``, ``output_attentions``) runs eagerly.

When the graph replays (checked on every call, otherwise the layers run eagerly as before):

- training mode with gradients enabled, and no gradient checkpointing;
- the batch shape and dtype it was recorded with, and the layout: plain causal attention on whole rows (no padding
  mask), or, where the graph was recorded for packed batches, rows of packed documents with every token real
  (below);
- the same FP8 state: the model's recipe inside its ``te.autocast``, or BF16 if recorded without FP8; and the
  same ``torch.autocast`` state (the Trainer's ``bf16=True`` turns it on);
- the layers' parameters hold no gradient yet. Replays write parameter gradients straight into the graph's
  buffers (no copy, no extra memory), which the next replay overwrites; so a forward whose layers still have
  gradients (gradient accumulation, the micro-batches after the first) runs eagerly and adds to them;
- the call comes from :class:`te_llama.model.modeling.TELlamaForCausalLM`'s forward, which arms the graph for it.

The model records the graph at its first training forward that qualifies (see
:meth:`te_llama.model.modeling.TELlamaForCausalLM.enable_cuda_graphs`), once: batches of another shape run eagerly,
and only a change of FP8 recipe records it again.

Packed batches at a fixed token budget (``te-llama finetune``'s blocks of packed documents: the same ``[b, s]``
every step, every token real, a different split into documents each time) run as a padding-free stream
(:mod:`te_llama.model.packed`), whose only input of data-dependent shape is ``cu_seqlens``. Where the first training
batch is such a batch, the graph records the stream's forward with ``cu_seqlens`` of fixed length
(:class:`Packing`: room for twice that batch's documents, at least :data:`MIN_CAPACITY`, the rest filled with
empty sequences) and ``max_seqlen`` a row; RoPE takes a per-token angle table made on the GPU from ``cu_seqlens``
(TE's ``thd`` RoPE kernel would spend its grid on the empty sequences). A batch with more documents, with padding
or FP8's alignment padding runs eagerly. Not under DDP: there packed batches count as padded.

Under DDP (several processes), ``enable_cuda_graphs()``, called before DDP wraps the model, keeps two things
(:class:`GraphPeers`):

- the layers' gradient accumulators, made on a side stream (:func:`accumulate_grads_on_side_stream`), without which
  the backward cannot be recorded;
- a gloo group over the processes, with which they agree on every training forward: the graphs replay only where
  they can replay in every process, and are recorded in all of them at the same forward. Replayed and eager layers
  make different collectives (delayed scaling's forward amax all-reduce took 42 values after an eager forward of the
  2-layer GPU-test model and 24 after a replay), so one process with a padded batch while the other replayed left
  both waiting for each other for good (an HF Trainer run on two H200s, after 2 steps). The vote is a host-side
  all-reduce of one flag.

Under DDP the layers after the first are recorded in :data:`DDP_PARTS` graphs instead of one, so that DDP can
all-reduce the gradients of the last parts while the backward of the earlier ones runs; losses and gradients equal
eager DDP's bit for bit (``tests/gpu/test_multi_gpu.py``; timings in ``docs/multi-gpu.md``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from te_llama.training.distributed import host_group, on_any_process
from te_llama.model.masks import is_causal_marker
from te_llama.model.packed import PackedSequences, forward_packed, token_angle_table
from te_llama.model.rope import RotaryAngles
from te_llama.model.whole_stack_call import WholeStackCall

logger = logging.getLogger("te_llama")


class CudaGraphError(RuntimeError):
    """CUDA graphs were asked for where they cannot work."""


class _StackCall(torch.nn.Module):
    """What one graph records: the TE forward of consecutive decoder layers in turn, causal attention, one RoPE
    table.

    Standalone (not part of the model), so that TE can replace its ``forward`` with the graph replay while the
    decoder layers keep their own. The layers are its only children, so their parameters are the graph's.
    """

    def __init__(self, layers):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)
        self.caches_weights = False
        """Recorded with TE's FP8 weight caching (TE records the cached path whatever ``is_first_microbatch``)."""

    def forward(self, hidden_states: torch.Tensor, rotary_pos_emb: torch.Tensor,
                is_first_microbatch: bool | None = None) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer.te_forward(hidden_states, rotary_pos_emb, mask=None, mask_type="causal",
                                             is_first_microbatch=is_first_microbatch,
                                             weights_cached=self.caches_weights)
        return hidden_states


class _PackedStackCall(_StackCall):
    """What a graph of packed batches records: the layers' padding-free forward (:mod:`te_llama.model.packed`) on
    the stream of a fixed-shape batch whose every token is real, its sequences in a ``cu_seqlens`` of fixed length
    (:class:`Packing`), RoPE from the per-token angle table."""

    def __init__(self, layers, packing: Packing):
        super().__init__(layers)
        self.packing = packing

    def forward(self, hidden_states: torch.Tensor, rotary_pos_emb: torch.Tensor, cu_seqlens: torch.Tensor,
                is_first_microbatch: bool | None = None) -> torch.Tensor:
        b, s = hidden_states.shape[:2]
        packed = PackedSequences((b, s), None, cu_seqlens, self.packing.max_seqlen, b * s, b * s)
        for layer in self.layers:
            hidden_states = forward_packed(layer, hidden_states, packed, None, {}, is_first_microbatch,
                                           token_angles=rotary_pos_emb, weights_cached=self.caches_weights)
        return hidden_states


@dataclass(frozen=True)
class Packing:
    """The fixed shapes a graph of packed batches takes: up to ``capacity`` sequences per batch, none longer than
    ``max_seqlen`` (a row)."""

    capacity: int
    max_seqlen: int

    @classmethod
    def for_batch(cls, packed: PackedSequences) -> Packing:
        """Room for twice the sequences of the batch a graph is recorded at (at least :data:`MIN_CAPACITY`): the
        empty ones cost attention little. A batch with more runs eagerly."""
        capacity = max(MIN_CAPACITY, 2 * packed.sequences)
        return cls(-(-capacity // 16) * 16, packed.batch_shape[1])

    def eager_reason(self, packed: PackedSequences) -> str | None:
        if not packed.every_token_real:
            return "the packed batch has padding tokens or more tokens than its rows (FP8's alignment padding)"
        if packed.sequences > self.capacity:
            return (f"a packed batch of {packed.sequences} sequences; the CUDA graphs take up to {self.capacity} "
                    "(recorded for twice the first batch's)")
        if packed.max_seqlen > self.max_seqlen:
            return f"a sequence of {packed.max_seqlen} tokens, longer than a row ({self.max_seqlen})"
        return None


MIN_CAPACITY = 64
"""The fewest sequences a graph of packed batches takes room for."""


class StackGraph:
    """The decoder layers' recorded forward and backward, and the conditions under which they replay."""

    def __init__(self, calls: tuple[_StackCall, ...], shape: torch.Size, dtype: torch.dtype, recipe,
                 caches_weights: bool = False, group=None, packing: Packing | None = None):
        self.calls = calls
        """The recorded parts of the stack, in order (see :func:`split_stack`)."""
        self.packing = packing
        """Recorded for packed batches (their fixed shapes), or ``None``: for batches of whole rows."""
        self.shape, self.dtype, self.recipe = shape, dtype, recipe
        self.caches_weights = caches_weights
        """Recorded with TE's FP8 weight caching: each replay takes ``is_first_microbatch``."""
        self.autocast = _autocast_state()
        self.group = group
        """Under DDP: the gloo group over the processes, which agree on each training forward's replay."""
        self.eager_shapes: set[torch.Size] = set()  # other batch shapes seen (logged once each)
        self.params = tuple(p for call in calls for p in call.parameters() if p.requires_grad)
        self.replays_done = 0
        self.armed = False
        """Set by the model's forward for its own call of the layers (see the module docstring)."""
        self._stack_call = WholeStackCall()  # the layers after the first hand the replay's output on
        self._reported: set[str] = set()  # reasons for eager training forwards already logged

    def replays(self, hidden_states: torch.Tensor, mask_type: str, packed: PackedSequences | None = None) -> bool:
        """Whether the first layer's call can replay the graph (see the module docstring); under DDP, whether it
        can in every process (they vote on every training forward). A training forward that cannot says why, once
        per reason, unless the reason is expected (evaluation, a batch of another shape, which
        :func:`record_layer_graphs_once` reports). ``packed``: the batch as a padding-free stream, where it is one."""
        reason = self.eager_reason(hidden_states, mask_type, packed)
        if self.group is not None and self._training_forward():
            if _on_any_process(reason is not None, self.group) and reason is None:
                reason = "another process runs this forward's layers eagerly (its log says why)"
        if reason and reason not in self._reported:
            self._reported.add(reason)
            logger.info("a training forward runs its decoder layers eagerly, not in the CUDA graphs: %s (said once)",
                        reason)
        return reason is None

    def eager_reason(self, hidden_states: torch.Tensor, mask_type: str,
                     packed: PackedSequences | None = None) -> str | None:
        """``None`` where the first layer's call can replay the graph; otherwise why not (``""`` where that is
        expected: evaluation, no gradients, another batch shape, a forward that asks for per-layer outputs)."""
        if not (self._training_forward() and hidden_states.shape == self.shape):
            return ""
        if packed is not None and self.packing is None:
            return ("a batch of packed documents; the graphs were recorded for whole rows" if packed.every_token_real
                    else "the batch has padding (it runs as a padding-free stream)")
        if packed is None and self.packing is not None:
            return "a batch of whole rows; the graphs were recorded for packed documents"
        if packed is not None:
            reason = self.packing.eager_reason(packed)
            if reason is not None:
                return reason
        elif mask_type != "causal":
            return "the batch has padding (an attention mask that is not plain causal)"
        if hidden_states.dtype != self.dtype:
            return f"hidden states of {hidden_states.dtype}, recorded for {self.dtype}"
        if _autocast_state() != self.autocast:
            return f"torch.autocast on CUDA is {_autocast_state()}, recorded with {self.autocast}"
        if any(p.grad is not None for p in self.params):
            return "the decoder parameters already hold gradients (gradient accumulation after the first micro-batch)"
        from transformer_engine.pytorch.quantization import FP8GlobalStateManager

        fp8 = FP8GlobalStateManager.get_fp8_recipe() if FP8GlobalStateManager.is_fp8_enabled() else None
        if fp8 is not self.recipe:
            return "another FP8 recipe or FP8 state than the one recorded"
        return None

    def _training_forward(self) -> bool:
        # Every process of a DDP run makes its training forwards together (DDP's backward needs them all); evaluation
        # and no-grad forwards may run in one process alone, and never vote
        return self.armed and torch.is_grad_enabled() and self.calls[0].layers[0].training

    def layer_forward(self, layer_idx: int, hidden_states: torch.Tensor, mask_type: str,
                      rotary_pos_emb: torch.Tensor, is_first_microbatch: bool | None = None) -> torch.Tensor | None:
        """The output of decoder layer ``layer_idx`` from the graph, or ``None``: the layer runs eagerly.
        ``is_first_microbatch``: TE's argument (``False``: reuse the cached FP8 weights; ``None`` or ``True``:
        cast them), see :mod:`te_llama.training.weight_cache`."""
        if layer_idx > 0:
            return self._handed_on(hidden_states)
        self._stack_call.start()
        if not self.replays(hidden_states, mask_type):
            return None
        return self._replay(hidden_states, {"rotary_pos_emb": rotary_pos_emb}, is_first_microbatch)

    def packed_layer_forward(self, layer_idx: int, hidden_states: torch.Tensor, packed: PackedSequences,
                             rotary: RotaryAngles, is_first_microbatch: bool | None = None) -> torch.Tensor | None:
        """:meth:`layer_forward` for a batch that runs as a padding-free stream (``packed``)."""
        if layer_idx > 0:
            return self._handed_on(hidden_states)
        self._stack_call.start()
        if not self.replays(hidden_states, "padding_causal", packed):
            return None
        fixed = packed.with_capacity(self.packing.capacity, self.packing.max_seqlen)
        inputs = {"rotary_pos_emb": token_angle_table(fixed, rotary.inv_freq), "cu_seqlens": fixed.cu_seqlens}
        return self._replay(hidden_states, inputs, is_first_microbatch)

    def _replay(self, hidden_states: torch.Tensor, inputs: dict, is_first_microbatch: bool | None) -> torch.Tensor:
        self.replays_done += 1
        cache = {"is_first_microbatch": is_first_microbatch is not False} if self.caches_weights else {}
        output = hidden_states
        for call in self.calls:
            output = call(output, **inputs, **cache)
        return self._stack_call.computed(output)

    def _handed_on(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        if self._stack_call.hands_on(hidden_states):
            return hidden_states  # this layer ran inside the replay of the first layer's call
        return None

    def reset(self) -> None:
        for call in self.calls:
            call.reset()

    def __deepcopy__(self, memo):  # a copied model records its own graphs
        return None


DDP_PARTS = 4
"""Under DDP, the layers after the first are recorded in this many graphs (see :func:`split_stack`)."""


def split_stack(layers, ddp: bool = False, packing: Packing | None = None) -> tuple[_StackCall, ...]:
    """The parts the stack is recorded in: the first layer alone, then the others.

    Launching a graph costs the host time in proportion to its kernels (milliseconds for Llama-3-8B's 32 layers),
    and the GPU, which has only the embedding to run at the start of a forward, would wait for
    all of it. The first layer's graph launches in about 0.1 ms and keeps the GPU busy while the host launches
    the rest. Costs a few more hidden-state-sized buffers (0.1 GiB reserved for Llama-3-8B at 4,096 tokens) and
    a copy of the first layer's output per step.

    ``ddp``: the others in :data:`DDP_PARTS` graphs, so that DDP gets each part's gradients when its backward ends
    and all-reduces them while the earlier parts' backward runs. ``packing``: the parts of a graph of packed
    batches.
    """
    def part(chunk) -> _StackCall:
        return _StackCall(chunk) if packing is None else _PackedStackCall(chunk, packing)

    layers = list(layers)
    if len(layers) < 2:
        return (part(layers),)
    rest = layers[1:]
    size = -(-len(rest) // DDP_PARTS) if ddp else len(rest)
    return (part(layers[:1]),) + tuple(part(rest[i:i + size]) for i in range(0, len(rest), size))


def record_layer_graphs_once(llama_model, tokens_shape: torch.Size, attention_mask: torch.Tensor | None,
                             recipe, cache_weights: bool = False, group=None,
                             packed: PackedSequences | None = None) -> None:
    """Record the graph of ``llama_model``'s decoder layers (a HF ``LlamaModel``) for this training batch,
    unless it exists for this FP8 recipe (``None``: BF16), dtype and FP8 weight caching (see
    :mod:`te_llama.training.weight_cache`): one recording serves a run, and batches of another shape run eagerly. A padded
    batch records nothing (its layers run eagerly). ``group``: under DDP, the processes' gloo group
    (:class:`GraphPeers`); they all record at the first forward where any of them has a batch without padding.

    ``packed``: the batch runs as a padding-free stream (:mod:`te_llama.model.packed`). Where every token of it is
    real (fixed-size blocks of packed documents: a fixed token budget), the graph is recorded for packed batches
    of this shape (:class:`Packing`), in one process only: under DDP packed batches count as padded."""
    layers = llama_model.layers
    if any(layer.gradient_checkpointing for layer in layers):  # HF's property walks all modules
        raise CudaGraphError("CUDA graphs are enabled and so is gradient checkpointing; turn one of them off")
    dtype = llama_model.embed_tokens.weight.dtype
    cache_weights = cache_weights and recipe is not None
    graph = layers[0].cuda_graph
    if graph is not None and graph.dtype == dtype and graph.recipe is recipe and graph.caches_weights == cache_weights:
        if graph.shape[:2] != tokens_shape and tokens_shape not in graph.eager_shapes:
            graph.eager_shapes.add(tokens_shape)
            logger.info("batches of shape %s run eagerly: the CUDA graphs were recorded for %s (call "
                        "enable_cuda_graphs() again to record for the next batch)", tuple(tokens_shape),
                        tuple(graph.shape[:2]))
        return
    padded = attention_mask is not None and not is_causal_marker(attention_mask) and not bool(attention_mask.all())
    packing = None
    if packed is not None:
        packing = Packing.for_batch(packed)
        padded = padded or group is not None or packing.eager_reason(packed) is not None
    if group is not None:  # the recording takes no batch: a process with padding records for the others' sake
        padded, packing = not _on_any_process(not padded, group), None
    if padded:
        return
    release_layer_graphs(layers)
    graph = record_layer_graphs(layers, llama_model.rotary_emb, *tokens_shape, llama_model.config.hidden_size,
                                dtype, recipe, cache_weights, group, packing)
    for layer in layers:
        layer.cuda_graph = graph


@contextmanager
def armed(graph: StackGraph | None, wants_layer_outputs: bool) -> Iterator[None]:
    """Let ``graph`` replay for the forward in this block, unless it asks for per-layer outputs (the graph computes
    all layers at the first, so there are none to report)."""
    if graph is None:
        yield
        return
    graph.armed = not wants_layer_outputs
    try:
        yield
    finally:
        graph.armed = False


def release_layer_graphs(layers) -> None:
    """Drop the layers' graph and return its memory pool."""
    graphs = {id(layer.cuda_graph): layer.cuda_graph for layer in layers if layer.cuda_graph is not None}
    for graph in graphs.values():
        graph.reset()
    for layer in layers:
        layer.cuda_graph = None
    if graphs:
        torch.cuda.empty_cache()


def _on_any_process(flag: bool, group) -> bool:
    """The processes' vote (:func:`te_llama.training.distributed.on_any_process`); a vote that fails or times out (one process
    waiting for the others for the group's timeout) becomes advice."""
    try:
        return on_any_process(flag, group)
    except RuntimeError as error:  # torch.distributed.DistBackendError is one
        raise CudaGraphError(
            "the processes' vote on recording or replaying the CUDA graphs failed or timed out. Under DDP every "
            "process must make each training forward (with gradients) of a model with CUDA graphs, together, as DDP's "
            "backward needs; "
            "run a forward of one process alone under torch.no_grad() or in eval mode, or call "
            "model.disable_cuda_graphs() first") from error


class GraphPeers:
    """What a model trained by several processes (DDP) keeps for its CUDA graphs: its decoder parameters' gradient
    accumulators made on a side stream (:func:`accumulate_grads_on_side_stream`), and a gloo group over the
    processes, with which they agree on recording and replaying (:meth:`StackGraph.replays`). A copied model keeps
    neither: it makes its own when it enables graphs (autograd nodes and process groups cannot be copied)."""

    def __init__(self, accumulators=(), group=None):
        self.accumulators, self.group = tuple(accumulators), group

    @classmethod
    def start(cls, params) -> GraphPeers:
        """Every process must call it, at the same point, before DDP wraps the model."""
        return cls(accumulate_grads_on_side_stream(params), host_group())

    def __deepcopy__(self, memo):
        return GraphPeers()


def accumulate_grads_on_side_stream(params) -> tuple:
    """Make each parameter's gradient accumulator (autograd's ``AccumulateGrad`` node) on a side stream, so that
    the backward graph can be recorded under DDP; returns the nodes, which the caller keeps.

    Autograd runs a parameter's accumulator on the stream that was current when the node was made. DDP's
    constructor makes (and keeps) the nodes on the default, legacy stream; recording the backward then fails,
    because the legacy stream may not wait on a stream that is being captured (``cudaErrorStreamCaptureImplicit``,
    seen on two H200s). Made here first, DDP takes these nodes as they are (autograd hands out the living node), and
    the recording captures the accumulation on the side stream as PyTorch's CUDA-graph notes advise for DDP. Eager
    backwards then wait for that stream per parameter, as autograd does between any two streams.
    """
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        return tuple(torch.autograd.graph.get_gradient_edge(p).node for p in params if p.requires_grad)


def record_layer_graphs(layers, rotary_emb, batch: int, seq: int, hidden: int, dtype: torch.dtype,
                        recipe, cache_weights: bool = False, group=None,
                        packing: Packing | None = None) -> StackGraph:
    """Record the forward and backward graphs of ``layers`` (all of a model's decoder layers, in order) for
    ``[batch, seq]`` token batches; ``recipe`` is the TE FP8 recipe the model trains with (``None``: BF16);
    ``cache_weights``: replays may reuse the previous FP8 weight cast (:mod:`te_llama.training.weight_cache`; only with a
    recipe, as :func:`record_layer_graphs_once` passes it); ``group``: under DDP, the processes' gloo group;
    ``packing``: for packed batches in these shapes (:class:`Packing`)."""
    import transformer_engine.pytorch as te

    layers = list(layers)
    if any(layer.training is False for layer in layers):
        raise CudaGraphError("CUDA graphs are recorded for training: call model.train() first")
    device = next(layers[0].parameters()).device
    calls = split_stack(layers, ddp=group is not None, packing=packing)
    for call in calls:
        call.caches_weights = cache_weights
    samples = tuple((torch.randn(batch, seq, hidden, device=device, dtype=dtype, requires_grad=True),)
                    for _ in calls)
    inputs = _sample_inputs(rotary_emb, batch, seq, device, packing)  # one buffer each, read by all the graphs
    # Under torch.autocast (the Trainer's bf16=True) record with the same autocast dtype; TE refuses autocast's
    # weight-cast cache, which would keep tensors of the recording alive.
    autocast = _autocast_state()
    with torch.autocast("cuda", dtype=autocast or torch.bfloat16, enabled=bool(autocast), cache_enabled=False), \
            _weight_skip_flag(cache_weights), _explain_capture_failure_under_ddp():
        te.make_graphed_callables(calls, samples, sample_kwargs=tuple(inputs for _ in calls),
                                  enabled=recipe is not None, recipe=recipe, clone_param_grads_on_return=False,
                                  cache_quantized_params=cache_weights,
                                  post_warmup_hook=_release_warmup_memory)
    torch.cuda.empty_cache()
    logger.info("recorded CUDA graphs of %d decoder layers for batches of %d x %d tokens%s", len(layers), batch, seq,
                "" if packing is None else f", packed documents (up to {packing.capacity} per batch)")
    return StackGraph(calls, torch.Size((batch, seq, hidden)), dtype, recipe, cache_weights, group, packing)


def _sample_inputs(rotary_emb, batch: int, seq: int, device: torch.device, packing: Packing | None) -> dict:
    """The inputs besides the hidden states that the graphs are recorded with, and copied into at each replay: the
    RoPE table, and for packed batches ``cu_seqlens`` (the rows as sequences, then empty ones)."""
    if packing is None:
        positions = torch.arange(seq, device=device)[None]
        _, angles = rotary_emb(torch.empty(0, device=device), positions).te_inputs(None, batch)
        return {"rotary_pos_emb": angles.clone()}
    tokens = batch * seq
    rows = PackedSequences((batch, seq), None, torch.arange(0, tokens + 1, seq, dtype=torch.int32, device=device),
                           seq, tokens, tokens).with_capacity(packing.capacity, packing.max_seqlen)
    inv_freq = rotary_emb.inv_freq.to(device=device, dtype=torch.float32)
    return {"rotary_pos_emb": token_angle_table(rows, inv_freq), "cu_seqlens": rows.cu_seqlens}


@contextmanager
def _explain_capture_failure_under_ddp() -> Iterator[None]:
    """Turn CUDA's capture error under DDP into advice: the gradient accumulators were made on the legacy stream
    (DDP wrapped the model before ``enable_cuda_graphs()``; see :func:`accumulate_grads_on_side_stream`)."""
    from te_llama.training.distributed import several_processes

    try:
        yield
    except RuntimeError as error:  # torch.AcceleratorError is a RuntimeError
        # The capture's own error is the context of the one that ending the capture raises
        if several_processes() and any("capturing blocking stream" in str(e) for e in _error_chain(error)):
            raise CudaGraphError(
                "recording the CUDA graphs failed under DDP: call model.enable_cuda_graphs() after "
                "torch.distributed.init_process_group() and before wrapping the model in DistributedDataParallel"
            ) from error
        raise


def _error_chain(error: BaseException) -> Iterator[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


@contextmanager
def _weight_skip_flag(cache_weights: bool) -> Iterator[None]:
    """Hide TE's global "skip the FP8 weight cast" flag while recording a graph without weight caching.

    TE's modules record a cast that obeys the flag whenever the flag exists, and TE creates it for the first
    graph recorded with caching (in this process, any model). A graph recorded without caching after that would
    obey it too, and skip its weight casts whenever a caching graph last set it, training on stale weights. Caching graphs keep reading the flag they recorded, which is restored afterwards.
    """
    from transformer_engine.pytorch.quantization import FP8GlobalStateManager

    state = FP8GlobalStateManager.quantization_state
    saved = state.skip_fp8_weight_update_tensor
    if not cache_weights:
        state.skip_fp8_weight_update_tensor = None
    try:
        yield
    finally:
        if not cache_weights:
            state.skip_fp8_weight_update_tensor = saved


def _autocast_state() -> torch.dtype | None:
    """torch.autocast's dtype on CUDA where it is on, else ``None``."""
    return torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None


def _release_warmup_memory() -> None:
    # The warm-up runs eagerly on the caching allocator; the graphs then get their own pool. Return the warm-up's
    # cached blocks first, or both would stay reserved.
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
