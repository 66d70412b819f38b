"""Loading HF checkpoints in every layout, saving them back, and the errors for bad input."""

import json

import pytest
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from conftest import random_hf_model, relative_error, tiny_config
from te_llama import CheckpointError, TELlamaForCausalLM
from te_llama.checkpoint.files import weight_files

IDS = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(5))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def write_bin(directory, model, max_shard_size=None):
    """A PyTorch .bin checkpoint as older transformers wrote them (transformers 5 only writes safetensors)."""
    directory.mkdir()
    model.config.save_pretrained(directory)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if max_shard_size is None:
        torch.save(state, directory / "pytorch_model.bin")
        return
    split = split_torch_state_dict_into_shards(state, filename_pattern="pytorch_model{suffix}.bin",
                                               max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        torch.save({n: state[n] for n in names}, directory / filename)
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def test_sharded_safetensors_with_layers_split_across_shards(hf_checkpoint):
    directory, hf = hf_checkpoint(max_shard_size="40KB")
    weight_map = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    layer0_files = {f for k, f in weight_map.items() if k.startswith("model.layers.0.")}
    assert len(set(weight_map.values())) > 2 and len(layer0_files) > 1
    te = TELlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)
    assert relative_error(logits(te), logits(hf)) < 1e-5


@pytest.mark.parametrize("max_shard_size", [None, "40KB"])
def test_pytorch_bin_checkpoints(tmp_path, max_shard_size):
    hf = random_hf_model(tiny_config())
    write_bin(tmp_path / "bin", hf, max_shard_size)
    te = TELlamaForCausalLM.from_pretrained(tmp_path / "bin", dtype=torch.float32)
    assert relative_error(logits(te), logits(hf)) < 1e-5


def test_tied_embeddings_share_one_tensor(hf_checkpoint):
    directory, hf = hf_checkpoint(tiny_config(tie_word_embeddings=True))
    te = TELlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)
    assert te.lm_head.weight is te.model.embed_tokens.weight
    assert relative_error(logits(te), logits(hf)) < 1e-5


def test_dtype_conversion_on_load(hf_checkpoint):
    directory, _ = hf_checkpoint()
    te = TELlamaForCausalLM.from_pretrained(directory, torch_dtype=torch.bfloat16)
    assert {p.dtype for p in te.parameters()} == {torch.bfloat16}
    state = load_file(directory / "model.safetensors")
    loaded = te.model.layers[1].self_attention.layernorm_qkv.key_weight
    assert torch.equal(loaded, state["model.layers.1.self_attn.k_proj.weight"].to(torch.bfloat16))


@pytest.mark.parametrize("tied", [False, True])
def test_save_is_a_plain_hf_checkpoint_with_identical_tensors(hf_checkpoint, tmp_path, tied):
    directory, hf = hf_checkpoint(tiny_config(tie_word_embeddings=tied, attention_bias=True, mlp_bias=True))
    te = TELlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)
    te.save_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["use_cache"] is True
    original, saved = load_file(directory / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[k], original[k]) for k in original)
    assert not any("extra_state" in k for k in saved)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert torch.equal(logits(reloaded), logits(hf))


def test_large_saves_are_sharded_with_an_index(hf_checkpoint, tmp_path):
    directory, hf = hf_checkpoint()
    te = TELlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)
    te.save_pretrained(tmp_path / "out", max_shard_size="50KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert torch.equal(logits(reloaded), logits(hf))


def test_failed_save_leaves_nothing_behind(hf_checkpoint, tmp_path, monkeypatch):
    import te_llama.checkpoint.files as io

    directory, _ = hf_checkpoint()
    te = TELlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)
    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return io.__dict__["_real_save_file"](tensors, path, metadata=metadata)

    monkeypatch.setitem(io.__dict__, "_real_save_file", io.save_file)
    monkeypatch.setattr(io, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        te.save_pretrained(tmp_path / "out", max_shard_size="50KB")
    assert list(tmp_path.iterdir()) == [directory]  # no target, no staging directory


def test_resave_over_an_existing_checkpoint_keeps_other_files(hf_checkpoint, tmp_path):
    directory, hf = hf_checkpoint()
    te = TELlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)
    out = tmp_path / "out"
    te.save_pretrained(out, max_shard_size="50KB")
    (out / "tokenizer.json").write_text("{}")
    te.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    assert torch.equal(logits(LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)), logits(hf))


# ----------------------------------------------------------------------------------------------- bad input
def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        TELlamaForCausalLM.from_pretrained(tmp_path / "nope")


def test_non_llama_model_type(hf_checkpoint):
    directory, _ = hf_checkpoint()
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    with pytest.raises(CheckpointError, match="model_type is 'mistral'"):
        TELlamaForCausalLM.from_pretrained(directory)


def test_missing_shard(hf_checkpoint):
    directory, _ = hf_checkpoint(max_shard_size="40KB")
    shard = sorted(directory.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing: {shard.name}"):
        TELlamaForCausalLM.from_pretrained(directory)


def test_no_weights(hf_checkpoint):
    directory, _ = hf_checkpoint()
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        TELlamaForCausalLM.from_pretrained(directory)


@pytest.mark.parametrize("damage", ["truncate", "garble_header"])
def test_corrupt_safetensors(hf_checkpoint, damage):
    directory, _ = hf_checkpoint()
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:8] + b"\xff" * 64 + data[72:])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated"):
        TELlamaForCausalLM.from_pretrained(directory)


def test_shape_that_disagrees_with_config(hf_checkpoint):
    directory, _ = hf_checkpoint()
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "intermediate_size": 80}))
    with pytest.raises(CheckpointError, match=r"gate_proj.weight in model.safetensors has shape \(96, 64\)"):
        TELlamaForCausalLM.from_pretrained(directory)


def test_missing_and_unexpected_keys_are_listed(hf_checkpoint, tmp_path):
    from safetensors.torch import save_file

    directory, hf = hf_checkpoint()
    state = load_file(directory / "model.safetensors")
    del state["model.layers.1.self_attn.o_proj.weight"]
    state["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(state, directory / "model.safetensors")
    with pytest.raises(CheckpointError) as error:
        TELlamaForCausalLM.from_pretrained(directory)
    assert "missing tensors: model.layers.1.self_attn.o_proj.weight" in str(error.value)
    assert "unexpected tensors: model.layers.0.mlp.extra.weight" in str(error.value)


def test_index_is_preferred_and_validated(hf_checkpoint):
    directory, _ = hf_checkpoint(max_shard_size="40KB")
    (directory / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid checkpoint index"):
        weight_files(directory)


def test_hf_loading_arguments_do_what_hf_does(hf_checkpoint, tmp_path):
    directory, hf = hf_checkpoint()
    expected = logits(hf)
    for kwargs in ({"device_map": "cpu"}, {"device_map": {"": "cpu"}}, {"device_map": "auto"},
                   {"attn_implementation": "sdpa", "low_cpu_mem_usage": True, "trust_remote_code": True,
                    "local_files_only": True}):
        te = TELlamaForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs)
        assert te.device.type == "cpu"
        assert relative_error(logits(te), expected) < 1e-5, kwargs
    te = TELlamaForCausalLM.from_pretrained(tmp_path, subfolder=directory.name, dtype=torch.float32)
    assert relative_error(logits(te), expected) < 1e-5


@pytest.mark.parametrize("kwargs, message", [
    ({"attn_implementation": "flash_attention_2"}, "pass attn_implementation='sdpa' or leave it out"),
    ({"device_map": {"model.embed_tokens": "cpu", "lm_head": "meta"}}, "spreads the model over 2 devices"),
    ({"device_map": "cuda:0", "device": "cpu"}, "pass one of them"),
    ({"device_map": "balanced"}, "spreads the model over the devices it finds"),
    ({"quantization_config": object()}, "unsupported argument.s. quantization_config; it takes dtype"),
])
def test_hf_loading_arguments_te_llama_cannot_honour_are_errors(hf_checkpoint, kwargs, message):
    from te_llama.model.hf_arguments import LoadingArgumentError

    with pytest.raises(LoadingArgumentError, match=message):
        TELlamaForCausalLM.from_pretrained(hf_checkpoint()[0], **kwargs)


def test_the_model_records_where_it_was_loaded_from(hf_checkpoint):
    directory, _ = hf_checkpoint()
    te = TELlamaForCausalLM.from_pretrained(directory)
    assert te.name_or_path == te.config.name_or_path == str(directory)


def test_an_adapter_directory_where_a_model_belongs_says_what_to_load(tmp_path):
    from te_llama.checkpoint.files import CheckpointError

    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="PEFT adapter directory.*--merge-lora.*PeftModel.from_pretrained"):
        TELlamaForCausalLM.from_pretrained(tmp_path)
