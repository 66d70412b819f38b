"""FSDP2 on the CPU (reference layer, gloo): two sharded processes train as one process on the whole batch, in a plain
loop (``tests/fsdp_train.py``) and in ``te-llama finetune --fsdp``; sharded checkpoints resume the same loss curve;
the export is a plain HF checkpoint of the trained weights; what FSDP2 cannot run is refused by name."""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import LlamaForCausalLM

import fsdp_train
from conftest import random_hf_model, relative_error, tiny_config
from te_llama import CheckpointError, CudaGraphError, TELlamaForCausalLM
from te_llama.cli import main
from te_llama.commands.assets import english_text, smollm2_checkpoint
from te_llama.training.fp8_state import COMPLETE_MARKER, FP8_STATE_FILE
from te_llama.training.fsdp import FSDPError, load_sharded, reshard, save_sharded, shard_model
from training_loop import losses_on_one_batch

TESTS = Path(__file__).resolve().parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
FP32 = 1e-5  # float32 rounding: the sharded reduction sums the two halves' gradients in another order


def launch(*command, timeout=240) -> str:
    env = {**os.environ, "TE_LLAMA_BACKEND": "reference"}  # also where a GPU is
    result = subprocess.run([*TORCHRUN, *command], capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


# ------------------------------------------------- two processes: a plain loop and te-llama finetune --fsdp
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A 2-layer random Llama with tied embeddings and SmolLM2's tokenizer; and a text file."""
    directory = tmp_path_factory.mktemp("tiny") / "model"
    random_hf_model(tiny_config(vocab_size=49152, tie_word_embeddings=True, eos_token_id=2)).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smollm2_checkpoint() / name, directory / name)
    text = directory.parent / "news.txt"
    text.write_text("\n\n".join(english_text().splitlines()[:40]))
    return directory, text


def finetune_args(tiny_checkpoint, out, *extra):
    model, text = tiny_checkpoint
    return ["finetune", "--model", str(model), "--data", str(text), "--output", str(out), "--seq-len", "64",
            "--batch-tokens", "128", "--max-eval-blocks", "2", "--max-steps", "4", "--save-every", "2",
            "--sample-tokens", "4", "--eval-every", "4", *extra]


def losses(out) -> dict[int, float]:
    summary = json.loads((out / "summary.json").read_text())
    return {row["step"]: row["loss"] for row in summary["log_history"] if "loss" in row}


@pytest.fixture(scope="module")
def launched(tiny_checkpoint, tmp_path_factory):
    """One launch of two processes (``tests/fsdp_cpu_launch.py``): the sharded plain loop, then ``te-llama finetune
    --fsdp --gradient-checkpointing`` (accelerate's FSDP2 under the Trainer); then both unsharded in this process."""
    root = tmp_path_factory.mktemp("fsdp")
    printed = launch(str(TESTS / "fsdp_cpu_launch.py"), "--plain-loop", str(root / "sharded"),
                     *finetune_args(tiny_checkpoint, root / "fsdp", "--fsdp", "--gradient-checkpointing"))
    (root / "printed.txt").write_text(printed)
    fsdp_train.main(["--unsharded", "--out", str(root / "unsharded")])
    with pytest.MonkeyPatch.context() as patch:  # conftest's backend switch is per test; this fixture is not
        patch.setenv("TE_LLAMA_BACKEND", "reference")
        assert main(finetune_args(tiny_checkpoint, root / "one")) == 0
    return root


@pytest.fixture(scope="module")
def plain_loop(launched):
    """``tests/fsdp_train.py`` sharded over two processes, and unsharded in this one on whole batches."""
    return launched / "sharded", launched / "unsharded"


@pytest.fixture(scope="module")
def finetuned(launched):
    """``te-llama finetune --fsdp`` in two processes, and without FSDP in this one; what the first process printed."""
    return launched, (launched / "printed.txt").read_text()


# --------------------------------------------------------------------------------------------------- a plain loop
def results(directory):
    return (json.loads((directory / "result.json").read_text()), torch.load(directory / "first_grads.pt"),
            torch.load(directory / "weights.pt"))


def test_two_sharded_processes_train_as_one_process(plain_loop):
    (two, two_grads, two_weights), (one, one_grads, one_weights) = map(results, plain_loop)
    assert two["world"] == 2 and one["world"] == 1
    assert two["local_shard_rows"] == 2 * 96 // 2  # each process holds half of fc1 (gate and up, 96 rows each)
    assert all(abs(a - b) <= FP32 * b for a, b in zip(two["losses"], one["losses"])), (two["losses"], one["losses"])
    assert one_grads.keys() == two_grads.keys() and one_weights.keys() == two_weights.keys()
    for name in one_grads:  # the averaged gradients of the two halves are the whole batch's
        assert relative_error(two_grads[name], one_grads[name]) < FP32, name
    for name in one_weights:  # after 4 AdamW steps
        assert relative_error(two_weights[name], one_weights[name]) < FP32, name


def test_a_sharded_checkpoint_resumes_the_same_loss_curve(plain_loop):
    sharded, _ = plain_loop
    result = json.loads((sharded / "result.json").read_text())
    assert result["resumed_losses"] == result["losses"][2:]  # weights, AdamW moments and step restored exactly
    files = {path.name for path in (sharded / "checkpoint").iterdir()}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", FP8_STATE_FILE} <= files  # each process its shard
    assert not [path for path in sharded.iterdir() if path.name.startswith(".")]  # no staging directory left


def test_the_export_is_a_plain_hf_checkpoint_of_the_trained_weights(plain_loop):
    sharded, unsharded = plain_loop
    hf = LlamaForCausalLM.from_pretrained(sharded / "hf", dtype=torch.float32).eval()
    assert hf.config.architectures == ["LlamaForCausalLM"]
    trained = TELlamaForCausalLM.from_config(tiny_config(), backend="reference").eval()
    trained.load_state_dict(torch.load(unsharded / "weights.pt"))  # the one-process run's final weights
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert relative_error(hf(ids).logits, trained(ids).logits) < FP32


# ------------------------------------------------------------------------------------- te-llama finetune --fsdp
def test_finetune_fsdp_trains_as_one_process(finetuned):
    root, printed = finetuned
    summary = json.loads((root / "fsdp" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 4 and summary["device"] == "2 x CPU (FSDP2)"
    assert summary["ddp"] is None and summary["fsdp"] == {"parameters": "float32", "compute": "float32",
                                                          "gradient_reduction": "float32"}
    for line in ("FSDP2: weights, gradients and optimizer state sharded over 2 processes", "saved HF checkpoint",
                 "summary:"):
        assert printed.count(line) == 1, line  # the first process prints
    sharded, one = losses(root / "fsdp"), losses(root / "one")  # tied embeddings, gradient checkpointing
    assert list(sharded) == [1, 2, 3, 4] and all(abs(sharded[s] - one[s]) <= FP32 * one[s] for s in one)
    checkpoint = root / "fsdp" / "checkpoints" / "checkpoint-2"
    files = {path.name for path in checkpoint.iterdir()}
    assert {"pytorch_model_fsdp_0", "optimizer_0", FP8_STATE_FILE, COMPLETE_MARKER} <= files  # DCP shards
    assert {path.name for path in (checkpoint / "pytorch_model_fsdp_0").iterdir()} >= {"__0_0.distcp", "__1_0.distcp"}


def test_finetune_fsdp_resumes_the_same_loss_curve_and_exports_the_trained_weights(finetuned, tiny_checkpoint):
    root, _ = finetuned
    resumed = root / "resumed"
    shutil.copytree(root / "fsdp", resumed)
    shutil.rmtree(resumed / "checkpoints" / "checkpoint-4")
    launch(str(TESTS / "fsdp_cpu_launch.py"),
           *finetune_args(tiny_checkpoint, resumed, "--fsdp", "--gradient-checkpointing", "--resume"))
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["steps"] == 4
    first, again = losses(root / "fsdp"), losses(resumed)
    assert all(abs(again[step] - first[step]) <= FP32 * first[step] for step in (3, 4)), (first, again)
    # The exports of both runs are plain HF checkpoints with the same weights, and those are the last checkpoint's.
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exported = LlamaForCausalLM.from_pretrained(root / "fsdp", dtype=torch.float32).eval()(ids).logits
        exported_again = LlamaForCausalLM.from_pretrained(resumed, dtype=torch.float32).eval()(ids).logits
        last = dcp_model(root / "fsdp" / "checkpoints" / "checkpoint-4" / "pytorch_model_fsdp_0", tiny_checkpoint)
        assert relative_error(exported_again, exported) < FP32
        assert relative_error(exported, last(ids).logits) < FP32


def dcp_model(directory, tiny_checkpoint) -> TELlamaForCausalLM:
    """The te-llama model with the weights of a DCP checkpoint, read in this one process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = directory.parent / "model.pt"
    dcp_to_torch_save(directory, path)
    model = TELlamaForCausalLM.from_pretrained(tiny_checkpoint[0], dtype=torch.float32)
    model.load_state_dict(torch.load(path)["model"])
    return model.eval()


@pytest.mark.parametrize("extra,message", [
    (("--fsdp",), "--fsdp shards the model over several processes: launch with torchrun"),
    (("--fsdp", "--lora", "8"), "drop --fsdp (DDP) for --lora"),
    (("--fsdp", "--cuda-graphs", "--attend-across-documents"), "--cuda-graphs cannot be combined with --fsdp"),
])
def test_finetune_fsdp_options_are_checked_before_output_is_touched(tiny_checkpoint, tmp_path, capsys, extra, message):
    assert main(finetune_args(tiny_checkpoint, tmp_path / "out", *extra)) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------- one process, sharded (world size 1)
@pytest.fixture
def process_group(tmp_path):
    """A gloo group of this process alone, as torchrun with one process gives."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def tiny(**config):
    torch.manual_seed(0)
    return TELlamaForCausalLM.from_config(tiny_config(**config), backend="reference").train()


def test_one_sharded_process_trains_exactly_as_the_unsharded_model(process_group):
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for sharded in (False, True):
        model = shard_model(tiny()) if sharded else tiny()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses.append(losses_on_one_batch(model, optimizer, 3, input_ids=ids, labels=ids))
    assert losses[0] == losses[1]


def test_tied_embeddings_stay_one_parameter_of_the_root_unit(process_group):
    model = shard_model(tiny(tie_word_embeddings=True))
    embedding = model.model.embed_tokens.weight
    assert model.lm_head.weight is embedding and isinstance(embedding, DTensor)
    assert sum(param is embedding for param in model.parameters()) == 1
    assert not any(param is embedding for layer in model.model.layers for param in layer.parameters())
    assert "lm_head.weight" in model.state_dict() and "model.embed_tokens.weight" in model.state_dict()


def test_a_checkpoint_of_two_processes_resumes_in_one(plain_loop, process_group):
    sharded, _ = plain_loop
    model = shard_model(TELlamaForCausalLM.from_config(tiny_config(), backend="reference").train())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    load_sharded(model, optimizer, sharded / "checkpoint")  # DCP reshards the two processes' shards into one
    ids = fsdp_train.batch(argparse.Namespace(model="tiny"), rank=0, world=1)  # the whole batch it learns
    resumed = losses_on_one_batch(model, optimizer, 2, input_ids=ids, labels=ids)
    expected = json.loads((sharded / "result.json").read_text())["losses"][2:]
    assert all(abs(a - b) <= FP32 * b for a, b in zip(resumed, expected)), (resumed, expected)


def test_reshard_gives_back_the_shards_an_evaluation_left_gathered(process_group):
    model = shard_model(tiny())
    with torch.no_grad():
        model.eval()(input_ids=torch.zeros(1, 8, dtype=torch.long))
    assert not isinstance(model.lm_head.weight, DTensor)  # the root keeps its weights for a backward
    reshard(model)
    assert all(isinstance(param, DTensor) for param in model.parameters())


class _ExtraState(torch.nn.Module):
    """Stands in for a TE module's FP8 scaling state, which the reference layer does not have."""

    def get_extra_state(self):
        return torch.zeros(7, dtype=torch.uint8)

    def set_extra_state(self, state):
        raise AssertionError("a sharded model's state dict has no _extra_state to load")


def test_a_sharded_state_dict_leaves_out_te_extra_state_and_loads_without_it(process_group):
    model = tiny()
    model.model.norm.add_module("fp8_meta_stand_in", _ExtraState())
    assert "model.norm.fp8_meta_stand_in._extra_state" in model.state_dict()
    shard_model(model)
    state = model.state_dict()
    assert not [key for key in state if key.endswith("_extra_state")]
    assert model.load_state_dict(state, strict=True).missing_keys == []


def test_what_fsdp2_cannot_run_is_refused_by_name(process_group, tmp_path):
    with pytest.raises(FSDPError, match="pass the te-llama model itself"):
        shard_model(torch.nn.parallel.DistributedDataParallel(tiny()))
    graphs = tiny()
    graphs.model.te_settings.cuda_graphs = True  # as enable_cuda_graphs() leaves it on a GPU
    with pytest.raises(CudaGraphError, match="disable_cuda_graphs"):
        shard_model(graphs)
    cached = tiny()
    cached.cache_fp8_weights = True
    with pytest.raises(FSDPError, match="cache_fp8_weights = False"):
        shard_model(cached)
    with pytest.raises(FSDPError, match="shards a te-llama model"):
        shard_model(torch.nn.Linear(2, 2))
    model = shard_model(tiny())
    with pytest.raises(FSDPError, match="already sharded"):
        shard_model(model)
    with pytest.raises(CudaGraphError, match="FSDP2"):
        model.enable_cuda_graphs()
    with pytest.raises(FSDPError, match="cache_fp8_weights"):
        model.cache_fp8_weights = True
    with pytest.raises(FSDPError, match="take a model sharded with shard_model"):
        save_sharded(tiny(), None, tmp_path / "unsharded")
    save_sharded(model, None, tmp_path / "checkpoint")
    with pytest.raises(CheckpointError, match="exists"):
        save_sharded(model, None, tmp_path / "checkpoint")
    with pytest.raises(CheckpointError, match="not a checkpoint of save_sharded"):
        load_sharded(model, None, tmp_path)


def test_lora_and_fsdp2_are_refused_both_ways(process_group):
    from peft import LoraConfig, get_peft_model

    with pytest.raises(FSDPError, match="PEFT adapters"):
        shard_model(get_peft_model(tiny(), LoraConfig(r=4, target_modules=["q_proj"])).base_model.model)
    model = shard_model(tiny())
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))  # adapters FSDP would neither shard nor reduce
    from te_llama.model.adapters import AdapterError

    with pytest.raises(AdapterError, match="train LoRA with DDP"):
        model(input_ids=torch.zeros(1, 8, dtype=torch.long))


def test_sharding_needs_a_process_group():
    with pytest.raises(FSDPError, match="torchrun --nproc_per_node N"):
        shard_model(tiny())
