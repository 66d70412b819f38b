"""Several GPUs: ``torchrun --nproc_per_node N -m te_llama finetune ...``, one process per GPU.

Each process trains a whole copy of the model on its share of every batch. The HF Trainer wraps it in DDP, which
averages the gradients, and Transformer Engine reduces delayed scaling's amaxes over every process (its default
group), so all processes cast with the same FP8 scales and keep the same weights. This module holds what a command
needs on top of that: each process on its own GPU before anything touches CUDA, one process that prints and
writes while the others wait, agreement between the processes on when to stop, and the options DDP runs with.
FSDP2, which shards the model over the processes instead, is :mod:`te_llama.training.fsdp`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

DATA_PARALLEL_ADVICE = ("Launch one process per GPU instead (DDP): torchrun --nproc_per_node N your_script.py, or "
                        "torchrun --nproc_per_node N -m te_llama finetune ...; or make one GPU visible with "
                        "CUDA_VISIBLE_DEVICES=0.")


DDP_OPTIONS = {"gradient_as_bucket_view": True}
"""te-llama's ``DistributedDataParallel`` options (``te-llama finetune``, ``benchmarks/ddp_step.py``, the GPU tests).

``gradient_as_bucket_view``: each parameter's gradient is a view into the bucket DDP all-reduces. With PyTorch's
default, DDP copies each gradient the backward makes into its bucket, all-reduces the bucket and copies the result
back into the gradient, which is then a second copy of the bucket until the next ``zero_grad`` (2 bytes a bf16
parameter, 15 GiB for Llama-3-8B). With the option, the backward's gradient is copied into the bucket and dropped,
and ``.grad`` is the bucket's view: one copy a step instead of two. Shape A on two H200s (FP8 delayed), 0.7-3.3 ms a
step faster: eager 162.7 against 165.1 ms in one call, 165.4 against 166.1 and 167.3 in another; with CUDA graphs 166.2
against 169.5. The step's peak memory did not show the difference: it moved between 35.1 and 40.3 GiB allocated from
run to run with either option. Losses are unchanged (bit for bit on the CPU, ``tests/test_ddp_step.py``)."""


def use_ddp_options(trainer) -> None:
    """Make the HF Trainer wrap its model in DDP with :data:`DDP_OPTIONS` (accelerate wraps it when training starts,
    with the options of the Trainer's ``DistributedDataParallelKwargs``)."""
    from accelerate.utils import DistributedDataParallelKwargs

    accelerator = trainer.accelerator
    if accelerator.ddp_handler is None:
        accelerator.ddp_handler = DistributedDataParallelKwargs()
    for name, value in DDP_OPTIONS.items():
        setattr(accelerator.ddp_handler, name, value)


def ddp_options_of(model) -> dict | None:
    """The :data:`DDP_OPTIONS` settings a DDP-wrapped ``model`` runs with, read from DDP itself (``None`` for a model
    that DDP does not wrap, as in a single process)."""
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return None
    return {name: getattr(model, name) for name in DDP_OPTIONS}


class DataParallelError(RuntimeError):
    """A te-llama model was run by ``torch.nn.DataParallel``, which the HF Trainer picks when one process sees
    several GPUs."""


def refuse_data_parallel(module: torch.nn.Module) -> None:
    """Raise :class:`DataParallelError` on a copy ``torch.nn.DataParallel`` made to run on one of its GPUs."""
    if getattr(module, "_is_replica", False):  # set by DataParallel on the copies it runs per GPU
        raise DataParallelError(
            "te-llama models do not run under torch.nn.DataParallel (the HF Trainer uses it when one process sees "
            "several GPUs): its per-step copies of the model on every GPU share Transformer Engine's and "
            f"te-llama's per-model state. {DATA_PARALLEL_ADVICE}")


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


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether ``module`` was sharded with FSDP2's ``fully_shard`` (:mod:`te_llama.training.fsdp`, or accelerate's)."""
    if not (dist.is_available() and dist.is_initialized()):  # only a model in a process group can be sharded;
        return False  # until there is one, FSDP is not imported
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


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
