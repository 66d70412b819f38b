"""Frozen decoder weights kept in FP8 only (``quantize_frozen_weights``): what te-llama does around them.

The FP8 tensors themselves are Transformer Engine's (``tests/gpu/test_fp8_weights_gpu.py`` runs them). Here, on the
reference backend, a weight "in FP8" is :class:`RoundedToFP8`: the weight's values rounded to E4M3 with one
per-tensor scale, in a tensor subclass that answers what te-llama asks of TE's (``dequantize``,
``get_data_tensors``). That tests te-llama's side: which weights are replaced, what refuses to touch them, what
``save_pretrained`` and ``dequantize_weights`` write.
"""

from __future__ import annotations

import types

import pytest
import torch
from transformers import LlamaForCausalLM

from conftest import tiny_config
from te_llama import FP8Config, TELlamaForCausalLM
from te_llama.model.decoder_stack import StackSettings
from te_llama.training import fp8_weights
from te_llama.training.cuda_graphs import CudaGraphError
from te_llama.training.fp8_weights import FP8WeightsError


class RoundedToFP8(torch.Tensor):
    """A weight as E4M3 with one scale would hold it (see the module docstring)."""

    @staticmethod
    def of(weight: torch.Tensor) -> RoundedToFP8:
        scale = 448.0 / weight.abs().max()
        rounded = (weight * scale).to(torch.float8_e4m3fn).to(weight.dtype) / scale
        return torch.Tensor._make_subclass(RoundedToFP8, rounded)

    def dequantize(self, *, dtype=None) -> torch.Tensor:
        return self.as_subclass(torch.Tensor).to(dtype or self.dtype).clone()

    def get_data_tensors(self, rowwise_data: bool = True, columnwise_data: bool = True):
        data = self.as_subclass(torch.Tensor)
        return data if not columnwise_data else (data, None)


@pytest.fixture
def rounding(monkeypatch):
    monkeypatch.setattr(fp8_weights, "quantized_types", lambda: (RoundedToFP8,))
    monkeypatch.setattr(fp8_weights, "weight_quantizer", lambda recipe, for_training: RoundedToFP8.of)


@pytest.fixture
def model(hf_checkpoint):
    """te-llama on a random HF model's weights, with the model's FP8 recipe set by hand (the reference backend has
    none to enable), frozen."""
    directory, hf = hf_checkpoint(tiny_config())
    te = TELlamaForCausalLM.from_pretrained(directory)
    settings = te.model.te_settings
    recipe = types.SimpleNamespace(delayed=lambda: False, float8_current_scaling=lambda: True)  # as TE's answers
    settings.fp8_config, settings.fp8_recipe = FP8Config(recipe="current"), recipe
    return te.requires_grad_(False), hf


KEPT = ("self_attention.proj.weight", "layernorm_mlp.fc1_weight", "layernorm_mlp.fc2_weight")


def _weights(model) -> dict[str, torch.Tensor]:
    return {f"{i}.{name}": layer.get_parameter(name) for i, layer in enumerate(model.model.layers)
            for name in (*KEPT, "self_attention.layernorm_qkv.query_weight")}


def test_the_frozen_projection_and_mlp_weights_are_replaced_and_qkv_kept(model, rounding):
    te, _ = model
    before = {name: weight.detach().clone() for name, weight in _weights(te).items()}
    te.quantize_frozen_weights(for_training=False)
    assert te.weights_in_fp8 == "current"
    for name, weight in _weights(te).items():
        kept = name.endswith(KEPT)
        assert isinstance(weight, RoundedToFP8) is kept, name
        assert isinstance(weight, torch.nn.Parameter) and not weight.requires_grad
        if kept:
            assert torch.equal(weight.dequantize(), RoundedToFP8.of(before[name]).dequantize())
            assert fp8_weights.tensor_addresses(weight) == (weight.as_subclass(torch.Tensor).data_ptr(),)  # row-wise
        else:
            assert torch.equal(weight, before[name])
    assert te.model.te_settings.fp8_active(training=False)  # evaluation runs in FP8 now, in_eval or not
    # per-tensor FP8 (current scaling): each layer's backward drops the transposes it makes of them
    assert all(layer.drops_weight_transposes for layer in te.model.layers)


def test_trainable_weights_are_refused_and_nothing_changes(model, rounding):
    te, _ = model
    te.model.layers[1].layernorm_mlp.fc2_weight.requires_grad_(True)
    with pytest.raises(FP8WeightsError, match=r"model\.layers\.1\.layernorm_mlp\.fc2_weight .*requires_grad_\(False\)"):
        te.quantize_frozen_weights()
    assert te.weights_in_fp8 is None
    assert not any(isinstance(weight, RoundedToFP8) for weight in _weights(te).values())


def test_without_fp8_it_says_to_enable_fp8(hf_checkpoint):
    directory, _ = hf_checkpoint(tiny_config())
    te = TELlamaForCausalLM.from_pretrained(directory).requires_grad_(False)
    with pytest.raises(FP8WeightsError, match=r"enable_fp8"):
        te.quantize_frozen_weights()


def test_what_would_write_into_them_refuses(model, rounding):
    te, _ = model
    te.quantize_frozen_weights()
    with pytest.raises(FP8WeightsError, match="dequantize_weights"):
        te.disable_fp8()
    with pytest.raises(FP8WeightsError, match="dequantize_weights"):
        te.load_state_dict(te.state_dict())
    with pytest.raises(CudaGraphError, match="dequantize_weights"):
        te.enable_cuda_graphs()


def test_save_pretrained_writes_the_fp8_values_as_a_plain_hf_checkpoint(model, rounding, tmp_path):
    te, hf = model
    te.quantize_frozen_weights()
    te.save_pretrained(tmp_path / "out")
    saved = LlamaForCausalLM.from_pretrained(tmp_path / "out")
    for i, layer in enumerate(saved.model.layers):
        mine = te.model.layers[i]
        assert torch.equal(layer.self_attn.o_proj.weight, mine.self_attention.proj.weight.dequantize())
        gate, up = mine.layernorm_mlp.fc1_weight.dequantize().chunk(2)
        assert torch.equal(layer.mlp.gate_proj.weight, gate) and torch.equal(layer.mlp.up_proj.weight, up)
        assert torch.equal(layer.self_attn.q_proj.weight, hf.model.layers[i].self_attn.q_proj.weight)


def test_dequantize_weights_gives_plain_parameters_with_the_fp8_values(model, rounding):
    te, _ = model
    te.quantize_frozen_weights()
    fp8 = {name: weight.dequantize() for name, weight in _weights(te).items() if name.endswith(KEPT)}
    te.dequantize_weights()
    assert te.weights_in_fp8 is None and not any(layer.drops_weight_transposes for layer in te.model.layers)
    for name, value in fp8.items():
        weight = _weights(te)[name]
        assert type(weight) is torch.nn.Parameter and not weight.requires_grad and torch.equal(weight, value)
    te.disable_fp8()  # allowed again


def test_peft_cannot_add_or_merge_adapters_on_weights_in_fp8(model, rounding):
    peft = pytest.importorskip("peft")
    te, _ = model
    wrapped = peft.get_peft_model(te, peft.LoraConfig(r=2, target_modules=["q_proj", "o_proj"], task_type="CAUSAL_LM"))
    wrapped.get_base_model().quantize_frozen_weights()
    with pytest.raises(FP8WeightsError, match="dequantize_weights"):
        wrapped.merge_and_unload()


def test_weights_in_fp8_run_evaluation_in_fp8():
    settings = StackSettings(fp8_config=FP8Config(recipe="delayed"), fp8_recipe=object())
    assert settings.fp8_active(training=True) and not settings.fp8_active(training=False)
    settings.weights_in_fp8 = "delayed"
    assert settings.fp8_active(training=False)


def test_recipes_that_read_the_same_fp8_tensors():
    assert fp8_weights.same_format("delayed", "current")
    assert not fp8_weights.same_format("delayed", "mxfp8") and not fp8_weights.same_format("block", "current")


def test_a_plain_tensor_is_not_quantized_and_has_its_own_address():
    weight = torch.ones(3)
    assert not fp8_weights.is_quantized(weight) and fp8_weights.high_precision(weight) is weight
    assert fp8_weights.tensor_addresses(weight) == (weight.data_ptr(),)
