"""TRL's SFTTrainer runs te-llama's decoder pass (where FP8 autocast applies), with and without PEFT LoRA; packed
and padding-free batches run as TE's padding-free stream.

TRL replaces the model's forward with its own LM head and loss, which calls ``model.model`` directly; these tests
count decoder-layer calls and check that each ran inside ``TELlamaModel``'s decoder pass (on a GPU that pass opens
TE's FP8 autocast; tests/gpu/test_hf_tools_fp8.py counts the calls under FP8 there). Real text and the real SmolLM2
tokenizer, a tiny random model.
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from te_llama import TELlamaForCausalLM
from te_llama.commands.assets import english_text, smollm2_checkpoint
from te_llama.model.decoder_stack import TELlamaModel

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
from peft import LoraConfig, PeftModel  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(smollm2_checkpoint())


@pytest.fixture(scope="module")
def documents():
    lines = [line.strip() for line in english_text().splitlines() if line.strip()]
    return datasets.Dataset.from_dict({"text": lines[:24]})


class LayerCalls:
    """Counts decoder-layer calls, and those made while ``TELlamaModel``'s decoder pass was open."""

    def __init__(self, model, monkeypatch):
        self.calls = self.in_pass = 0
        self.open = 0
        original = TELlamaModel._decoder_pass

        def counted_pass(stack, *args, **kwargs):
            context = original(stack, *args, **kwargs)

            class Counted:
                def __enter__(inner):
                    self.open += 1
                    return context.__enter__()

                def __exit__(inner, *exc):
                    self.open -= 1
                    return context.__exit__(*exc)
            return Counted()

        monkeypatch.setattr(TELlamaModel, "_decoder_pass", counted_pass)
        for layer in model.model.layers:
            layer.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1
        self.in_pass += self.open > 0


def tiny_model(tokenizer) -> TELlamaForCausalLM:
    torch.manual_seed(0)
    config = tiny_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id or 0,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    return TELlamaForCausalLM.from_config(config, dtype=torch.float32)


def sft_config(tmp_path, **overrides) -> SFTConfig:
    return SFTConfig(**{"output_dir": str(tmp_path / "sft"), "max_steps": 3, "per_device_train_batch_size": 2,
                        "max_length": 64, "learning_rate": 1e-3, "logging_steps": 1, "save_strategy": "no",
                        "report_to": [], "use_cpu": True, "bf16": False, "dataloader_num_workers": 0,
                        # TRL checkpoints activations by default; the recomputation in the backward would call the
                        # layers again outside any forward (on TE, TE's checkpoint restores FP8 for it).
                        "gradient_checkpointing": False, **overrides})


@pytest.mark.parametrize("options", [{}, {"packing": True}, {"padding_free": True, "max_length": None}],
                         ids=["default", "packing", "padding_free"])
def test_sft_trainer_runs_the_layers_inside_te_llamas_decoder_pass(options, tokenizer, documents, tmp_path,
                                                                     monkeypatch, stream_calls):
    model = tiny_model(tokenizer)
    calls = LayerCalls(model, monkeypatch)
    before = model.model.layers[0].self_attention.proj.weight.detach().clone()
    trainer = SFTTrainer(model=model, args=sft_config(tmp_path, **options), train_dataset=documents,
                         processing_class=tokenizer)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert calls.calls >= 3 * model.config.num_hidden_layers
    assert calls.in_pass == calls.calls
    if options:  # packed documents: every layer call ran padding-free, each document on its own
        assert len(stream_calls) == calls.calls and all(len(s.cu_seqlens) > 2 for s in stream_calls)
    assert not torch.equal(model.model.layers[0].self_attention.proj.weight, before)  # it trained


def test_sft_trainer_with_peft_config_trains_an_hf_named_adapter(tokenizer, documents, tmp_path, monkeypatch):
    model = tiny_model(tokenizer)
    calls = LayerCalls(model, monkeypatch)
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=sft_config(tmp_path, padding_free=True, max_length=None), train_dataset=documents,
                         processing_class=tokenizer, peft_config=lora)
    assert isinstance(trainer.model, PeftModel)
    trainer.train()
    assert calls.calls >= 3 * model.config.num_hidden_layers and calls.in_pass == calls.calls
    for name, p in model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base[name]), name
    lora_b = [p for name, p in trainer.model.named_parameters() if "lora_B" in name]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero; training moved it
    trainer.model.save_pretrained(tmp_path / "adapter")
    keys = list(__import__("peft").utils.load_peft_weights(str(tmp_path / "adapter")))
    assert any(key.endswith("self_attn.q_proj.lora_A.weight") for key in keys)
    assert any(key.endswith("mlp.down_proj.lora_B.weight") for key in keys)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sft_trainer_with_trls_default_gradient_checkpointing_trains_as_without(lora, tokenizer, documents, tmp_path):
    # TRL turns activation checkpointing on by default: the layers then run again in the backward.
    assert SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False).gradient_checkpointing
    losses, calls = {}, {}
    for checkpointing in (True, False):
        model = tiny_model(tokenizer)
        qkv_calls = []  # an inner module's hooks run again in the recomputation, whichever transformers wraps
        for layer in model.model.layers:
            layer.self_attention.layernorm_qkv.register_forward_pre_hook(lambda *_: qkv_calls.append(1))
        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM") if lora else None
        args = sft_config(tmp_path / str(checkpointing), gradient_checkpointing=checkpointing, padding_free=True,
                          max_length=None)
        trainer = SFTTrainer(model=model, args=args, train_dataset=documents, processing_class=tokenizer,
                             peft_config=peft_config)
        trainer.train()
        assert model.is_gradient_checkpointing == checkpointing
        losses[checkpointing] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        calls[checkpointing] = len(qkv_calls)
    assert calls[True] == 2 * calls[False]  # each layer recomputed once in the backward
    assert len(losses[True]) == 3
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=0)
