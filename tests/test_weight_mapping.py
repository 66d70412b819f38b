"""The HF <-> TE name table: exact round trips and clear errors."""

import pytest
import torch

from conftest import random_hf_model, tiny_config
from te_llama.checkpoint.weight_mapping import (
    FUSED,
    HF_TO_TE,
    TE_TO_HF,
    WeightMappingError,
    hf_target,
    hf_to_te,
    te_to_hf,
)


@pytest.mark.parametrize("bias", [False, True])
def test_round_trip_is_bit_exact(bias):
    hf_state = random_hf_model(tiny_config(attention_bias=bias, mlp_bias=bias)).state_dict()
    te_state = hf_to_te(hf_state)
    back = te_to_hf(te_state)
    assert back.keys() == hf_state.keys()
    for key, tensor in hf_state.items():
        assert torch.equal(back[key], tensor), key


def test_gate_comes_first_in_fc1():
    hf_state = random_hf_model(tiny_config()).state_dict()
    fc1 = hf_to_te(hf_state)["model.layers.1.layernorm_mlp.fc1_weight"]
    gate, up = hf_state["model.layers.1.mlp.gate_proj.weight"], hf_state["model.layers.1.mlp.up_proj.weight"]
    assert torch.equal(fc1[: gate.shape[0]], gate) and torch.equal(fc1[gate.shape[0]:], up)


def test_te_names_match_the_te_layer_parameters():
    from te_llama import TELlamaForCausalLM

    model = TELlamaForCausalLM.from_config(tiny_config(attention_bias=True, mlp_bias=True))
    te_names = set(model.state_dict())
    hf_state = random_hf_model(tiny_config(attention_bias=True, mlp_bias=True)).state_dict()
    assert set(hf_to_te(hf_state)) == te_names


def test_reverse_table_is_derived_and_complete():
    assert TE_TO_HF == {te: hf for hf, te in HF_TO_TE.items() if te is not None}
    assert len(TE_TO_HF) == sum(te is not None for te in HF_TO_TE.values())
    for fused, parts in FUSED.items():
        assert all(hf_target(p.format(3))[0] == fused.format(3) for p in parts)


def test_extra_state_and_tied_head_are_not_saved():
    te_state = hf_to_te(random_hf_model(tiny_config()).state_dict())
    te_state["model.layers.0.layernorm_mlp._extra_state"] = torch.tensor([1, 2, 3], dtype=torch.uint8)
    hf = te_to_hf(te_state, tie_word_embeddings=True)
    assert not any(k.endswith("_extra_state") for k in hf)
    assert "lm_head.weight" not in hf


def test_unknown_and_incomplete_keys_are_errors():
    with pytest.raises(WeightMappingError, match="model.layers.0.mlp.weird.weight"):
        hf_target("model.layers.0.mlp.weird.weight")
    with pytest.raises(WeightMappingError, match="up_proj"):
        hf_to_te({"model.layers.0.mlp.gate_proj.weight": torch.zeros(4, 2)})
    assert hf_target("model.layers.5.self_attn.rotary_emb.inv_freq") is None
