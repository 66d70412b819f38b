"""generate(): greedy tokens identical to HF (reference backend, fp32), batched with left padding."""

import pytest
import torch

from conftest import tiny_config
from te_llama import KVCacheNotSupportedError, TELlamaForCausalLM


@pytest.fixture
def pair(hf_checkpoint):
    directory, hf = hf_checkpoint(tiny_config(num_hidden_layers=3, eos_token_id=None, bos_token_id=None))
    return hf, TELlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)


def test_greedy_generation_matches_hf(pair):
    hf, te = pair
    prompt = torch.randint(1, 128, (1, 7), generator=torch.Generator().manual_seed(6))
    expected = hf.generate(prompt, max_new_tokens=20, do_sample=False)
    actual = te.generate(prompt, max_new_tokens=20, do_sample=False)
    assert torch.equal(actual, expected)


def test_batched_left_padded_generation_matches_hf(pair):
    hf, te = pair
    ids = torch.randint(1, 128, (3, 9), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    ids = ids.masked_fill(mask == 0, 0)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(te.generate(ids, **kwargs), hf.generate(ids, **kwargs))


def test_asking_for_a_kv_cache_is_a_clear_error(pair):
    _, te = pair
    with pytest.raises(KVCacheNotSupportedError, match="use_cache=False"):
        te.generate(torch.randint(1, 128, (1, 4)), max_new_tokens=2, use_cache=True)
