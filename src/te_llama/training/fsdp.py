"""FSDP2: a te-llama model sharded over the processes with PyTorch's ``fully_shard``, for models whose weights,
gradients and optimizer state do not fit one GPU (DDP keeps all of them in every process).

:func:`shard_model` makes each decoder layer one FSDP unit and the rest (embeddings, final norm, LM head) the root
unit, as torchtitan does. Each process keeps 1/N of every parameter, its gradient and its optimizer state; FSDP
gathers a layer's weights just before its forward and again before its backward, frees them after, and
reduce-scatters the gradients. Inside a layer's forward Transformer Engine sees plain tensors (FSDP swaps the
gathered weights in), so BF16 and every FP8 recipe run as without FSDP: the weights are gathered in the compute
dtype and TE casts them to FP8 as it does on one GPU (no FP8 all-gather). The LM head stays in the root unit, so
te-llama's chunked LM head loss, which reads ``lm_head.weight`` outside the head's forward, sees it gathered, and tied
embeddings are one parameter in one unit.

Checkpoints: :func:`save_sharded` / :func:`load_sharded` write and read torch's distributed checkpoint (DCP: every
process writes its shards of the weights and the optimizer state) with TE's FP8 scaling state beside it
(:mod:`te_llama.training.fp8_state`); under the HF Trainer, accelerate writes the same DCP format and
:class:`~te_llama.training.fp8_state.FP8StateCallback` the FP8 state. A sharded model's state dict leaves out TE's
``_extra_state``: TE pickles the FP8 scaling state into a byte tensor whose size changes once FP8 has run, which DCP
cannot load into a fresh model (TransformerEngine issue 1860; TE's own FSDP2 checkpoint tests leave it out too).
``TELlamaForCausalLM.save_pretrained`` on a sharded model gathers the full weights to the first process, which
writes the plain HF checkpoint (:func:`gathered_state_dict`). See ``docs/multi-gpu.md``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from te_llama.backend import working_dtype
from te_llama.checkpoint.files import CheckpointError, staging_directory
from te_llama.training.cuda_graphs import CudaGraphError
from te_llama.training.distributed import is_sharded
from te_llama.training.fp8_state import load_fp8_state, save_fp8_state

EXTRA_STATE_SUFFIX = "._extra_state"


class FSDPError(RuntimeError):
    """A model or option that FSDP2 sharding cannot take as given; the message says what to change."""


def default_mp_policy(backend: str) -> MixedPrecisionPolicy:
    """te-llama's mixed precision under FSDP2: layers compute in the backend's working dtype (BF16 on Transformer
    Engine, FP32 on the reference), gradients are reduced in FP32.

    The parameters keep the dtype the model was built in; built in FP32 (as ``te-llama finetune --fsdp`` does), the
    shards are FP32 master weights and the optimizer updates them in FP32, while FSDP gathers BF16 copies for the
    compute, as torchtitan and accelerate do. Reducing in FP32: the reduce-scatter sums N processes' gradients,
    which in BF16 would round every partial sum to 8 bits of mantissa.
    """
    return MixedPrecisionPolicy(param_dtype=working_dtype(backend), reduce_dtype=torch.float32)


def shard_model(model, mesh=None, mp_policy: MixedPrecisionPolicy | None = None,
                reshard_after_forward: bool = True):
    """Shard ``model`` (a ``TELlamaForCausalLM`` or another family's te-llama class) with FSDP2 in place: each decoder layer, then the root; returns it.

    Every process calls it, after ``torch.distributed.init_process_group()`` (``torchrun``) and, on GPUs, with its
    own device set; the model must be the same in every process (the same checkpoint, or the same seed), as each
    keeps its own shard of it. Then build the optimizer from ``model.parameters()`` (the shards).

    ``mesh``: the processes to shard over, a ``DeviceMesh`` (default: all of them, on the model's device type).
    ``mp_policy``: FSDP's mixed precision (default :func:`default_mp_policy`).
    ``reshard_after_forward``: free each layer's gathered weights after its forward and gather them again for its
    backward (least memory). ``False`` keeps them from forward to backward: one all-gather less per layer and step,
    for the memory of the whole unsharded model at the end of the forward. The last layer keeps its weights either
    way, since the backward starts with it (torchtitan's choice), and so does the root, FSDP's default for it.
    """
    _check_shardable(model)
    policy = mp_policy if mp_policy is not None else default_mp_policy(model.te_backend)
    if mesh is None:  # one mesh for every unit, on the model's device type (the reference layer stays on the CPU)
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(model.device.type, (dist.get_world_size(),))
    # fully_shard replaces each parameter with a DTensor; attributes set on the parameter (TE's parallelism
    # markers, HF's init flag) would be lost, so they are copied over, as TE's own FSDP2 tests do.
    attributes = {name: dict(vars(param)) for name, param in model.named_parameters()}
    layers = model.model.layers
    for index, layer in enumerate(layers):
        fully_shard(layer, mesh=mesh, mp_policy=policy,
                    reshard_after_forward=reshard_after_forward and index < len(layers) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for name, param in model.named_parameters():
        for key, value in attributes.get(name, {}).items():
            setattr(param, key, value)
    model.register_state_dict_post_hook(_drop_extra_state)
    model.register_load_state_dict_post_hook(_extra_state_not_missing)
    return model


def reshard(model) -> None:
    """Free the gathered weights that forwards without a backward leave behind (FSDP keeps the root's and the last
    layer's from the forward for the backward), so that ``model.parameters()`` are the shards again, as an optimizer
    built after an evaluation must see them."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _check_shardable(model) -> None:
    from te_llama.model.modeling import TECausalLM

    if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        raise FSDPError(f"shard_model got a {type(model).__name__}: FSDP2 replaces DDP (it reduces the gradients "
                        "itself); pass the te-llama model itself, not wrapped in DDP or DataParallel")
    if is_sharded(model):
        raise FSDPError("the model is already sharded with FSDP2 (shard_model or accelerate's FSDP); shard it once")
    if not isinstance(model, TECausalLM):
        raise FSDPError(f"shard_model shards a te-llama model (TELlamaForCausalLM, te_llama.AutoModelForCausalLM's "
                        f"classes), got {type(model).__name__}; pass the te-llama model itself (te-llama does not "
                        "run PEFT adapters under FSDP2)")
    if model.cuda_graphs:
        raise CudaGraphError("enable_cuda_graphs() cannot be combined with FSDP2: the graphs replay the layers with "
                             "the weights' addresses at recording, which FSDP gathers into new memory every step, "
                             "and without its all-gathers and reduce-scatters; call model.disable_cuda_graphs() "
                             "before shard_model, or train with DDP")
    if model.cache_fp8_weights:
        raise FSDPError("cache_fp8_weights cannot be combined with FSDP2: the cache follows the weights through "
                        "their parameters, which FSDP replaces by shards and gathered copies; set "
                        "model.cache_fp8_weights = False before shard_model")
    from te_llama.model.adapters import has_adapters

    if has_adapters(model.model.layers):
        raise FSDPError("the model carries PEFT adapters, which te-llama does not run under FSDP2: train LoRA "
                        "with DDP (torchrun without --fsdp), or merge the adapters first (merge_and_unload())")
    if not (dist.is_available() and dist.is_initialized()):
        raise FSDPError("FSDP2 shards over the processes of a process group, and none is up: launch with torchrun "
                        "--nproc_per_node N and call torch.distributed.init_process_group() (or "
                        "te_llama.training.distributed.start_processes) before shard_model")


def _drop_extra_state(module, state_dict, prefix, local_metadata) -> None:
    # TE's FP8 scaling state as a pickled byte tensor: see the module docstring for why it stays out.
    for key in [key for key in state_dict if key.endswith(EXTRA_STATE_SUFFIX)]:
        del state_dict[key]


def _extra_state_not_missing(module, incompatible_keys) -> None:
    # The counterpart of _drop_extra_state: state dicts of a sharded model have no _extra_state to load.
    missing = incompatible_keys.missing_keys
    missing[:] = [key for key in missing if not key.endswith(EXTRA_STATE_SUFFIX)]


def gathered_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict of a sharded model, on the CPU of the first process; ``{}`` in the others.
    Every process must call it (it all-gathers each parameter)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    reshard(model)
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(model, optimizer: torch.optim.Optimizer | None, directory: str | os.PathLike) -> Path:
    """Write a resumable checkpoint of a sharded model (and its optimizer) to the new directory ``directory``.

    Every process calls it and writes its shards (torch's distributed checkpoint, DCP), so ``directory`` must be on
    a filesystem that every process sees; the first process adds TE's FP8 scaling state (the same in every process:
    TE reduces the amaxes over all of them). The checkpoint is written into a staging directory beside
    ``directory`` and renamed to it once complete, so ``directory`` never holds a half-written one. The step, the
    learning-rate schedule and the data order are the caller's to keep.
    """
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    if directory.exists():
        raise CheckpointError(f"{directory} exists; save_sharded writes a new directory for each checkpoint "
                              "(as checkpoint-STEP)")
    state = _state(model, optimizer)
    first = dist.get_rank() == 0
    staging = [None]
    if first:
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = [str(staging_directory(directory))]
    dist.broadcast_object_list(staging, src=0)
    staging = Path(staging[0])
    try:
        dcp.save(state, checkpoint_id=staging)
        if first:
            save_fp8_state(model, staging)
            os.replace(staging, directory)
    except BaseException:
        if first:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    dist.barrier()
    return directory


def load_sharded(model, optimizer: torch.optim.Optimizer | None, directory: str | os.PathLike) -> None:
    """Restore a checkpoint of :func:`save_sharded` into a model sharded the same way (and its optimizer, built
    from ``model.parameters()`` after sharding), with the FP8 scaling state. Every process calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    directory = Path(directory)
    if not (directory / ".metadata").is_file():
        raise CheckpointError(f"{directory}: not a checkpoint of save_sharded (no DCP .metadata file)")
    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=directory)
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    load_fp8_state(model, directory)


def _state(model, optimizer) -> dict:
    """What a sharded checkpoint holds, as DCP's state dicts (parameter names as the unsharded model's)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if not is_sharded(model):
        raise FSDPError("save_sharded and load_sharded take a model sharded with shard_model; for one process use "
                        "save_pretrained, or a Trainer checkpoint")
    reshard(model)
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}
