"""Which implementation of the decoder layer runs: Transformer Engine or the pure-PyTorch reference.

The choice is automatic (TE when it is installed and a CUDA GPU is present) and can be forced with the
environment variable ``TE_LLAMA_BACKEND=te|reference`` or a ``backend=`` argument. Asking for ``te`` where TE
cannot run is an error, never a silent fallback. ``transformer_engine`` is imported only here, and only when the
TE backend is actually chosen.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import sys
from typing import Literal

import torch

logger = logging.getLogger("te_llama")

Backend = Literal["te", "reference"]
BACKENDS = ("te", "reference")
ENV_VAR = "TE_LLAMA_BACKEND"
TE_INSTALL_HINT = "pip install 'te-llama[te]' on a machine with a CUDA GPU and toolkit"

_logged: set[str] = set()


@functools.cache
def triton_installed() -> bool:
    """Whether Triton (te-llama's own kernels: AdamW, the LM-head loss) can be imported; asked at every step, and
    the answer does not change within a process."""
    return importlib.util.find_spec("triton") is not None


class BackendUnavailableError(RuntimeError):
    """The Transformer Engine backend was requested but cannot run on this machine."""


def te_unavailable_reason() -> str | None:
    """Why TE cannot run here, or None if it can (without importing it)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return f"transformer_engine is not installed; {TE_INSTALL_HINT}"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to PyTorch"
    return None


def resolve_backend(backend: str | None = None) -> Backend:
    """Return the backend to use: the argument, else $TE_LLAMA_BACKEND, else automatic."""
    source = "argument"
    if backend is None:
        backend = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        source = f"${ENV_VAR}" if ENV_VAR in os.environ else "auto"
    if backend not in (*BACKENDS, "auto"):
        raise ValueError(f"unknown te-llama backend {backend!r} (from {source}); use one of: te, reference, auto")

    reason = te_unavailable_reason()
    if backend == "te":
        if reason is not None:
            raise BackendUnavailableError(
                f"te-llama backend 'te' was requested ({source}) but {reason}. "
                f"Unset {ENV_VAR} or set {ENV_VAR}=reference to run the pure-PyTorch reference layer."
            )
        chosen: Backend = "te"
        why = f"requested by {source}"
    elif backend == "reference":
        chosen, why = "reference", f"requested by {source}"
    else:
        chosen = "te" if reason is None else "reference"
        why = "Transformer Engine and a CUDA GPU found" if reason is None else reason

    if chosen not in _logged:
        _logged.add(chosen)
        logger.info("backend %s (%s)", chosen, why)
    return chosen


def transformer_layer_base(backend: Backend) -> type[torch.nn.Module]:
    """The TransformerLayer class that ``TELlamaDecoderLayer`` derives from for this backend."""
    if backend == "te":
        try:
            import transformer_engine.pytorch as te
        except ImportError as error:  # installed but broken (CUDA/cuDNN mismatch, ...)
            raise BackendUnavailableError(
                f"transformer_engine is installed but failed to import: {error}. "
                f"Fix the installation or set {ENV_VAR}=reference."
            ) from error
        return te.TransformerLayer
    from te_llama.model.reference_layer import TransformerLayer

    return TransformerLayer


def working_dtype(backend: Backend) -> torch.dtype:
    """The dtype te-llama's commands run a model in: bf16 on the TE backend, fp32 on the reference."""
    return torch.bfloat16 if backend == "te" else torch.float32


def default_device(backend: Backend) -> torch.device:
    """Where a model lives when the caller does not say: the GPU for TE, the CPU for the reference."""
    return torch.device("cuda") if backend == "te" else torch.device("cpu")


def te_attention_backend() -> str | None:
    """The attention kernel TE chose for its latest ``DotProductAttention`` call, e.g. ``"FusedAttention
    F16_arbitrary_seqlen"`` (cuDNN's flash attention in BF16) or ``"FusedAttention FP8"``; ``None`` before TE
    has run attention."""
    module = sys.modules.get("transformer_engine.pytorch.attention.dot_product_attention.dot_product_attention")
    chosen = getattr(module, "_attention_backends", None)
    if not chosen or chosen.get("attention_params") is None:
        return None
    if chosen["use_flash_attention"]:
        return f"FlashAttention {chosen['flash_attention_backend']}"
    if chosen["use_fused_attention"]:
        backend = chosen["fused_attention_backend"]
        return f"FusedAttention {getattr(backend, 'name', backend)}"
    return "UnfusedDotProductAttention" if chosen["use_unfused_attention"] else None
