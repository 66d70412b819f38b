"""Loading streams shard by shard: peak host memory stays near the model plus one shard."""

import os
import subprocess
import sys

from conftest import random_hf_model, tiny_config

SCRIPT = """
import resource, sys, torch
from te_llama import TELlamaForCausalLM
from transformers import LlamaConfig
if sys.argv[1] == "load":
    model = TELlamaForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32)
else:  # the same model, built and initialised in place, without reading any checkpoint
    model = TELlamaForCausalLM.from_config(LlamaConfig.from_pretrained(sys.argv[2]), dtype=torch.float32)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def peak_mib(mode: str, directory) -> int:
    result = subprocess.run([sys.executable, "-c", SCRIPT, mode, str(directory)], capture_output=True, text=True,
                            check=True, env={**os.environ, "TE_LLAMA_BACKEND": "reference",
                                             "TE_LLAMA_LOG_LEVEL": "WARNING"})
    return int(result.stdout.strip().splitlines()[-1])


def test_peak_host_memory_is_model_plus_about_one_shard(tmp_path):
    config = tiny_config(vocab_size=8000, hidden_size=512, intermediate_size=1536, num_attention_heads=8,
                         num_key_value_heads=2, num_hidden_layers=8)
    model = random_hf_model(config)
    size_mib = sum(p.numel() * 4 for p in model.parameters()) / 2**20  # ~118 MiB in fp32
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="24MB")
    shards = list((tmp_path / "ckpt").glob("model-*.safetensors"))
    largest = max(p.stat().st_size for p in shards) / 2**20
    assert len(shards) >= 4 and largest < 30
    built, loaded = peak_mib("build", tmp_path / "ckpt"), peak_mib("load", tmp_path / "ckpt")
    overhead = loaded - built
    print(f"model {size_mib:.0f} MiB in {len(shards)} shards (largest {largest:.0f} MiB); peak RSS built {built} "
          f"MiB, loaded {loaded} MiB (+{overhead} MiB)")
    # a loader that read the whole state dict first would add the model's size (~118 MiB) again
    assert overhead < 2 * largest + 20
