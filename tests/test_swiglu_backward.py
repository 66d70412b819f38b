"""The fused FP8 SwiGLU backward kernel (run by Triton's interpreter on the CPU) against the same math in torch:
TE's ``dgated_act_kernel`` in float32, rounded to bfloat16, scaled and cast to FP8, plus its transpose, amax,
scale_inv and bias gradient. Its use inside Transformer Engine is tested in ``tests/gpu/test_swiglu_backward.py``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

RUN_KERNEL = """
import sys, torch
import te_llama.swiglu_backward_triton as kernel
cases = torch.load(sys.argv[1])
for case in cases:
    kernel.INT32_LIMIT = 0 if case.pop("wide", False) else 2**31
    case["bias"] = kernel.dswiglu_fp8(case["grad"], case["act_in"], case["scale"], case["amax"], case["out"],
                                      case["out_t"], case["scale_inv"], bias_grad=case["bias_grad"])
torch.save(cases, sys.argv[1])
"""


def run_interpreted(tmp_path, cases: list[dict]) -> list[dict]:
    """Run the kernel on each case under ``TRITON_INTERPRET=1`` in a fresh process: Triton reads the switch when
    it is imported (its ``tl.max`` and ``tl.sum`` are compiled then), and this process may have imported it."""
    pytest.importorskip("triton")
    path = tmp_path / "cases.pt"
    torch.save(cases, path)
    env = dict(os.environ, TRITON_INTERPRET="1")
    subprocess.run([sys.executable, "-c", RUN_KERNEL, str(path)], env=env, check=True, timeout=300)
    return torch.load(path)


def case(grad, act_in, *, scale: float, amax: float = 0.0, fp8=torch.float32, transpose=True,
         bias_grad=True) -> dict:
    rows, inner = grad.shape
    return dict(grad=grad, act_in=act_in, scale=torch.tensor([scale]), amax=torch.tensor([amax]),
                out=torch.empty(rows, 2 * inner, dtype=fp8),
                out_t=torch.empty(2 * inner, rows, dtype=fp8) if transpose else None,
                scale_inv=torch.tensor([float("nan")]), bias_grad=bias_grad)


def reference(grad: torch.Tensor, act_in: torch.Tensor):
    """(input gradient rounded to bfloat16, its max |value|, bias gradient) as TE's unfused path computes them."""
    inner = grad.shape[1]
    gate, up, grad = act_in[:, :inner].float(), act_in[:, inner:].float(), grad.float()
    sigmoid = 1.0 / (1.0 + torch.exp(-gate))
    silu = gate * sigmoid
    dsilu = gate * (sigmoid * (1.0 - sigmoid)) + sigmoid
    dact = torch.cat([dsilu * grad * up, grad * silu], dim=1).to(torch.bfloat16).float()
    return dact, dact.abs().max(), dact.sum(dim=0)


def inputs(rows: int, inner: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    grad = (torch.randn(rows, inner, generator=generator) * 0.01).to(torch.bfloat16)
    act_in = (torch.randn(rows, 2 * inner, generator=generator) * 2).to(torch.bfloat16)
    return grad, act_in


def test_kernel_matches_te_math(tmp_path):
    """Indexing, masking, the transpose, the math, amax, scale_inv and the bias gradient. The kernel writes
    float32 here: Triton's interpreter does not round float downcasts as the GPU does (it truncates), so the FP8
    values themselves are compared with TE's, bit for bit, on the GPU (``tests/gpu/test_swiglu_backward.py``)."""
    rows, inner = 70, 100  # neither a multiple of the 32 x 128 tiles: every edge is masked
    grad, act_in = inputs(rows, inner)
    results = run_interpreted(tmp_path, [case(grad, act_in, scale=300.0, fp8=torch.float32, bias_grad=True),
                                         case(grad, act_in, scale=300.0, fp8=torch.float32, transpose=False,
                                              bias_grad=False),
                                         {**case(grad, act_in, scale=300.0, fp8=torch.float32), "wide": True}])
    dact, expected_amax, expected_bias = reference(grad, act_in)
    for result in results:
        # the interpreter's bfloat16 rounding may land one bfloat16 step away
        torch.testing.assert_close(result["out"], dact * 300.0, rtol=2**-7, atol=0)
        torch.testing.assert_close(result["amax"], expected_amax.reshape(1), rtol=2**-7, atol=0)
        assert result["scale_inv"].item() == pytest.approx(1 / 300.0, rel=1e-7)
    assert torch.equal(results[0]["out_t"], results[0]["out"].t())
    # the bias gradient: column sums of the gradient the kernel wrote (the interpreter truncates, so its sums drift
    # from the exactly rounded reference's)
    torch.testing.assert_close(results[0]["bias"], results[0]["out"].sum(dim=0) / 300.0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0]["bias"], expected_bias, rtol=0.05, atol=2e-3)
    assert results[1]["bias"] is None and results[1]["out_t"] is None
    for key in ("out", "out_t", "amax", "bias"):  # 64-bit offsets, as for tensors of 2**31 elements or more
        assert torch.equal(results[2][key], results[0][key])


def test_amax_only_grows(tmp_path):
    """Delayed scaling accumulates a step's amax in place: the kernel raises it, never lowers it."""
    grad, act_in = inputs(64, 64, seed=1)
    _, expected_amax, _ = reference(grad, act_in)
    results = run_interpreted(tmp_path, [case(grad, act_in, scale=1.0, amax=0.0, fp8=torch.float32),
                                         case(grad, act_in, scale=1.0, amax=1e6, fp8=torch.float32)])
    assert results[0]["amax"].item() == pytest.approx(expected_amax.item(), rel=2**-7)
    assert results[1]["amax"].item() == 1e6
