"""generate() with the KV cache on TE in BF16: the cached layer path agrees with TE's fused layer and with HF."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

import small_llama
from te_llama import TELlamaForCausalLM

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gen") / "hf"
    torch.manual_seed(0)
    config = LlamaConfig(**small_llama.CONFIG, eos_token_id=None, bos_token_id=None, pad_token_id=0)
    hf = LlamaForCausalLM(config).to(torch.bfloat16).cuda().eval()
    hf.save_pretrained(directory)
    return hf, TELlamaForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, backend="te")


def _relative(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


CACHE = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"
"""What the forward calls its KV cache argument and output (transformers >= 5.20: ``cache``)."""


def _cache_of(output):
    return getattr(output, CACHE)


def test_cached_decoding_agrees_with_the_fused_layer_and_hf(pair, record):
    hf, te = pair
    ids = small_llama.batch(1, size=2, seq=64)
    with torch.no_grad():
        fused = te(input_ids=ids).logits
        prefix = te(input_ids=ids[:, :48], use_cache=True)
        step = te(input_ids=ids[:, 48:], use_cache=True, **{CACHE: _cache_of(prefix)})
        reference = hf(input_ids=ids).logits
    cached_vs_fused = _relative(step.logits, fused[:, 48:])
    te_vs_hf = _relative(fused, reference)
    record(test="kv_cache_bf16", cached_vs_fused=cached_vs_fused, te_vs_hf=te_vs_hf)
    assert cached_vs_fused < 2e-2 and te_vs_hf < 2e-2


def test_greedy_tokens_follow_hf_for_a_prefix(pair, record):
    """Greedy tokens equal HF's until a step where HF itself is within BF16 rounding of a tie (random weights make
    near-ties common): there, HF's logits for its token and for te-llama's differ by a hair of their spread."""
    hf, te = pair
    ids = small_llama.batch(2, size=4, seq=32)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    expected, actual = hf.generate(ids, **kwargs), te.generate(ids, **kwargs)
    same, margins = [], []
    for row in range(ids.shape[0]):
        differ = (actual[row, 32:] != expected[row, 32:]).nonzero()
        if not len(differ):
            same.append(24)
            continue
        step = 32 + int(differ[0])
        same.append(step - 32)
        prefix_mask = torch.cat([mask[row:row + 1], mask.new_ones(1, step - 32)], dim=1)
        with torch.no_grad():
            logits = hf(expected[row:row + 1, :step], attention_mask=prefix_mask).logits[0, -1].float()
        margin = (logits[expected[row, step]] - logits[actual[row, step]]).item()
        margins.append(margin / (logits.max() - logits.min()).item())
    record(test="greedy_prefix_bf16", equal_prefix_per_row=same, tie_margins=margins)
    assert all(margin < 2e-2 for margin in margins)


@pytest.mark.parametrize("recipe", ["delayed", "current"])
def test_fp8_generation_pads_one_token_steps_and_stays_near_bf16(pair, recipe, record):
    """FP8Config(in_eval=True): batch 3 (one token per row a step) runs FP8 GEMMs on rows padded to 16; the cached
    step's logits stay within FP8's error of the BF16 cached step."""
    from te_llama import FP8Config

    _, te = pair
    ids = small_llama.batch(3, size=3, seq=40)
    def last_step() -> torch.Tensor:
        prefix = te(input_ids=ids[:, :39], use_cache=True)
        return te(input_ids=ids[:, 39:], use_cache=True, **{CACHE: _cache_of(prefix)}).logits

    with torch.no_grad():
        bf16 = last_step()
        te.enable_fp8(FP8Config(recipe=recipe, in_eval=True))
        try:
            tokens = te.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
            fp8 = last_step()
        finally:
            te.disable_fp8()
    error = _relative(fp8, bf16)
    record(test=f"fp8_generation_{recipe}", fp8_vs_bf16=error)
    assert tokens.shape == (3, 46) and torch.isfinite(fp8).all()
    assert 0 < error < 0.15  # FP8 changed the numbers (it ran), by FP8's error


def test_fp8_generation_reuses_one_weight_cast_with_the_same_tokens(pair, record):
    """generate() casts the FP8 weights once per call (current scaling: the same bytes as a cast at every step), so
    its greedy tokens equal a step-by-step loop that casts at every forward; and it runs fewer casts."""
    from te_llama import FP8Config

    _, te = pair
    ids = small_llama.batch(4, size=2, seq=24)
    te.enable_fp8(FP8Config(recipe="current", in_eval=True))
    try:
        with torch.no_grad():
            tokens = te.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
            loop, cache = ids, None
            for _ in range(8):
                step = te(input_ids=loop if cache is None else loop[:, -1:], use_cache=True, **{CACHE: cache})
                cache = _cache_of(step)
                loop = torch.cat([loop, step.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    finally:
        te.disable_fp8()
    record(test="fp8_generation_cast_once", same_tokens=bool(torch.equal(tokens, loop)))
    assert torch.equal(tokens, loop)
