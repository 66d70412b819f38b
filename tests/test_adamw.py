"""te_llama.AdamW: the Triton kernel (run by Triton's interpreter on the CPU) against torch's AdamW, the
optimizer's state handling, and the fallback to torch's step."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

from te_llama.training import adamw as adamw_module
from te_llama.training.adamw import AdamW

HYPER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


@pytest.fixture
def interpreted_kernel(monkeypatch):
    """The Triton kernel under ``TRITON_INTERPRET=1`` and the optimizer taking its Triton path on the CPU."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import te_llama.kernels.adamw_triton as kernel_module

    kernel_module = importlib.reload(kernel_module)  # the decorator reads TRITON_INTERPRET
    monkeypatch.setattr(adamw_module, "_kernel_fits", lambda param, grad: grad is None or not grad.is_sparse)
    monkeypatch.setattr(adamw_module, "TRITON_MIN_NUMEL", 0)  # every parameter through the kernel
    yield kernel_module
    monkeypatch.delenv("TRITON_INTERPRET")
    importlib.reload(kernel_module)


def _params(dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(64, 48), (5000,), (3, 7, 11)]  # the second spans two kernel blocks and ends mid-block
    return [torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape in shapes]


def _train(optimizer_class, params, steps: int, **kwargs) -> torch.optim.Optimizer:
    optimizer = optimizer_class(params, **HYPER, **kwargs)
    for step in range(steps):
        generator = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)
        optimizer.step()
    return optimizer


def test_kernel_matches_torch_adamw_in_float32(interpreted_kernel):
    ours, reference = _params(torch.float32), _params(torch.float32)
    optimizer = _train(AdamW, ours, steps=4)
    assert optimizer.uses_triton()
    _train(torch.optim.AdamW, reference, steps=4, foreach=False)
    for a, b in zip(ours, reference):  # torch's CPU step uses lerp and rounds by alignment: a few float32 ulps
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for p in ours:
        state = optimizer.state[p]
        assert state["step"].device.type == "cpu" and float(state["step"]) == 4.0


def fused_adamw_reference(param, grad, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay, step):
    """torch's fused CUDA AdamW update written out (float32 math, tensors stored in their own dtype), the CPU
    oracle for bf16: torch's CPU AdamW computes in bf16 itself."""
    p, g, m, v = (t.float() for t in (param, grad, exp_avg, exp_avg_sq))
    p = p - lr * weight_decay * p
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    p = p - (lr / (1 - beta1**step)) * m / (v.sqrt() / (1 - beta2**step) ** 0.5 + eps)
    for target, value in ((param, p), (exp_avg, m), (exp_avg_sq, v)):
        target.copy_(value)


def test_kernel_matches_fused_arithmetic_in_bfloat16(interpreted_kernel):
    ours = _params(torch.bfloat16)
    optimizer = _train(AdamW, ours, steps=3)
    reference = _params(torch.bfloat16)
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in reference]
    beta1, beta2 = HYPER["betas"]
    for step in range(1, 4):
        generator = torch.Generator().manual_seed(100 + step - 1)
        for p, (m, v) in zip(reference, moments):
            grad = torch.randn(p.shape, generator=generator).to(p.dtype)
            with torch.no_grad():
                fused_adamw_reference(p, grad, m, v, lr=HYPER["lr"], beta1=beta1, beta2=beta2, eps=HYPER["eps"],
                                      weight_decay=HYPER["weight_decay"], step=step)
    # Triton's interpreter rounds float32 -> bf16 towards zero (the GPU rounds to nearest, and the GPU test
    # compares bit for bit with torch's fused kernel), so allow one bf16 step per update (3 updates), and near
    # zero a tenth of the learning rate.
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a.float(), b.float(), rtol=3 * 2**-7, atol=HYPER["lr"] / 10)
    for p, (m, v) in zip(ours, moments):
        torch.testing.assert_close(optimizer.state[p]["exp_avg"].float(), m.float(), rtol=2**-5, atol=4e-3)
        torch.testing.assert_close(optimizer.state[p]["exp_avg_sq"].float(), v.float(), rtol=2**-5, atol=1e-6)


def test_state_dict_moves_between_torch_adamw_and_ours(interpreted_kernel):
    ours, reference = _params(torch.float32), _params(torch.float32)
    optimizer = _train(AdamW, ours, steps=2)
    torch_optimizer = torch.optim.AdamW(reference, **HYPER, foreach=False)
    with torch.no_grad():
        for a, b in zip(reference, ours):
            a.copy_(b)
    # deep copies, as a checkpoint written and read back would be (state_dict() shares the moment tensors)
    torch_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # ours -> torch
    back = AdamW(_params(torch.float32, seed=1), **HYPER)
    back.load_state_dict(copy.deepcopy(torch_optimizer.state_dict()))  # torch -> ours
    assert back.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]
    for step in range(2):
        generator = torch.Generator().manual_seed(200 + step)
        grads = [torch.randn(p.shape, generator=generator) for p in ours]
        for p, q, g in zip(ours, reference, grads):
            p.grad, q.grad = g.clone(), g.clone()
        optimizer.step()
        torch_optimizer.step()
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cpu_parameters_take_torchs_step():
    ours, reference = _params(torch.float32), _params(torch.float32)
    optimizer = _train(AdamW, ours, steps=3)
    assert not optimizer.uses_triton()
    _train(torch.optim.AdamW, reference, steps=3)
    for a, b in zip(ours, reference):  # not bit for bit: two runs of torch's own CPU step differ here by up to 3e-6
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fused_and_capturable_are_refused():
    with pytest.raises(ValueError, match="fused=True"):
        AdamW(_params(torch.float32), fused=True)
    with pytest.raises(ValueError, match="capturable"):
        AdamW(_params(torch.float32), capturable=True)


def test_small_parameters_take_torchs_fused_kernel(interpreted_kernel, monkeypatch):
    """Above the size threshold the Triton kernel, below it torch's multi-tensor fused kernel (on the CPU here):
    the step matches torch's fused AdamW, bit for bit where torch's own kernel ran."""
    monkeypatch.setattr(adamw_module, "TRITON_MIN_NUMEL", 4000)  # only the 5000-element parameter takes Triton
    ours, reference = _params(torch.float32), _params(torch.float32)
    _train(AdamW, ours, steps=3)
    _train(torch.optim.AdamW, reference, steps=3, fused=True)
    for a, b in zip(ours, reference):
        if a.numel() < 4000:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_group_without_gradients_is_left_alone(interpreted_kernel):
    trained, frozen = _params(torch.float32), _params(torch.float32, seed=1)
    before = [p.detach().clone() for p in frozen]
    optimizer = AdamW([{"params": trained}, {"params": frozen}], **HYPER)
    for p in trained:
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert all(float(optimizer.state[p]["step"]) == 1 for p in trained)
    assert all(torch.equal(p, b) for p, b in zip(frozen, before)) and not any(p in optimizer.state for p in frozen)
