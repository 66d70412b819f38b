"""``replace_decoder_layer()``: build HF Llama models with ``TELlamaDecoderLayer`` instead of ``LlamaDecoderLayer``.

HF's ``LlamaForCausalLM.__init__`` looks up ``LlamaModel``, and ``LlamaModel.__init__`` looks up
``LlamaDecoderLayer`` and ``LlamaRotaryEmbedding``, in ``transformers.models.llama.modeling_llama`` when they build
the model. While the context is open those names point at te-llama's classes (:class:`TELlamaModel` runs the layers
under the model's FP8 and CUDA-graph settings); on exit, also on an exception, the previous classes are back. A process-wide
re-entrant lock serialises the patch, so nested contexts restore in order and a model built in another thread
under its own context never sees a half-restored module.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from transformers.models.llama import modeling_llama

from te_llama.model.layer import decoder_layer_class
from te_llama.model.rope import TERotaryEmbedding

_lock = threading.RLock()


@contextmanager
def replace_decoder_layer(backend: str | None = None) -> Iterator[type]:
    """Swap Llama's decoder layer (and rotary module) for te-llama's while the block runs.

    Yields the ``TELlamaDecoderLayer`` class in use. ``backend`` is ``"te"``, ``"reference"`` or ``None``
    (``$TE_LLAMA_BACKEND``, else automatic).
    """
    from te_llama.model.decoder_stack import TELlamaModel  # imports te-llama's training glue

    layer_class = decoder_layer_class(backend)
    names = ("LlamaModel", "LlamaDecoderLayer", "LlamaRotaryEmbedding")
    with _lock:
        saved = [getattr(modeling_llama, name) for name in names]
        for name, replacement in zip(names, (TELlamaModel, layer_class, TERotaryEmbedding)):
            setattr(modeling_llama, name, replacement)
        try:
            yield layer_class
        finally:
            for name, original in zip(names, saved):
                setattr(modeling_llama, name, original)
