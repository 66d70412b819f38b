"""Mistral, Qwen2 and Qwen3 (and Llama) through ``te_llama.AutoModelForCausalLM``: each family against transformers'
own class in float32 on the reference layer, checkpoints both ways, training, generation, LoRA, and the errors."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

import te_llama
from conftest import family_config, random_hf_model, relative_error
from te_llama import AutoModelForCausalLM, CheckpointError, UnsupportedConfigError
from te_llama.checkpoint import weight_mapping
from training_loop import losses_on_one_batch

CASES = {
    "llama": ("llama", {}),
    "llama-attention-bias-only": ("llama", dict(attention_bias=True, mlp_bias=False)),
    "mistral": ("mistral", dict(sliding_window=None)),
    "mistral-window": ("mistral", dict(sliding_window=8)),  # sequences of 24: the window matters
    "qwen2": ("qwen2", {}),
    "qwen2-all-sliding": ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=0)),
    "qwen3": ("qwen3", dict(head_dim=24)),  # head_dim != hidden_size / heads (16)
    "qwen3-attention-bias": ("qwen3", dict(head_dim=24, attention_bias=True)),
}
FAMILIES = {"llama": ("LlamaForCausalLM", te_llama.TELlamaForCausalLM),
            "mistral": ("MistralForCausalLM", te_llama.TEMistralForCausalLM),
            "qwen2": ("Qwen2ForCausalLM", te_llama.TEQwen2ForCausalLM),
            "qwen3": ("Qwen3ForCausalLM", te_llama.TEQwen3ForCausalLM)}
FAMILY_CASES = ["llama", "mistral-window", "qwen2", "qwen3"]


def config_of(case: str, **extra):
    model_type, overrides = CASES[case]
    return family_config(model_type, **{**overrides, **extra})


def load_pair(hf_checkpoint, case: str, **extra):
    directory, hf = hf_checkpoint(config_of(case, **extra), name=case)
    return directory, hf, AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)


def ids_and_mask(padding: str, batch: int = 3, seq: int = 24, seed: int = 2):
    ids = torch.randint(1, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for row, pad in enumerate((0, seq // 5, seq // 2)[:batch]):
        if pad and padding == "right":
            mask[row, -pad:] = 0
        elif pad and padding == "left":
            mask[row, :pad] = 0
    return ids.masked_fill(mask == 0, 0), mask


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


# --------------------------------------------------------------------------------------------- the classes
@pytest.mark.parametrize("model_type", FAMILIES)
def test_auto_class_builds_the_family_class_with_te_layers(model_type):
    hf_name, te_class = FAMILIES[model_type]
    model = AutoModelForCausalLM.from_config(family_config(model_type))
    assert type(model) is te_class and isinstance(model, getattr(transformers, hf_name))
    assert all(isinstance(layer, te_llama.TELlamaDecoderLayer) for layer in model.model.layers)
    assert type(model.model).__name__ == "TE" + hf_name.replace("ForCausalLM", "Model")


def test_replace_decoder_layer_swaps_every_family_and_restores_them():
    from transformers.models.qwen3 import modeling_qwen3

    original = modeling_qwen3.Qwen3DecoderLayer
    with te_llama.replace_decoder_layer() as layer_class:
        inside = transformers.Qwen3ForCausalLM(family_config("qwen3"))
        mistral = transformers.MistralForCausalLM(family_config("mistral"))
    outside = transformers.Qwen3ForCausalLM(family_config("qwen3"))
    assert isinstance(inside.model.layers[0], layer_class) and isinstance(mistral.model.layers[0], layer_class)
    assert type(outside.model.layers[0]) is original is modeling_qwen3.Qwen3DecoderLayer


# ------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("case", CASES)
def test_logits_match_hf(hf_checkpoint, case, padding):
    _, hf, te = load_pair(hf_checkpoint, case)
    ids, mask = ids_and_mask(padding)
    expected, actual = logits(hf, ids, mask), logits(te, ids, mask)
    real = mask.bool()
    assert torch.isfinite(actual).all()
    assert relative_error(actual[real], expected[real]) < 1e-5


def test_the_sliding_window_changes_the_logits(hf_checkpoint):
    """The window test above means something: Mistral without the window differs at 24 tokens."""
    _, hf, te = load_pair(hf_checkpoint, "mistral-window")
    full = transformers.MistralForCausalLM(config_of("mistral")).eval()
    full.load_state_dict(hf.state_dict())
    ids, _ = ids_and_mask("none")
    assert relative_error(logits(full, ids), logits(te, ids)) > 1e-3


@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_sliding_window_batches_keep_te_fused_paths(hf_checkpoint, padding):
    """Whole rows run TE's causal type (TE applies the window); padded ones the padding-free stream, whose attention
    applies the same window within each sequence."""
    from te_llama.model.masks import te_mask_from_hf

    _, _, te = load_pair(hf_checkpoint, "mistral-window")
    seen = []
    te.model.layers[0].register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True)
    ids, mask = ids_and_mask(padding)
    logits(te, ids, mask)
    if padding == "none":
        assert te_mask_from_hf(seen[0]["attention_mask"], 3, 24, window=8).mask_type == "causal"
    else:
        assert seen[0]["packed_sequences"].real_tokens == int(mask.sum())


@pytest.mark.parametrize("case", ["mistral-window", "qwen2", "qwen3-attention-bias"])
def test_gradients_match_hf(hf_checkpoint, case):
    _, hf, te = load_pair(hf_checkpoint, case)
    hf.train(), te.train()
    ids, _ = ids_and_mask("none", batch=2)
    hf(input_ids=ids, labels=ids).loss.backward()
    te(input_ids=ids, labels=ids).loss.backward()
    table = te.te_family.weights
    te_grads = weight_mapping.te_to_hf({k: p.grad for k, p in te.named_parameters()}, table=table)
    assert te_grads.keys() == dict(hf.named_parameters()).keys()
    for name, param in hf.named_parameters():
        assert relative_error(te_grads[name], param.grad) < 1e-5, name


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("case", CASES)
def test_save_round_trip_is_bit_exact_and_plain_hf_loads_it(hf_checkpoint, tmp_path, case):
    directory, hf, te = load_pair(hf_checkpoint, case)
    te.save_pretrained(tmp_path / "out")
    original, saved = load_file(directory / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[key], original[key]) for key in original)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == [FAMILIES[config["model_type"]][0]]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert type(reloaded) is type(hf)
    ids, _ = ids_and_mask("none")
    assert torch.equal(logits(reloaded, ids), logits(hf, ids))


@pytest.mark.parametrize("case", ["qwen2", "llama-attention-bias-only", "qwen3-attention-bias"])
def test_biases_hf_lacks_are_zeros_outside_parameters_and_checkpoints(hf_checkpoint, tmp_path, case):
    """TE's one bias switch also gives the projections HF has no bias on one; te-llama keeps those as zero buffers
    that no optimizer, state dict or checkpoint sees, and they stay zero through training."""
    directory, hf, te = load_pair(hf_checkpoint, case)
    hf_names = set(dict(hf.named_parameters()))
    te_params = dict(te.named_parameters())
    assert set(weight_mapping.te_to_hf(te_params, table=te.te_family.weights)) == hf_names
    assert sum(p.numel() for p in te_params.values()) == sum(p.numel() for p in hf.parameters())
    zeros = {name: buffer for name, buffer in te.named_buffers() if "bias" in name}
    assert zeros and all(not buffer.any() and not buffer.requires_grad for buffer in zeros.values())
    assert not set(zeros) & set(te.state_dict())
    te.train()
    optimizer = torch.optim.AdamW(te.parameters(), lr=1e-2)
    assert sum(p.numel() for group in optimizer.param_groups for p in group["params"]) == sum(
        p.numel() for p in hf.parameters())
    ids, _ = ids_and_mask("none", batch=2)
    for _ in range(2):
        te(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(not buffer.any() for buffer in zeros.values())
    te.save_pretrained(tmp_path / "trained")
    assert set(load_file(tmp_path / "trained" / "model.safetensors")) == set(load_file(directory / "model.safetensors"))
    te.load_state_dict(hf.state_dict())  # HF names, strict: nothing of the zeros is expected
    assert relative_error(logits(te, ids), logits(hf, ids)) < 1e-5


def test_family_weight_tables_round_trip_and_name_the_model_parameters():
    for model_type, overrides in (("mistral", {}), ("qwen2", {}), ("qwen3", dict(attention_bias=True))):
        config = family_config(model_type, **overrides)
        hf_state = random_hf_model(config).state_dict()
        te = AutoModelForCausalLM.from_config(config)
        table = te.te_family.weights
        te_state = weight_mapping.hf_to_te(hf_state, table)
        assert set(te_state) == set(te.state_dict())
        back = weight_mapping.te_to_hf(te_state, table=table)
        assert back.keys() == hf_state.keys() and all(torch.equal(back[k], hf_state[k]) for k in hf_state)
        assert table.te_to_hf == {te_key: hf for hf, te_key in table.hf_to_te.items() if te_key is not None}
    assert weight_mapping.hf_target("model.layers.2.self_attn.k_norm.weight", weight_mapping.QWEN3) == (
        "model.layers.2.self_attention.k_norm.weight", 0, 1)
    with pytest.raises(weight_mapping.WeightMappingError, match="is not a Mistral weight"):
        weight_mapping.hf_target("model.layers.0.self_attn.q_proj.bias", weight_mapping.MISTRAL)


# ------------------------------------------------------------------------------------ training, generation
@pytest.mark.parametrize("case", FAMILY_CASES)
def test_training_lowers_the_loss(case):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_of(case)).train()
    optimizer = te_llama.AdamW(model.parameters(), lr=3e-3)
    ids, _ = ids_and_mask("none", batch=2)
    losses = losses_on_one_batch(model, optimizer, 6, input_ids=ids, labels=ids)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.1


@pytest.mark.parametrize("case", ["mistral-window", "qwen2", "qwen3", "qwen2-all-sliding"])
def test_greedy_generation_matches_hf(hf_checkpoint, case):
    """Through HF's KV cache (with a sliding window: HF's sliding cache layers), single and left-padded batches."""
    _, hf, te = load_pair(hf_checkpoint, case, eos_token_id=None, bos_token_id=None)
    ids, mask = ids_and_mask("left", seq=10)
    kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert torch.equal(te.generate(ids[:1], **kwargs), hf.generate(ids[:1], **kwargs))
    assert torch.equal(te.generate(ids, attention_mask=mask, **kwargs), hf.generate(ids, attention_mask=mask, **kwargs))


@pytest.mark.parametrize("case", ["qwen3", "qwen2", "mistral-window"])
def test_lora_on_q_and_k_matches_hf_peft(hf_checkpoint, tmp_path, case):
    """Qwen3's q/k norm sees q_proj(x) + the adapter's share, as in HF + PEFT; adapters move both ways."""
    peft = pytest.importorskip("peft")
    _, hf, te = load_pair(hf_checkpoint, case)
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], lora_dropout=0.0,
                             init_lora_weights=False, task_type="CAUSAL_LM")
    hf_peft = peft.get_peft_model(hf, config)
    hf_peft.save_pretrained(tmp_path / "adapter")
    te_peft = peft.PeftModel.from_pretrained(te, tmp_path / "adapter")
    ids, mask = ids_and_mask("right")
    expected, actual = logits(hf_peft, ids, mask), logits(te_peft, ids, mask)
    real = mask.bool()
    assert relative_error(actual[real], expected[real]) < 1e-5
    with hf_peft.disable_adapter():
        assert relative_error(logits(hf_peft, ids, mask)[real], expected[real]) > 1e-3  # the adapters matter


# ------------------------------------------------------------------------------------------------- errors
def test_model_types_no_family_supports_are_errors_naming_model_type(hf_checkpoint):
    gpt2 = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2)
    with pytest.raises(UnsupportedConfigError, match="model_type is 'gpt2'; te-llama runs the model types 'llama', "
                                                     "'mistral', 'qwen2', 'qwen3'"):
        AutoModelForCausalLM.from_config(gpt2)
    directory, _ = hf_checkpoint(family_config("llama"))
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "gemma"}))
    with pytest.raises(CheckpointError, match="model_type is 'gemma'; te-llama runs the model types"):
        AutoModelForCausalLM.from_pretrained(directory)
    with pytest.raises(TypeError, match="from_pretrained"):
        AutoModelForCausalLM()


def test_a_family_class_refuses_another_familys_config_and_checkpoint(hf_checkpoint):
    with pytest.raises(UnsupportedConfigError, match="TEMistralForCausalLM runs model_type 'mistral'.*"
                                                     "AutoModelForCausalLM"):
        te_llama.TEMistralForCausalLM.from_config(family_config("llama"))
    directory, _ = hf_checkpoint(family_config("qwen3"))
    with pytest.raises(CheckpointError, match="model_type is 'qwen3', not 'llama'; load it with "
                                              "te_llama.AutoModelForCausalLM"):
        te_llama.TELlamaForCausalLM.from_pretrained(directory)


@pytest.mark.parametrize("model_type, overrides, field", [
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1), "max_window_layers=1"),
    ("qwen3", dict(layer_types=["full_attention", "sliding_attention"], use_sliding_window=True), "layer_types"),
    ("mistral", dict(sliding_window=0), "sliding_window=0"),
    ("qwen3", dict(hidden_act="gelu"), "hidden_act"),
    ("mistral", dict(use_sliding_window=True), "use_sliding_window"),
    ("qwen2", dict(num_key_value_heads=3), "num_key_value_heads"),
])
def test_configs_te_llama_cannot_express_name_the_field(model_type, overrides, field):
    with pytest.raises(UnsupportedConfigError, match=field):
        AutoModelForCausalLM.from_config(family_config(model_type, **overrides))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_fp8_on_the_reference_backend_is_refused_for_every_family(model_type):
    from te_llama import FP8ConfigError

    model = AutoModelForCausalLM.from_config(family_config(model_type))
    with pytest.raises(FP8ConfigError, match="reference backend"):
        model.enable_fp8("delayed")
    with pytest.raises(FP8ConfigError, match="reference backend"):
        AutoModelForCausalLM.from_config(family_config(model_type), fp8="delayed")


@pytest.mark.parametrize("case", ["qwen2", "qwen3", "mistral"])
def test_decode_graphs_give_hf_tokens_for_each_family(hf_checkpoint, case):
    """The recorded decode step (its CPU stand-in, capture=False) serves Qwen2's biases, Qwen3's q/k norm and
    Mistral without a window as HF's own classes decode; the tokens equal HF's on a static cache."""
    _, hf, te = load_pair(hf_checkpoint, case, eos_token_id=None, bos_token_id=None)
    ids, mask = ids_and_mask("left", seq=10)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                  cache_implementation="static")
    te.enable_decode_graphs(capture=False)
    assert torch.equal(te.generate(ids, **kwargs), hf.generate(ids, **kwargs))
    assert te.decode_graph_replays() == 11  # every step after the prompt's
