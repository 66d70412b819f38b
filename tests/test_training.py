"""Training integrations on CPU (reference backend): Trainer train/evaluate/save/resume, checkpointing."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from conftest import random_hf_model, relative_error, tiny_config
from te_llama import TELlamaForCausalLM
from te_llama.training.fp8_state import FP8_STATE_FILE, FP8StateCallback


class Blocks(torch.utils.data.Dataset):
    def __init__(self, n, seq=16, seed=0):
        self.ids = torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def trainer(model, out, max_steps, **kwargs):
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=2,
                             learning_rate=1e-3, logging_steps=1, save_steps=3, report_to=[], use_cpu=True,
                             seed=0, eval_strategy="no", disable_tqdm=True, **kwargs)
    return Trainer(model=model, args=args, train_dataset=Blocks(24), eval_dataset=Blocks(4, seed=1),
                   callbacks=[FP8StateCallback()])


def losses(trainer_):
    return {row["step"]: row["loss"] for row in trainer_.state.log_history if "loss" in row}


@pytest.fixture
def checkpoint(tmp_path):
    directory = tmp_path / "init"
    random_hf_model(tiny_config(tie_word_embeddings=True)).save_pretrained(directory)
    return directory


def test_trainer_trains_saves_and_resumes_on_the_same_curve(checkpoint, tmp_path):
    straight = trainer(TELlamaForCausalLM.from_pretrained(checkpoint), tmp_path / "a", 6)
    straight.train()
    metrics = straight.evaluate()
    assert metrics["eval_loss"] > 0

    interrupted = trainer(TELlamaForCausalLM.from_pretrained(checkpoint), tmp_path / "b", 6)
    interrupted.train()
    saved = tmp_path / "b" / "checkpoint-3"
    weights = load_file(saved / "model.safetensors")
    assert "model.layers.0.mlp.gate_proj.weight" in weights and not any("extra_state" in k for k in weights)
    assert json.loads((saved / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (saved / FP8_STATE_FILE).is_file()

    import shutil

    shutil.rmtree(tmp_path / "b" / "checkpoint-6")
    resumed = trainer(TELlamaForCausalLM.from_pretrained(checkpoint), tmp_path / "b", 6)
    resumed.train(resume_from_checkpoint=True)
    expected, actual = losses(straight), losses(resumed)
    assert sorted(actual) == [1, 2, 3, 4, 5, 6]  # steps 1-3 come from the checkpoint's trainer state
    for step in (4, 5, 6):
        assert abs(actual[step] - expected[step]) < 1e-4 * expected[step], step
    assert expected[6] < expected[1]  # it learns


def test_gradient_checkpointing_gives_the_same_gradients(checkpoint):
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(8))
    grads = []
    for checkpointing in (False, True):
        model = TELlamaForCausalLM.from_pretrained(checkpoint).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads.append((loss.item(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    (loss_a, a), (loss_b, b) = grads
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for key in a:
        assert relative_error(b[key], a[key]) < 1e-6, key


def test_is_first_microbatch_reaches_the_layers(checkpoint, monkeypatch):
    from te_llama.model.reference_layer import TransformerLayer

    seen = []
    original = TransformerLayer.forward

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("is_first_microbatch"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TransformerLayer, "forward", spy)
    model = TELlamaForCausalLM.from_pretrained(checkpoint).train()
    ids = torch.randint(0, 128, (2, 8))
    model(ids, labels=ids, is_first_microbatch=True)
    model(ids, labels=ids, is_first_microbatch=False)
    assert seen == [True, True, False, False]
