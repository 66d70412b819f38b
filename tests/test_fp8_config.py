"""FP8 configuration: validation messages, and the model-level autocast switch (with a stand-in for TE)."""

import contextlib
import sys
import types

import pytest
import torch

from conftest import tiny_config
from te_llama import TELlamaForCausalLM
from te_llama.training.fp8 import FP8Config, FP8ConfigError, check_fp8_possible, describe, parse_fp8


def test_config_is_frozen_and_validated():
    config = FP8Config()
    assert (config.recipe, config.fp8_format) == ("auto", "hybrid")
    with pytest.raises(Exception):
        config.recipe = "current"
    with pytest.raises(FP8ConfigError, match="unknown FP8 recipe 'fp4'"):
        FP8Config(recipe="fp4")
    with pytest.raises(FP8ConfigError, match="fp8_format"):
        FP8Config(fp8_format="e5m2")
    assert parse_fp8("off") is None and parse_fp8("current") == FP8Config(recipe="current")


def test_describe_names_the_formats():
    assert describe(FP8Config(recipe="delayed")) == "delayed (DelayedScaling, HYBRID: E4M3 fwd / E5M2 bwd)"
    assert describe(FP8Config(recipe="block")) == "block (Float8BlockScaling, E4M3)"
    assert describe(FP8Config(recipe="current", backward_accumulation="fast")) == (
        "current (Float8CurrentScaling, HYBRID: E4M3 fwd / E5M2 bwd, fast backward accumulation)")


def test_fast_backward_accumulation_is_opt_in_and_checked():
    assert FP8Config().backward_accumulation == "split"
    assert parse_fp8("delayed", "fast") == FP8Config(recipe="delayed", backward_accumulation="fast")
    with pytest.raises(FP8ConfigError, match="'split' or 'fast', got 'quick'"):
        FP8Config(backward_accumulation="quick")
    for recipe in ("block", "mxfp8"):  # their GEMMs accumulate in float32 whatever is asked
        with pytest.raises(FP8ConfigError, match=f"needs the delayed or current recipe; '{recipe}'"):
            FP8Config(recipe=recipe, backward_accumulation="fast")
    for off in (None, "off"):  # asked for, but FP8 is off: an error, not ignored
        with pytest.raises(FP8ConfigError, match="needs FP8, but FP8 is off"):
            parse_fp8(off, "fast")
    assert parse_fp8("off", "split") is None


def test_fast_accumulation_with_auto_is_checked_once_auto_has_chosen(monkeypatch):
    from te_llama.training.fp8 import te_recipe

    assert FP8Config(backward_accumulation="fast").recipe == "auto"  # fine until the GPU says what auto means
    for module in ("transformer_engine", "transformer_engine.common", "transformer_engine.common.recipe",
                   "transformer_engine.pytorch", "transformer_engine.pytorch.quantization"):
        stand_in = types.ModuleType(module)
        stand_in.check_recipe_support = lambda recipe: None
        monkeypatch.setitem(sys.modules, module, stand_in)
    monkeypatch.setattr("te_llama.training.fp8._capability", lambda: (10, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "NVIDIA B200")
    with pytest.raises(FP8ConfigError, match="'mxfp8' \\(what 'auto' chose on NVIDIA B200\\) GEMMs always"):
        te_recipe(FP8Config(backward_accumulation="fast"))


def test_fp8_on_the_reference_backend_is_an_error_not_bf16():
    model = TELlamaForCausalLM.from_config(tiny_config())
    with pytest.raises(FP8ConfigError, match="reference backend"):
        model.enable_fp8("delayed")
    assert model.fp8_recipe_name is None
    with pytest.raises(FP8ConfigError, match="--fp8 off"):
        TELlamaForCausalLM.from_config(tiny_config(), fp8="auto")


def test_old_gpus_and_odd_shapes_are_rejected(monkeypatch):
    monkeypatch.setattr("te_llama.training.fp8._capability", lambda: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100")
    with pytest.raises(FP8ConfigError, match=r"compute capability 8.9\+.*A100 is 8.0.*--fp8 off"):
        check_fp8_possible("te")
    monkeypatch.setattr("te_llama.training.fp8._capability", lambda: (9, 0))
    with pytest.raises(FP8ConfigError, match="hidden_size=72"):
        check_fp8_possible("te", tiny_config(hidden_size=72, num_attention_heads=4, num_key_value_heads=2))
    check_fp8_possible("te", tiny_config())


def test_accelerate_fp8_mode_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(FP8ConfigError, match="--mixed_precision bf16"):
        TELlamaForCausalLM.from_config(tiny_config()).enable_fp8("delayed")


def te_recipe_standin(delayed: bool = False):
    """What te-llama asks of TE's recipe object outside TE: whether it is delayed scaling, and whether its amaxes are
    reduced over processes."""
    return types.SimpleNamespace(delayed=lambda: delayed, reduce_amax=True)


@pytest.fixture
def fake_te(monkeypatch):
    """Installs (when called) a stand-in for transformer_engine.pytorch that records when autocast is active."""
    return lambda: _install_fake_te(monkeypatch)


def _install_fake_te(monkeypatch):
    events = []

    @contextlib.contextmanager
    def autocast(enabled=True, recipe=None):
        state.recipe = recipe
        events.append(("enter", recipe))
        fake.active = True
        try:
            yield
        finally:
            fake.active = False
            events.append(("exit", recipe))

    fake = types.ModuleType("transformer_engine.pytorch")
    fake.autocast, fake.active = autocast, False
    quantization = types.ModuleType("transformer_engine.pytorch.quantization")  # delayed scaling's scale update
    state = types.SimpleNamespace(autocast_depth=0, recipe=None)
    quantization.FP8GlobalStateManager = types.SimpleNamespace(
        quantization_state=state,  # the update's reduction flag as the update sees it
        reduce_and_update_fp8_tensors=lambda forward: events.append(("update", forward, state.recipe.reduce_amax)))
    fake.quantization = quantization
    package = types.ModuleType("transformer_engine")
    package.pytorch, package.__version__ = fake, "2.20.2"
    monkeypatch.setitem(sys.modules, "transformer_engine", package)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", fake)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch.quantization", quantization)
    return fake, events


def test_autocast_wraps_training_forwards_only(fake_te):
    model = TELlamaForCausalLM.from_config(tiny_config())
    fake, events = fake_te()
    recipe = te_recipe_standin(delayed=True)
    settings = model.model.te_settings  # as enable_fp8 sets them on a GPU
    settings.fp8_recipe, settings.fp8_config = recipe, FP8Config(recipe="delayed")
    seen_in_forward, seen_in_backward = [], []
    model.model.layers[0].register_forward_hook(lambda *a: seen_in_forward.append(fake.active))
    model.model.embed_tokens.weight.register_hook(lambda g: seen_in_backward.append(fake.active))
    ids = torch.randint(0, 128, (2, 8))

    model.train()
    model(ids, labels=ids).loss.backward()
    assert events == [("enter", recipe), ("exit", recipe)]
    assert seen_in_forward == [True] and seen_in_backward == [False]  # backward runs outside autocast

    model.eval()
    with torch.no_grad():
        model(ids)
    assert len(events) == 2  # evaluation runs in BF16 by default
    settings.fp8_config = FP8Config(recipe="delayed", in_eval=True)
    with torch.no_grad():
        model(ids)
    # TE updates delayed scaling's scales when an autocast with gradients ends; te-llama does it without them, on
    # this process's amaxes (no all-reduce that other processes might never join)
    assert events[2:] == [("enter", recipe), ("exit", recipe), ("update", True, False)] and recipe.reduce_amax

    model.train()
    model.model(input_ids=ids)  # the decoder stack called directly, as TRL's fused LM head does
    assert events[5:] == [("enter", recipe), ("exit", recipe)] and seen_in_forward[-1] is True

    model.disable_fp8().train()
    model(ids, labels=ids)
    assert len(events) == 7 and model.fp8_recipe_name is None


def test_an_unaligned_token_count_is_padded_inside_also_on_the_kv_cache(fake_te, stream_calls):
    model = TELlamaForCausalLM.from_config(tiny_config()).train()
    fake_te()
    settings = model.model.te_settings
    settings.fp8_recipe, settings.fp8_config = te_recipe_standin(), FP8Config(recipe="current")
    ids = torch.randint(0, 128, (1, 13))
    plain = model(ids).logits
    assert stream_calls[0].cu_seqlens.tolist() == [0, 13, 16]  # a sequence of padding makes 16 tokens for FP8's GEMMs
    rows = []
    for layer in model.model.layers:
        layer.self_attention.layernorm_qkv.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape))
    cached = model(ids, use_cache=True).logits
    assert rows and {shape[0] for shape in rows} == {16}  # 13 tokens and 3 zero rows for TE's modules
    torch.testing.assert_close(cached, plain)


def test_forward_signature_is_hf_s():
    import inspect

    parameters = inspect.signature(TELlamaForCausalLM.from_config(tiny_config()).forward).parameters
    assert {"input_ids", "attention_mask", "position_ids", "labels"} <= set(parameters)


def test_fp8_generation_casts_the_weights_once_per_generate_call(fake_te):
    model = TELlamaForCausalLM.from_config(tiny_config()).eval()
    fake, _ = fake_te()
    settings = model.model.te_settings
    settings.fp8_recipe, settings.fp8_config = te_recipe_standin(), FP8Config(recipe="current", in_eval=True)
    seen = []  # TE's is_first_microbatch as the first layer received it, one entry per forward
    model.model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("is_first_microbatch", "absent")), with_kwargs=True)
    ids = torch.randint(1, 128, (2, 5))
    for _ in range(2):  # each call casts anew: the weights may have changed between calls
        seen.clear()
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        # the prompt casts plainly (delayed scaling has no amax of the weights yet), the first step keeps its cast
        assert seen == [None, True, False, False]
    seen.clear()
    with torch.no_grad():
        model(ids)  # outside generate(): TE's plain cast, no kept copy
    assert seen == ["absent"] and settings.generation_forwards is None


@pytest.mark.parametrize("recipe", ["current", "delayed"])
def test_fp8_decode_graphs_replay_after_each_calls_weight_cast_with_current_scaling_only(fake_te, recipe):
    model = TELlamaForCausalLM.from_config(tiny_config()).eval()
    ids = torch.randint(1, 128, (1, 5))
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static")
    expected = model.generate(ids, **kwargs)  # without FP8 and graphs (the stand-in TE changes no number)
    fake_te()
    settings = model.model.te_settings
    settings.fp8_recipe, settings.fp8_config = te_recipe_standin(), FP8Config(recipe=recipe, in_eval=True)
    model.enable_decode_graphs(capture=False)
    seen = []  # (is_first_microbatch, rows TE's qkv got) per forward of the first layer
    layer = model.model.layers[0]
    layer.register_forward_pre_hook(lambda m, a, k: seen.append(k.get("is_first_microbatch")), with_kwargs=True)
    rows = []
    layer.self_attention.layernorm_qkv.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    for call in range(2):
        assert torch.equal(model.generate(ids, **kwargs), expected)
        assert seen[-6:] == [None, True, False, False, False, False]
    if recipe == "current":  # the prompt, then each call's casting step eagerly; the others as the recorded step
        assert model.decode_graph_replays() == 2 * 4
        assert list(settings.decode_graphs.steps) == [(1, 10, torch.float32, "current")]
        assert set(rows) == {16}  # the 5-token prompt and the 1-token steps, padded for FP8's GEMMs
    else:
        assert model.decode_graph_replays() == 0


def test_a_recorded_fp8_decode_step_is_recorded_again_when_te_replaces_a_kept_weight_cast(fake_te):
    model = TELlamaForCausalLM.from_config(tiny_config()).eval()
    fake_te()
    settings = model.model.te_settings
    settings.fp8_recipe, settings.fp8_config = te_recipe_standin(), FP8Config(recipe="current", in_eval=True)
    qkv = model.model.layers[0].self_attention.layernorm_qkv
    qkv._fp8_workspaces = {"weight": object()}  # as TE keeps a cast; the reference module keeps none
    model.enable_decode_graphs(capture=False)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, cache_implementation="static")
    ids = torch.randint(1, 128, (1, 5))
    model.generate(ids, **kwargs)
    first = settings.decode_graphs.steps[(1, 9, torch.float32, "current")]
    model.generate(ids, **kwargs)
    assert settings.decode_graphs.steps[(1, 9, torch.float32, "current")] is first  # the same cast: replayed
    qkv._fp8_workspaces["weight"] = object()  # TE made a new cast (another recipe or usage)
    model.generate(ids, **kwargs)
    assert settings.decode_graphs.steps[(1, 9, torch.float32, "current")] is not first


def test_fp8_decode_steps_run_eagerly_on_a_te_version_they_were_not_checked_with(fake_te, monkeypatch, caplog):
    import logging
    import sys

    model = TELlamaForCausalLM.from_config(tiny_config()).eval()
    fake_te()
    monkeypatch.setattr(sys.modules["transformer_engine"], "__version__", "2.19.0")
    settings = model.model.te_settings
    settings.fp8_recipe, settings.fp8_config = te_recipe_standin(), FP8Config(recipe="current", in_eval=True)
    model.enable_decode_graphs(capture=False)
    with caplog.at_level(logging.INFO, logger="te_llama"):
        model.generate(torch.randint(1, 128, (1, 5)), max_new_tokens=5, do_sample=False, pad_token_id=0,
                       cache_implementation="static")
    assert model.decode_graph_replays() == 0 and "not 2.19.0" in caplog.text
