"""te-llama: Hugging Face Llama-family models (Llama, Mistral, Qwen2, Qwen3) with NVIDIA Transformer Engine decoder
layers.

Importing this package never imports ``transformer_engine``; the TE backend is loaded the first time a layer
is built (or ``te_llama.TELlamaDecoderLayer`` is accessed) on a machine where it can run.
"""

from __future__ import annotations

import logging
import os
import sys

from te_llama.training.adamw import AdamW
from te_llama.backend import BackendUnavailableError, resolve_backend
from te_llama.checkpoint.files import CheckpointError
from te_llama.training.cuda_graphs import CudaGraphError
from te_llama.training.fp8 import FP8Config, FP8ConfigError
from te_llama.model.auto import AutoModelForCausalLM
from te_llama.model.layer import UnsupportedConfigError, decoder_layer_class
from te_llama.model.modeling import TELlamaForCausalLM, TEMistralForCausalLM, TEQwen2ForCausalLM, TEQwen3ForCausalLM
from te_llama.model.patching import replace_decoder_layer

__version__ = "0.1.0"

__all__ = [
    "AdamW",
    "AutoModelForCausalLM",
    "BackendUnavailableError",
    "CheckpointError",
    "CudaGraphError",
    "FP8Config",
    "FP8ConfigError",
    "FP8StateCallback",
    "TELlamaDecoderLayer",
    "TELlamaForCausalLM",
    "TEMistralForCausalLM",
    "TEQwen2ForCausalLM",
    "TEQwen3ForCausalLM",
    "UnsupportedConfigError",
    "decoder_layer_class",
    "replace_decoder_layer",
    "resolve_backend",
]

# te-llama's decisions (backend, FP8 recipe) are shown once each on stderr by default, like transformers'
# own messages; TE_LLAMA_LOG_LEVEL=WARNING silences them, or configure the "te_llama" logger yourself.
class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (pytest's capture, a redirected notebook stream)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


_logger = logging.getLogger("te_llama")
if not _logger.handlers:
    _handler = _StderrHandler()
    _handler.setFormatter(logging.Formatter("te-llama: %(message)s"))
    _logger.addHandler(_handler)
    _logger.setLevel(os.environ.get("TE_LLAMA_LOG_LEVEL", "INFO").upper())
    _logger.propagate = False


def __getattr__(name: str):
    # TELlamaDecoderLayer's base class depends on the backend, so it is built on first access.
    if name == "TELlamaDecoderLayer":
        return decoder_layer_class()
    if name == "FP8StateCallback":  # imports transformers' Trainer machinery, so only on demand
        from te_llama.training.fp8_state import FP8StateCallback

        return FP8StateCallback
    raise AttributeError(f"module 'te_llama' has no attribute {name!r}")
