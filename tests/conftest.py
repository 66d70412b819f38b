"""Shared fixtures: tiny random configs (Llama and the other families) and checkpoints written by plain transformers;
an HF model and te-llama on the same weights with prompts for generate(); running a Triton kernel under Triton's
interpreter."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import torch
from transformers import CONFIG_MAPPING, LlamaConfig, LlamaModel, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    pad_token_id=0,
)


@pytest.fixture(autouse=True)
def _backend_for_the_tier(request, monkeypatch):
    """CPU tests run the reference layer; GPU tests (marker ``gpu``) run Transformer Engine, and a GPU test that
    cannot get it fails instead of silently testing the reference. An explicit ``backend=`` argument still wins."""
    monkeypatch.setenv("TE_LLAMA_BACKEND", "te" if "gpu" in request.keywords else "reference")


def tiny_config(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**BASE, **overrides})


def family_config(model_type: str, **overrides) -> PretrainedConfig:
    """A tiny config of ``model_type``'s own config class (``MistralConfig``, ...) with :data:`BASE`'s sizes."""
    return CONFIG_MAPPING[model_type](**{**BASE, **overrides})


def random_hf_model(config: PretrainedConfig, seed: int = 0):
    """A plain HF causal LM of the config's family (``LlamaForCausalLM``, ...) with random weights, norms and biases
    perturbed so that every tensor matters."""
    torch.manual_seed(seed)
    model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    return model


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: save a random HF model and return (directory, model)."""

    def make(config: PretrainedConfig | None = None, seed: int = 0, name: str = "hf", **save_kwargs):
        model = random_hf_model(config or tiny_config(), seed)
        directory = tmp_path / name
        model.save_pretrained(directory, **save_kwargs)
        return directory, model

    return make


@pytest.fixture(params=[False, True], ids=["no-bias", "bias"])
def generation_pair(request, hf_checkpoint):
    """(plain HF ``LlamaForCausalLM``, te-llama on the same weights), 3 layers, fp32, with and without biases, no end
    token (every generation runs to ``max_new_tokens``)."""
    from te_llama import TELlamaForCausalLM

    config = tiny_config(num_hidden_layers=3, eos_token_id=None, bos_token_id=None,
                         attention_bias=request.param, mlp_bias=request.param)
    directory, hf = hf_checkpoint(config)
    return hf, TELlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)


CACHE = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"
"""The name of the cache argument of forward() and generate(): transformers >= 5.20 calls it ``cache``, 5.17
``past_key_values``."""


def prompt(seed=6, batch=1, length=7):
    return torch.randint(1, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padded(seed=7):
    """(ids, attention mask) of 3 rows of 9 tokens, the last two left-padded by 3 and 6 (pad id 0)."""
    ids = prompt(seed, batch=3, length=9)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.fixture
def stream_calls(monkeypatch):
    """The :class:`te_llama.model.packed.PackedSequences` of each decoder-layer forward that ran on the padding-free
    stream, in order."""
    from te_llama.model import packed

    calls = []
    original = packed.forward_packed

    def counted(layer, hidden_states, sequences, *args):
        calls.append(sequences)
        return original(layer, hidden_states, sequences, *args)

    monkeypatch.setattr("te_llama.model.layer.forward_packed", counted)
    return calls


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def run_interpreted(script: str, tmp_path, cases: list[dict]) -> list[dict]:
    """Run ``script`` on ``cases`` under ``TRITON_INTERPRET=1`` in a fresh process and return the cases it saved
    back: Triton reads the switch when it is imported (its ``tl.max`` and ``tl.sum`` are compiled then), and this
    process may have imported it. The script loads the cases from ``sys.argv[1]`` and saves them there again;
    views keep their strides through ``torch.save``."""
    pytest.importorskip("triton")
    path = tmp_path / "cases.pt"
    torch.save(cases, path)
    subprocess.run([sys.executable, "-c", script, str(path)], env=dict(os.environ, TRITON_INTERPRET="1"), check=True,
                   timeout=300)
    return torch.load(path)
