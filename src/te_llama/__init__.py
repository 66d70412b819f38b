"""te-llama: Hugging Face Llama models with NVIDIA Transformer Engine decoder layers.

Importing this package never imports ``transformer_engine``; the TE backend is loaded the first time a layer
is built (or ``te_llama.TELlamaDecoderLayer`` is accessed) on a machine where it can run.
"""

from __future__ import annotations

import logging

from te_llama.backend import BackendUnavailableError, resolve_backend
from te_llama.checkpoint_io import CheckpointError
from te_llama.fp8 import FP8Config, FP8ConfigError
from te_llama.layer import KVCacheNotSupportedError, UnsupportedConfigError, decoder_layer_class
from te_llama.modeling import TELlamaForCausalLM
from te_llama.patching import replace_decoder_layer

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "CheckpointError",
    "FP8Config",
    "FP8ConfigError",
    "FP8StateCallback",
    "KVCacheNotSupportedError",
    "TELlamaDecoderLayer",
    "TELlamaForCausalLM",
    "UnsupportedConfigError",
    "decoder_layer_class",
    "replace_decoder_layer",
    "resolve_backend",
]

logging.getLogger("te_llama").addHandler(logging.NullHandler())


def __getattr__(name: str):
    # TELlamaDecoderLayer's base class depends on the backend, so it is built on first access.
    if name == "TELlamaDecoderLayer":
        return decoder_layer_class()
    if name == "FP8StateCallback":  # imports transformers' Trainer machinery, so only on demand
        from te_llama.training import FP8StateCallback

        return FP8StateCallback
    raise AttributeError(f"module 'te_llama' has no attribute {name!r}")
