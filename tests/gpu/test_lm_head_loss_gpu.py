"""The chunked LM-head loss on the GPU: the compiled step against HF's full-logits loss (bf16, TE layers)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import te_llama.lm_head_loss as lm_head_loss
from te_llama import TELlamaForCausalLM

pytestmark = pytest.mark.gpu


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("fp8", [None, "delayed"])
def test_chunked_loss_matches_full_logits_on_gpu(tmp_path, record, fp8):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    model = TELlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16, device="cuda", fp8=fp8).train()
    ids = torch.randint(0, 32000, (2, 1536), device="cuda")  # 3072 tokens: 5 chunks of 512 and a remainder

    def step(chunked):
        model.chunked_lm_head_loss = chunked
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    for _ in range(3):  # let delayed scaling calibrate before comparing
        step(True)
    full_loss, full_grads = step(False)
    chunked_loss, chunked_grads = step(True)
    assert lm_head_loss._compiled_step is not lm_head_loss.loss_and_logit_grad_eager, "the compiled step fell back to eager"
    worst = max(rel(chunked_grads[n], full_grads[n]) for n in full_grads)
    record(test="chunked_lm_head_loss", fp8=fp8, loss_full=full_loss.item(), loss_chunked=chunked_loss.item(),
           worst_grad_rel=worst, lm_head_grad_rel=rel(chunked_grads["lm_head.weight"], full_grads["lm_head.weight"]))
    assert abs(chunked_loss.item() - full_loss.item()) < 2e-3 * full_loss.item()
    assert rel(chunked_grads["lm_head.weight"], full_grads["lm_head.weight"]) < 2e-2
    assert worst < (5e-2 if fp8 else 2e-2)
