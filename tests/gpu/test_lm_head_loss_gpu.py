"""The chunked LM-head loss on the GPU: its Triton kernel and the compiled step against HF's full-logits loss (bf16,
TE layers), and the kernel against the compiled step on one chunk of Llama 3 logits."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import te_llama.model.lm_head_loss as lm_head_loss
from te_llama import TELlamaForCausalLM

pytestmark = pytest.mark.gpu


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("chunk_step", ["kernel", "compiled"])
@pytest.mark.parametrize("fp8", [None, "delayed"])
def test_chunked_loss_matches_full_logits_on_gpu(tmp_path, record, monkeypatch, fp8, chunk_step):
    choose = lm_head_loss._chunk_step
    monkeypatch.setattr(lm_head_loss, "_chunk_step", lambda device, _step="auto": choose(device, chunk_step))
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
    chosen = lm_head_loss._chunk_step(torch.device("cuda"))
    assert chosen is not lm_head_loss.loss_and_logit_grad_eager, "the chunk step fell back to eager"
    assert chosen is (lm_head_loss.loss_and_logit_grad_kernel if chunk_step == "kernel" else lm_head_loss._compiled_step)
    assert choose(torch.device("cuda")) is lm_head_loss.loss_and_logit_grad_kernel  # the default on a GPU
    worst = max(rel(chunked_grads[n], full_grads[n]) for n in full_grads)
    record(test="chunked_lm_head_loss", fp8=fp8, step=chunk_step, loss_full=full_loss.item(),
           loss_chunked=chunked_loss.item(), worst_grad_rel=worst,
           lm_head_grad_rel=rel(chunked_grads["lm_head.weight"], full_grads["lm_head.weight"]))
    assert abs(chunked_loss.item() - full_loss.item()) < 2e-3 * full_loss.item()
    assert rel(chunked_grads["lm_head.weight"], full_grads["lm_head.weight"]) < 2e-2
    assert worst < (5e-2 if fp8 else 2e-2)


def test_loss_kernel_matches_compiled_step_on_a_llama3_chunk(record):
    """One chunk as the model makes it (512 tokens x 128,256 logits, bf16): the kernel's per-token losses and logit
    gradient against the torch.compile'd step's (float32 math in both; the exponential and the log-sum-exp are
    computed in another order, so gradients may differ by a bf16 rounding step)."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(512, 128256, device="cuda", generator=generator) * 4).to(torch.bfloat16)
    targets = torch.randint(0, 128256, (512,), device="cuda", generator=generator)
    scale = torch.full((512,), 1.0 / 8192, device="cuda")
    scale[7] = 0.0  # an ignored token
    compiled = torch.compile(lm_head_loss.loss_and_logit_grad, fullgraph=True)
    (grad_k, loss_k), (grad_c, loss_c) = [(torch.empty_like(logits), torch.empty(512, device="cuda")) for _ in "kc"]
    lm_head_loss.loss_and_logit_grad_kernel(logits, targets, scale, grad_k, loss_k)
    compiled(logits, targets, scale, grad_c, loss_c)
    differing = int((grad_k != grad_c).sum())
    record(test="loss_kernel_vs_compiled", gradient_elements_differing=differing, gradient_elements=grad_k.numel(),
           loss_max_abs_difference=float((loss_k - loss_c).abs().max()))
    torch.testing.assert_close(loss_k, loss_c, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad_k.float(), grad_c.float(), rtol=2 ** -7, atol=1e-12)
    assert loss_k[7] == 0 and not grad_k[7].any()
    in_place, loss_i = logits.clone(), torch.empty(512, device="cuda")  # as the model runs it
    lm_head_loss.loss_and_logit_grad_kernel(in_place, targets, scale, in_place, loss_i)
    assert torch.equal(in_place, grad_k) and torch.equal(loss_i, loss_k)
    assert differing < grad_k.numel() // 100
