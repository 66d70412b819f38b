"""Decode graphs (te_llama.generation) on the CPU: the recorded step's buffers, cache adoption and the layers' hand-on,
run without a graph (``capture=False``: the captured function called eagerly on the static buffers), give the tokens of
plain HF and of te-llama without graphs (reference backend, fp32)."""

import logging

import pytest
import torch
from transformers import StaticCache

from conftest import CACHE, left_padded, prompt
from te_llama.generation.static_cache import CacheMemory

STATIC = dict(cache_implementation="static", pad_token_id=0)


class Entries:
    """Counts the decoder-layer forwards that were handed the decode graphs (the graph path's entries)."""

    def __init__(self, model):
        self.count = 0
        model.model.layers[0].register_forward_pre_hook(self._seen, with_kwargs=True)

    def _seen(self, module, args, kwargs):
        self.count += kwargs.get("decode_graphs") is not None


def generate_both(hf, te, ids, **kwargs):
    """(HF's tokens, te-llama's eager tokens, te-llama's tokens through the recorded steps), each from seed 123."""
    outputs = []
    for model, graphs in ((hf, False), (te, False), (te, True)):
        if graphs:
            te.enable_decode_graphs(capture=False)
        torch.manual_seed(123)
        outputs.append(model.generate(ids, **STATIC, **kwargs))
    return outputs


@pytest.mark.parametrize("mode", [dict(do_sample=False), dict(do_sample=True, top_k=20, temperature=0.8),
                                  dict(num_beams=3, do_sample=False)], ids=["greedy", "sampling", "beam-search"])
def test_left_padded_batch_matches_hf_and_eager(generation_pair, mode):
    hf, te = generation_pair
    ids, mask = left_padded()
    expected, eager, graphs = generate_both(hf, te, ids, attention_mask=mask, max_new_tokens=10, **mode)
    assert torch.equal(eager, expected) and torch.equal(graphs, expected)
    assert te.decode_graph_replays() == 9  # every step after the prompt's
    rows = 3 * mode.get("num_beams", 1)
    assert list(te.model.te_settings.decode_graphs.steps) == [(rows, 18, torch.float32, None)]  # the prompt and 10 tokens but the last


def test_batch_one_then_a_new_prompt_reuses_the_step_and_another_batch_records_one(generation_pair):
    hf, te = generation_pair
    expected, eager, graphs = generate_both(hf, te, prompt(), max_new_tokens=12, do_sample=False)
    assert torch.equal(eager, expected) and torch.equal(graphs, expected)
    steps = te.model.te_settings.decode_graphs.steps
    first = steps[(1, 18, torch.float32, None)]
    other = prompt(seed=11)  # same length: generate() makes a new StaticCache of the same size
    assert torch.equal(te.generate(other, max_new_tokens=12, do_sample=False, **STATIC),
                       hf.generate(other, max_new_tokens=12, do_sample=False, **STATIC))
    assert list(steps.values()) == [first] and first.replays == 22
    ids, mask = left_padded(seed=12)
    two = dict(attention_mask=mask[:2], max_new_tokens=12, do_sample=False, **STATIC)
    assert torch.equal(te.generate(ids[:2], **two), hf.generate(ids[:2], **two))
    assert list(steps) == [(1, 18, torch.float32, None), (2, 20, torch.float32, None)] and te.decode_graph_replays() == 33


def test_a_dynamic_cache_never_enters_the_graph_path(generation_pair, caplog):
    hf, te = generation_pair
    te.enable_decode_graphs(capture=False)
    entries = Entries(te)
    ids, mask = left_padded()
    with caplog.at_level(logging.INFO, logger="te_llama"):
        for _ in range(2):
            out = te.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out, hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0))
    assert entries.count == 0 and te.decode_graph_replays() == 0
    assert caplog.text.count("the cache is a DynamicCache") == 1  # said once


def test_a_static_cache_passed_in_serves_decoding_and_the_prefill_stays_eager(generation_pair):
    hf, te = generation_pair
    te.enable_decode_graphs(capture=False)
    entries = Entries(te)
    cache = StaticCache(config=te.config, max_cache_len=24)
    out = te.generate(prompt(), max_new_tokens=8, **{CACHE: cache}, do_sample=False, pad_token_id=0)
    assert torch.equal(out, hf.generate(prompt(), max_new_tokens=8, do_sample=False, **STATIC))
    assert entries.count == 7 and te.decode_graph_replays() == 7  # not the prompt's forward
    assert cache.layers[0].keys is te.model.te_settings.decode_graphs.steps[(1, 24, torch.float32, None)].memory.layers[0][
        "keys"]


@pytest.mark.parametrize("case", ["hidden-states", "cuda-graphs-asked-on-cpu"])
def test_forwards_graphs_cannot_serve_run_eagerly_and_say_why(generation_pair, caplog, case):
    _, te = generation_pair
    te.enable_decode_graphs(capture=case == "cuda-graphs-asked-on-cpu")  # a CUDA graph on the CPU: eager
    ids, mask = left_padded()
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, **STATIC)
    with caplog.at_level(logging.INFO, logger="te_llama"):
        if case == "hidden-states":
            out = te.generate(ids, output_hidden_states=True, return_dict_in_generate=True, **kwargs).sequences
        else:
            out = te.generate(ids, **kwargs)
    assert te.decode_graph_replays() == 0 and not te.model.te_settings.decode_graphs.steps
    te.disable_decode_graphs()
    assert torch.equal(out, te.generate(ids, **kwargs))
    reason = {"hidden-states": "the forward asks for per-layer outputs",
              "cuda-graphs-asked-on-cpu": "the model is on cpu; CUDA graphs need a CUDA device"}[case]
    assert caplog.text.count(f"decode steps run eagerly, not as a CUDA graph: {reason}") == 1


def test_a_decode_step_with_gradients_runs_eagerly(generation_pair, caplog):
    _, te = generation_pair
    logits = []
    for graphs in (False, True):
        if graphs:
            te.enable_decode_graphs(capture=False)
        cache = StaticCache(config=te.config, max_cache_len=12)
        with torch.no_grad():
            te(input_ids=prompt(), use_cache=True, **{CACHE: cache})
        with caplog.at_level(logging.INFO, logger="te_llama"):
            logits.append(te(input_ids=prompt(seed=3, length=1), use_cache=True, **{CACHE: cache}).logits)
    assert logits[1].requires_grad and torch.equal(logits[1], logits[0])
    assert te.decode_graph_replays() == 0 and "a forward with gradients or in training mode" in caplog.text


def test_peft_adapters_run_eagerly(generation_pair):
    from peft import LoraConfig, get_peft_model

    _, te = generation_pair
    te.enable_decode_graphs(capture=False)
    peft_model = get_peft_model(te, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    out = peft_model.generate(input_ids=prompt(), max_new_tokens=5, do_sample=False, **STATIC)
    assert out.shape[1] == 12 and te.decode_graph_replays() == 0


def test_a_step_whose_weights_moved_is_recorded_again(generation_pair):
    hf, te = generation_pair
    te.enable_decode_graphs(capture=False)
    te.generate(prompt(), max_new_tokens=6, do_sample=False, **STATIC)
    first = te.model.te_settings.decode_graphs.steps[(1, 12, torch.float32, None)]
    proj = te.model.layers[1].self_attention.proj
    proj.weight = torch.nn.Parameter(proj.weight.detach().clone())  # new memory, same values
    out = te.generate(prompt(), max_new_tokens=6, do_sample=False, **STATIC)
    assert te.model.te_settings.decode_graphs.steps[(1, 12, torch.float32, None)] is not first
    assert torch.equal(out, hf.generate(prompt(), max_new_tokens=6, do_sample=False, **STATIC))


def test_adopting_a_new_cache_gives_the_previous_one_its_own_copy(generation_pair):
    _, te = generation_pair
    with torch.no_grad():
        caches = [StaticCache(config=te.config, max_cache_len=12) for _ in range(2)]
        for seed, cache in enumerate(caches):
            te(input_ids=prompt(seed=seed, length=4), use_cache=True, **{CACHE: cache})
    kept = [layer.keys.clone() for layer in caches[0].layers]
    memory = CacheMemory(caches[0])
    memory.adopt(caches[1])
    assert caches[1].layers[0].keys is memory.layers[0]["keys"]
    assert caches[0].layers[0].keys is not memory.layers[0]["keys"]
    assert all(torch.equal(layer.keys, before) for layer, before in zip(caches[0].layers, kept))
    assert not torch.equal(memory.layers[0]["keys"], kept[0])  # now the second cache's prompt


def test_generate_compiles_te_llamas_forward_only_for_an_explicit_compile_config(generation_pair, monkeypatch):
    # generate() compiles the forward by itself for a static cache on CUDA; te-llama's fast path there is decode
    # graphs. Checked through HF's own criteria, told that the model is on CUDA.
    from transformers import CompileConfig, GenerationConfig

    hf, te = generation_pair
    for model in (hf, te):
        monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda")))
    cache = StaticCache(config=te.config, max_cache_len=16)
    assert hf._valid_auto_compile_criteria({CACHE: cache}, GenerationConfig())  # HF would compile
    assert not te._valid_auto_compile_criteria({CACHE: cache}, GenerationConfig())
    assert te._valid_auto_compile_criteria({CACHE: cache}, GenerationConfig(compile_config=CompileConfig()))
    te.enable_decode_graphs(capture=False)
    assert not te._valid_auto_compile_criteria({CACHE: cache}, GenerationConfig(compile_config=CompileConfig()))
