"""Several GPUs: ``torchrun --nproc_per_node N -m te_llama finetune ...``, one process per GPU.

Each process trains a whole copy of the model on its share of every batch. The HF Trainer wraps it in DDP, which
averages the gradients, and Transformer Engine reduces delayed scaling's amaxes over every process (its default
group), so all processes cast with the same FP8 scales and keep the same weights. This module holds what a command
needs on top of that: each process on its own GPU before anything touches CUDA, one process that prints and
writes while the others wait, and agreement between the processes on when to stop.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

DATA_PARALLEL_ADVICE = ("Launch one process per GPU instead (DDP): torchrun --nproc_per_node N your_script.py, or "
                        "torchrun --nproc_per_node N -m te_llama finetune ...; or make one GPU visible with "
                        "CUDA_VISIBLE_DEVICES=0.")


class DataParallelError(RuntimeError):
    """A te-llama model was run by ``torch.nn.DataParallel``, which the HF Trainer picks when one process sees
    several GPUs."""


def start_processes(on_gpu: bool):
    """This process's place among the launcher's (one process when started plainly), as accelerate's
    ``PartialState``: the process group is up and, on GPUs, the process is on its own (``LOCAL_RANK``)."""
    from accelerate import PartialState

    return PartialState(cpu=not on_gpu)


def wait_for_everyone() -> None:
    """Block until every process gets here (nothing to wait for in a single process)."""
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def several_processes() -> bool:
    """Whether this process is one of several (a process group of more than one is up)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def host_group() -> dist.ProcessGroup | None:
    """A gloo group over every process, for flags exchanged between hosts without waiting for the GPU; ``None``
    in a single process. Every process must call it, at the same point."""
    if not several_processes():
        return None
    return dist.new_group(backend="gloo")


def on_any_process(flag: bool, group: dist.ProcessGroup | None) -> bool:
    """Whether ``flag`` is true on at least one process of ``group`` (this process's own flag without one)."""
    if group is None:
        return flag
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item())
