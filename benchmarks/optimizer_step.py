"""Time one AdamW step over a model's parameters (bf16, as in `te-llama bench`): torch's fused AdamW against
te-llama's AdamW (a Triton kernel per parameter, `te_llama.training.adamw`) and Transformer Engine's FusedAdam (bf16
states like torch's, and TE's default fp32 states). Two parameter sets: shape A of the bench (2.8B parameters in
75 tensors) and SmolLM2-135M's shapes (the fine-tune's model: 135M parameters in 273 small tensors), where the
per-tensor launches of the Triton step cost the most.

    python benchmarks/optimizer_step.py --out optimizer_step.json
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import LlamaConfig

from te_llama.training.adamw import AdamW
from te_llama.bench.suite import SHAPES, environment, median_ms

SMOLLM2_135M = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                           num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)


def parameters(config: LlamaConfig) -> list[torch.nn.Parameter]:
    from te_llama.model.modeling import TELlamaForCausalLM

    model = TELlamaForCausalLM.from_config(config, dtype=torch.bfloat16, device="cuda")
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def candidates(params) -> dict:
    from transformer_engine.pytorch.optimizers import FusedAdam

    return {
        "torch AdamW fused (bf16 states)": lambda: torch.optim.AdamW(params, lr=1e-5, fused=True),
        "te-llama AdamW, Triton (bf16 states)": lambda: AdamW(params, lr=1e-5),
        "TE FusedAdam, bf16 states": lambda: FusedAdam(params, lr=1e-5, adam_w_mode=True, exp_avg_dtype=torch.bfloat16,
                                                       exp_avg_sq_dtype=torch.bfloat16),
        "TE FusedAdam, fp32 states": lambda: FusedAdam(params, lr=1e-5, adam_w_mode=True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    report = {**environment(), "ms_per_step": {}}
    for label, config in (("A", SHAPES["A"].model_config()), ("SmolLM2-135M", SMOLLM2_135M)):
        params = parameters(config)
        rows = report["ms_per_step"][label] = {"parameters": sum(p.numel() for p in params), "tensors": len(params)}
        for name, make in candidates(params).items():
            rows[name] = median_ms(make().step, repeats=10, warmup=3)
            torch.cuda.empty_cache()
            print(f"{label:>12}  {rows[name]:8.2f} ms  {name}", flush=True)
        params.clear()
        torch.cuda.empty_cache()
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
