"""Training glue for the HF Trainer and plain loops: FP8 scaling state in checkpoints, and the callbacks
``te-llama finetune`` uses (complete-checkpoint markers, tokens/s and perplexity in the logs, graceful stop
on Ctrl-C/SIGTERM).

Delayed scaling keeps an amax history and scaling factors per TE module. HF-format exports never contain them
(see :mod:`te_llama.checkpoint.weight_mapping`), so resumable checkpoints keep them beside the weights, as plain tensors in
``te_fp8_state.safetensors`` (TE's own ``_extra_state`` is a pickle, which TE rightly refuses to load from
untrusted files). :class:`FP8StateCallback` does this for ``transformers.Trainer``; plain loops call
:func:`save_fp8_state` / :func:`load_fp8_state`. Stateless recipes (current, block, MXFP8) save an empty file.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from te_llama.training.distributed import host_group, on_any_process, wait_for_everyone

logger = logging.getLogger("te_llama")

FP8_STATE_FILE = "te_fp8_state.safetensors"


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):  # DDP / accelerate wrappers
        model = model.module
    return model


def _scaling_states(model: torch.nn.Module) -> Iterator[tuple[str, object]]:
    for name, module in _unwrap(model).named_modules():
        meta = getattr(module, "fp8_meta", None)
        if isinstance(meta, dict):
            for key in ("scaling_fwd", "scaling_bwd"):
                state = meta.get(key)
                if state is not None and hasattr(state, "amax_history"):
                    yield f"{name}.{key}", state


def fp8_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Delayed-scaling state of every TE module: ``<module>.scaling_{fwd,bwd}.{scale,amax_history}``."""
    out = {}
    for prefix, state in _scaling_states(model):
        out[f"{prefix}.scale"] = state.scale
        out[f"{prefix}.amax_history"] = state.amax_history
    return out


def save_fp8_state(model: torch.nn.Module, directory: str | os.PathLike) -> Path:
    """Write the FP8 scaling state into ``directory/te_fp8_state.safetensors`` (atomically)."""
    path = Path(directory) / FP8_STATE_FILE
    partial = path.with_name(path.name + ".partial")
    save_file({k: v.detach().to("cpu", copy=True) for k, v in fp8_state(model).items()}, str(partial))
    os.replace(partial, path)
    return path


def _initialise_fp8_state(model: torch.nn.Module) -> None:
    # TE allocates scaling state on a module's first FP8 forward; run one tiny forward to create it.
    inner = _unwrap(model)
    if getattr(inner, "fp8_config", None) is None:
        raise RuntimeError("FP8 state can only be loaded into a te-llama model with FP8 enabled (enable_fp8)")
    was_training = inner.training
    inner.train()
    with torch.no_grad():
        inner(input_ids=torch.zeros(1, 32, dtype=torch.long, device=inner.device))
    inner.train(was_training)


def load_fp8_state(model: torch.nn.Module, directory: str | os.PathLike) -> bool:
    """Restore the FP8 scaling state saved in ``directory``; False (with a warning) if there is none."""
    path = Path(directory) / FP8_STATE_FILE
    if not path.is_file():
        logger.warning("no FP8 state in %s: FP8 scaling factors restart from their initial values", directory)
        return False
    saved = load_file(str(path))
    if not saved:
        return True  # a stateless recipe
    live = fp8_state(model)
    if not live:
        _initialise_fp8_state(model)
        live = fp8_state(model)
    if saved.keys() != live.keys():
        raise RuntimeError(f"{path} does not match this model's FP8 modules "
                           f"(saved {len(saved)} tensors, model has {len(live)}); was the recipe changed?")
    with torch.no_grad():
        for key, tensor in saved.items():
            if tensor.shape != live[key].shape:
                raise RuntimeError(f"{path}: {key} has shape {tuple(tensor.shape)}, the model expects "
                                   f"{tuple(live[key].shape)} (amax_history_len changed?)")
            live[key].copy_(tensor)
    logger.info("restored FP8 scaling state (%d tensors) from %s", len(saved), path)
    return True


class FP8StateCallback(TrainerCallback):
    """Saves TE's FP8 scaling state in every Trainer checkpoint and restores it when training resumes.

    Add it to any ``Trainer`` training a te-llama model: ``Trainer(..., callbacks=[FP8StateCallback()])``.
    On resume it reads ``output_dir/checkpoint-<step>``, the directory ``resume_from_checkpoint=True`` picks.
    """

    def on_save(self, args, state, control, model=None, **kwargs):
        directory = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if model is not None and state.is_world_process_zero and directory.is_dir():
            save_fp8_state(model, directory)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and state.global_step > 0:
            load_fp8_state(model, Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


COMPLETE_MARKER = "te_llama_checkpoint_complete"


class CheckpointCompleteCallback(TrainerCallback):
    """Marks a Trainer checkpoint complete once everything in it is written (``on_save`` runs after the save).

    A crash half-way through writing ``checkpoint-N`` leaves it unmarked; :func:`last_complete_checkpoint`
    then resumes from the one before, which the crash never touched. With several processes the marker waits
    for all of them (each writes its own random-number state into the checkpoint).
    """

    def on_save(self, args, state, control, **kwargs):
        directory = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        wait_for_everyone()
        if state.is_world_process_zero and directory.is_dir():
            (directory / COMPLETE_MARKER).write_text(str(state.global_step))


def last_complete_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest ``checkpoint-N`` under ``directory`` that :class:`CheckpointCompleteCallback` marked."""
    candidates = []
    for path in Path(directory).glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        step = path.name.rsplit("-", 1)[-1]
        if step.isdigit() and (path / COMPLETE_MARKER).is_file():
            candidates.append((int(step), path))
    return max(candidates)[1] if candidates else None


class LogExtrasCallback(TrainerCallback):
    """Adds ``tokens_per_s`` (input tokens since the previous log / wall time) to training log lines and
    ``eval_perplexity`` (exp of ``eval_loss``) to evaluation ones. Insert it first so printers see them."""

    def __init__(self):
        self._last: tuple[float, int] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.perf_counter(), state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "eval_loss" in logs:
            logs["eval_perplexity"] = round(math.exp(min(logs["eval_loss"], 50.0)), 3)
        if logs is None or "loss" not in logs or self._last is None:
            return
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        seconds = now - self._last[0]
        if seconds > 0 and tokens > self._last[1]:
            logs["tokens_per_s"] = round((tokens - self._last[1]) / seconds, 1)
        self._last = (now, tokens)


class GracefulStopCallback(TrainerCallback):
    """On Ctrl-C or SIGTERM: finish the current step, save a resumable checkpoint, stop. A second signal aborts.

    With several processes (``torchrun`` passes a signal on to each), they agree after every step, over a gloo
    group of the hosts, whether any has been signalled, so that all stop after the same step and save together.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self.stopped = False
        """Whether training was stopped by a signal (to this process or another)."""
        self._previous: dict = {}
        self._group = None

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        logger.warning("%s received: saving a checkpoint after this step, then stopping (again to abort)",
                       signal.Signals(signum).name)

    def on_train_begin(self, args, state, control, **kwargs):
        self._group = host_group()
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def on_step_end(self, args, state, control, **kwargs):
        if on_any_process(self.received is not None, self._group):
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
