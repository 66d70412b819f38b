"""``te-llama bench --packed``: supervised fine-tuning on documents of very different lengths, side by side.

Documents are runs of real text (gensim's Wikipedia excerpt, SmolLM2's tokenizer) whose lengths are drawn from a
log-normal distribution (median 400 tokens) clipped to 64..4,096, the same stream for every variant. A step holds
at most ``budget`` tokens, padding included:

- ``hf_bf16_padded``: HF BF16 (SDPA), documents as rows padded to the longest, as many rows as the budget allows;
- ``hf_bf16_padding_free``: HF BF16 (SDPA) on one row of ``budget`` tokens of concatenated documents (the last
  one cut to fit) with restarting
  ``position_ids`` (what ``DataCollatorWithFlattening`` and TRL's ``padding_free=True`` give), HF's own
  padding-free path;
- ``te_bf16_padding_free``, ``te_fp8_padding_free`` (delayed scaling): te-llama on that same row, run as TE's
  padding-free ``thd`` stream (:mod:`te_llama.model.packed`); ``te_fp8_padding_free_graphs``: that with CUDA
  graphs, which the fixed budget lets replay for every step's documents (:mod:`te_llama.training.cuda_graphs`).

A row: real tokens per second over the timed steps (padding never counts), ms per step, peak memory, and ratios
against both HF rows. Forward with labels, backward and AdamW step, random weights; each variant in its own process.
The token ids come from ``$TE_LLAMA_CACHE/bench_corpus.pt``, written on first use (it needs gensim and the
embedded SmolLM2 tokenizer once; copy the file to run elsewhere).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass

import torch

from te_llama.bench.row_runner import check_names, run_row, run_rows
from te_llama.bench.suite import LLAMA3_8B, RESULT_PREFIX

TINY = dict(vocab_size=49152, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=False)
VARIANTS = ("hf_bf16_padded", "hf_bf16_padding_free", "te_bf16_padding_free", "te_fp8_padding_free",
            "te_fp8_padding_free_graphs")
BASELINES = ("hf_bf16_padded", "hf_bf16_padding_free")
CORPUS_FILE = "bench_corpus.pt"


@dataclass(frozen=True)
class PackedShape:
    config: dict
    layers: int
    budget: int  # real tokens per step
    min_length: int = 64
    max_length: int = 4096
    median_length: int = 400

    def llama_config(self):
        from transformers import LlamaConfig

        return LlamaConfig(**{**self.config, "num_hidden_layers": self.layers})


SHAPES = {"8B": PackedShape(LLAMA3_8B, 8, 8192),
          "tiny": PackedShape(TINY, 2, 256, min_length=8, max_length=96, median_length=24)}


def corpus_tokens() -> torch.Tensor:
    """Token ids of the whole corpus (cached in te-llama's cache directory)."""
    from te_llama.commands.assets import cache_dir, smollm2_checkpoint, wiki_articles

    path = cache_dir() / CORPUS_FILE
    if not path.is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint())
        ids = [token for article in wiki_articles() for token in tokenizer(article).input_ids]
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        torch.save(torch.tensor(ids, dtype=torch.int32), partial)
        os.replace(partial, path)
    return torch.load(path)


def document_stream(shape: PackedShape, seed: int = 0):
    """Documents of consecutive corpus text with log-normal lengths, endlessly (the corpus wraps around)."""
    tokens = corpus_tokens()
    generator = torch.Generator().manual_seed(seed)
    cursor = 0
    while True:
        drawn = math.exp(math.log(shape.median_length) + torch.randn((), generator=generator).item())
        length = max(shape.min_length, min(shape.max_length, round(drawn)))
        if cursor + length > len(tokens):
            cursor = 0
        yield tokens[cursor:cursor + length].long()
        cursor += length


def steps_of_documents(shape: PackedShape, steps: int, padded: bool) -> list[list[torch.Tensor]]:
    """The documents of each of ``steps`` steps: padded rows (rows x longest <= budget), or documents filling
    exactly ``budget`` tokens, the last one cut."""
    stream, result, pending = document_stream(shape), [], None
    for _ in range(steps):
        documents = []
        while True:
            doc = pending if pending is not None else next(stream)
            pending = None
            if padded:
                if documents and (len(documents) + 1) * max(len(doc), *map(len, documents)) > shape.budget:
                    pending = doc
                    break
                documents.append(doc)
            else:
                room = shape.budget - sum(map(len, documents))
                documents.append(doc[:room])
                if len(doc) >= room:
                    break
        result.append(documents)
    return result


def padded_batch(documents: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    width = max(len(doc) for doc in documents)
    ids = torch.zeros(len(documents), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, doc in enumerate(documents):
        ids[row, :len(doc)], mask[row, :len(doc)] = doc, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def flat_batch(documents: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """What ``DataCollatorWithFlattening`` makes: one row, position ids restarting, no label across documents."""
    ids = torch.cat(documents)[None]
    positions = torch.cat([torch.arange(len(doc)) for doc in documents])[None]
    labels = ids.masked_fill(positions == 0, -100)
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


def build(variant: str, shape: PackedShape, device: torch.device):
    from transformers import LlamaForCausalLM

    from te_llama.model.modeling import TELlamaForCausalLM, default_dtype

    config = shape.llama_config()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    if variant.startswith("te_"):
        fp8 = "delayed" if variant.startswith("te_fp8") and device.type == "cuda" else None
        model = TELlamaForCausalLM.from_config(config, dtype=dtype, device=device, fp8=fp8).train()
        return model.enable_cuda_graphs() if variant.endswith("_graphs") else model
    config._attn_implementation, config.use_cache = "sdpa", False
    with default_dtype(dtype), torch.device(device):
        return LlamaForCausalLM(config).train()


def run(variant: str, shape_name: str, steps: int = 8, warmup: int = 3) -> dict:
    shape = SHAPES[shape_name]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if variant.endswith("_graphs") and device.type != "cuda":
        return {"variant": variant, "shape": shape_name, "status": "skipped", "reason": "CUDA graphs need a GPU"}
    model = build(variant, shape, device)
    padded = variant == "hf_bf16_padded"
    batches = [{k: v.to(device) for k, v in (padded_batch if padded else flat_batch)(docs).items()}
               for docs in steps_of_documents(shape, warmup + steps, padded)]
    if variant.startswith("te_") and device.type == "cuda":
        from te_llama.training.adamw import AdamW

        optimizer = AdamW(model.parameters(), lr=1e-5)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")

    def step(batch):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for batch in batches[:warmup]:
        step(batch)
    synchronize()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for batch in batches[warmup:]:
        loss = step(batch)
    synchronize()
    seconds = time.perf_counter() - start
    timed = batches[warmup:]
    real = sum(int((b["attention_mask"] if padded else b["input_ids"] >= 0).sum()) for b in timed)
    return {"variant": variant, "shape": shape_name, "status": "ok", "budget": shape.budget, "timed_steps": steps,
            "documents_per_step": sum(len(b["input_ids"]) if padded else int((b["position_ids"] == 0).sum())
                                      for b in timed) / steps,
            "real_tokens_per_step": real / steps,
            "ms_per_step": 1000 * seconds / steps, "real_tokens_per_s": real / seconds,
            "final_loss": float(loss),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def add_ratios(rows: list[dict]) -> None:
    """Each row's real tokens/s and peak memory against each HF row of the same shape."""
    for baseline in BASELINES:
        base = {row["shape"]: row for row in rows if row["variant"] == baseline and row["status"] == "ok"}
        for row in rows:
            reference = base.get(row["shape"])
            if row["status"] == "ok" and reference:
                row[f"speedup_vs_{baseline}"] = row["real_tokens_per_s"] / reference["real_tokens_per_s"]
                if row["peak_memory_gib"] and reference["peak_memory_gib"]:
                    row[f"memory_vs_{baseline}"] = row["peak_memory_gib"] / reference["peak_memory_gib"]


HEADER = (f"{'shape':5s} {'variant':22s} {'ms/step':>9s} {'real tok/s':>11s} {'vs padded':>9s} {'vs pad-free':>11s} "
          f"{'peak GiB':>8s}")


def format_row(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['shape']:5s} {row['variant']:22s} {row['status']}: {row.get('reason', '')}"

    def ratio(key):
        return f"{row[key]:8.2f}x" if key in row else f"{'':9s}"

    memory = f"{row['peak_memory_gib']:8.2f}" if row["peak_memory_gib"] is not None else f"{'-':>8s}"
    return (f"{row['shape']:5s} {row['variant']:22s} {row['ms_per_step']:9.1f} {row['real_tokens_per_s']:11.0f} "
            f"{ratio('speedup_vs_hf_bf16_padded')} {ratio('speedup_vs_hf_bf16_padding_free'):>11s} {memory}")


def bench_packed(shapes: str, variants: str, output: str, steps: int = 8, warmup: int = 3,
                 timeout: int = 600) -> list[dict]:
    """Run the padding-free fine-tuning suite, print the table, write ``output`` (JSON with GPU and versions)."""
    shape_list, variant_list = shapes.split(","), variants.split(",")
    check_names("shape", shape_list, SHAPES, "packed")
    check_names("variant", variant_list, VARIANTS, "packed")
    corpus_tokens()  # tokenized once here, not in every worker

    def row(variant: str, shape: str) -> dict:
        return run_row("te_llama.bench.packed_sft", variant, shape, ["--steps", str(steps), "--warmup", str(warmup)],
                       timeout, lambda reason: "oom" if "OutOfMemory" in reason else "failed")

    return run_rows(f"te-llama bench --packed --shapes {shapes} --variants {variants}", shape_list, variant_list, row,
                    add_ratios, HEADER, format_row, output)


def main() -> None:
    parser = argparse.ArgumentParser(description="one packed fine-tuning row (internal: te-llama bench --packed)")
    parser.add_argument("--worker", required=True, choices=VARIANTS)
    parser.add_argument("--shape", required=True, choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    print(RESULT_PREFIX + json.dumps(run(args.worker, args.shape, args.steps, args.warmup)), flush=True)


if __name__ == "__main__":
    main()
