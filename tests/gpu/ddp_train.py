"""Train the small GPU-test model under DDP, one process per GPU, each on its share of one batch it learns by
heart, and report what the multi-GPU test compares: the losses averaged over the processes, the first step's
(averaged) gradients, and each process's final weights and FP8 scaling state as digests.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/gpu/ddp_train.py --fp8 delayed --out DIR
    python tests/gpu/ddp_train.py --fp8 delayed --out DIR          # the same global batches in one process

``--pad-steps 0,3``: at those steps the last process's batch has padding (its layers cannot replay CUDA graphs).
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import small_llama  # noqa: E402

from te_llama.training.distributed import DDP_OPTIONS, start_processes  # noqa: E402
from te_llama.training.fp8_state import fp8_state  # noqa: E402


def digest(tensors) -> str:
    hashed = hashlib.sha256()
    for tensor in tensors:
        hashed.update(tensor.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return hashed.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fp8", default="delayed")
    parser.add_argument("--graphs", action="store_true")
    parser.add_argument("--graphs-after-ddp", action="store_true", help="enable the graphs once DDP wrapped the model")
    parser.add_argument("--pad-steps", default="", help="steps (e.g. 0,3) at which the last process's batch has "
                        "padding and the others' have none")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (under DDP, more than 2 record the "
                        "stack in more than two graphs)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    processes = start_processes(on_gpu=True)  # as te-llama finetune starts
    world, rank = processes.num_processes, processes.process_index
    model = small_llama.model(fp8=None if args.fp8 == "off" else args.fp8, graphs=args.graphs,
                              num_hidden_layers=args.layers)
    trained = torch.nn.parallel.DistributedDataParallel(model, **DDP_OPTIONS) if world > 1 else model
    if args.graphs_after_ddp:
        model.enable_cuda_graphs()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    share = args.global_batch // world
    ids = small_llama.batch(0, size=args.global_batch)[rank * share:(rank + 1) * share]
    pad_steps = {int(step) for step in args.pad_steps.split(",") if step}
    losses, first_grads = [], None
    for step in range(args.steps):
        mask = torch.ones_like(ids)
        if step in pad_steps and rank == world - 1:
            mask[0, -16:] = 0
        loss = trained(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        if step == 0:
            first_grads = {name: p.grad.float().cpu() for name, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean, op=dist.ReduceOp.AVG)
        losses.append(mean.item())

    mine = {"weights": digest(p for _, p in sorted(model.named_parameters())),
            "fp8_state": digest(t for _, t in sorted(fp8_state(model).items()))}
    everyone = [mine]
    if world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(first_grads, out / "first_grads.pt")
        (out / "result.json").write_text(json.dumps({"world": world, "losses": losses, "processes": everyone,
                                                     "recipe": model.fp8_recipe_name,
                                                     "graph_replays": model.cuda_graph_replays()}, indent=1))
    if world > 1:  # DDP goes before its process group (the other order could hang at exit, seen with gloo)
        del trained
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
