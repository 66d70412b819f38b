"""One call of the first decoder layer that computes every layer (a CUDA graph's replay), inside HF's loop.

HF's decoder stack (``LlamaModel.forward``) calls each decoder layer in turn. Where one replay computes all of them
(training graphs, :mod:`te_llama.training.cuda_graphs`; decode graphs, :mod:`te_llama.generation.decode_graphs`),
the first layer's call replays and the others hand its output on. Each of them checks that it received exactly that
tensor: a layer handed anything else (a forward hook replaced the output) computes itself.
"""

from __future__ import annotations

import weakref

import torch


class WholeStackCall:
    """What the later layers of one forward need to know: the output the first layer's replay returned."""

    def __init__(self):
        self._output = None  # a weak reference: the replay's output belongs to the forward, not to this object

    def start(self) -> None:
        """The first layer of a forward is called: what an earlier forward returned is no longer handed on."""
        self._output = None

    def computed(self, output: torch.Tensor) -> torch.Tensor:
        """The first layer's call computed every layer, ``output`` being the last layer's output."""
        self._output = weakref.ref(output)
        return output

    def hands_on(self, hidden_states: torch.Tensor) -> bool:
        """Whether a later layer was handed the replay's output, which it returns as its own."""
        return self._output is not None and self._output() is hidden_states
