"""FP8 convergence: the same Llama model trained from scratch in BF16 and with each FP8 recipe.

A 113M-parameter Llama (12 layers, hidden 768, GQA 12/4 heads, SmolLM2's 49k vocabulary and tokenizer, tied
embeddings), random init with one seed, the same batches of real English text in the same order, AdamW with
warm-up and cosine decay, BF16 autocast with FP32 master weights. Each FP8 run's final smoothed loss is
compared with BF16's.

    python benchmarks/fp8_convergence.py --tokens .gpu/english_tokens.npy --out benchmarks/results/fp8_convergence

Writes ``<out>.json`` (per-step losses, summary, GPU and versions) and ``<out>.png`` (the curves).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import numpy as np
import torch
from transformers import LlamaConfig

from te_llama import TELlamaForCausalLM
from te_llama.fp8 import FP8Config, FP8ConfigError, describe

MODEL = dict(vocab_size=49152, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
             num_attention_heads=12, num_key_value_heads=4, head_dim=64, max_position_embeddings=2048,
             rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=100000.0, bos_token_id=1, eos_token_id=2)


def batches(tokens: np.ndarray, steps: int, batch: int, seq: int, seed: int) -> np.ndarray:
    starts = np.random.default_rng(seed).integers(0, len(tokens) - seq - 1, size=(steps, batch))
    return starts[..., None] + np.arange(seq)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(variant: str, args, train_tokens: torch.Tensor, eval_tokens: torch.Tensor) -> dict:
    torch.manual_seed(args.seed)
    model = TELlamaForCausalLM.from_config(LlamaConfig(**MODEL), dtype=torch.float32, device="cuda",
                                           backend="te")
    recipe = None
    if variant != "bf16":
        try:
            model.enable_fp8(FP8Config(recipe=variant))
        except FP8ConfigError as error:
            return {"variant": variant, "skipped": str(error)}
        recipe = describe(model.fp8_config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    index = torch.from_numpy(batches(train_tokens.numpy(), args.steps, args.batch, args.seq, args.seed)).cuda()
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
            print(f"{variant:8s} step {step:4d} loss {losses[-1].item():.4f}", flush=True)
    torch.cuda.synchronize()
    elapsed = sum(times)
    losses = [x.item() for x in losses]
    model.eval()
    eval_index = torch.from_numpy(batches(eval_tokens.numpy(), 16, args.batch, args.seq, args.seed + 1)).cuda()
    eval_data = eval_tokens.cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        eval_loss = statistics.mean(model(input_ids=eval_data[i], labels=eval_data[i]).loss.item()
                                    for i in eval_index)
    window = losses[-args.smooth:]
    return {"variant": variant, "recipe": recipe, "parameters": parameters, "losses": losses,
            "final_smoothed_loss": statistics.mean(window), "eval_loss_bf16": eval_loss,
            "nan_or_inf": not all(math.isfinite(x) for x in losses), "mean_step_ms": 1000 * elapsed / args.steps,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def plot(results: list[dict], path: str, smooth: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, height_ratios=(3, 1.3))
    runs = [r for r in results if "losses" in r]
    base = np.convolve(runs[0]["losses"], np.ones(smooth) / smooth, mode="valid")
    for run in runs:
        curve = np.convolve(run["losses"], np.ones(smooth) / smooth, mode="valid")
        steps = np.arange(len(curve)) + smooth
        top.plot(steps, curve, label=run["recipe"] or "BF16", linewidth=1.2)
        bottom.plot(steps, 100 * (curve / base - 1), linewidth=1.0)
    top.set_ylabel(f"training loss ({smooth}-step mean)")
    top.legend()
    top.grid(alpha=0.3)
    bottom.set_ylabel("vs BF16 (%)")
    bottom.set_xlabel("step")
    bottom.axhline(1.5, color="grey", linestyle=":")
    bottom.axhline(-1.5, color="grey", linestyle=":")
    bottom.grid(alpha=0.3)
    fig.suptitle(f"113M Llama from scratch on English text, FP8 vs BF16 ({torch.cuda.get_device_name()})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", required=True)
    parser.add_argument("--out", required=True, help="path prefix for .json and .png")
    parser.add_argument("--variants", default="bf16,delayed,current,block,mxfp8")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--smooth", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    tokens = torch.from_numpy(np.load(args.tokens).astype(np.int64))
    split = int(len(tokens) * 0.95)
    results = [train(v, args, tokens[:split], tokens[split:]) for v in args.variants.split(",")]
    base = results[0]["final_smoothed_loss"]
    for run in results:
        if "losses" in run:
            run["vs_bf16_percent"] = 100 * (run["final_smoothed_loss"] / base - 1)
            run["within_1_5_percent"] = abs(run["vs_bf16_percent"]) <= 1.5 and not run["nan_or_inf"]
    import transformer_engine
    import transformers

    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "transformers": transformers.__version__, "transformer_engine": transformer_engine.__version__,
              "settings": vars(args), "tokens_train": split, "tokens_eval": len(tokens) - split, "runs": results}
    with open(args.out + ".json", "w") as handle:
        json.dump(report, handle, indent=1)
    plot(results, args.out + ".png", args.smooth)
    print(f"\n{'variant':10s} {'recipe':48s} {'final loss':>10s} {'vs BF16':>8s} {'eval':>7s} {'ms/step':>8s}")
    for run in results:
        if "skipped" in run:
            print(f"{run['variant']:10s} skipped: {run['skipped']}")
            continue
        print(f"{run['variant']:10s} {run['recipe'] or 'BF16':48s} {run['final_smoothed_loss']:10.4f} "
              f"{run.get('vs_bf16_percent', 0):+7.2f}% {run['eval_loss_bf16']:7.4f} {run['mean_step_ms']:8.1f}")


if __name__ == "__main__":
    main()
