"""``examples/train_loop.py`` on the CPU, started by torchrun in one process and in two (DDP over gloo, with
te-llama's DDP options; ``accelerate launch --cpu`` starts one process only). On GPUs with FP8 under ``accelerate
launch``: tests/gpu/test_accelerate.py."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import random_hf_model, tiny_config

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random 2-layer Llama and a token file with a repeating pattern, learnable in a few steps."""
    directory = tmp_path_factory.mktemp("example")
    config = tiny_config()
    random_hf_model(config).save_pretrained(directory / "model")
    pattern = np.random.default_rng(0).integers(0, config.vocab_size, 29)
    np.save(directory / "tokens.npy", np.tile(pattern, 200).astype(np.uint16))
    return directory


@pytest.mark.parametrize("processes", [1, 2])
def test_the_loop_trains_alone_and_under_ddp(checkpoint, processes):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = [*launcher, str(ROOT / "examples" / "train_loop.py"), "--model", str(checkpoint / "model"),
               "--tokens", str(checkpoint / "tokens.npy"), "--steps", "6", "--micro-batch", "2",
               "--accumulation", "2", "--seq", "32", "--lr", "3e-3"]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    if processes > 1:  # te_llama.training.distributed.DDP_OPTIONS reached DDP; one process prints
        assert "2 processes (DDP, gradient_as_bucket_view=True)" in result.stdout
    else:
        assert "DDP" not in result.stdout
    losses = [float(line.split()[3]) for line in result.stdout.splitlines() if line.startswith("step")]
    assert len(losses) == 6 and losses[-1] < losses[0]
