"""``replace_decoder_layer()``: build HF Llama models with ``TELlamaDecoderLayer`` instead of ``LlamaDecoderLayer``.

HF's ``LlamaModel.__init__`` looks up ``LlamaDecoderLayer`` and ``LlamaRotaryEmbedding`` in
``transformers.models.llama.modeling_llama`` when it builds its layers. While the context is open those names
point at te-llama's classes; on exit, also on an exception, the previous classes are back. A process-wide
re-entrant lock serialises the patch, so nested contexts restore in order and a model built in another thread
under its own context never sees a half-restored module.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from transformers.models.llama import modeling_llama

from te_llama.layer import decoder_layer_class
from te_llama.rope import TERotaryEmbedding

_lock = threading.RLock()


@contextmanager
def replace_decoder_layer(backend: str | None = None) -> Iterator[type]:
    """Swap Llama's decoder layer (and rotary module) for te-llama's while the block runs.

    Yields the ``TELlamaDecoderLayer`` class in use. ``backend`` is ``"te"``, ``"reference"`` or ``None``
    (``$TE_LLAMA_BACKEND``, else automatic).
    """
    layer_class = decoder_layer_class(backend)
    with _lock:
        saved = modeling_llama.LlamaDecoderLayer, modeling_llama.LlamaRotaryEmbedding
        modeling_llama.LlamaDecoderLayer = layer_class
        modeling_llama.LlamaRotaryEmbedding = TERotaryEmbedding
        try:
            yield layer_class
        finally:
            modeling_llama.LlamaDecoderLayer, modeling_llama.LlamaRotaryEmbedding = saved
