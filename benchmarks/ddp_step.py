"""Training steps under DDP, one process per GPU, for one ``te-llama bench`` variant and shape: ms per step.

    torchrun --standalone --nproc_per_node 2 benchmarks/ddp_step.py --variant te_fp8_delayed_graphs --shape A --out X.jsonl
    python benchmarks/ddp_step.py --variant te_fp8_delayed_graphs --shape A --out X.jsonl     # the same on one GPU

Each process builds the variant's model as ``te-llama bench`` does (``te_llama.bench.suite.prepare_variant``; a
``_graphs`` variant enables CUDA graphs before DDP wraps the model), trains on a batch of the shape's size of its
own, and DDP averages the gradients. Steps are timed as the suite times them (CUDA events, a wait for the GPU after
each step), and process 0 appends one JSON line to ``--out``: the median ms per step over the processes' slowest,
tokens per second over all processes, peak memory, the last step's loss averaged over the processes (to compare
eager and graphed variants, which start from the same weights and tokens), the SM clock and power of its GPU.

Why it exists: with CUDA graphs, DDP gets the decoder layers' gradients only as each recorded part's backward ends,
not layer by layer as it does eagerly, so it overlaps less of its all-reduce with the backward. Under DDP the stack
is recorded in parts for that reason (``te_llama.training.cuda_graphs.DDP_PARTS``); this script measures what it costs.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.distributed as dist

from te_llama.bench.suite import SHAPES, environment, prepare_variant, skip_reason, timed_ms, training_step
from te_llama.training.distributed import DDP_OPTIONS, start_processes
from te_llama.bench.gpu_power import PowerSampler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", required=True)
    parser.add_argument("--shape", default="A", choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", required=True)
    parser.add_argument("--torch-ddp-defaults", action="store_true",
                        help="wrap the model in DDP with PyTorch's default options instead of te-llama's "
                        "(te_llama.training.distributed.DDP_OPTIONS), to compare the two")
    args = parser.parse_args()
    if (reason := skip_reason(args.variant, args.shape)) is not None:
        raise SystemExit(f"{args.variant} on shape {args.shape}: {reason}")

    # As `te-llama finetune` starts: the process group up, each process on its GPU (on the CPU, which the tests use:
    # gloo and the reference layer)
    processes = start_processes(on_gpu=torch.cuda.is_available())
    world, rank, device = processes.num_processes, processes.process_index, processes.device
    shape = SHAPES[args.shape]
    model, optimizer, _ = prepare_variant(args.variant, shape, device)
    ids = torch.randint(0, shape.config["vocab_size"], (shape.batch, shape.seq), device=device,
                        generator=torch.Generator(device).manual_seed(rank))  # each process its own tokens
    ddp_options = {} if args.torch_ddp_defaults else DDP_OPTIONS
    trained = torch.nn.parallel.DistributedDataParallel(model, **ddp_options) if world > 1 else model
    gpu = device.type == "cuda"
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        training_step(trained, ids, optimizer)
    with PowerSampler() as power:
        timed = [timed_ms(lambda: training_step(trained, ids, optimizer), device.type) for _ in range(args.steps)]
    ms = torch.tensor([step_ms for step_ms, _ in timed], device=device)
    loss = timed[-1][1].detach().float()  # the last step's, averaged over the processes below
    if world > 1:  # a step lasts as long as its slowest process; gloo has no average op, so the loss is summed
        dist.all_reduce(ms, op=dist.ReduceOp.MAX)
        dist.all_reduce(loss)
    median = statistics.median(ms.tolist())
    row = {"variant": args.variant, "shape": args.shape, "processes": world, "ddp_options": ddp_options,
           "ms_per_step": median,
           "tokens_per_s": world * shape.batch * shape.seq / median * 1000,
           "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
           "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if gpu else None,
           "graph_replays": model.cuda_graph_replays() if hasattr(model, "cuda_graph_replays") else None,
           "final_loss": loss.item() / world,
           "gpu_power": power.summary(), **environment()}
    if rank == 0:
        with Path(args.out).open("a") as file:
            file.write(json.dumps(row) + "\n")
        print(json.dumps({k: row[k] for k in ("variant", "shape", "processes", "ddp_options", "ms_per_step",
                                              "tokens_per_s", "peak_memory_gib", "peak_reserved_gib", "graph_replays",
                                              "final_loss")}), flush=True)
    if world > 1:
        del trained  # DDP's reducer goes before its process group: the other order sometimes hung at exit (gloo, CPU)
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
