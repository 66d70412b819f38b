"""RoPE by te_llama's kernel (te_llama.rope_apply) against Transformer Engine's fused RoPE: the same outputs and
input gradients for the query and key views TE's attention makes, and the same training when a model uses it."""

import pytest
import torch
from transformer_engine.pytorch.attention import multi_head_attention
from transformer_engine.pytorch.attention.rope import apply_rotary_pos_emb as te_rope
from small_llama import batch, model, passes, worst_rel

from te_llama import rope_apply
from te_llama import rope_apply_triton as kernel
from te_llama.rope import angle_table

pytestmark = pytest.mark.gpu


def bf16_steps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance between two bfloat16 tensors in representable steps (same-sign values)."""
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs().max().item()


@pytest.mark.parametrize("tensor_format", ["bshd", "sbhd"])
@pytest.mark.parametrize("batch,seq,heads,groups,dim", [(2, 4096, 32, 8, 128), (3, 300, 9, 3, 64)])
def test_same_as_te_fused_rope(tensor_format, batch, seq, heads, groups, dim, record):
    """Llama-3-8B's and SmolLM2's head layouts: query and key as views of one projection output."""
    generator = torch.Generator("cuda").manual_seed(0)
    lead = (batch, seq) if tensor_format == "bshd" else (seq, batch)
    mixed = torch.randn(*lead, heads + 2 * groups, dim, device="cuda", generator=generator).to(torch.bfloat16)
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, dim, 2, device="cuda").float() / dim)
    angles = angle_table(torch.arange(seq, device="cuda"), inv_freq)
    for name, view in (("query", mixed[:, :, :heads]), ("key", mixed[:, :, heads:heads + groups])):
        ours_in = view.detach().requires_grad_()
        te_in = view.detach().requires_grad_()
        ours = rope_apply.apply_rope(ours_in, angles, tensor_format)
        theirs = te_rope(te_in, angles, tensor_format, fused=True)
        grad = torch.randn(ours.shape, device="cuda", generator=generator).to(torch.bfloat16)
        ours.backward(grad)
        theirs.backward(grad)
        forward_steps, backward_steps = bf16_steps(ours, theirs), bf16_steps(ours_in.grad, te_in.grad)
        record(test="rope_vs_te", format=tensor_format, shape=list(view.shape), tensor=name,
               forward_differing=int((ours != theirs).sum()),
               backward_differing=int((ours_in.grad != te_in.grad).sum()), of=ours.numel(),
               forward_max_steps=forward_steps, backward_max_steps=backward_steps)
        assert ours.is_contiguous() and ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, rtol=2**-7, atol=1e-6)
        torch.testing.assert_close(ours_in.grad, te_in.grad, rtol=2**-7, atol=1e-6)


def _train(monkeypatch, plug: bool, fp8: str | None, graphs: bool, steps: int = 4):
    monkeypatch.setenv(rope_apply.ENV_SWITCH, "1" if plug else "0")
    return passes(model(fp8, graphs), steps, batch(1, size=2))


@pytest.mark.parametrize("fp8,graphs", [(None, False), ("delayed", False), ("delayed", True)])
def test_training_equal_to_te_rope(monkeypatch, fp8, graphs, record):
    calls = []
    launch = kernel.rope

    def counted(*args, **kwargs):
        calls.append(kwargs.get("backward", False))
        return launch(*args, **kwargs)

    monkeypatch.setattr(kernel, "rope", counted)
    losses_te, grads_te = _train(monkeypatch, plug=False, fp8=fp8, graphs=graphs)
    assert not calls
    assert getattr(multi_head_attention.apply_rotary_pos_emb, "te_llama_rope", False)  # installed with the layers
    losses, grads = _train(monkeypatch, plug=True, fp8=fp8, graphs=graphs)
    assert False in calls and True in calls  # forward and backward ran the kernel
    worst = worst_rel(grads, grads_te)
    record(test="rope_training", fp8=fp8, graphs=graphs, losses_te=losses_te, losses_ours=losses,
           kernel_calls=len(calls), worst_grad_rel_diff=worst[0], worst_param=worst[1])
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(losses_te), rtol=2e-3, atol=0)
    assert worst[0] < 2e-2
