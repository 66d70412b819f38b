"""FP8 with real Transformer Engine: recipes run, the switch really quantizes, checkpointing, Trainer resume."""

import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformer_engine.pytorch.quantization import FP8GlobalStateManager
from transformers import LlamaConfig, Trainer, TrainingArguments

from te_llama import TELlamaForCausalLM, decoder_layer_class
from te_llama.training.fp8 import FP8Config, FP8ConfigError, te_recipe
from te_llama.model.rope import TERotaryEmbedding
from te_llama.training.fp8_state import FP8_STATE_FILE, FP8StateCallback, fp8_state

pytestmark = pytest.mark.gpu

CONFIG = dict(vocab_size=1024, hidden_size=512, intermediate_size=1408, num_hidden_layers=2, num_attention_heads=8,
              num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)
RECIPES = ["delayed", "current", "block", "mxfp8"]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def model(fp8=None, seed=0, **overrides):
    torch.manual_seed(seed)
    return TELlamaForCausalLM.from_config(LlamaConfig(**{**CONFIG, **overrides}), dtype=torch.bfloat16,
                                          device="cuda", backend="te", fp8=fp8)


def ids(batch=4, seq=256, seed=1):
    return torch.randint(0, 1024, (batch, seq), device="cuda", generator=torch.Generator("cuda").manual_seed(seed))


@pytest.mark.parametrize("recipe", RECIPES)
def test_each_recipe_trains_or_says_why_not(recipe, record):
    major = torch.cuda.get_device_capability()[0]
    if recipe == "mxfp8" and major < 10:
        with pytest.raises(FP8ConfigError, match="mxfp8"):
            model(fp8=recipe)
        record(test="recipe", recipe=recipe, supported=False)
        return
    bf16, fp8 = model().train(), model(fp8=recipe).train()
    x = ids()
    for _ in range(3):  # delayed scaling calibrates its scales from the amax history of earlier steps
        fp8(input_ids=x, labels=x).loss.backward()
        fp8.zero_grad()
    losses = []
    for m in (bf16, fp8):
        loss = m(input_ids=x, labels=x).loss
        loss.backward()
        losses.append(loss.item())
    grads = {k: rel(p.grad, dict(bf16.named_parameters())[k].grad) for k, p in fp8.named_parameters()}
    worst = max(grads, key=grads.get)
    record(test="recipe", recipe=recipe, supported=True, loss_bf16=losses[0], loss_fp8=losses[1],
           worst_grad_param=worst, worst_grad_rel_error=grads[worst])
    assert abs(losses[1] - losses[0]) / losses[0] < 0.02
    assert grads[worst] < 0.25


@pytest.mark.parametrize("recipe", ["delayed", "current"])
def test_fast_backward_accumulation_changes_the_backward_gemms_only(recipe, record):
    """``FP8Config(backward_accumulation="fast")`` reaches TE's dgrad and wgrad GEMMs: the gradients differ from
    split accumulation's, while the forward is the same bit for bit (TE's forward GEMMs accumulate fast either
    way). Both stay as far from BF16's gradients as each other."""
    x = ids()
    bf16 = model().train()
    bf16(input_ids=x, labels=x).loss.backward()
    reference = {k: p.grad.float() for k, p in bf16.named_parameters()}
    runs = {}
    for accumulation in ("split", "fast"):
        m = model(fp8=FP8Config(recipe=recipe, backward_accumulation=accumulation)).train()
        for gemm in ("fp8_gemm_dgrad", "fp8_gemm_wgrad"):  # DelayedScaling has them only when set (TE: split)
            params = getattr(m.model.te_settings.fp8_recipe, gemm, None)
            assert (params is None or params.use_split_accumulator) == (accumulation == "split")
        for _ in range(3):  # delayed scaling calibrates its scales (the forward's are the same in both runs)
            m(input_ids=x, labels=x).loss.backward()
            m.zero_grad()
        loss = m(input_ids=x, labels=x).loss
        loss.backward()
        runs[accumulation] = loss.item(), {k: p.grad.float() for k, p in m.named_parameters() if ".layers." in k}
    (loss_split, split), (loss_fast, fast) = runs["split"], runs["fast"]
    apart = {k: rel(fast[k], split[k]) for k in split}
    error = {mode: max(rel(grads[k], reference[k]) for k in grads) for mode, grads in (("split", split),
                                                                                     ("fast", fast))}
    record(test="fast_backward_accumulation", recipe=recipe, loss_split=loss_split, loss_fast=loss_fast,
           worst_fast_vs_split=max(apart.values()), mean_fast_vs_split=sum(apart.values()) / len(apart),
           worst_grad_vs_bf16_split=error["split"], worst_grad_vs_bf16_fast=error["fast"])
    assert loss_fast == loss_split
    assert max(apart.values()) > 0  # the option reached the backward GEMMs
    assert error["fast"] < 1.2 * error["split"]


def test_fp8_is_really_on_in_training_and_off_in_eval():
    m = model(fp8="delayed")
    seen = []
    m.model.layers[0].register_forward_hook(lambda *a: seen.append(FP8GlobalStateManager.is_fp8_enabled()))
    m.train()
    m(input_ids=ids(), labels=ids()).loss.backward()
    m.model(input_ids=ids())  # the decoder stack called directly, as TRL's fused LM head does
    m.eval()
    with torch.no_grad():
        m(input_ids=ids())
    assert seen == [True, True, False]
    assert FP8GlobalStateManager.is_fp8_enabled() is False  # nothing leaks out of the forward


def test_single_layer_fp8_gradients_against_the_fp32_reference(record):
    """One TELlamaDecoderLayer under FP8 vs the reference layer in FP32 with the same weights."""
    import transformer_engine.pytorch as te

    config = LlamaConfig(**CONFIG)
    torch.manual_seed(0)
    with torch.device("cuda"):
        rotary = TERotaryEmbedding(config)
        torch.set_default_dtype(torch.bfloat16)
        layer = decoder_layer_class("te")(config, 0)
        torch.set_default_dtype(torch.float32)
        reference = decoder_layer_class("reference")(config, 0)
    reference.load_state_dict({k: v.float() for k, v in layer.state_dict().items() if "extra_state" not in k})
    x = torch.randn(4, 256, 512, device="cuda")
    angles = rotary(x, torch.arange(256, device="cuda")[None])
    recipe = te_recipe(FP8Config(recipe="current"))
    errors, results = {}, {}
    for name, mod, dtype, fp8 in (("ref", reference, torch.float32, False), ("bf16", layer, torch.bfloat16, False),
                                  ("fp8", layer, torch.bfloat16, True)):
        mod.zero_grad()
        inp = x.detach().to(dtype).clone().requires_grad_()
        with te.autocast(enabled=fp8, recipe=recipe if fp8 else None):
            out = mod(inp, position_embeddings=angles)
        out.float().square().mean().backward()
        results[name] = (out.float(), inp.grad.float(), {k: p.grad.float() for k, p in mod.named_parameters()})
    for name in ("bf16", "fp8"):
        out, dx, dw = results[name]
        ref_out, ref_dx, ref_dw = results["ref"]
        errors[name] = dict(output=rel(out, ref_out), input_grad=rel(dx, ref_dx),
                            worst_weight_grad=max(rel(dw[k], ref_dw[k]) for k in ref_dw))
    record(test="single_layer_vs_fp32_reference", **errors)
    assert errors["bf16"]["output"] < 1e-2 and errors["bf16"]["worst_weight_grad"] < 3e-2
    assert errors["fp8"]["output"] < 6e-2 and errors["fp8"]["input_grad"] < 0.1
    assert errors["fp8"]["worst_weight_grad"] < 0.15


@pytest.mark.parametrize("recipe", ["delayed", "current"])
def test_gradient_checkpointing_under_fp8(recipe, record):
    x = ids()
    runs = []
    for checkpointing in (False, True):
        m = model(fp8=recipe).train()
        if checkpointing:
            m.gradient_checkpointing_enable()
        loss = m(input_ids=x, labels=x).loss
        loss.backward()
        runs.append((loss.item(), {k: p.grad.float() for k, p in m.named_parameters()}))
    (loss_a, a), (loss_b, b) = runs
    worst = max(rel(b[k], a[k]) for k in a)
    record(test="checkpointing_fp8", recipe=recipe, loss=loss_a, loss_checkpointed=loss_b, worst_grad_rel_diff=worst)
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert worst < 1e-2


def test_gradient_checkpointing_memory_saving(record):
    """Peak memory of forward+backward with and without checkpointing (8 layers, 4 x 2048 tokens, FP8)."""
    peaks = {}
    for checkpointing in (False, True):
        m = model(fp8="delayed", num_hidden_layers=8, hidden_size=2048, intermediate_size=5632,
                  num_attention_heads=16, num_key_value_heads=4).train()
        if checkpointing:
            m.gradient_checkpointing_enable()
        x = ids(batch=4, seq=2048)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        m(input_ids=x, labels=x).loss.backward()
        torch.cuda.synchronize()
        peaks[checkpointing] = (torch.cuda.max_memory_allocated() - base) / 2**30
        del m
        torch.cuda.empty_cache()
    saving = 1 - peaks[True] / peaks[False]
    record(test="checkpointing_memory", activation_peak_gib=peaks[False], activation_peak_checkpointed_gib=peaks[True],
           saving=saving)
    assert saving > 0.3


class Blocks(torch.utils.data.Dataset):
    def __init__(self, n, seq=128):
        self.ids = torch.randint(0, 1024, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_resume_restores_fp8_state(tmp_path, record):
    def run(out, resume=False):
        m = model(fp8="delayed", seed=3)
        args = TrainingArguments(output_dir=str(out), max_steps=20, per_device_train_batch_size=8,
                                 learning_rate=3e-4, logging_steps=1, save_steps=10, report_to=[], seed=0,
                                 bf16=True, disable_tqdm=True, save_only_model=False)
        trainer = Trainer(model=m, args=args, train_dataset=Blocks(400), callbacks=[FP8StateCallback()])
        trainer.train(resume_from_checkpoint=resume or None)
        return trainer, m

    straight, _ = run(tmp_path / "a")
    _, interrupted = run(tmp_path / "b")
    saved = load_file(tmp_path / "b" / "checkpoint-10" / FP8_STATE_FILE)
    assert saved and any(v.abs().sum() > 0 for k, v in saved.items() if "amax_history" in k)
    shutil.rmtree(tmp_path / "b" / "checkpoint-20")
    resumed, resumed_model = run(tmp_path / "b", resume=True)
    a = {r["step"]: r["loss"] for r in straight.state.log_history if "loss" in r}
    b = {r["step"]: r["loss"] for r in resumed.state.log_history if "loss" in r}
    diffs = [abs(b[s] - a[s]) / a[s] for s in range(11, 21)]
    record(test="trainer_resume_fp8", max_rel_loss_diff_steps_11_20=max(diffs), loss_20=a[20], resumed_loss_20=b[20])
    assert max(diffs) < 2e-2
    exported = load_file(tmp_path / "b" / "checkpoint-20" / "model.safetensors")
    assert not any("extra_state" in k for k in exported)
    restored = fp8_state(resumed_model)
    assert restored.keys() == saved.keys()
