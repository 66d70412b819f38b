"""te_llama.AdamW's Triton step against torch's fused AdamW on the GPU."""

from __future__ import annotations

import copy

import pytest
import torch

from te_llama.training.adamw import AdamW

pytestmark = pytest.mark.gpu


def _model_params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    generator = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(4096, 1024), (1024,), (3000, 7), (128256 // 64, 4096)]  # Triton, torch's fused, torch's, Triton
    return [torch.nn.Parameter(torch.randn(s, device="cuda", generator=generator).to(dtype)) for s in shapes]


def _groups(params):
    return [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0, "lr": 3e-3}]


def _run(optimizer, params, steps: int, first_step: int = 0):
    generator = torch.Generator(device="cuda").manual_seed(1)
    for step in range(first_step, first_step + steps):
        for group in optimizer.param_groups:  # a schedule: the learning rate changes every step
            group["lr"] = group.setdefault("initial_lr", group["lr"]) * (1 - 0.1 * step)
        for p in params:
            p.grad = (torch.randn(p.shape, device="cuda", generator=generator) * 1e-2).to(p.dtype)
        optimizer.step()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_matches_torch_fused_adamw(dtype, record):
    ours, theirs = _model_params(dtype), _model_params(dtype)
    optimizer = AdamW(_groups(ours), lr=1e-3, betas=(0.9, 0.95))
    assert optimizer.uses_triton()
    _run(optimizer, ours, steps=5)
    _run(torch.optim.AdamW(_groups(theirs), lr=1e-3, betas=(0.9, 0.95), fused=True), theirs, steps=5)
    equal = sum((a == b).sum().item() for a, b in zip(ours, theirs)) / sum(p.numel() for p in ours)
    largest = max((a.float() - b.float()).abs().max().item() for a, b in zip(ours, theirs))
    record(test="adamw_vs_torch_fused", dtype=str(dtype), bitwise_equal_share=equal, max_abs_diff=largest)
    # The two kernels contract multiply-adds differently: the few others differ in the last bit, which 5 updates
    # can carry to two bf16 steps (2**-6 relative; 1e-4 near the smallest weights).
    assert equal > (0.999 if dtype == torch.bfloat16 else 0.9)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=2**-6 if dtype == torch.bfloat16 else 1e-5,
                                   atol=1e-4 if dtype == torch.bfloat16 else 1e-6)


def test_continues_from_a_torch_fused_adamw_checkpoint():
    ours, theirs = _model_params(torch.float32), _model_params(torch.float32)
    fused = torch.optim.AdamW(theirs, lr=1e-3, fused=True)
    _run(fused, theirs, steps=2)
    with torch.no_grad():
        for a, b in zip(ours, theirs):
            a.copy_(b)
    optimizer = AdamW(ours, lr=1e-3)
    optimizer.load_state_dict(copy.deepcopy(fused.state_dict()))  # step counters live on the GPU there
    _run(optimizer, ours, steps=2, first_step=2)
    _run(fused, theirs, steps=2, first_step=2)
    assert all(state["step"].device.type == "cpu" and float(state["step"]) == 4 for state in optimizer.state.values())
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
