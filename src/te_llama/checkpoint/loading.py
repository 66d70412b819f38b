"""Filling a te-llama model's parameters from an HF checkpoint, shard by shard, each exactly once.

Before any data is read, the checkpoint's tensor names and shapes (from file headers) are checked against the
model built from its config: missing keys, unexpected keys and shape mismatches are reported together. Then
each tensor is copied straight into its parameter (or its row block of a fused parameter), converting dtype
and device on the way, so no second copy of the model is ever held.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from te_llama.checkpoint.files import CheckpointError, TensorInfo, iter_tensors, tensor_index
from te_llama.checkpoint.weight_mapping import WeightMappingError, WeightTable, hf_names, hf_target

_SHOWN = 8


def expected_hf_shapes(model: torch.nn.Module, table: WeightTable) -> dict[str, tuple[int, ...]]:
    """HF key -> shape for every parameter of the model (tied weights once)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for te_key, param in model.named_parameters():
        names = hf_names(te_key, table)
        rows = param.shape[0] // len(names)
        for name in names:
            shapes[name] = (rows, *param.shape[1:]) if len(names) > 1 else tuple(param.shape)
    return shapes


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


def _skipped(key: str, tied: bool) -> bool:
    return tied and key == "lm_head.weight"


def check_checkpoint(directory: Path, index: dict[str, TensorInfo], expected: dict[str, tuple[int, ...]],
                     tied: bool, table: WeightTable) -> None:
    """Raise :class:`CheckpointError` listing every key or shape that disagrees with the model's config."""
    unexpected, mismatched, present = [], [], set()
    for key, info in index.items():
        try:
            target = hf_target(key, table)
        except WeightMappingError:
            unexpected.append(key)
            continue
        if target is None or _skipped(key, tied):
            continue
        if key not in expected:
            unexpected.append(key)
            continue
        present.add(key)
        if info.shape != expected[key]:
            mismatched.append(f"{key} in {info.file.name} has shape {info.shape}, config.json implies "
                              f"{expected[key]}")
    missing = sorted(set(expected) - present)
    problems = []
    if missing:
        problems.append(f"missing tensors: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_listing(sorted(unexpected))}")
    if mismatched:
        problems.append("shape mismatches: " + "; ".join(mismatched[:_SHOWN]))
    if problems:
        raise CheckpointError(f"{directory}: the checkpoint does not match its config.json: " + " | ".join(problems))


def copy_hf_tensor(params: dict[str, torch.nn.Parameter], key: str, tensor: torch.Tensor, tied: bool,
                   table: WeightTable) -> bool:
    """Copy one HF tensor into its TE parameter (or row block of a fused one). False if the key is dropped."""
    target = hf_target(key, table)
    if target is None or _skipped(key, tied):
        return False
    te_key, part, parts = target
    destination = params[te_key].data
    if parts > 1:
        rows = destination.shape[0] // parts
        destination = destination.narrow(0, part * rows, rows)
    destination.copy_(tensor)
    return True


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, directory: Path, files: list[Path], table: WeightTable) -> None:
    """Copy the checkpoint in ``files`` into ``model``'s parameters (validated first, streamed by shard), naming
    tensors by ``table`` (the model's family)."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    index = tensor_index(files)
    expected = expected_hf_shapes(model, table)
    check_checkpoint(directory, index, expected, tied, table)
    params = dict(model.named_parameters())
    filled: set[str] = set()
    progress = tqdm(total=len(expected), desc="Loading weights", unit="tensor", leave=False,
                    disable=len(expected) < 64)
    for key, tensor in iter_tensors(files):
        if copy_hf_tensor(params, key, tensor, tied, table):
            filled.add(key)
            progress.update()
    progress.close()
    if filled != set(expected):  # guaranteed by check_checkpoint; kept as a hard guard
        raise CheckpointError(f"{directory}: tensors not loaded: {_listing(sorted(set(expected) - filled))}")
