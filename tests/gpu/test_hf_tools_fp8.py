"""FP8 wherever an HF tool runs te-llama on TE: decoder-layer calls counted under TE's FP8 autocast for a plain
loop, the Trainer, TRL's SFTTrainer and PEFT LoRA; LoRA on TE against HF + PEFT; FP8 LoRA converging as BF16 LoRA.

TRL and datasets are not on every GPU image: their tests skip where they are missing (the device's wheels
bring them, see docs/internals.md).
"""

from __future__ import annotations

import pytest
import torch
from transformer_engine.pytorch.quantization import FP8GlobalStateManager
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import small_llama
from te_llama import TELlamaForCausalLM
from training_loop import losses_on_one_batch

pytestmark = pytest.mark.gpu
peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

LORA = dict(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")


class FP8Calls:
    """Decoder-layer calls, and those that ran with TE's FP8 autocast on."""

    def __init__(self, model):
        self.calls = self.fp8 = 0
        for layer in model.model.layers:
            layer.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1
        self.fp8 += FP8GlobalStateManager.is_fp8_enabled()


def tokenizer():
    """A word-level tokenizer over the small model's 1,024 ids: TRL needs one for its pad and end ids, and the data
    here is already token ids."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, 1024)}}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<pad>")),
                                   pad_token="<pad>", eos_token="</s>")


def texts(count=16, seq=128):
    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 1024, (seq,), generator=generator).tolist()} for _ in range(count)]


def test_plain_loop_and_peft_loop_run_every_layer_call_in_fp8():
    model = small_llama.model(fp8="delayed")
    calls = FP8Calls(model)
    small_llama.train(model, 2)
    peft_model = get_peft_model(model, LoraConfig(**LORA))
    small_llama.train(peft_model, 2)
    assert calls.calls == 4 * model.config.num_hidden_layers and calls.fp8 == calls.calls


def test_trainer_with_and_without_lora_runs_every_layer_call_in_fp8(tmp_path):
    for lora in (False, True):
        model = small_llama.model(fp8="delayed")
        calls = FP8Calls(model)
        trained = get_peft_model(model, LoraConfig(**LORA)) if lora else model
        args = TrainingArguments(output_dir=str(tmp_path / str(lora)), max_steps=3, per_device_train_batch_size=2,
                                 bf16=True, report_to=[], save_strategy="no", logging_steps=1)
        rows = [{**row, "labels": row["input_ids"]} for row in texts()]
        Trainer(model=trained, args=args, train_dataset=rows).train()
        assert calls.calls >= 3 * model.config.num_hidden_layers and calls.fp8 == calls.calls, lora


@pytest.mark.parametrize("options", [{}, {"packing": True}, {"padding_free": True, "max_length": None}],
                         ids=["default", "packing", "padding_free"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_trl_sft_trainer_runs_every_layer_call_in_fp8(options, lora, tmp_path, record):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    model = small_llama.model(fp8="delayed", pad_token_id=0, eos_token_id=1)
    calls = FP8Calls(model)
    config = trl.SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, bf16=True,
                           report_to=[], save_strategy="no", logging_steps=1, **{"max_length": 128, **options})
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(texts()),
                             processing_class=tokenizer(), peft_config=LoraConfig(**LORA) if lora else None)
    trainer.train()
    record(test="trl_fp8_layer_calls", options=str(options), lora=lora, calls=calls.calls, fp8_calls=calls.fp8)
    assert calls.calls >= 3 * model.config.num_hidden_layers and calls.fp8 == calls.calls


def _pair(tmp_path):
    config = LlamaConfig(**small_llama.CONFIG)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).to(torch.bfloat16).cuda().eval()
    hf.save_pretrained(tmp_path / "hf")
    te = TELlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16, backend="te")
    return hf, te


def _relative(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]], ids=["all-linear", "q-v"])
def test_lora_on_te_matches_hf_peft_in_bf16(targets, tmp_path, record):
    """LoRA on TE in BF16 against HF + PEFT in BF16, and both against HF + PEFT in float32: te-llama computes the
    adapters in BF16 where PEFT keeps them in float32, so each side's gradients are held to the float32 ones."""
    hf, te = _pair(tmp_path)
    torch.manual_seed(1)
    hf_peft = get_peft_model(hf, LoraConfig(**{**LORA, "target_modules": targets, "init_lora_weights": False}))
    hf_peft.save_pretrained(tmp_path / "adapter")
    te_peft = PeftModel.from_pretrained(te, tmp_path / "adapter", is_trainable=True)
    exact = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).cuda(),
                                      tmp_path / "adapter", is_trainable=True)
    ids = small_llama.batch(3, size=2, seq=128)
    runs = []
    for model in (exact, hf_peft, te_peft):
        model.train()
        output = model(input_ids=ids, labels=ids)
        output.loss.backward()
        runs.append((output.loss.item(), {n.replace(".base_model", ""): p.grad.float() for n, p in
                                          model.named_parameters() if p.requires_grad}))
    (_, exact_grads), (hf_loss, hf_grads), (te_loss, te_grads) = runs

    def worst(grads):
        return max(_relative(grads[name], grad) for name, grad in exact_grads.items())

    hf_worst, te_worst = worst(hf_grads), worst(te_grads)
    record(test="lora_bf16_vs_hf_peft", targets=str(targets), hf_loss=hf_loss, te_loss=te_loss,
           hf_worst_grad_rel_to_fp32=hf_worst, te_worst_grad_rel_to_fp32=te_worst)
    assert abs(te_loss - hf_loss) / hf_loss < 2e-3
    assert te_worst < max(1.5 * hf_worst, 2e-2)
    assert all(p.grad is None for name, p in te.named_parameters() if "lora_" not in name)  # frozen base


def test_fp8_lora_converges_like_bf16_lora(record):
    """Same seed and data: LoRA in FP8 (delayed) against LoRA in BF16; the final loss within 1.5 %."""
    finals = {}
    for fp8 in (None, "delayed"):
        model = get_peft_model(small_llama.model(fp8=fp8), LoraConfig(**{**LORA, "r": 16, "lora_alpha": 32}))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
        x = small_llama.batch(7)  # one batch, repeated: the loss falls far enough to compare curves
        losses = losses_on_one_batch(model, optimizer, 60, input_ids=x, labels=x)
        finals[fp8 or "bf16"] = sum(losses[-5:]) / 5
        assert losses[-1] < 0.8 * losses[0], fp8
    gap = abs(finals["delayed"] - finals["bf16"]) / finals["bf16"]
    record(test="fp8_lora_convergence", bf16_final=finals["bf16"], fp8_final=finals["delayed"], relative_gap=gap)
    assert gap < 0.015


def test_merge_and_unload_on_te_saves_a_plain_hf_checkpoint(tmp_path):
    hf, te = _pair(tmp_path)
    te_peft = get_peft_model(te, LoraConfig(**{**LORA, "init_lora_weights": False}))
    ids = small_llama.batch(5, size=1, seq=64)
    with torch.no_grad():
        expected = te_peft(input_ids=ids).logits.float()
    te_peft.merge_and_unload().save_pretrained(tmp_path / "merged")
    plain = LlamaForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        assert _relative(plain(input_ids=ids).logits, expected) < 2e-2
