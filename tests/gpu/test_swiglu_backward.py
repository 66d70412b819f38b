"""The fused FP8 SwiGLU backward (te_llama.kernels.swiglu_backward) against Transformer Engine's own two kernels: the same
FP8 bytes, amax, scale_inv and bias gradient, and the same gradients when a model trains with it."""

import pytest
import torch
import transformer_engine_torch as tex
from small_llama import batch, model, passes, worst_rel
from transformer_engine.pytorch.tensor.float8_tensor import Float8Quantizer

from te_llama import te_patches
from te_llama.kernels import swiglu_backward
from te_llama.kernels import swiglu_backward_triton as kernel

pytestmark = pytest.mark.gpu

FP8 = {"e5m2": tex.DType.kFloat8E5M2, "e4m3": tex.DType.kFloat8E4M3}


def quantizer(fp8: str, scale: float) -> Float8Quantizer:
    q = Float8Quantizer(scale=torch.tensor([scale], device="cuda"), amax=torch.zeros(1, device="cuda"),
                        fp8_dtype=FP8[fp8])
    q.internal = True
    q.set_usage(rowwise=True, columnwise=True)
    return q


def te_path(grad, act_in, q):
    return tex.bgrad_quantize(tex.dswiglu(grad, act_in, None), q)


def fused_without_bias(grad, act_in, q):
    # A bias-free MLP's recipe is marked bias_grad=False (swiglu_backward.mark_recipe): no bias gradient is made.
    return swiglu_backward.dswiglu_quantize(grad, act_in, q, bias_grad=False)


def bits(tensor):
    return tensor.view(torch.uint8).to(torch.int16)


@pytest.mark.parametrize("fp8,scale", [("e5m2", 2.0**12), ("e4m3", 2.0**14), ("e4m3", 2.0**30)])
@pytest.mark.parametrize("rows,inner", [(4096, 14336), (1000, 1400)])
def test_same_fp8_bytes_as_te(fp8, scale, rows, inner, record):
    """The scale 2**30 overflows FP8: both paths must saturate to the largest finite value."""
    generator = torch.Generator("cuda").manual_seed(0)
    grad = (torch.randn(rows, inner, device="cuda", generator=generator) * 1e-3).to(torch.bfloat16)
    act_in = (torch.randn(rows, 2 * inner, device="cuda", generator=generator) * 3).to(torch.bfloat16)
    q_te, q_ours = quantizer(fp8, scale), quantizer(fp8, scale)
    bias_te, ours_te = te_path(grad, act_in, q_te)
    bias_ours, ours = swiglu_backward.dswiglu_quantize(grad, act_in, q_ours)  # no fc1_bias here: bias computed
    no_bias, ours_again = fused_without_bias(grad, act_in, quantizer(fp8, scale))

    differ = bits(ours._data) != bits(ours_te._data)
    steps = (bits(ours._data) - bits(ours_te._data)).abs().max().item()
    record(test="swiglu_bytes", fp8=fp8, scale=scale, rows=rows, inner=inner, differing=int(differ.sum()),
           of=differ.numel(), max_code_step=steps, amax_te=q_te.amax.item(), amax_ours=q_ours.amax.item(),
           bias_max_abs_diff=(bias_ours.float() - bias_te.float()).abs().max().item())
    assert differ.float().mean().item() <= 1e-5 and steps <= 1
    assert torch.equal(bits(ours._transpose), bits(ours._data).t())
    assert not ours._transpose_invalid
    assert torch.equal(ours._scale_inv, ours_te._scale_inv)
    assert q_ours.amax.item() == q_te.amax.item()
    torch.testing.assert_close(bias_ours.float(), bias_te.float(), rtol=1e-2, atol=1e-2)
    assert no_bias is None and torch.equal(bits(ours_again._data), bits(ours._data))
    if scale == 2.0**30:
        values = ours._data.view(torch.float8_e4m3fn).float()
        assert torch.isfinite(values).all() and values.abs().max().item() == 448.0


def _train(monkeypatch, fused: bool, bias: bool, graphs: bool, steps: int = 4):
    m = model("delayed", graphs, attention_bias=bias, mlp_bias=bias)  # with graphs the backward records the kernel
    assert te_patches.installed("swiglu_backward")  # enable_fp8 with delayed scaling installed it
    if not fused:
        te_patches.remove("swiglu_backward")  # TE's own two kernels, for the same marked recipe
    try:
        return passes(m, steps, batch(1, size=2))
    finally:
        te_patches.install("swiglu_backward")


@pytest.mark.parametrize("bias,graphs", [(False, False), (True, False), (False, True)])
def test_training_gradients_equal_te_path(monkeypatch, bias, graphs, record):
    calls = []
    launch = kernel.dswiglu_fp8

    def counted(*args, **kwargs):
        calls.append(kwargs.get("bias_grad", args[-1]))
        return launch(*args, **kwargs)

    monkeypatch.setattr(kernel, "dswiglu_fp8", counted)
    losses_te, grads_te = _train(monkeypatch, fused=False, bias=bias, graphs=graphs)
    assert not calls
    losses, grads = _train(monkeypatch, fused=True, bias=bias, graphs=graphs)
    assert calls and all(call == bias for call in calls)  # the bias gradient only where there is a bias
    worst = worst_rel(grads, grads_te)
    record(test="swiglu_training", bias=bias, graphs=graphs, losses_te=losses_te, losses_fused=losses,
           kernel_calls=len(calls), worst_grad_rel_diff=worst[0], worst_param=worst[1],
           identical=losses == losses_te and worst[0] == 0.0)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(losses_te), rtol=1e-3, atol=0)
    assert worst[0] < 1e-2
    if bias:
        assert any("fc1_bias" in name for name in grads)
