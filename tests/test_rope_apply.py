"""The RoPE kernel (run by Triton's interpreter on the CPU) against the same float32 math, for the tensors TE hands
it: the query and key as strided views of one projection output, ``bshd`` and ``sbhd``, head counts that are not
powers of two; and which calls the plug leaves to TE. Its use inside Transformer Engine, against TE's own kernels,
is tested on the GPU in ``tests/gpu/test_rope_apply.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import run_interpreted
from te_llama import rope
from te_llama.rope_apply import covered

RUN_KERNEL = """
import sys, torch
import te_llama.rope_apply_triton as kernel
cases = torch.load(sys.argv[1])
for case in cases:
    kernel.INT32_LIMIT = 0 if case.pop("wide", False) else 2**31
    x, out = case["x"], case["out"]
    if case["format"] == "sbhd":
        x, out = x.transpose(0, 1), out.transpose(0, 1)
    kernel.rope(x, case["angles"], out, backward=case["backward"])
torch.save(cases, sys.argv[1])
"""


def angle_table(seq: int, dim: int, theta: float = 500000.0) -> torch.Tensor:
    """TE's ``freqs`` as the model builds it (te_llama.rope.angle_table) for Llama's default inverse frequencies."""
    return rope.angle_table(torch.arange(seq), 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def reference(x: torch.Tensor, angles: torch.Tensor, backward: bool, tensor_format: str) -> torch.Tensor:
    """float32 RoPE (or its transpose) in the kernel's order of operations, in numpy as the interpreter runs it."""
    x = x if tensor_format == "bshd" else x.transpose(0, 1)
    seq, half = x.shape[1], x.shape[-1] // 2
    values = x.float().numpy()
    x1, x2 = values[..., :half], values[..., half:]
    a = angles[:seq, 0, 0, :].numpy()[None, :, None, :]  # [1, s, 1, d]
    cos1, sin1, cos2, sin2 = np.cos(a[..., :half]), np.sin(a[..., :half]), np.cos(a[..., half:]), np.sin(a[..., half:])
    if backward:
        y = np.concatenate([x1 * cos1 + x2 * sin2, x2 * cos2 - x1 * sin1], axis=-1)
    else:
        y = np.concatenate([x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2], axis=-1)
    y = torch.from_numpy(y)
    return y if tensor_format == "bshd" else y.transpose(0, 1)


def projection_views(batch: int, seq: int, heads: int, groups: int, dim: int, tensor_format: str, seed: int = 0):
    """Query and key as TE's MultiheadAttention makes them: views of one ``[.., (heads + 2 * groups) * dim]``
    projection output (not interleaved), so the token stride is the whole projection's width."""
    generator = torch.Generator().manual_seed(seed)
    lead = (batch, seq) if tensor_format == "bshd" else (seq, batch)
    mixed = torch.randn(*lead, heads + 2 * groups, dim, generator=generator).to(torch.bfloat16)
    return mixed[:, :, :heads], mixed[:, :, heads:heads + groups]


def case(x: torch.Tensor, angles: torch.Tensor, tensor_format: str, backward: bool = False,
         out_dtype=torch.float32, **extra) -> dict:
    return dict(x=x, angles=angles, out=torch.empty(x.shape, dtype=out_dtype), format=tensor_format,
                backward=backward, **extra)


@pytest.mark.parametrize("tensor_format", ["bshd", "sbhd"])
def test_kernel_matches_float32_math(tmp_path, tensor_format):
    """Strided query and key views (9 query heads, 3 key heads: SmolLM2's counts, not powers of two), forward and
    backward, and 64-bit offsets, bit for bit in float32 output."""
    query, key = projection_views(batch=2, seq=13, heads=9, groups=3, dim=64, tensor_format=tensor_format)
    angles = angle_table(16, 64)  # longer than the sequence, as TE allows
    cases = [case(query, angles, tensor_format), case(key, angles, tensor_format),
             case(query, angles, tensor_format, backward=True), case(key, angles, tensor_format, backward=True),
             case(query, angles, tensor_format, wide=True)]
    results = run_interpreted(RUN_KERNEL, tmp_path, cases)
    for result in results:
        expected = reference(result["x"], angles, result["backward"], tensor_format)
        assert torch.equal(result["out"], expected), (result["backward"], tuple(result["x"].shape))


def test_bfloat16_output_and_transpose(tmp_path):
    """The bfloat16 output rounds the float32 result once, and the backward is the forward's transpose:
    <rope(x), g> == <x, rope_backward(g)>."""
    query, _ = projection_views(batch=1, seq=8, heads=4, groups=1, dim=128, tensor_format="bshd", seed=1)
    grad = torch.randn(query.shape, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    angles = angle_table(8, 128, theta=10000.0)
    forward, backward, rounded = run_interpreted(RUN_KERNEL, tmp_path, [
        case(query, angles, "bshd"), case(grad, angles, "bshd", backward=True),
        case(query, angles, "bshd", out_dtype=torch.bfloat16)])
    torch.testing.assert_close(rounded["out"].float(), forward["out"], rtol=2**-7, atol=0)  # within one bf16 step
    lhs = (forward["out"].double() * grad.double()).sum()
    rhs = (query.double() * backward["out"].double()).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-5)


def test_plug_leaves_other_calls_to_te():
    """Only what the kernel computes exactly as TE does is taken: on the CPU nothing, and on a GPU not interleaved
    RoPE, start positions, thd, context parallelism, partial rotary dims, odd head dims or other dtypes."""
    x = torch.zeros(1, 4, 2, 64, dtype=torch.bfloat16)
    freqs = angle_table(4, 64)
    assert not covered(x, freqs, "bshd", None, False, None, 1)  # a CPU tensor

    class FakeCuda(torch.Tensor):  # covered() reads only metadata; pretend the tensor lives on a GPU
        is_cuda = True

    cuda_like = x.as_subclass(FakeCuda)
    assert covered(cuda_like, freqs, "bshd", None, False, None, 1)
    assert covered(cuda_like.transpose(0, 1), freqs, "sbhd", None, False, None, 1)
    assert not covered(cuda_like, freqs, "bshd", None, True, None, 1)
    assert not covered(cuda_like, freqs, "bshd", torch.zeros(1), False, None, 1)
    assert not covered(cuda_like, freqs, "thd", None, False, torch.zeros(2), 1)
    assert not covered(cuda_like, freqs, "bshd", None, False, None, 2)
    assert not covered(cuda_like, angle_table(4, 32), "bshd", None, False, None, 1)  # partial rotary
    assert not covered(cuda_like, angle_table(2, 64), "bshd", None, False, None, 1)  # table shorter than seq
    assert not covered(torch.zeros(1, 4, 2, 48, dtype=torch.bfloat16).as_subclass(FakeCuda), angle_table(4, 48),
                       "bshd", None, False, None, 1)  # head dim not a power of two
    assert not covered(cuda_like.transpose(2, 3), freqs, "bshd", None, False, None, 1)  # last dim strided
    assert not covered(x.half().as_subclass(FakeCuda), freqs, "bshd", None, False, None, 1)  # tested in bf16 only
