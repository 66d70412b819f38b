"""One recorded decode step: every decoder layer on one new token per row, on a static cache, as a CUDA graph.

A graph replays kernels on fixed addresses, so a :class:`DecodeStep` owns a buffer for each input of the step:
the hidden states after the embedding ``[batch, 1, hidden]``, HF's attention mask ``[batch, 1, 1, cache length]``
(left padding changes it at every step), each row's position ``[batch, 1]`` and RoPE's inverse frequencies (which
a dynamic RoPE type may replace); and the static cache's memory (:class:`CacheMemory`). :meth:`DecodeStep.run`
copies the step's inputs into the buffers and replays the graph, which writes the new keys and values into the
cache and the last layer's output into the output buffer.

Recording follows torch's advice (``torch.cuda.graphs``): the step runs once on a side stream first, so that
allocations and lazy set-up (cuBLAS handles, TE's workspaces) happen outside the capture; that run's one write to the
cache (the keys and values at the step's position, the lengths' increment) is undone by restoring the lengths, and
the first replay writes the same keys again. Everything on the host (HF's mask, the rows' positions) was computed
before the step, by HF's eager code; the captured function is only device work of fixed shapes.

``capture=False`` records no graph: :meth:`DecodeStep.run` calls the same function on the same buffers eagerly,
writing the output buffer in place as a replay would. That exercises the buffers, the cache's adoption and the
layers' hand-on without a GPU (``tests/test_decode_graphs.py``).
"""

from __future__ import annotations

import torch

from te_llama.generation.static_cache import CacheMemory
from te_llama.model.kv_cache import forward_with_cache
from te_llama.model.rope import RotaryAngles
from te_llama.training.fp8_weights import tensor_addresses


def _addresses(layers) -> tuple[int, ...]:
    return tuple(address for layer in layers for t in (*layer.parameters(), *layer.buffers())
                 for address in tensor_addresses(t))


def _fp8_casts(layers) -> tuple:
    """The FP8 weight casts TE keeps for the layers' modules (TE's ``_fp8_workspaces``, what ``is_first_microbatch``
    writes and reuses). TE updates a kept cast in place, but replaces it where its quantizer changed (another recipe,
    a backward's usage): a recorded FP8 step reads the casts it was recorded with."""
    return tuple(cast for layer in layers for module in layer.modules()
                 for cast in getattr(module, "_fp8_workspaces", {}).values())


class DecodeStep:
    """The decode step for one (batch size, static cache length, dtype): its buffers, and its graph on CUDA."""

    def __init__(self, layers, cache, hidden_states: torch.Tensor, attention_mask: torch.Tensor,
                 rotary: RotaryAngles, capture: bool, fp8_token_alignment: int = 1):
        self.layers = list(layers)
        self.fp8_token_alignment = fp8_token_alignment
        """1 in BF16; in FP8 the rows TE's GEMMs get are padded to it, and they read the kept FP8 weight cast."""
        self.memory = CacheMemory(cache)
        batch = hidden_states.shape[0]
        self.hidden_states = hidden_states.clone()
        self.attention_mask = attention_mask.clone()
        self.positions = rotary.position_ids.expand(batch, 1).clone()
        self.inv_freq = rotary.inv_freq.clone()
        self.weights = _addresses(self.layers)
        """Where the decoder's parameters were when the graph was recorded: it reads them there."""
        self.replays = 0
        self.graph = None
        self.output = self._record(cache) if capture else torch.empty_like(self.hidden_states)
        self.fp8_casts = _fp8_casts(self.layers) if fp8_token_alignment > 1 else ()

    def weights_moved(self) -> bool:
        """Whether a decoder parameter now lives elsewhere than when the graph was recorded (``model.to()``,
        ``load_state_dict(assign=True)``): the graph would read freed memory."""
        return _addresses(self.layers) != self.weights

    def fp8_casts_replaced(self) -> bool:
        """Whether TE replaced a kept FP8 weight cast this (FP8) step was recorded on."""
        casts = _fp8_casts(self.layers) if self.fp8_casts else ()
        return len(casts) != len(self.fp8_casts) or any(a is not b for a, b in zip(casts, self.fp8_casts))

    def run(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, rotary: RotaryAngles,
            cache) -> torch.Tensor:
        """The last decoder layer's output for this step, in the step's output buffer (valid until the next run)."""
        self.memory.adopt(cache)
        self.hidden_states.copy_(hidden_states)
        self.attention_mask.copy_(attention_mask)
        self.positions.copy_(rotary.position_ids.expand_as(self.positions))
        self.inv_freq.copy_(rotary.inv_freq)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.output.copy_(self._layers(cache))
        self.replays += 1
        return self.output

    def _layers(self, cache) -> torch.Tensor:
        """What the graph records: the decoder layers on HF's cache (:mod:`te_llama.model.kv_cache`), reading the
        step's buffers."""
        rotary = RotaryAngles(self.inv_freq, self.positions)
        hidden_states = self.hidden_states
        fp8 = self.fp8_token_alignment > 1
        for layer in self.layers:
            hidden_states = forward_with_cache(layer, hidden_states, self.attention_mask, rotary, cache, adapters={},
                                               token_alignment=self.fp8_token_alignment,
                                               is_first_microbatch=False if fp8 else None)
        return hidden_states

    def _record(self, cache) -> torch.Tensor:
        lengths = [length.clone() for length in self.memory.lengths]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._layers(cache)
        torch.cuda.current_stream().wait_stream(side)
        for length, before in zip(self.memory.lengths, lengths):
            length.copy_(before)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            output = self._layers(cache)
        return output
