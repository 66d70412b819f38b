"""HF's ``from_pretrained`` keyword arguments, each doing what it does in HF or a clear error naming what te-llama
supports, so that code written for ``LlamaForCausalLM.from_pretrained`` runs unchanged where it can."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("te_llama")

ATTENTION = (None, "sdpa")
"""te-llama's layers run Transformer Engine's attention on the masks HF builds for SDPA."""

NO_OPS = {
    "low_cpu_mem_usage": "te-llama always streams the checkpoint into the model without a random initialisation",
    "trust_remote_code": "the families' modelling code is transformers' own; no code from the checkpoint runs",
    "local_files_only": "te-llama loads local directories only",
}


SPREADING = ("balanced", "balanced_low_0", "sequential")
"""accelerate's device maps that spread a model over several devices."""


class LoadingArgumentError(TypeError):
    """A ``from_pretrained`` argument te-llama cannot honour."""


def _one_device(device_map) -> torch.device | None:
    if device_map is None or device_map == "auto":
        return None  # the backend's device: the GPU for Transformer Engine, the CPU for the reference
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise LoadingArgumentError(
                f"device_map={device_map!r} spreads the model over {len(devices)} devices; te-llama puts the whole "
                "model on one device (pass one device, or train on several GPUs with torchrun: DDP)")
        return _one_device(devices.pop())
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    if device_map in SPREADING:
        raise LoadingArgumentError(
            f"device_map={device_map!r} spreads the model over the devices it finds; te-llama puts the whole model on "
            "one device (pass one device or 'auto', or train on several GPUs with torchrun: DDP)")
    try:
        return torch.device(device_map)
    except (RuntimeError, TypeError) as error:
        raise LoadingArgumentError(f"device_map={device_map!r} is not a device: {error}") from error


def loading_arguments(hf_kwargs: dict, device) -> tuple[torch.device | str | None, str | None]:
    """``(device, subfolder)`` from HF's keyword arguments to ``from_pretrained``.

    ``device_map``: one device (a name, an index, a ``torch.device``, ``"auto"``, or a dict whose values are all the
    same device); ``attn_implementation``: ``None`` or ``"sdpa"``; ``subfolder``: as in HF; ``low_cpu_mem_usage``,
    ``trust_remote_code`` and ``local_files_only`` change nothing (:data:`NO_OPS` says why). Anything else is a
    :class:`LoadingArgumentError` that lists what is supported.
    """
    kwargs = dict(hf_kwargs)
    attention = kwargs.pop("attn_implementation", None)
    if attention not in ATTENTION:
        raise LoadingArgumentError(
            f"attn_implementation={attention!r}: te-llama's decoder layers run Transformer Engine's fused attention "
            "(cuDNN flash attention on the GPU), fed by the masks HF builds for SDPA; pass attn_implementation='sdpa' "
            "or leave it out")
    if "device_map" in kwargs:
        mapped = _one_device(kwargs.pop("device_map"))
        if device is not None and mapped is not None and torch.device(device) != mapped:
            raise LoadingArgumentError(f"device={device!r} and device_map put the model on {mapped}; pass one of them")
        device = device if mapped is None else mapped
    for name in NO_OPS:
        kwargs.pop(name, None)
    subfolder = kwargs.pop("subfolder", None) or None
    if kwargs:
        raise LoadingArgumentError(
            f"te-llama's from_pretrained got unsupported argument(s) {', '.join(sorted(kwargs))}; it takes "
            "dtype (or torch_dtype), device, backend, fp8, and HF's device_map (one device), attn_implementation "
            f"({' or '.join(repr(a) for a in ATTENTION)}), subfolder, {', '.join(NO_OPS)}")
    return device, subfolder
