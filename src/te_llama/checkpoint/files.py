"""Reading Hugging Face checkpoint files (safetensors or ``.bin``, single or sharded) and writing safetensors.

Reading streams one shard at a time (safetensors and ``.bin`` files are memory-mapped), so host memory stays
near one shard. Writing goes to a staging directory that is renamed into place only when every file is
complete, so a failed save never leaves a half-written checkpoint behind. Errors name the file or key.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
WEIGHT_FILE_PREFIXES = ("model.safetensors", "model-", "pytorch_model")


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be read as an HF Llama checkpoint."""


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    file: Path


def weight_files(directory: Path) -> list[Path]:
    """The weight files of an HF checkpoint directory, in the order they should be read."""
    for index_name, single_name in ((SAFE_INDEX, SAFE_SINGLE), (BIN_INDEX, BIN_SINGLE)):
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise CheckpointError(f"{index}: not a valid checkpoint index ({error})") from error
            files = [directory / name for name in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index} lists shard(s) that are missing: {', '.join(missing)}")
            return files
        if (directory / single_name).is_file():
            return [directory / single_name]
    raise CheckpointError(
        f"{directory}: no weights found (looked for {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE}, {BIN_INDEX})"
    )


def _open_safetensors(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({error}); re-save or re-download it")


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:  # torch.load raises many types (pickle, zipfile, RuntimeError)
        raise CheckpointError(f"{path}: cannot read PyTorch checkpoint ({type(error).__name__}: {error})") from error


def tensor_index(files: list[Path]) -> dict[str, TensorInfo]:
    """Every tensor name in the checkpoint with its shape and file, read from headers only."""
    index: dict[str, TensorInfo] = {}
    for path in files:
        if path.suffix == ".safetensors":
            with _open_safetensors(path) as handle:
                shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        else:
            shapes = {key: tuple(t.shape) for key, t in _load_bin(path).items()}
        for key, shape in shapes.items():
            if key in index:
                raise CheckpointError(f"tensor {key!r} appears in both {index[key].file.name} and {path.name}")
            index[key] = TensorInfo(shape, path)
    return index


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` shard by shard; each tensor is read when it is reached."""
    for path in files:
        if path.suffix == ".safetensors":
            with _open_safetensors(path) as handle:
                for key in handle.keys():
                    try:
                        yield key, handle.get_tensor(key)
                    except SafetensorError as error:
                        raise CheckpointError(f"{path}: cannot read tensor {key!r} ({error})") from error
        else:
            state = _load_bin(path)
            yield from state.items()
            del state


def _to_cpu_owned(tensor: torch.Tensor) -> torch.Tensor:
    # Own storage per tensor: TE keeps q/k/v (and fc1) as views of one buffer, which safetensors refuses.
    return tensor.detach().to("cpu", copy=True).contiguous()


def _write_weights(staging: Path, tensors: dict[str, torch.Tensor], max_shard_size: int | str) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(
        tensors, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for filename, names in split.filename_to_tensors.items():
        shard = {name: _to_cpu_owned(tensors[name]) for name in names}
        save_file(shard, str(staging / filename), metadata={"format": "pt"})
        del shard
    if split.is_sharded:
        index = {"metadata": {**split.metadata}, "weight_map": split.tensor_to_filename}
        (staging / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))


def staging_directory(target: Path, purpose: str = "saving") -> Path:
    """An empty directory beside ``target`` (same filesystem, so it can be renamed into place)."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.{purpose}-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should look like any directory
    return staging


def _is_weight_file(name: str) -> bool:
    return name.startswith(WEIGHT_FILE_PREFIXES) and (name.endswith((".safetensors", ".bin", ".index.json")))


def write_checkpoint(
    directory: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    config,
    generation_config=None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write an HF checkpoint (config, generation config, safetensors weights) to ``directory`` atomically.

    Files are written into a staging directory next to ``directory`` and moved in once complete; weight
    files of an earlier save that the new one does not overwrite are removed, other files (a tokenizer) stay.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_directory(directory)
    try:
        config.save_pretrained(staging)
        if generation_config is not None:
            generation_config.save_pretrained(staging)
        _write_weights(staging, tensors, max_shard_size)
        if not directory.exists():
            os.replace(staging, directory)
            return directory
        if not directory.is_dir():
            raise CheckpointError(f"{directory} exists and is not a directory")
        new = {p.name for p in staging.iterdir()}
        for old in directory.iterdir():
            if _is_weight_file(old.name) and old.name not in new:
                old.unlink()
        for path in staging.iterdir():
            os.replace(path, directory / path.name)
        staging.rmdir()
        return directory
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
