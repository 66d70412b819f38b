"""Two GPUs: DDP training in FP8 keeps the processes identical and matches one GPU on the same global batches, and
``te-llama finetune`` runs under ``torchrun``. Skipped on a machine with one GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from small_llama import rel

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")]
ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "TE_LLAMA_BACKEND": "te"}  # tests/conftest.py defaults CPU tests to the reference


def train(tmp_path, name, launcher, *flags):
    out = tmp_path / name
    command = [*launcher, str(ROOT / "tests" / "gpu" / "ddp_train.py"), "--out", str(out), *flags]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "result.json").read_text()), torch.load(out / "weights.pt")


@pytest.mark.parametrize("recipe, graphs", [("delayed", False), ("delayed", True), ("current", False)])
def test_ddp_fp8_keeps_processes_identical_and_matches_one_gpu(tmp_path, record, recipe, graphs):
    flags = ["--fp8", recipe] + (["--graphs"] if graphs else [])
    two, two_weights = train(tmp_path, "two", TORCHRUN, *flags)
    one, one_weights = train(tmp_path, "one", [sys.executable], *flags)
    first, second = two["processes"]
    worst = max(rel(two_weights[name], one_weights[name]) for name in one_weights)
    loss_gap = max(abs(a - b) / b for a, b in zip(two["losses"], one["losses"]))
    record(test="ddp_fp8", recipe=recipe, graphs=graphs, losses_two_gpus=two["losses"], losses_one_gpu=one["losses"],
           worst_loss_gap=loss_gap, worst_weight_rel=worst, graph_replays=first["graph_replays"])
    assert two["recipe"] == recipe and two["world"] == 2
    assert first["weights"] == second["weights"]  # DDP: the same weights in every process, bit for bit
    if recipe == "delayed":  # amaxes reduced over both processes, though each saw other tokens
        assert first["fp8_state"] == second["fp8_state"]
    if graphs:
        assert first["graph_replays"] == second["graph_replays"] > 0
    assert two["losses"][-1] < two["losses"][0] - 0.5  # it learns
    assert loss_gap < 0.01 and worst < 0.02  # the same training as one GPU on the whole batch, to FP8 rounding


@pytest.fixture
def small_checkpoint(tmp_path):
    """A random 2-layer Llama with a byte-level BPE tokenizer trained on the README (no hub, no GGUF here)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    text = (ROOT / "README.md").read_text()
    tokenizer.train_from_iterator(text.splitlines(), trainers.BpeTrainer(
        vocab_size=1024, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    directory = tmp_path / "model"
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(directory)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1408, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    return directory


def test_finetune_under_torchrun_on_two_gpus(small_checkpoint, tmp_path, record):
    out = tmp_path / "run"
    command = [*TORCHRUN, "-m", "te_llama", "finetune", "--model", str(small_checkpoint), "--data",
               str(ROOT / "README.md"), "--output", str(out), "--fp8", "delayed", "--cuda-graphs", "--seq-len", "128",
               "--batch-tokens", "1024", "--max-steps", "40", "--learning-rate", "1e-3", "--max-eval-blocks", "4",
               "--sample-tokens", "8"]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    record(test="finetune_torchrun", device=summary["device"], tokens=summary["tokens"],
           tokens_per_s=summary["tokens_per_s"], replays=summary["cuda_graph_replays"],
           perplexity=(summary["eval_perplexity_before"], summary["eval_perplexity_after"]))
    assert result.stdout.count("te-llama finetune:") == 1 and result.stdout.count("saved HF checkpoint") == 1
    assert summary["processes"] == 2 and summary["fp8_recipe"] == "delayed" and summary["steps"] == 40
    assert summary["tokens"] == 40 * 1024  # --batch-tokens is the step's, shared by the two processes
    assert summary["cuda_graph_replays"] > 0
    assert summary["eval_perplexity_after"] < summary["eval_perplexity_before"]
    assert LlamaForCausalLM.from_pretrained(out).config.architectures == ["LlamaForCausalLM"]
