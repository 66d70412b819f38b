"""``pipeline("text-generation")`` takes a te-llama model quietly and generates what HF's model generates."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, pipeline
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from conftest import tiny_config, random_hf_model
from te_llama import TELlamaForCausalLM
from te_llama.commands.assets import smollm2_checkpoint


def test_text_generation_pipeline_is_quiet_and_matches_hf(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    hf = random_hf_model(tiny_config(vocab_size=len(tokenizer)))
    hf.save_pretrained(tmp_path / "hf")
    te = TELlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    prompts = ["The bushfire near Sydney", "A short sentence"]
    outputs = {}
    for name, model in (("hf", hf), ("te", te)):
        with CaptureLogger(logging.get_logger("transformers.pipelines.base")) as captured:
            generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
        assert "not supported" not in captured.out
        outputs[name] = generator(prompts, max_new_tokens=8, do_sample=False)
    assert outputs["te"] == outputs["hf"]
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "hf")) is LlamaForCausalLM  # Llama still loads as HF's


def test_every_familys_class_is_accepted_by_the_pipeline(tmp_path):
    from conftest import family_config
    from te_llama import AutoModelForCausalLM as TEAutoModel

    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    for model_type in ("mistral", "qwen3"):
        model = TEAutoModel.from_config(family_config(model_type, vocab_size=len(tokenizer)))
        with CaptureLogger(logging.get_logger("transformers.pipelines.base")) as captured:
            generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
        assert "not supported" not in captured.out, model_type
        assert generator("A short sentence", max_new_tokens=2, do_sample=False)[0]["generated_text"]
