"""TELlamaForCausalLM on Transformer Engine against transformers' Llama and the reference layer (bf16, GPU)."""

import json

import pytest
import torch
import transformer_engine.pytorch as te
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import small_llama
import te_llama
from te_llama import TELlamaForCausalLM
from te_llama.checkpoint.weight_mapping import te_to_hf

pytestmark = pytest.mark.gpu

BASE = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0)
CASES = {
    "gqa": {},
    "mha": dict(num_key_value_heads=8),
    "head_dim": dict(head_dim=64),
    "tied": dict(tie_word_embeddings=True),
    "bias": dict(attention_bias=True, mlp_bias=True),
    "llama3_rope": dict(rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                             high_freq_factor=4.0, original_max_position_embeddings=64)),
    "yarn_rope": dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                           original_max_position_embeddings=64)),
}
LOGIT_TOL = 2e-2  # bf16: different kernels accumulate in different orders


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def hf_model(tmp_path, name, **overrides):
    return small_llama.saved_hf_model(tmp_path, name, LlamaConfig(**{**BASE, **overrides}))


def load(directory, backend):
    return TELlamaForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, device="cuda", backend=backend)


def test_te_backend_layers_are_transformer_engine_layers(tmp_path):
    directory, _ = hf_model(tmp_path, "x")
    model = load(directory, "te")
    assert issubclass(te_llama.decoder_layer_class("te"), te.TransformerLayer)
    assert all(isinstance(layer, te.TransformerLayer) for layer in model.model.layers)
    assert isinstance(model, LlamaForCausalLM)


@pytest.mark.parametrize("case", CASES)
def test_logits_match_hf_and_reference(tmp_path, case, record):
    directory, hf = hf_model(tmp_path, case, **CASES[case])
    te_model, ref = load(directory, "te"), load(directory, "reference")
    ids = torch.randint(1, 512, (2, 256), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.no_grad():
        expected, actual, oracle = hf(ids).logits, te_model(ids).logits, ref(ids).logits
    errors = dict(te_vs_hf=rel(actual, expected), te_vs_reference=rel(actual, oracle),
                  reference_vs_hf=rel(oracle, expected))
    record(test="logits", case=case, **errors)
    assert errors["te_vs_hf"] < LOGIT_TOL and errors["te_vs_reference"] < LOGIT_TOL


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batches_match_hf(tmp_path, side, record):
    directory, hf = hf_model(tmp_path, side)
    te_model = load(directory, "te")
    ids = torch.randint(1, 512, (3, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    mask = torch.ones_like(ids)
    for row, pad in enumerate((0, 17, 64)):
        if pad and side == "right":
            mask[row, -pad:] = 0
        elif pad:
            mask[row, :pad] = 0
    ids = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        expected, actual = hf(ids, attention_mask=mask).logits, te_model(ids, attention_mask=mask).logits
    real = mask.bool()
    error = rel(actual[real], expected[real])
    record(test="padded", side=side, te_vs_hf=error)
    assert torch.isfinite(actual[real]).all() and error < LOGIT_TOL


@pytest.mark.parametrize("case", ["gqa", "bias"])
def test_gradients_match_hf(tmp_path, case, record):
    """Gradients of TE (bf16) and HF (bf16) against HF in fp32: TE's error stays within 2x of HF-bf16's own."""
    directory, hf = hf_model(tmp_path, case, **CASES[case])
    te_model = load(directory, "te")
    oracle = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).cuda()
    ids = torch.randint(1, 512, (2, 256), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    losses = {}
    for name, m in (("hf", hf), ("te", te_model), ("fp32", oracle)):
        m.train()
        loss = m(ids, labels=ids).loss
        loss.backward()
        losses[name] = loss.item()
    te_grads = te_to_hf({k: p.grad for k, p in te_model.named_parameters()})
    hf_grads = {k: p.grad for k, p in hf.named_parameters()}
    rows = {name: (rel(te_grads[name], p.grad), rel(hf_grads[name], p.grad)) for name, p in oracle.named_parameters()}
    ratio = {name: te / max(hf_err, 1e-3) for name, (te, hf_err) in rows.items()}
    worst = max(ratio, key=ratio.get)
    record(test="gradients_vs_fp32", case=case, loss_fp32=losses["fp32"], loss_hf_bf16=losses["hf"],
           loss_te_bf16=losses["te"], worst_param=worst, te_rel_error=rows[worst][0], hf_bf16_rel_error=rows[worst][1],
           max_te_rel_error=max(r[0] for r in rows.values()), max_hf_bf16_rel_error=max(r[1] for r in rows.values()))
    assert abs(losses["te"] - losses["fp32"]) / losses["fp32"] < 1e-2
    assert ratio[worst] < 2.0


def test_save_round_trip_on_gpu_is_bit_exact(tmp_path):
    directory, hf = hf_model(tmp_path, "rt", tie_word_embeddings=True, attention_bias=True, mlp_bias=True)
    te_model = load(directory, "te")
    with torch.no_grad():  # a forward creates TE's FP8/extra state; it must not reach the HF files
        te_model(torch.randint(1, 512, (1, 16), device="cuda"))
    te_model.save_pretrained(tmp_path / "out")
    original, saved = load_file(directory / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in original)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert set(te_to_hf(te_model.state_dict(), tie_word_embeddings=True)) == set(original)
