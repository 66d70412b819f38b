"""``te-llama bench --generation``: greedy generation speed and memory against HF, side by side on one GPU.

Each (variant, shape) runs in its own process, one after the other. A row: time to first token (the prompt's
forward and one token), decode ms per token and tokens/s over the remaining new tokens, and peak memory. Random
weights and prompts; ``min_new_tokens`` equals ``max_new_tokens``, so every row generates the same count.

Variants: ``hf_dynamic`` (HF with its default ``DynamicCache``), ``hf_static_compile`` (HF's fast path: a static
cache, whose decode step ``generate()`` compiles itself; skipped with the reason where it fails), ``te_bf16``
(te-llama with HF's cache, :mod:`te_llama.model.kv_cache`) and ``te_bf16_graphs`` (te-llama on a static cache, its
decode step a CUDA graph: :mod:`te_llama.generation.decode_graphs`; on the CPU the graph's eager stand-in, so the
row only shows that the path runs), ``te_fp8_current`` (te-llama in FP8 with current scaling, ``in_eval=True``, on
HF's cache: the weights cast to FP8 once per ``generate()`` call; a GPU's only) and ``te_fp8_current_graphs`` (that,
on a static cache with decode graphs); ``te_fp8_current_fp8weights`` and ``te_fp8_current_graphs_fp8weights`` are
those two with the decoder's weights kept in FP8 only (:meth:`te_llama.TELlamaForCausalLM.quantize_frozen_weights`).
Rows of the ``_graphs`` variants count the steps the recorded step served.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass

import torch

from te_llama.bench.row_runner import check_names, run_row, run_rows
from te_llama.bench.suite import LLAMA3_8B, RESULT_PREFIX

LLAMA32_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=64, rope_theta=500000.0, max_position_embeddings=8192,
                  rms_norm_eps=1e-5, tie_word_embeddings=True)
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=False)


@dataclass(frozen=True)
class GenerationShape:
    config: dict
    layers: int
    batch: int
    prompt: int = 128
    new_tokens: int = 128

    def llama_config(self):
        from transformers import LlamaConfig

        return LlamaConfig(**{**self.config, "num_hidden_layers": self.layers, "eos_token_id": None,
                              "bos_token_id": None, "pad_token_id": 0})


SHAPES = {
    "1B-b1": GenerationShape(LLAMA32_1B, 16, 1), "1B-b16": GenerationShape(LLAMA32_1B, 16, 16),
    "1B-b64": GenerationShape(LLAMA32_1B, 16, 64), "8B-b1": GenerationShape(LLAMA3_8B, 32, 1),
    "8B-b16": GenerationShape(LLAMA3_8B, 32, 16), "8B-b64": GenerationShape(LLAMA3_8B, 32, 64),
    "tiny": GenerationShape(TINY, 2, 2, prompt=16, new_tokens=32),
}
FP8_VARIANTS = ("te_fp8_current", "te_fp8_current_graphs", "te_fp8_current_fp8weights",
                "te_fp8_current_graphs_fp8weights")
VARIANTS = ("hf_dynamic", "hf_static_compile", "te_bf16", "te_bf16_graphs") + FP8_VARIANTS
BASELINE = "hf_dynamic"


def build(variant: str, shape: GenerationShape, device: torch.device):
    from transformers import LlamaForCausalLM

    from te_llama.model.modeling import TELlamaForCausalLM, default_dtype
    from te_llama.training.fp8 import FP8Config

    config = shape.llama_config()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    if variant.startswith("te_"):
        fp8 = FP8Config(recipe="current", in_eval=True) if variant in FP8_VARIANTS else None
        model = TELlamaForCausalLM.from_config(config, dtype=dtype, device=device, fp8=fp8).eval()
        if variant.endswith("_fp8weights"):
            model.requires_grad_(False).quantize_frozen_weights(for_training=False)
        if "_graphs" in variant:
            model.generation_config.cache_implementation = "static"
            model.enable_decode_graphs(capture=device.type == "cuda")
        return model
    config._attn_implementation = "sdpa"
    with default_dtype(dtype), torch.device(device):
        model = LlamaForCausalLM(config).eval()
    if variant == "hf_static_compile":
        model.generation_config.cache_implementation = "static"
    return model


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_generate(model, ids: torch.Tensor, new_tokens: int) -> float:
    """Seconds of one greedy ``generate()`` of exactly ``new_tokens`` tokens."""
    _synchronize(ids.device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    _synchronize(ids.device)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return time.perf_counter() - start


def run(variant: str, shape_name: str, repeats: int = 3) -> dict:
    shape = SHAPES[shape_name]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if variant in FP8_VARIANTS and device.type != "cuda":
        return {"variant": variant, "shape": shape_name, "status": "skipped", "reason": "FP8 needs a GPU"}
    model = build(variant, shape, device)
    ids = torch.randint(1, shape.config["vocab_size"], (shape.batch, shape.prompt), device=device,
                        generator=torch.Generator(device).manual_seed(1))
    timed_generate(model, ids, shape.new_tokens)  # warm-up: kernels, compilation, the static cache's allocation
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # Each repeat times the first token and the whole generation back to back; the decode time is the median of
    # their differences, which a slow moment in one of two separate minima cannot turn negative on a busy host.
    pairs = [(timed_generate(model, ids, 1), timed_generate(model, ids, shape.new_tokens)) for _ in range(repeats)]
    first = min(pair[0] for pair in pairs)
    decode_ms = 1000 * statistics.median(whole - one for one, whole in pairs) / (shape.new_tokens - 1)
    row = {"variant": variant, "shape": shape_name, "status": "ok", "batch": shape.batch, "prompt": shape.prompt,
           "new_tokens": shape.new_tokens, "time_to_first_token_ms": 1000 * first, "ms_per_token": decode_ms,
           "tokens_per_s": shape.batch * 1000 / decode_ms,
           "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
    if variant.endswith("_graphs"):  # that the steps ran as the recorded step, not eagerly
        row["decode_graph_replays"] = model.decode_graph_replays()
    return row


def add_ratios(rows: list[dict]) -> None:
    """Each row's decode speed-up and memory against ``hf_dynamic`` of the same shape."""
    base = {row["shape"]: row for row in rows if row["variant"] == BASELINE and row["status"] == "ok"}
    for row in rows:
        reference = base.get(row["shape"])
        if row["status"] == "ok" and reference:
            row["speedup_vs_hf_dynamic"] = reference["ms_per_token"] / row["ms_per_token"]
            if row["peak_memory_gib"] and reference["peak_memory_gib"]:
                row["memory_vs_hf_dynamic"] = row["peak_memory_gib"] / reference["peak_memory_gib"]


def format_row(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['shape']:7s} {row['variant']:22s} {row['status']}: {row.get('reason', '')}"
    speedup = f"{row['speedup_vs_hf_dynamic']:6.2f}x" if "speedup_vs_hf_dynamic" in row else f"{'':7s}"
    memory = f"{row['peak_memory_gib']:8.2f}" if row["peak_memory_gib"] is not None else f"{'-':>8s}"
    return (f"{row['shape']:7s} {row['variant']:22s} {row['time_to_first_token_ms']:9.1f} {row['ms_per_token']:9.2f} "
            f"{speedup} {row['tokens_per_s']:9.0f} {memory}")


HEADER = f"{'shape':7s} {'variant':22s} {'TTFT ms':>9s} {'ms/token':>9s} {'speedup':>7s} {'tokens/s':>9s} {'peak GiB':>8s}"


def bench_generation(shapes: str, variants: str, output: str, timeout: int = 600) -> list[dict]:
    """Run the generation suite, print the table, write ``output`` (JSON with GPU and versions)."""
    shape_list, variant_list = shapes.split(","), variants.split(",")
    check_names("shape", shape_list, SHAPES, "generation")
    check_names("variant", variant_list, VARIANTS, "generation")

    def row(variant: str, shape: str) -> dict:  # HF's fast path where it fails is a skip, with the reason
        return run_row("te_llama.bench.generation", variant, shape, [], timeout,
                       lambda reason: "skipped" if variant == "hf_static_compile" else "failed")

    return run_rows(f"te-llama bench --generation --shapes {shapes} --variants {variants}", shape_list, variant_list,
                    row, add_ratios, HEADER, format_row, output)


def main() -> None:
    parser = argparse.ArgumentParser(description="one generation benchmark row (internal: te-llama bench --generation)")
    parser.add_argument("--worker", required=True, choices=VARIANTS)
    parser.add_argument("--shape", required=True, choices=list(SHAPES))
    args = parser.parse_args()
    print(RESULT_PREFIX + json.dumps(run(args.worker, args.shape)), flush=True)


if __name__ == "__main__":
    main()
