"""Padded and packed batches on TE's fused attention (thd): against the reference layer in FP32 and HF on each
document alone, in BF16; and FP8 training on packed rows whose token count FP8 cannot take as it is."""

from __future__ import annotations

import pytest
import torch
from transformer_engine.pytorch.quantization import FP8GlobalStateManager
from transformers import LlamaConfig, LlamaForCausalLM

import small_llama
from te_llama import TELlamaForCausalLM
from te_llama.backend import te_attention_backend
from training_loop import losses_on_one_batch

pytestmark = pytest.mark.gpu

LENGTHS = [(57, 130, 40), (301,), (17, 200, 9, 31)]  # documents per row; rows padded to 320 tokens
WIDTH = 320


def packed_rows(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    docs = [[torch.randint(1, 1024, (n,), generator=generator) for n in row] for row in LENGTHS]
    ids, mask, positions = (torch.zeros(len(docs), WIDTH, dtype=torch.long) for _ in range(3))
    labels = torch.full_like(ids, -100)
    for r, row in enumerate(docs):
        column = 0
        for doc in row:
            n = len(doc)
            ids[r, column:column + n], positions[r, column:column + n] = doc, torch.arange(n)
            mask[r, column:column + n], labels[r, column + 1:column + n] = 1, doc[1:]
            column += n
    batch = dict(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels)
    return docs, {key: value.cuda() for key, value in batch.items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """HF BF16, te-llama on TE in BF16, and the reference layer in BF16 and in FP32 (the oracle), same weights."""
    directory = tmp_path_factory.mktemp("packed") / "hf"
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**small_llama.CONFIG)).to(torch.bfloat16).cuda()
    hf.save_pretrained(directory)
    load = dict(device="cuda")
    return {"hf": hf,
            "te": TELlamaForCausalLM.from_pretrained(directory, backend="te", dtype=torch.bfloat16, **load),
            "reference": TELlamaForCausalLM.from_pretrained(directory, backend="reference", dtype=torch.bfloat16,
                                                            **load),
            "fp32": TELlamaForCausalLM.from_pretrained(directory, backend="reference", dtype=torch.float32, **load)}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_packed_rows_match_the_fp32_oracle_and_hf_per_document(models, record):
    docs, batch = packed_rows()
    real = batch["attention_mask"].bool()
    forward = {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids")}
    logits, grads = {}, {}
    for name in ("te", "reference", "fp32"):
        model = models[name]
        with torch.no_grad():
            logits[name] = model.eval()(**forward).logits[real].float()
            if name == "te":
                backend = te_attention_backend()
        model.train()
        model(**batch).loss.backward()
        grads[name] = {key: p.grad.float().clone() for key, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        model.eval()
    with torch.no_grad():
        alone = torch.cat([models["hf"](input_ids=doc[None].cuda()).logits[0] for row in docs for doc in row])
    # TE's gradient error (against fp32) within 3x of what plain BF16 arithmetic (the reference layer) makes.
    errors = {key: (rel(grads["te"][key], g), rel(grads["reference"][key], g)) for key, g in grads["fp32"].items()}
    ratio = {key: te / max(plain, 1e-3) for key, (te, plain) in errors.items()}
    worst = max(ratio, key=ratio.get)
    row = dict(test="packed_bf16", te_vs_fp32=rel(logits["te"], logits["fp32"]),
               reference_bf16_vs_fp32=rel(logits["reference"], logits["fp32"]), te_vs_hf_alone=rel(logits["te"], alone),
               worst_grad=worst, worst_grad_te_error=errors[worst][0], worst_grad_bf16_error=errors[worst][1],
               attention_backend=backend)
    record(**row)
    assert backend is not None and backend.split()[0] in ("FusedAttention", "FlashAttention"), backend
    assert row["te_vs_fp32"] < 2e-2 and row["te_vs_hf_alone"] < 2e-2 and ratio[worst] < 3.0


def test_fp8_training_on_unaligned_packed_rows(record):
    model = small_llama.model(fp8="delayed")
    fp8_calls = []
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda module, args: fp8_calls.append(FP8GlobalStateManager.is_fp8_enabled()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _, batch = packed_rows(1)
    assert int(batch["attention_mask"].sum()) % 16, "the batch's real tokens must need FP8 padding"
    losses = losses_on_one_batch(model, optimizer, 12, **batch)
    record(test="packed_fp8_training", losses=[round(x, 4) for x in losses], fp8_calls=sum(fp8_calls),
           layer_calls=len(fp8_calls))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.5
    assert all(fp8_calls) and len(fp8_calls) == 12 * model.config.num_hidden_layers
