"""Frozen decoder weights kept in FP8 only on Transformer Engine (``quantize_frozen_weights``): the same outputs as
casting them at every forward, less memory, LoRA training on them, generation with and without decode graphs."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import small_llama
from te_llama import FP8Config, TELlamaForCausalLM
from te_llama.training.fp8_weights import QUANTIZED_WEIGHTS, FP8WeightsError, is_quantized
from training_loop import losses_on_one_batch

pytestmark = pytest.mark.gpu
peft = pytest.importorskip("peft")


def _relative(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _kept_bytes(model) -> int:
    """Bytes the weights kept in FP8 take in the model's dtype."""
    return sum(layer.get_submodule(path).get_parameter(name).numel() * 2
               for layer in model.model.layers for path, name in QUANTIZED_WEIGHTS)


def _frozen(recipe: str) -> TELlamaForCausalLM:
    model = small_llama.model(fp8=FP8Config(recipe=recipe, in_eval=True)).eval()
    return model.requires_grad_(False)


@pytest.mark.parametrize("recipe", ["delayed", "current"])
def test_weights_in_fp8_give_the_per_forward_casts_logits_in_half_the_memory(recipe, record):
    model = _frozen(recipe)
    x = small_llama.batch(2)
    with torch.no_grad():
        for _ in range(2):  # delayed scaling: the second forward casts with the first one's amaxes
            cast = model(input_ids=x).logits
        torch.cuda.synchronize()
        before, kept = torch.cuda.memory_allocated(), _kept_bytes(model)
        model.quantize_frozen_weights(for_training=False)
        after = torch.cuda.memory_allocated()
        fp8 = model(input_ids=x).logits
    error = _relative(fp8, cast)
    record(test=f"fp8_weights_logits_{recipe}", fp8_weights_vs_cast=error, freed_gib=(before - after) / 2**30,
           expected_freed_gib=kept / 2 / 2**30)
    assert all(is_quantized(layer.get_submodule(path).get_parameter(name))
               for layer in model.model.layers for path, name in QUANTIZED_WEIGHTS)
    assert model.weights_in_fp8 == recipe and torch.isfinite(fp8).all()
    # current scaling quantizes a weight as each forward's cast does; delayed scaling's cast used the amax history
    assert error < (1e-3 if recipe == "current" else 2e-2)
    assert before - after >= 0.8 * kept / 2  # one byte per weight instead of two (and no kept cast)


def test_generate_on_weights_in_fp8_matches_the_per_call_cast_with_and_without_decode_graphs(record):
    ids = small_llama.batch(4, size=2, seq=24)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    model = _frozen("current")
    with torch.no_grad():
        expected = model.generate(ids, **kwargs)
        model.quantize_frozen_weights(for_training=False)
        eager = model.generate(ids, **kwargs)
        model.enable_decode_graphs()
        graphed = model.generate(ids, cache_implementation="static", **kwargs)
    record(test="fp8_weights_generate", eager_equal=bool(torch.equal(eager, expected)),
           graphed_equal=bool(torch.equal(graphed, expected)), decode_graph_replays=model.decode_graph_replays())
    assert torch.equal(eager, expected)
    assert torch.equal(graphed, expected) and model.decode_graph_replays() > 0


def test_lora_on_a_base_in_fp8_trains_like_lora_on_the_cast_base(record):
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    runs = {}
    for kept in (False, True):
        model = peft.get_peft_model(small_llama.model(fp8="delayed"), copy.deepcopy(lora))
        if kept:
            model.get_base_model().quantize_frozen_weights(for_training=True)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
        x = small_llama.batch(7)
        torch.cuda.reset_peak_memory_stats()
        runs[kept] = (losses_on_one_batch(model, optimizer, 20, input_ids=x, labels=x),
                      torch.cuda.max_memory_allocated() / 2**30)
        base = model.get_base_model()
        assert all(p.grad is None for name, p in base.named_parameters() if "lora_" not in name)  # frozen base
        if kept:  # one byte per weight between steps: each layer's backward dropped the transposes it made (the
            # first layer's input needs no gradient, so nothing marks the end of its backward: its transposes stay)
            assert all(layer.get_submodule(path).get_parameter(name)._transpose is None
                       for layer in base.model.layers[1:] for path, name in QUANTIZED_WEIGHTS)
    (cast, cast_peak), (fp8, fp8_peak) = runs[False], runs[True]
    gap = abs(fp8[-1] - cast[-1]) / cast[-1]
    record(test="fp8_weights_lora", cast_losses=cast, fp8_weights_losses=fp8, relative_gap=gap,
           peak_gib=(cast_peak, fp8_peak))
    assert all(torch.isfinite(torch.tensor(fp8))) and fp8[-1] < 0.8 * fp8[0]
    assert gap < 0.02


def test_saving_refusals_and_dequantizing(tmp_path):
    model = _frozen("current").quantize_frozen_weights(for_training=False)
    proj = model.model.layers[0].self_attention.proj.weight.dequantize()
    model.save_pretrained(tmp_path / "out")
    plain = LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert torch.equal(plain.model.layers[0].self_attn.o_proj.weight, proj.cpu())
    with pytest.raises(FP8WeightsError, match="dequantize_weights"):
        model.disable_fp8()
    model.dequantize_weights()
    assert model.weights_in_fp8 is None and torch.equal(model.model.layers[0].self_attention.proj.weight, proj)
    trainable = small_llama.model(fp8="current")
    with pytest.raises(FP8WeightsError, match="trainable"):
        trainable.quantize_frozen_weights()


def test_from_a_checkpoint_the_loaded_weights_quantize_for_generation(tmp_path):
    directory = tmp_path / "hf"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**small_llama.CONFIG, pad_token_id=0)).to(torch.bfloat16).save_pretrained(directory)
    model = TELlamaForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, backend="te",
                                               fp8=FP8Config(recipe="current", in_eval=True))
    model.requires_grad_(False).quantize_frozen_weights(for_training=False)
    tokens = model.generate(small_llama.batch(5, size=1, seq=16), max_new_tokens=4, do_sample=False,
                            pad_token_id=0)
    assert tokens.shape == (1, 20)
