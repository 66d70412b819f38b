"""GPU tests: real Transformer Engine on a CUDA GPU. Run with ``pytest -m gpu tests/gpu``.

Numbers each test measures are collected and, when ``TE_LLAMA_REPORT`` names a file, written there as JSON.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)
pytest.importorskip("transformer_engine.pytorch")

_RESULTS: list[dict] = []


@pytest.fixture(scope="session")
def record():
    def add(**row):
        _RESULTS.append(row)
        print(json.dumps(row))

    return add


@pytest.fixture
def small_checkpoint(tmp_path):
    """A random 2-layer Llama with a byte-level BPE tokenizer trained on the README (no hub, no GGUF here)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    tokenizer.train_from_iterator(text.splitlines(), trainers.BpeTrainer(
        vocab_size=1024, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    directory = tmp_path / "model"
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(directory)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1408, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    return directory


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("TE_LLAMA_REPORT")
    if path and _RESULTS:
        import transformer_engine
        import transformers

        meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                "transformers": transformers.__version__, "transformer_engine": transformer_engine.__version__}
        with open(path, "w") as handle:
            json.dump({"environment": meta, "results": _RESULTS}, handle, indent=1)
