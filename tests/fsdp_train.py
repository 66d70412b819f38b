"""Train a te-llama model sharded with FSDP2 (``te_llama.training.fsdp``), one process per device, each on its share
of one batch it learns by heart; or, with ``--unsharded``, the same model on the whole batch in one process, for
comparison.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_train.py --out DIR
    python tests/fsdp_train.py --unsharded --out DIR

Writes ``DIR/result.json`` (the losses, averaged over the processes; a digest of each process's FP8 scaling
state), ``DIR/first_grads.pt`` (the first step's gradients as whole tensors) and ``DIR/weights.pt`` (the final state
dict, whole). Sharded runs also save a sharded checkpoint after step ``--save-at`` (``DIR/checkpoint``), export the
trained model with ``save_pretrained`` (``DIR/hf``), and then train again from the checkpoint to the last step in a
fresh model and optimizer: ``resumed_losses``, and the digest of the FP8 state it loaded against the one saved.
``--model tiny`` is the CPU tests' model (reference layer); ``--model small`` the GPU tests' (Transformer Engine,
``--fp8`` recipe).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import LlamaConfig

sys.path.append(str(Path(__file__).resolve().parent / "gpu"))  # after tests/, whose conftest is the CPU tests'

import small_llama  # noqa: E402
from conftest import BASE  # noqa: E402
from te_llama import TELlamaForCausalLM  # noqa: E402
from te_llama.training.fp8_state import fp8_state  # noqa: E402
from te_llama.training.fsdp import load_sharded, save_sharded, shard_model  # noqa: E402

MODELS = {"tiny": BASE, "small": small_llama.CONFIG}  # the CPU tests' and the GPU tests' configs
BATCHES = {"tiny": (4, 16), "small": (8, 256)}  # global batch: rows, tokens per row


def build(args) -> TELlamaForCausalLM:
    """The seeded model, the same in every process."""
    on_gpu = args.model == "small"
    torch.manual_seed(0)
    config = LlamaConfig(**{**MODELS[args.model], "tie_word_embeddings": args.tied})
    model = TELlamaForCausalLM.from_config(
        config, dtype=getattr(torch, args.dtype), device="cuda" if on_gpu else "cpu",
        backend="te" if on_gpu else "reference", fp8=None if args.fp8 == "off" else args.fp8).train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def batch(args, rank: int, world: int) -> torch.Tensor:
    """This process's share of the global batch."""
    rows, tokens = BATCHES[args.model]
    device = "cuda" if args.model == "small" else "cpu"
    generator = torch.Generator(device).manual_seed(1000)
    ids = torch.randint(0, MODELS[args.model]["vocab_size"], (rows, tokens), device=device, generator=generator)
    share = rows // world
    return ids[rank * share:(rank + 1) * share]


def digest(tensors) -> str:
    hashed = hashlib.sha256()
    for tensor in tensors:
        hashed.update(tensor.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return hashed.hexdigest()[:16]


def fp8_digest(model) -> str:
    return digest(tensor for _, tensor in sorted(fp8_state(model).items()))


def everyone(value, world: int) -> list:
    """``value`` of every process, in rank order."""
    if world == 1:
        return [value]
    values = [None] * world
    dist.all_gather_object(values, value)
    return values


def full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().float().cpu()


def train(args, model, optimizer, steps: range, rank: int, world: int, directory: Path | None = None) -> tuple:
    """Optimizer steps ``steps``: the losses averaged over the processes and the first step's gradients; a sharded
    checkpoint into ``directory`` after step ``args.save_at``."""
    losses, first_grads, saved_fp8 = [], None, None
    for step in steps:
        ids = batch(args, rank, world)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if first_grads is None:
            first_grads = {name: full(p.grad) for name, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean, op=dist.ReduceOp.AVG)
        losses.append(mean.item())
        if directory is not None and step + 1 == args.save_at:
            save_sharded(model, optimizer, directory)
            saved_fp8 = fp8_digest(model)
    return losses, first_grads, saved_fp8


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--dtype", default="float32", help="the parameters' dtype (shards and optimizer state)")
    parser.add_argument("--fp8", default="off")
    parser.add_argument("--tied", action="store_true", help="tie_word_embeddings=True")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--save-at", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--unsharded", action="store_true", help="one process, no FSDP")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.unsharded:
        rank, world = 0, 1
    else:
        from te_llama.training.distributed import start_processes

        processes = start_processes(on_gpu=args.model == "small")  # as te-llama finetune starts
        rank, world = processes.process_index, processes.num_processes
    model = build(args)
    if not args.unsharded:
        shard_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses, first_grads, saved_fp8 = train(args, model, optimizer, range(args.steps), rank, world,
                                           None if args.unsharded else out / "checkpoint")
    weights = {name: full(tensor) for name, tensor in model.state_dict().items()}
    result = {"world": world, "losses": losses, "tied": model.lm_head.weight is model.model.embed_tokens.weight,
              "fp8_state_tensors": len(fp8_state(model)),
              "fp8_state": everyone(fp8_digest(model), world)}
    if not args.unsharded:
        model.save_pretrained(out / "hf")
        resumed = build(args)
        shard_model(resumed)
        resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=args.lr)
        load_sharded(resumed, resumed_optimizer, out / "checkpoint")
        result["fp8_state_saved"], result["fp8_state_loaded"] = saved_fp8, fp8_digest(resumed)
        result["resumed_losses"], _, _ = train(args, resumed, resumed_optimizer, range(args.save_at, args.steps),
                                               rank, world)
        result["local_shard_rows"] = model.model.layers[0].layernorm_mlp.fc1_weight.to_local().shape[0]
    if rank == 0:
        torch.save(first_grads, out / "first_grads.pt")
        torch.save(weights, out / "weights.pt")
        (out / "result.json").write_text(json.dumps(result, indent=1))
    if world > 1:
        dist.barrier()


if __name__ == "__main__":
    main()
