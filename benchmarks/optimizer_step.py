"""Time one AdamW step over shape A's parameters (bf16, as in `te-llama bench`): torch's fused AdamW against
Transformer Engine's FusedAdam (bf16 states like torch's, and TE's default fp32 states).

    python benchmarks/optimizer_step.py --out optimizer_step.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from te_llama.benchmark import SHAPES, environment


def parameters(shape: str) -> list[torch.nn.Parameter]:
    from te_llama.modeling import TELlamaForCausalLM

    model = TELlamaForCausalLM.from_config(SHAPES[shape].llama_config(), dtype=torch.bfloat16, device="cuda")
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def time_optimizer(optimizer, steps: int = 10) -> float:
    for _ in range(3):
        optimizer.step()
    times = []
    for _ in range(steps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        optimizer.step()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="A", choices=list(SHAPES))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from transformer_engine.pytorch.optimizers import FusedAdam

    params = parameters(args.shape)
    candidates = {
        "torch AdamW fused (bf16 states)": lambda: torch.optim.AdamW(params, lr=1e-5, fused=True),
        "TE FusedAdam, bf16 states": lambda: FusedAdam(params, lr=1e-5, adam_w_mode=True, exp_avg_dtype=torch.bfloat16,
                                                       exp_avg_sq_dtype=torch.bfloat16),
        "TE FusedAdam, fp32 states": lambda: FusedAdam(params, lr=1e-5, adam_w_mode=True),
    }
    rows = {}
    for name, make in candidates.items():
        rows[name] = time_optimizer(make())
        torch.cuda.empty_cache()
        print(f"{rows[name]:8.2f} ms  {name}", flush=True)
    report = {"shape": args.shape, "parameters": sum(p.numel() for p in params), **environment(), "ms_per_step": rows}
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
