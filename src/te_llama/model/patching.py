"""``replace_decoder_layer()``: build HF models of te-llama's families with ``TELlamaDecoderLayer`` instead of theirs.

HF's ``LlamaForCausalLM.__init__`` looks up ``LlamaModel``, and ``LlamaModel.__init__`` looks up
``LlamaDecoderLayer`` and ``LlamaRotaryEmbedding``, in ``transformers.models.llama.modeling_llama`` when they build
the model; Mistral, Qwen2 and Qwen3 do the same in their own modules. While the context is open those names point at
te-llama's classes in every family's module (the family's stack from :mod:`te_llama.model.decoder_stack` runs the
layers under the model's FP8 and CUDA-graph settings); on exit, also on an exception, the previous classes are back.
A process-wide re-entrant lock serialises the patch, so nested contexts restore in order and a model built in another
thread under its own context never sees a half-restored module.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from te_llama.model.families import FAMILIES
from te_llama.model.layer import decoder_layer_class
from te_llama.model.rope import TERotaryEmbedding

_lock = threading.RLock()


@contextmanager
def replace_decoder_layer(backend: str | None = None) -> Iterator[type]:
    """Swap each family's decoder layer (and decoder stack and rotary module) for te-llama's while the block runs.

    Yields the ``TELlamaDecoderLayer`` class in use. ``backend`` is ``"te"``, ``"reference"`` or ``None``
    (``$TE_LLAMA_BACKEND``, else automatic).
    """
    from te_llama.model.decoder_stack import STACKS  # imports te-llama's training glue

    layer_class = decoder_layer_class(backend)
    swaps = [(family.hf_module, f"{family.name}{suffix}", replacement) for family in FAMILIES.values()
             for suffix, replacement in (("Model", STACKS[family.model_type]), ("DecoderLayer", layer_class),
                                         ("RotaryEmbedding", TERotaryEmbedding))]
    with _lock:
        saved = [getattr(module, name) for module, name, _ in swaps]
        for module, name, replacement in swaps:
            setattr(module, name, replacement)
        try:
            yield layer_class
        finally:
            for (module, name, _), original in zip(swaps, saved):
                setattr(module, name, original)
