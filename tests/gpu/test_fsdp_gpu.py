"""FSDP2 on GPUs with Transformer Engine (``te_llama.training.fsdp``).

One GPU: the model sharded over one process (world size 1) trains as the unsharded model, in BF16 and in each FP8
recipe, with gradient checkpointing too; its sharded checkpoint restores weights, AdamW state and TE's FP8 scaling
state, so the resumed steps repeat the losses. Two GPUs (skipped with fewer): sharded training tracks one GPU on the
whole batch with the same FP8 state in both processes, and ``te-llama finetune --fsdp`` trains, resumes from its DCP
checkpoint and exports a plain HF checkpoint.

    CUDA_VISIBLE_DEVICES=0 pytest -m gpu tests/gpu/test_fsdp_gpu.py     # the one-GPU tests
    pytest -m gpu tests/gpu/test_fsdp_gpu.py -k two_gpus                # the two-GPU tests

Tolerances. World size 1 runs the same kernels on the same numbers as the unsharded model: FSDP's gather is a copy
and its BF16 cast a no-op on BF16 parameters, and the FP32 reduction of one process's gradients casts them back
unchanged. What is left is nondeterminism (attention's backward accumulates with atomics), which AdamW's steps and,
in FP8, a rounding flipped here and there can grow: losses within 1e-3 (BF16) and 1e-2 (FP8, TE's FP8 noise on this
model being some 1-2 % of a loss), first-step gradients within 1e-2 and 5e-2. Two GPUs change the arithmetic (each
process's mean loss, a reduce-scatter): losses within 5 % of one GPU, as the DDP test allows.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

import small_llama
from te_llama.training.fp8_state import COMPLETE_MARKER, FP8_STATE_FILE

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "fsdp_train.py"
ENV = {**os.environ, "TE_LLAMA_BACKEND": "te"}  # tests/conftest.py defaults CPU tests to the reference
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


def torchrun(processes: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]


def train(tmp_path, name, launcher, *flags):
    """``tests/fsdp_train.py`` on the GPU tests' small model; its result, first gradients and final weights."""
    out = tmp_path / name
    result = subprocess.run([*launcher, str(SCRIPT), "--model", "small", "--dtype", "bfloat16", "--steps", "8",
                             "--save-at", "4", "--out", str(out), *flags],
                            capture_output=True, text=True, env=ENV, timeout=400)
    errors = [line for line in result.stderr.splitlines() if "Error" in line or "error" in line]
    assert result.returncode == 0, "\n".join(errors[:20]) + result.stderr[-3000:]
    return (json.loads((out / "result.json").read_text()), torch.load(out / "first_grads.pt"),
            torch.load(out / "weights.pt"))


def gaps(sharded, unsharded, sharded_grads, unsharded_grads) -> tuple[float, float, str]:
    loss_gap = max(abs(a - b) / b for a, b in zip(sharded["losses"], unsharded["losses"]))
    worst, name = max((small_llama.rel(sharded_grads[n], unsharded_grads[n]), n) for n in unsharded_grads)
    return loss_gap, worst, name


def supported(recipe: str) -> None:
    if recipe == "mxfp8" and torch.cuda.get_device_capability()[0] < 10:
        pytest.skip("MXFP8 needs a Blackwell GPU (compute capability 10.0+)")


@pytest.mark.parametrize("recipe,flags", [("off", ()), ("delayed", ()), ("current", ()), ("block", ()),
                                          ("mxfp8", ()), ("delayed", ("--gradient-checkpointing",))],
                         ids=["bf16", "delayed", "current", "block", "mxfp8", "delayed-checkpointing"])
def test_one_sharded_gpu_trains_as_the_unsharded_model(tmp_path, record, recipe, flags):
    supported(recipe)
    sharded, sharded_grads, sharded_weights = train(tmp_path, "sharded", torchrun(1), "--fp8", recipe, *flags)
    unsharded, unsharded_grads, unsharded_weights = train(tmp_path, "unsharded", [sys.executable], "--fp8", recipe,
                                                          "--unsharded")
    loss_gap, worst, name = gaps(sharded, unsharded, sharded_grads, unsharded_grads)
    weights_gap = max(small_llama.rel(sharded_weights[n], unsharded_weights[n]) for n in unsharded_weights
                      if not n.endswith("_extra_state"))  # TE's FP8 state: compared through the losses
    resumed_gap = max(abs(a - b) / b for a, b in zip(sharded["resumed_losses"], sharded["losses"][4:]))
    record(test="fsdp_world_1", recipe=recipe, flags=list(flags), losses_sharded=sharded["losses"],
           losses_unsharded=unsharded["losses"], worst_loss_gap=loss_gap, worst_first_grad_rel=worst,
           worst_first_grad_param=name, worst_weight_rel=weights_gap, resumed_losses=sharded["resumed_losses"],
           worst_resumed_loss_gap=resumed_gap)
    fp8 = recipe != "off"
    assert sharded["world"] == 1 and sharded["losses"][-1] < 0.9 * sharded["losses"][0]  # it learns the batch
    assert loss_gap < (1e-2 if fp8 else 1e-3) and worst < (5e-2 if fp8 else 1e-2), (loss_gap, worst, name)
    assert weights_gap < (5e-2 if fp8 else 1e-2)
    assert sharded["fp8_state_tensors"] == unsharded["fp8_state_tensors"]
    assert (sharded["fp8_state_tensors"] > 0) == (recipe == "delayed")  # only delayed scaling keeps state
    assert sharded["fp8_state_loaded"] == sharded["fp8_state_saved"]  # the checkpoint restored it exactly
    assert resumed_gap < (1e-2 if fp8 else 1e-3)  # and the resumed steps repeat the losses


@two_gpus
@pytest.mark.parametrize("recipe", ["off", "delayed", "current"])
def test_sharded_over_two_gpus_trains_as_one_gpu_on_the_whole_batch(tmp_path, record, recipe):
    two, two_grads, _ = train(tmp_path, "two", torchrun(2), "--fp8", recipe)
    one, one_grads, _ = train(tmp_path, "one", [sys.executable], "--fp8", recipe, "--unsharded")
    loss_gap, worst, name = gaps(two, one, two_grads, one_grads)
    resumed_gap = max(abs(a - b) / b for a, b in zip(two["resumed_losses"], two["losses"][4:]))
    record(test="fsdp_two_gpus", recipe=recipe, losses_two_gpus=two["losses"], losses_one_gpu=one["losses"],
           worst_loss_gap=loss_gap, worst_first_grad_rel=worst, worst_first_grad_param=name,
           worst_resumed_loss_gap=resumed_gap)
    assert two["world"] == 2 and two["local_shard_rows"] == 2 * 1408 // 2  # each GPU holds half of fc1
    assert two["losses"][-1] < 0.9 * two["losses"][0] and loss_gap < 0.05
    if recipe == "off":  # BF16: the reduce-scattered gradients are one GPU's to rounding (FP8 adds its own noise)
        assert worst < 0.02
    first, second = two["fp8_state"]
    assert first == second  # TE reduced the amaxes over both processes, though each saw other tokens
    assert two["fp8_state_loaded"] == two["fp8_state_saved"] and resumed_gap < 1e-2
    assert LlamaForCausalLM.from_pretrained(tmp_path / "two" / "hf").config.architectures == ["LlamaForCausalLM"]


def finetune(small_checkpoint, out, *extra) -> tuple[dict, str]:
    command = [*torchrun(2), "-m", "te_llama", "finetune", "--fsdp", "--model", str(small_checkpoint), "--data",
               str(ROOT / "README.md"), "--output", str(out), "--fp8", "delayed", "--seq-len", "128",
               "--batch-tokens", "1024", "--max-steps", "20", "--save-every", "10", "--eval-every", "10",
               "--learning-rate", "1e-3", "--max-eval-blocks", "4", "--sample-tokens", "8", *extra]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=400)
    errors = [line for line in result.stderr.splitlines() if "Error" in line or "error" in line]
    assert result.returncode == 0, "\n".join(errors[:20]) + result.stderr[-2000:]
    return json.loads((out / "summary.json").read_text()), result.stdout


def losses(summary: dict) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in summary["log_history"] if "loss" in row}


@two_gpus
def test_finetune_fsdp_on_two_gpus_trains_resumes_and_exports(small_checkpoint, tmp_path, record):
    out = tmp_path / "run"
    summary, printed = finetune(small_checkpoint, out)
    assert summary["status"] == "completed" and summary["steps"] == 20 and summary["device"].endswith("(FSDP2)")
    assert summary["fsdp"] == {"parameters": "float32", "compute": "bfloat16", "gradient_reduction": "float32"}
    assert summary["ddp"] is None and summary["fp8_recipe"] == "delayed"
    assert summary["optimizer"] == "te-llama AdamW (torch's step)"  # the shards are DTensors: torch's update
    assert summary["eval_perplexity_after"] < summary["eval_perplexity_before"]
    assert printed.count("te-llama finetune:") == 1 and printed.count("saved HF checkpoint") == 1
    checkpoint = out / "checkpoints" / "checkpoint-10"
    assert {"pytorch_model_fsdp_0", "optimizer_0", FP8_STATE_FILE, COMPLETE_MARKER} <= {
        path.name for path in checkpoint.iterdir()}
    assert LlamaForCausalLM.from_pretrained(out).config.architectures == ["LlamaForCausalLM"]

    resumed = tmp_path / "resumed"  # from checkpoint-10: DCP shards without TE's _extra_state, FP8 state beside
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "checkpoint-20")
    again, _ = finetune(small_checkpoint, resumed, "--resume")
    first, second = losses(summary), losses(again)
    gap = max(abs(second[step] - first[step]) / first[step] for step in first if step > 10)
    record(test="finetune_fsdp", device=summary["device"], perplexity=(summary["eval_perplexity_before"],
           summary["eval_perplexity_after"]), losses=first, resumed_losses=second, worst_resumed_loss_gap=gap,
           peak_gpu_memory_gib=summary["peak_gpu_memory_gib"])
    assert again["resumed_from"].endswith("checkpoint-10") and again["steps"] == 20
    assert gap < 2e-2  # the same curve, to FP8 noise
