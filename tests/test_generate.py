"""generate() with HF's KV cache: tokens identical to HF (reference backend, fp32) for every decoding mode."""

import pytest
import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from conftest import CACHE, left_padded, prompt, relative_error


class Calls:
    """Counts the tokens each forward of the model feeds the decoder layers."""

    def __init__(self, model):
        self.lengths = []
        model.model.layers[0].register_forward_pre_hook(lambda module, args: self.lengths.append(args[0].shape[1]))


def test_greedy_generation_matches_hf_and_uses_the_cache(generation_pair):
    hf, te = generation_pair
    calls = Calls(te)
    expected = hf.generate(prompt(), max_new_tokens=20, do_sample=False)
    assert torch.equal(te.generate(prompt(), max_new_tokens=20, do_sample=False), expected)
    assert calls.lengths == [7] + [1] * 19  # the prompt once, then one token a step: the cache is used


def test_batched_left_padded_generation_matches_hf(generation_pair):
    hf, te = generation_pair
    ids, mask = left_padded()
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(te.generate(ids, **kwargs), hf.generate(ids, **kwargs))


def test_without_a_cache_generation_recomputes_and_agrees(generation_pair):
    _, te = generation_pair
    ids, mask = left_padded(8)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(te.generate(ids, use_cache=False, **kwargs), te.generate(ids, **kwargs))


@pytest.mark.parametrize("mode", [
    dict(do_sample=True, top_k=20, top_p=0.9, temperature=0.8),
    dict(num_beams=3, do_sample=False),
    dict(num_beams=2, do_sample=True, num_return_sequences=2),
    dict(do_sample=False, repetition_penalty=1.3, no_repeat_ngram_size=2),
    dict(cache_implementation="static", do_sample=False),
], ids=["sampling", "beam-search", "beam-sampling", "penalties", "static-cache"])
def test_decoding_modes_match_hf(generation_pair, mode):
    hf, te = generation_pair
    ids, mask = left_padded(9)
    outputs = []
    for model in (hf, te):
        torch.manual_seed(123)
        outputs.append(model.generate(ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0, **mode))
    assert torch.equal(outputs[1], outputs[0])


def test_streamer_and_stopping_criteria(generation_pair):
    hf, te = generation_pair

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.tolist())

        def end(self):
            self.chunks.append("end")

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 12, dtype=torch.bool)

    results = []
    for model in (hf, te):
        streamer = Collect()
        out = model.generate(prompt(), max_new_tokens=30, do_sample=False, streamer=streamer,
                             stopping_criteria=StoppingCriteriaList([StopAfter()]))
        results.append((out, streamer.chunks))
    assert results[1][0].shape[1] == 12 and torch.equal(results[1][0], results[0][0])
    assert results[1][1] == results[0][1]


def test_forward_with_use_cache_returns_the_cache_and_continues_like_hf(generation_pair):
    hf, te = generation_pair
    ids = prompt(10, batch=2, length=8)
    outputs = []
    for model in (hf, te):
        with torch.no_grad():
            first = model(input_ids=ids[:, :5], use_cache=True)
            cache = getattr(first, CACHE, None) or first.past_key_values
            assert isinstance(cache, DynamicCache) and cache.get_seq_length() == 5
            second = model(input_ids=ids[:, 5:], use_cache=True, **{CACHE: cache})
            whole = model(input_ids=ids).logits
        outputs.append((second.logits, whole))
    (hf_second, hf_whole), (te_second, te_whole) = outputs
    assert relative_error(te_second, hf_second) < 1e-5
    assert relative_error(te_second, te_whole[:, 5:]) < 1e-5  # the cached path equals TE's fused one


def test_plain_forwards_make_no_cache(generation_pair):
    _, te = generation_pair
    with torch.no_grad():
        output = te(input_ids=prompt())
        assert getattr(output, CACHE, None) is None and output.past_key_values is None  # scoring keeps TE's fused layers
    assert te.generation_config.use_cache is True


def test_kv_cache_path_pads_tokens_to_fp8s_alignment_without_changing_the_output(generation_pair, monkeypatch):
    # FP8 GEMMs need a multiple of 16 tokens (32 for MXFP8); a decode step has one per row. The padding is what FP8
    # would ask for (the reference backend runs no FP8: the stack's choice is forced here).
    from te_llama.model.decoder_stack import TEDecoderStack

    hf, te = generation_pair
    ids = prompt(length=7)
    kwargs = dict(max_new_tokens=5, do_sample=False)
    expected = hf.generate(ids, **kwargs)
    rows = []
    for layer in te.model.layers:
        layer.self_attention.layernorm_qkv.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape))
    monkeypatch.setattr(TEDecoderStack, "_token_alignment", lambda self, fp8: 8)
    assert torch.equal(te.generate(ids, **kwargs), expected)
    assert rows and all(shape[0] % 8 == 0 and len(shape) == 2 for shape in rows)
    assert {shape[0] for shape in rows} == {8 * -(-ids.shape[0] * 7 // 8), 8}  # the prompt, then 1-token steps
