"""lm-eval's HFLM drives a te-llama model as it drives HF's: generate_until (through the KV cache) and
loglikelihood give HF's results on the same weights."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from conftest import random_hf_model, tiny_config
from te_llama import TELlamaForCausalLM
from te_llama.commands.assets import english_text, smollm2_checkpoint

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402


def requests(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(arguments)]


def test_hflm_generate_until_and_loglikelihood_match_hf(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    config = tiny_config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id or 0)
    hf = random_hf_model(config)
    hf.save_pretrained(tmp_path / "hf")
    te = TELlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    lines = [line for line in english_text().splitlines() if line.strip()][:3]
    contexts = [line[:160] for line in lines]
    generations = [(context, {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}) for context in contexts]
    scores = [(context[:80], context[80:160]) for context in contexts]
    results = {}
    for name, model in (("hf", hf), ("te", te)):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2, device="cpu")
        results[name] = (lm.generate_until(requests("generate_until", generations)),
                         lm.loglikelihood(requests("loglikelihood", scores)))
    (hf_text, hf_ll), (te_text, te_ll) = results["hf"], results["te"]
    assert te_text == hf_text and all(text for text in te_text)
    for (te_logprob, te_greedy), (hf_logprob, hf_greedy) in zip(te_ll, hf_ll):
        assert te_greedy == hf_greedy and abs(te_logprob - hf_logprob) < 1e-3 * abs(hf_logprob)
