"""``te-llama finetune --lora`` on TE in FP8: the command as a user runs it, on the small checkpoint (the embedded
SmolLM2 needs the ``gguf`` package and its 98 MB file, which a GPU image may lack)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

pytestmark = pytest.mark.gpu
peft = pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "TE_LLAMA_BACKEND": "te"}  # tests/conftest.py defaults CPU tests to the reference


def test_finetune_lora_in_fp8_writes_an_adapter_plain_hf_loads(small_checkpoint, tmp_path, record):
    out = tmp_path / "lora"
    command = [sys.executable, "-m", "te_llama", "finetune", "--lora", "8", "--merge-lora", "--model",
               str(small_checkpoint), "--data", str(ROOT / "README.md"), "--output", str(out), "--fp8", "delayed",
               "--seq-len", "128", "--batch-tokens", "1024", "--max-steps", "30", "--eval-every", "15",
               "--learning-rate", "2e-3", "--max-eval-blocks", "4", "--sample-tokens", "8"]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    record(test="finetune_lora_fp8", perplexity=(summary["eval_perplexity_before"], summary["eval_perplexity_after"]),
           tokens_per_s=summary["tokens_per_s"], peak_gpu_memory_gib=summary.get("peak_gpu_memory_gib"))
    assert summary["status"] == "completed" and summary["steps"] == 30 and summary["backend"] == "te"
    assert summary["fp8_recipe"] == "delayed" and summary["lora"]["rank"] == 8
    assert summary["eval_perplexity_after"] < summary["eval_perplexity_before"]
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    # the adapter on plain HF + PEFT (BF16, no TE) gives the merged checkpoint's logits
    ids = torch.randint(0, 1024, (1, 32), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    base = LlamaForCausalLM.from_pretrained(small_checkpoint, dtype=torch.bfloat16).cuda().eval()
    plain = peft.PeftModel.from_pretrained(base, out).eval()
    merged = LlamaForCausalLM.from_pretrained(out / "merged", dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        expected, actual = plain(ids).logits.float(), merged(ids).logits.float()
    assert ((actual - expected).norm() / expected.norm()).item() < 2e-2
