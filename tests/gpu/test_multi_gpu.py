"""Two GPUs: DDP training in FP8 keeps the processes identical and trains as one GPU does on the same global batch,
``te-llama finetune`` runs under ``torchrun`` (with and without CUDA graphs), CUDA graphs in a plain DDP loop
compute what eager DDP does, also where one process's batch has padding;
``nn.DataParallel`` is refused with advice.
Skipped on a machine with one GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

import small_llama
from te_llama.training.distributed import DataParallelError

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")]
ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "TE_LLAMA_BACKEND": "te"}  # tests/conftest.py defaults CPU tests to the reference


def launch(tmp_path, name, launcher, *flags):
    command = [*launcher, str(ROOT / "tests" / "gpu" / "ddp_train.py"), "--out", str(tmp_path / name), *flags]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)


def train(tmp_path, name, launcher, *flags):
    result = launch(tmp_path, name, launcher, *flags)
    errors = [line for line in result.stderr.splitlines() if "Error" in line or "error" in line]
    assert result.returncode == 0, "\n".join(errors[:20]) + result.stderr[-2000:]
    out = tmp_path / name
    return json.loads((out / "result.json").read_text()), torch.load(out / "first_grads.pt")


@pytest.mark.parametrize("recipe", ["off", "delayed", "current"])
def test_ddp_keeps_processes_identical_and_trains_as_one_gpu(tmp_path, record, recipe):
    two, two_grads = train(tmp_path, "two", TORCHRUN, "--fp8", recipe)
    one, one_grads = train(tmp_path, "one", [sys.executable], "--fp8", recipe)
    first, second = two["processes"]
    worst = max(small_llama.rel(two_grads[name], one_grads[name]) for name in one_grads)
    loss_gap = max(abs(a - b) / b for a, b in zip(two["losses"], one["losses"]))
    record(test="ddp", recipe=recipe, losses_two_gpus=two["losses"], losses_one_gpu=one["losses"],
           worst_loss_gap=loss_gap, worst_first_grad_rel=worst)
    assert two["world"] == 2 and two["recipe"] == (None if recipe == "off" else recipe)
    assert first["weights"] == second["weights"]  # DDP: the same weights in every process, bit for bit
    if recipe == "delayed":  # amaxes reduced over both processes, though each saw other tokens
        assert first["fp8_state"] == second["fp8_state"]
    assert two["losses"][-1] < 0.9 * two["losses"][0]  # it learns the batch
    assert loss_gap < 0.05  # and tracks one GPU on the whole batch
    if recipe == "off":  # BF16: the averaged gradients are one GPU's to rounding (FP8 adds its own noise)
        assert worst < 0.02


@pytest.mark.parametrize("recipe,pad_steps,layers", [("off", "", 2), ("delayed", "", 2), ("delayed", "0,3", 2),
                                                     ("delayed", "", 6)],
                         ids=["off", "delayed", "delayed-padding", "delayed-6-layers"])
def test_ddp_with_cuda_graphs_trains_as_eager_ddp(tmp_path, record, recipe, pad_steps, layers):
    """``pad_steps``: at steps 0 and 3 the second process's batch has padding, so both processes run those steps
    eagerly (replayed and eager layers make different collectives; the HF Trainer hung on it) and record the graphs
    at step 0. Under DDP a 6-layer stack is recorded in 4 graphs (cuda_graphs.split_stack), a 2-layer one in 2."""
    flags = ["--layers", str(layers)] + (["--pad-steps", pad_steps] if pad_steps else [])
    graphs, graphs_grads = train(tmp_path, "graphs", TORCHRUN, "--fp8", recipe, "--graphs", *flags)
    eager, eager_grads = train(tmp_path, "eager", TORCHRUN, "--fp8", recipe, *flags)
    first, second = graphs["processes"]
    loss_gap = max(abs(a - b) / b for a, b in zip(graphs["losses"], eager["losses"]))
    worst = max(small_llama.rel(graphs_grads[name], eager_grads[name]) for name in eager_grads)
    record(test="ddp_graphs", recipe=recipe, pad_steps=pad_steps, layers=layers, losses_graphs=graphs["losses"],
           losses_eager=eager["losses"], worst_loss_gap=loss_gap, worst_first_grad_rel=worst,
           replays=graphs["graph_replays"],
           same_weights_as_eager=graphs["processes"][0]["weights"] == eager["processes"][0]["weights"])
    padded = len(pad_steps.split(",")) if pad_steps else 0
    assert graphs["graph_replays"] == len(graphs["losses"]) - padded  # every step without padding anywhere replayed
    assert first["weights"] == second["weights"] and first["fp8_state"] == second["fp8_state"]
    assert loss_gap < 1e-3 and worst < 1e-2  # the graphs compute what eager DDP computes


def test_cuda_graphs_enabled_after_ddp_wrapped_the_model_give_advice(tmp_path):
    result = launch(tmp_path, "late", TORCHRUN, "--fp8", "delayed", "--graphs-after-ddp")
    assert result.returncode != 0
    assert "call model.enable_cuda_graphs() after torch.distributed.init_process_group() and before wrapping" \
        in result.stderr


def test_data_parallel_is_refused_with_advice():
    model = small_llama.model()
    ids = small_llama.batch(0)
    with pytest.raises(DataParallelError, match="torchrun --nproc_per_node N"):
        torch.nn.DataParallel(model)(input_ids=ids, labels=ids)


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_finetune_under_torchrun_on_two_gpus(small_checkpoint, tmp_path, record, graphs):
    out = tmp_path / "run"
    command = [*TORCHRUN, "-m", "te_llama", "finetune", "--model", str(small_checkpoint), "--data",
               str(ROOT / "README.md"), "--output", str(out), "--fp8", "delayed", "--seq-len", "128",
               "--batch-tokens", "1024", "--max-steps", "40", "--learning-rate", "1e-3", "--max-eval-blocks", "4",
               "--sample-tokens", "8"] + (["--cuda-graphs"] if graphs else [])
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=400)
    errors = [line for line in result.stderr.splitlines() if "Error" in line or "error" in line]
    assert result.returncode == 0, "\n".join(errors[:20]) + result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    record(test="finetune_torchrun", graphs=graphs, device=summary["device"], tokens=summary["tokens"],
           tokens_per_s=summary["tokens_per_s"], replays=summary["cuda_graph_replays"],
           perplexity=(summary["eval_perplexity_before"], summary["eval_perplexity_after"]),
           peak_gpu_memory_gib=summary["peak_gpu_memory_gib"])
    if graphs:  # the data's last, padded block made a few steps eager in both processes (it hung them before)
        assert 30 <= summary["cuda_graph_replays"] < 40
    assert result.stdout.count("te-llama finetune:") == 1 and result.stdout.count("saved HF checkpoint") == 1
    assert summary["processes"] == 2 and summary["fp8_recipe"] == "delayed" and summary["steps"] == 40
    assert summary["ddp"] == {"gradient_as_bucket_view": True}  # te_llama.training.distributed.DDP_OPTIONS reached DDP
    assert summary["tokens"] == 40 * 1024  # --batch-tokens is the step's, shared by the two processes
    assert summary["eval_perplexity_after"] < summary["eval_perplexity_before"]
    assert LlamaForCausalLM.from_pretrained(out).config.architectures == ["LlamaForCausalLM"]


def test_finetune_in_one_process_seeing_two_gpus_trains_on_one(small_checkpoint, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "te_llama", "finetune", "--model", str(small_checkpoint), "--data",
               str(ROOT / "README.md"), "--output", str(out), "--seq-len", "128", "--batch-tokens", "1024",
               "--max-steps", "6", "--max-eval-blocks", "2", "--sample-tokens", "4"]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 GPUs visible, training on one: to train on all of them run torchrun --nproc_per_node 2" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 1 and summary["steps"] == 6 and summary["tokens"] == 6 * 1024
