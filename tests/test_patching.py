"""replace_decoder_layer(): the swap is visible only inside the context and always undone."""

import threading

import pytest
import torch
from transformers import LlamaForCausalLM
from transformers.models.llama import modeling_llama

from conftest import tiny_config
from te_llama import TELlamaDecoderLayer, replace_decoder_layer

ORIGINAL = modeling_llama.LlamaDecoderLayer, modeling_llama.LlamaRotaryEmbedding


def current():
    return modeling_llama.LlamaDecoderLayer, modeling_llama.LlamaRotaryEmbedding


def test_models_built_inside_use_te_layers_and_outside_do_not():
    with replace_decoder_layer() as layer_class:
        inside = LlamaForCausalLM(tiny_config())
    outside = LlamaForCausalLM(tiny_config())
    assert layer_class is TELlamaDecoderLayer
    assert all(isinstance(layer, TELlamaDecoderLayer) for layer in inside.model.layers)
    assert all(type(layer) is ORIGINAL[0] for layer in outside.model.layers)
    assert current() == ORIGINAL
    with torch.no_grad():
        assert torch.isfinite(inside(torch.randint(0, 128, (1, 8))).logits).all()


def test_original_restored_after_an_exception():
    with pytest.raises(RuntimeError, match="boom"):
        with replace_decoder_layer():
            assert current() != ORIGINAL
            raise RuntimeError("boom")
    assert current() == ORIGINAL


def test_nested_contexts_restore_in_order():
    with replace_decoder_layer():
        patched = current()
        with replace_decoder_layer(backend="reference"):
            assert current() == patched
        assert current() == patched
    assert current() == ORIGINAL


def test_two_threads_never_leak_the_patch():
    built, errors, barrier = {}, [], threading.Barrier(2)

    def build(name, patched):
        try:
            barrier.wait()
            for _ in range(5):
                if patched:
                    with replace_decoder_layer():
                        model = LlamaForCausalLM(tiny_config(num_hidden_layers=1))
                else:
                    model = LlamaForCausalLM(tiny_config(num_hidden_layers=1))
                built.setdefault(name, []).append(type(model.model.layers[0]))
        except Exception as error:  # pragma: no cover - surfaced by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=build, args=("te", True)), threading.Thread(target=build, args=("a", True))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert set(built["te"]) == set(built["a"]) == {TELlamaDecoderLayer}
    assert current() == ORIGINAL
