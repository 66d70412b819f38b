"""PEFT LoRA written as for an HF Llama runs on te-llama with HF's math, and adapters move both ways.

Every comparison is against plain transformers + PEFT on the same weights, in float32 on the reference layer.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from conftest import relative_error, tiny_config
from te_llama import TELlamaForCausalLM
from te_llama.model.adapters import AdapterError, ProjectionSite

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_config(targets=ALL, **overrides) -> LoraConfig:
    # init_lora_weights=False: B is random too, so the adapters change the output from the first step
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": targets, "lora_dropout": 0.0,
                         "task_type": "CAUSAL_LM", "init_lora_weights": False, **overrides})


def batch(seed: int = 1, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(params=[False, True], ids=["no-bias", "bias"])
def pair(request, hf_checkpoint):
    """(HF model, te-llama model) with the same random weights."""
    config = tiny_config(attention_bias=request.param, mlp_bias=request.param)
    directory, hf = hf_checkpoint(config)
    return hf, TELlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)


def test_sites_have_hf_names_and_views_of_te_weights(pair):
    _, te = pair
    layer = te.model.layers[0]
    sites = {name: module for name, module in te.named_modules() if isinstance(module, ProjectionSite)}
    assert sorted({name.split(".")[-1] for name in sites}) == sorted(ALL)
    assert "model.layers.1.self_attn.q_proj" in sites and "model.layers.1.mlp.down_proj" in sites
    ffn = te.config.intermediate_size
    fc1 = layer.layernorm_mlp.fc1_weight
    assert layer.mlp.up_proj.weight.data_ptr() == fc1[ffn:].data_ptr()
    assert layer.self_attn.k_proj.weight is layer.self_attention.layernorm_qkv.key_weight
    assert not any("_proj" in name for name in te.state_dict())  # TE's parameters appear once


@pytest.mark.parametrize("targets", [ALL, "all-linear", ["q_proj", "v_proj"], ["o_proj", "down_proj"]],
                         ids=["all", "all-linear", "q-v", "o-down"])
def test_hf_adapter_loads_into_te_llama_with_the_same_logits(pair, targets, tmp_path):
    hf, te = pair
    torch.manual_seed(0)
    hf_peft = get_peft_model(hf, lora_config(targets))
    hf_peft.save_pretrained(tmp_path / "adapter")
    te_peft = PeftModel.from_pretrained(te, tmp_path / "adapter")
    ids = batch()
    expected = logits(hf_peft, ids)
    assert relative_error(logits(te_peft, ids), expected) < 1e-5
    with hf_peft.disable_adapter(), te_peft.disable_adapter():
        base = logits(hf_peft, ids)
        assert relative_error(logits(te_peft, ids), base) < 1e-5
    assert relative_error(base, expected) > 1e-3  # the adapters do change the output


def test_te_llama_adapter_trains_frozen_base_and_loads_into_hf(pair, tmp_path):
    hf, te = pair
    torch.manual_seed(0)
    te_peft = get_peft_model(te, lora_config("all-linear"))
    te_peft.train()
    base_before = {name: p.detach().clone() for name, p in te.named_parameters() if "lora_" not in name}
    optimizer = torch.optim.AdamW([p for p in te_peft.parameters() if p.requires_grad], lr=1e-2)
    ids = batch(2)
    for _ in range(3):
        loss = te_peft(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is None for name, p in te.named_parameters() if "lora_" not in name)
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(p, base_before[name]) for name, p in te.named_parameters() if "lora_" not in name)
    te_peft.save_pretrained(tmp_path / "adapter")
    saved = peft.utils.load_peft_weights(str(tmp_path / "adapter"))
    assert "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight" in saved  # HF's names
    hf_peft = PeftModel.from_pretrained(hf, tmp_path / "adapter")
    te_peft.eval()
    ids = batch(3)
    assert relative_error(logits(te_peft, ids), logits(hf_peft, ids)) < 1e-5


def test_gradients_of_the_adapters_equal_hf(pair, tmp_path):
    hf, te = pair
    torch.manual_seed(0)
    hf_peft = get_peft_model(hf, lora_config("all-linear", lora_dropout=0.0, use_rslora=True))
    hf_peft.save_pretrained(tmp_path / "adapter")
    te_peft = PeftModel.from_pretrained(te, tmp_path / "adapter", is_trainable=True)
    ids = batch(4)
    grads = []
    for model in (hf_peft, te_peft):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({name.replace(".base_model", ""): p.grad for name, p in model.named_parameters()
                      if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 7 * 2
    for name, grad in grads[0].items():
        assert relative_error(grads[1][name], grad) < 1e-5, name


def test_merge_and_unload_gives_a_plain_hf_checkpoint(pair, tmp_path):
    hf, te = pair
    torch.manual_seed(0)
    hf_peft = get_peft_model(hf, lora_config("all-linear"))
    hf_peft.save_pretrained(tmp_path / "adapter")
    te_peft = PeftModel.from_pretrained(te, tmp_path / "adapter")
    ids = batch(5)
    expected = logits(hf_peft, ids)
    merged = te_peft.merge_and_unload(safe_merge=True)
    assert isinstance(merged, TELlamaForCausalLM)
    assert relative_error(logits(merged, ids), expected) < 1e-5
    merged.save_pretrained(tmp_path / "merged")
    plain = LlamaForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert relative_error(logits(plain, ids), expected) < 1e-5


def test_several_adapters_and_switching(pair, tmp_path):
    hf, te = pair
    for seed, name in ((0, "first"), (1, "second")):
        torch.manual_seed(seed)
        get_peft_model(LlamaForCausalLM(hf.config), lora_config(ALL)).save_pretrained(tmp_path / name)
    hf_peft = PeftModel.from_pretrained(hf, tmp_path / "first", adapter_name="first")
    hf_peft.load_adapter(tmp_path / "second", adapter_name="second")
    te_peft = PeftModel.from_pretrained(te, tmp_path / "first", adapter_name="first")
    te_peft.load_adapter(tmp_path / "second", adapter_name="second")
    ids = batch(6)
    outputs = []
    for name in ("first", "second"):
        hf_peft.set_adapter(name)
        te_peft.set_adapter(name)
        outputs.append(logits(te_peft, ids))
        assert relative_error(outputs[-1], logits(hf_peft, ids)) < 1e-5, name
    assert relative_error(outputs[0], outputs[1]) > 1e-3  # the switch took effect


def test_unsupported_peft_methods_are_refused_by_name(pair):
    _, te = pair
    dora = get_peft_model(te, lora_config(["q_proj"], use_dora=True))
    with pytest.raises(AdapterError, match="use_dora"):
        dora(input_ids=batch())
    _, te2 = pair[0], TELlamaForCausalLM.from_config(te.config, dtype=torch.float32)
    ia3 = get_peft_model(te2, peft.IA3Config(target_modules=["k_proj", "down_proj"],
                                             feedforward_modules=["down_proj"], task_type="CAUSAL_LM"))
    with pytest.raises(AdapterError, match="LoRA"):
        ia3(input_ids=batch())


def test_saving_the_base_model_with_unmerged_adapters_says_what_to_do(pair, tmp_path):
    _, te = pair
    get_peft_model(te, lora_config(["q_proj"]))
    with pytest.raises(Exception, match="merge_and_unload"):
        te.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_generation_with_adapters_matches_hf_peft(pair, tmp_path):
    hf, te = pair
    torch.manual_seed(0)
    get_peft_model(LlamaForCausalLM(hf.config), lora_config("all-linear")).save_pretrained(tmp_path / "adapter")
    hf_peft = PeftModel.from_pretrained(hf, tmp_path / "adapter")
    te_peft = PeftModel.from_pretrained(te, tmp_path / "adapter")
    ids = batch(7)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(te_peft.generate(input_ids=ids, **kwargs), hf_peft.generate(input_ids=ids, **kwargs))


def lora_forward_calls(monkeypatch) -> list[int]:
    """Counts calls of PEFT's own LoRA forward (te-llama computes the adapters itself: te_llama.model.lora)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    calls, forward = [0], LoraLinear.forward

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LoraLinear, "forward", counted)
    return calls


@pytest.mark.parametrize("overrides", [{}, {"lora_dropout": 0.1}, {"lora_bias": True}],
                         ids=["fused", "dropout", "lora-bias"])
def test_adapters_of_one_fused_projection_run_as_two_gemms(pair, overrides, tmp_path, monkeypatch):
    hf, te = pair
    torch.manual_seed(0)
    hf_peft = get_peft_model(hf, lora_config("all-linear", **overrides))
    if overrides.get("lora_bias"):  # PEFT initialises B's bias to zero: make it matter
        with torch.no_grad():
            for name, p in hf_peft.named_parameters():
                if "lora_B" in name and name.endswith("bias"):
                    p.normal_()
    hf_peft.save_pretrained(tmp_path / "adapter")
    te_peft = PeftModel.from_pretrained(te, tmp_path / "adapter")
    ids = batch(8)
    hf_peft.eval(), te_peft.eval()  # dropout off in both
    expected = logits(hf_peft, ids)
    calls = lora_forward_calls(monkeypatch)
    assert relative_error(logits(te_peft, ids), expected) < 1e-5
    # Only LoRA with a bias on B runs PEFT's forward (one call per site and layer); the rest is te-llama's GEMMs.
    assert calls[0] == (7 * te.config.num_hidden_layers if overrides.get("lora_bias") else 0)


def test_lora_dropout_trains_like_peft(pair, tmp_path):
    hf, te = pair
    torch.manual_seed(0)
    hf_peft = get_peft_model(hf, lora_config(["q_proj", "up_proj"], lora_dropout=0.5))
    hf_peft.save_pretrained(tmp_path / "adapter")
    te_peft = PeftModel.from_pretrained(te, tmp_path / "adapter", is_trainable=True).train()
    ids = batch(9)
    losses = [te_peft(input_ids=ids, labels=ids).loss.item() for _ in range(2)]
    assert losses[0] != losses[1]  # dropout draws new masks each forward
    hf_peft.eval(), te_peft.eval()
    assert relative_error(logits(te_peft, ids), logits(hf_peft, ids)) < 1e-5


def test_bfloat16_adapters_are_as_close_to_float32_as_peft(hf_checkpoint, tmp_path):
    # PEFT keeps float32 adapters on a bfloat16 model and computes them in float32; te-llama computes them in
    # bfloat16 from the same float32 weights. Both against the float32 model with the same adapter:
    directory, _ = hf_checkpoint(tiny_config())
    torch.manual_seed(0)
    get_peft_model(LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32),
                   lora_config("all-linear")).save_pretrained(tmp_path / "adapter")
    ids = batch(10)
    errors = {}
    for dtype in (torch.float32, torch.bfloat16):
        for cls in (LlamaForCausalLM, TELlamaForCausalLM):
            model = PeftModel.from_pretrained(cls.from_pretrained(directory, dtype=dtype), tmp_path / "adapter")
            errors[cls, dtype] = logits(model, ids)
    truth = errors[LlamaForCausalLM, torch.float32]
    assert relative_error(errors[TELlamaForCausalLM, torch.float32], truth) < 1e-5
    hf_error = relative_error(errors[LlamaForCausalLM, torch.bfloat16], truth)
    te_error = relative_error(errors[TELlamaForCausalLM, torch.bfloat16], truth)
    assert 0 < te_error < 1.5 * hf_error, (te_error, hf_error)  # measured: 0.015 against PEFT's 0.013
