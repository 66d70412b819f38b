"""The fused FP8 SwiGLU backward kernel (run by Triton's interpreter on the CPU) against the same math: TE's
``dgated_act_kernel`` in float32, rounded to bfloat16, scaled and cast to FP8, plus its transpose, amax, scale_inv and
bias gradient, bit for bit. Its use inside Transformer Engine, and its FP8 bytes against TE's, are tested on the GPU
in ``tests/gpu/test_swiglu_backward.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import run_interpreted

RUN_KERNEL = """
import sys, torch
import te_llama.kernels.swiglu_backward_triton as kernel
cases = torch.load(sys.argv[1])
for case in cases:
    kernel.INT32_LIMIT = 0 if case.pop("wide", False) else 2**31
    case["bias"] = kernel.dswiglu_fp8(case["grad"], case["act_in"], case["scale"], case["amax"], case["out"],
                                      case["out_t"], case["scale_inv"], bias_grad=case["bias_grad"])
torch.save(cases, sys.argv[1])
"""

FP8 = torch.float8_e4m3fn


def interpreter_cast(values: torch.Tensor, dtype) -> torch.Tensor:
    """``values`` (float32) cast as Triton's interpreter casts in the kernel: ``.to(tl.bfloat16)`` truncates,
    ``.to(tl.float8e4nv)`` rounds half up without carrying into the exponent and does not saturate. The GPU rounds to
    nearest even (the GPU tests compare the FP8 bytes with TE's); here the kernel's indexing and math are checked
    bit for bit against the same float32 math cast the interpreter's way."""
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.runtime.interpreter import _convert_float

    rounding = None if dtype is torch.bfloat16 else ir.ROUNDING_MODE.RTNE
    target = tl.bfloat16 if dtype is torch.bfloat16 else tl.float8e4nv
    data = _convert_float(values.float().numpy(), tl.float32, target, rounding)
    return torch.from_numpy(data.copy()).view(dtype)


def case(grad, act_in, *, scale: float, amax: float = 0.0, transpose=True, bias_grad=True) -> dict:
    rows, inner = grad.shape
    return dict(grad=grad, act_in=act_in, scale=torch.tensor([scale]), amax=torch.tensor([amax]),
                out=torch.empty(rows, 2 * inner, dtype=FP8),
                out_t=torch.empty(2 * inner, rows, dtype=FP8) if transpose else None,
                scale_inv=torch.tensor([float("nan")]), bias_grad=bias_grad)


def reference(grad: torch.Tensor, act_in: torch.Tensor) -> torch.Tensor:
    """SwiGLU's input gradient (gate half, up half) in float32, before the rounding to bfloat16, computed as the
    kernel computes it under the interpreter (numpy, float32, the same order of operations)."""
    inner = act_in.shape[1] // 2
    gate, up, grad = act_in[:, :inner].float().numpy(), act_in[:, inner:].float().numpy(), grad.float().numpy()
    one = np.float32(1.0)
    sigmoid = one / (one + np.exp(-gate))
    dsilu = gate * (sigmoid * (one - sigmoid)) + sigmoid
    return torch.from_numpy(np.concatenate([dsilu * grad * up, grad * (gate * sigmoid)], axis=1))


def inputs(rows: int, inner: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    grad = (torch.randn(rows, inner, generator=generator) * 0.01).to(torch.bfloat16)
    act_in = (torch.randn(rows, 2 * inner, generator=generator) * 2).to(torch.bfloat16)
    return grad, act_in


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


ROWS, INNER = 70, 100  # neither a multiple of the 32 x 128 tiles: every edge is masked


def test_backward_kernel_matches_te_math(tmp_path):
    """Indexing, masking, the transpose, the math, amax, scale_inv and the bias gradient, bit for bit."""
    grad, act_in = inputs(ROWS, INNER)
    results = run_interpreted(RUN_KERNEL, tmp_path, [case(grad, act_in, scale=30.0, bias_grad=True),
                                         case(grad, act_in, scale=30.0, transpose=False, bias_grad=False),
                                         {**case(grad, act_in, scale=30.0), "wide": True}])
    dact = interpreter_cast(reference(grad, act_in), torch.bfloat16).float()  # as TE's BF16 copy
    expected = interpreter_cast(dact * 30.0, FP8)
    for result in results:
        assert same_bytes(result["out"], expected)
        assert result["amax"].item() == dact.abs().max().item()
        assert result["scale_inv"].item() == pytest.approx(1 / 30.0, rel=1e-7)
    assert same_bytes(results[0]["out_t"], expected.t().contiguous())
    assert same_bytes(results[2]["out_t"], expected.t().contiguous())  # 64-bit offsets, as from 2**31 elements
    torch.testing.assert_close(results[0]["bias"], dact.sum(dim=0), rtol=1e-5, atol=1e-6)  # summation order
    torch.testing.assert_close(results[2]["bias"], results[0]["bias"], rtol=0, atol=0)
    assert results[1]["bias"] is None and results[1]["out_t"] is None


def test_amax_only_grows(tmp_path):
    """Delayed scaling accumulates a step's amax in place: the kernel raises it, never lowers it."""
    grad, act_in = inputs(64, 64, seed=1)
    results = run_interpreted(RUN_KERNEL, tmp_path, [case(grad, act_in, scale=1.0, amax=0.0),
                                         case(grad, act_in, scale=1.0, amax=1e6)])
    dact = interpreter_cast(reference(grad, act_in), torch.bfloat16).float()
    assert results[0]["amax"].item() == dact.abs().max().item()
    assert results[1]["amax"].item() == 1e6
