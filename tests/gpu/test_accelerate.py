"""The plain-loop example under `accelerate launch` on one GPU, in FP8, with gradient accumulation."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1408, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "model")
    pattern = np.random.default_rng(0).integers(0, 2048, 97)  # a repeating pattern: learnable in a few steps
    np.save(tmp_path / "tokens.npy", np.tile(pattern, 2000).astype(np.uint16))
    return tmp_path


def launch(tmp_path, mixed_precision):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--mixed_precision",
               mixed_precision, str(ROOT / "examples" / "train_loop.py"), "--model", str(tmp_path / "model"),
               "--tokens", str(tmp_path / "tokens.npy"), "--fp8", "delayed", "--steps", "6", "--lr", "1e-3"]
    env = {**os.environ, "TE_LLAMA_BACKEND": "te"}  # tests/conftest.py defaults CPU tests to the reference
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def test_accelerate_launch_bf16_with_te_llama_fp8(checkpoint, record):
    result = launch(checkpoint, "bf16")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("step")]
    record(test="accelerate_launch", output="; ".join(lines[::2]))
    assert "in delayed" in result.stdout and len(lines) == 6
    first, last = float(lines[0].split()[3]), float(lines[-1].split()[3])
    assert last < first


def test_accelerate_fp8_mode_is_refused_with_advice(checkpoint):
    result = launch(checkpoint, "fp8")
    assert result.returncode != 0 and "--mixed_precision bf16" in result.stderr
