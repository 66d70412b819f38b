"""FP8 convergence: the same Llama model trained from scratch in BF16 and with each FP8 recipe.

Two models, SmolLM2's 49k vocabulary and tokenizer, random init from the seed, the same batches of real English
text in the same order for every variant of one seed, AdamW with warm-up and cosine decay, BF16 autocast with FP32
master weights:
- ``113m``: 12 layers, hidden 768, GQA 12/4 heads, tied embeddings;
- ``8b-layers``: Llama-3-8B's layer shapes (hidden 4096, intermediate 14336, GQA 32/8 heads, rope theta 500000)
  in ``--layers`` layers (4 by default, 1.27B parameters), untied embeddings. Its backward GEMMs have the 8B
  model's inner dimensions (up to 28,672 for the MLP's input gradient), where fast accumulation's error is largest.

A variant is ``bf16`` or an FP8 recipe, optionally with ``_fast`` (``FP8Config(backward_accumulation="fast")``).
Each run's final smoothed loss is compared with the first variant of its seed; with several seeds the spread
between seeds shows the run-to-run noise a difference between variants has to stand out from.

    python benchmarks/fp8_convergence.py --tokens .gpu/english_tokens.npy --out benchmarks/results/fp8_convergence
    python benchmarks/fp8_convergence.py --model 8b-layers --variants delayed,delayed_fast,bf16 --seeds 0,1 \
        --steps 1000 --batch 2 --seq 2048 --lr 3e-4 --warmup 100 --tokens ... --out ...

Writes ``<out>.json`` (per-step losses, summary, GPU and versions) and ``<out>.png`` (the curves) after every run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import numpy as np
import torch
from transformers import LlamaConfig

from te_llama import TELlamaForCausalLM
from te_llama.training.fp8 import FP8Config, FP8ConfigError, describe

MODELS = {
    "113m": dict(vocab_size=49152, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=4, head_dim=64, max_position_embeddings=2048,
                 rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=100000.0, bos_token_id=1, eos_token_id=2),
    "8b-layers": dict(vocab_size=49152, hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=500000.0, bos_token_id=1,
                      eos_token_id=2),
}
FAST = "_fast"  # variant suffix: fast accumulation in the backward FP8 GEMMs


def fp8_config(variant: str) -> FP8Config:
    accumulation = "fast" if variant.endswith(FAST) else "split"
    return FP8Config(recipe=variant.removesuffix(FAST), backward_accumulation=accumulation)


def model_config(args) -> LlamaConfig:
    config = dict(MODELS[args.model])
    if args.layers:
        config["num_hidden_layers"] = args.layers
    return LlamaConfig(**config)


def batches(tokens: np.ndarray, steps: int, batch: int, seq: int, seed: int) -> np.ndarray:
    starts = np.random.default_rng(seed).integers(0, len(tokens) - seq - 1, size=(steps, batch))
    return starts[..., None] + np.arange(seq)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(variant: str, seed: int, args, train_tokens: torch.Tensor, eval_tokens: torch.Tensor) -> dict:
    torch.manual_seed(seed)
    model = TELlamaForCausalLM.from_config(model_config(args), dtype=torch.float32, device="cuda", backend="te")
    recipe = None
    if variant != "bf16":
        try:
            model.enable_fp8(fp8_config(variant))
        except FP8ConfigError as error:
            return {"variant": variant, "seed": seed, "skipped": str(error)}
        recipe = describe(model.fp8_config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    index = torch.from_numpy(batches(train_tokens.numpy(), args.steps, args.batch, args.seq, seed)).cuda()
    data = train_tokens.cuda()
    losses, times = [], []
    parameters = sum(p.numel() for p in model.parameters())
    torch.cuda.reset_peak_memory_stats()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        start = time.perf_counter()
        ids = data[index[step]]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        times.append(time.perf_counter() - start)  # host time: the GPU syncs only every 100 steps
        if step % 100 == 0 or step == args.steps - 1:
            print(f"{variant:12s} seed {seed} step {step:4d} loss {losses[-1].item():.4f}", flush=True)
    torch.cuda.synchronize()
    elapsed = sum(times)
    losses = [x.item() for x in losses]
    model.eval()
    eval_index = torch.from_numpy(batches(eval_tokens.numpy(), 16, args.batch, args.seq, 12345)).cuda()
    eval_data = eval_tokens.cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        eval_loss = statistics.mean(model(input_ids=eval_data[i], labels=eval_data[i]).loss.item()
                                    for i in eval_index)
    window = losses[-args.smooth:]
    return {"variant": variant, "seed": seed, "recipe": recipe, "parameters": parameters, "losses": losses,
            "final_smoothed_loss": statistics.mean(window), "eval_loss_bf16": eval_loss,
            "nan_or_inf": not all(math.isfinite(x) for x in losses), "mean_step_ms": 1000 * elapsed / args.steps,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def plot(results: list[dict], path: str, smooth: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results if "losses" in r]
    if not runs:
        return
    seeds = sorted({run["seed"] for run in runs})
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, height_ratios=(3, 1.3))

    def mean_curve(run):
        return np.convolve(run["losses"], np.ones(smooth) / smooth, mode="valid")

    bases = {seed: mean_curve(next(r for r in runs if r["seed"] == seed)) for seed in seeds}
    for run in runs:
        curve = mean_curve(run)
        steps = np.arange(len(curve)) + smooth
        label = (run["recipe"] or "BF16") + (f", seed {run['seed']}" if len(seeds) > 1 else "")
        style = "-" if run["seed"] == seeds[0] else "--"
        top.plot(steps, curve, style, label=label, linewidth=1.2)
        bottom.plot(steps, 100 * (curve / bases[run["seed"]] - 1), style, linewidth=1.0)
    top.set_ylabel(f"training loss ({smooth}-step mean)")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    bottom.set_ylabel(f"vs {runs[0]['variant']} of its seed (%)")
    bottom.set_xlabel("step")
    bottom.axhline(1.5, color="grey", linestyle=":")
    bottom.axhline(-1.5, color="grey", linestyle=":")
    bottom.grid(alpha=0.3)
    fig.suptitle(f"{title}: FP8 vs BF16 ({torch.cuda.get_device_name()})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(results: list[dict]) -> None:
    """Each run against the first run of its seed (``vs_first_percent``), in place."""
    firsts: dict[int, float] = {}
    for run in results:
        if "losses" not in run:
            continue
        base = firsts.setdefault(run["seed"], run["final_smoothed_loss"])
        run["vs_first_percent"] = 100 * (run["final_smoothed_loss"] / base - 1)
        run["within_1_5_percent"] = abs(run["vs_first_percent"]) <= 1.5 and not run["nan_or_inf"]


def write_report(path: str, args, results: list[dict], split: int, total: int) -> None:
    import transformer_engine
    import transformers

    config = model_config(args)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "transformers": transformers.__version__, "transformer_engine": transformer_engine.__version__,
              "settings": vars(args), "model_config": config.to_diff_dict(), "tokens_train": split,
              "tokens_eval": total - split, "runs": results}
    partial = path + ".partial"
    with open(partial, "w") as handle:
        json.dump(report, handle, indent=1)
    os.replace(partial, path)  # a run killed by a time limit leaves the runs before it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", required=True)
    parser.add_argument("--out", required=True, help="path prefix for .json and .png")
    parser.add_argument("--model", choices=sorted(MODELS), default="113m")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the model's)")
    parser.add_argument("--variants", default="bf16,delayed,current,block,mxfp8",
                        help="bf16 or FP8 recipes, each optionally + _fast (fast backward accumulation)")
    parser.add_argument("--seeds", default="0", help="comma-separated; every variant runs once per seed")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--smooth", type=int, default=50)
    args = parser.parse_args()

    tokens = torch.from_numpy(np.load(args.tokens).astype(np.int64))
    split = int(len(tokens) * 0.95)
    results: list[dict] = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for variant in args.variants.split(","):
            results.append(train(variant, seed, args, tokens[:split], tokens[split:]))
            compare(results)
            write_report(args.out + ".json", args, results, split, len(tokens))
            parameters = next((r["parameters"] for r in results if "parameters" in r), 0)
            plot(results, args.out + ".png", args.smooth,
                 f"{parameters / 1e6:,.0f}M Llama ({args.model}) from scratch on English text")
    print(f"\n{'variant':14s} {'seed':>4s} {'recipe':64s} {'final loss':>10s} {'vs first':>8s} {'eval':>7s} "
          f"{'ms/step':>8s}")
    for run in results:
        if "skipped" in run:
            print(f"{run['variant']:14s} {run['seed']:4d} skipped: {run['skipped']}")
            continue
        print(f"{run['variant']:14s} {run['seed']:4d} {run['recipe'] or 'BF16':64s} {run['final_smoothed_loss']:10.4f} "
              f"{run['vs_first_percent']:+7.2f}% {run['eval_loss_bf16']:7.4f} {run['mean_step_ms']:8.1f}")


if __name__ == "__main__":
    main()
