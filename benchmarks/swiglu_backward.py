"""Time SwiGLU's FP8 backward for one decoder layer of the bench's shapes: Transformer Engine's two kernels
(``dgated_act`` in bfloat16, then ``cast_transpose_dbias``) against te-llama's fused kernel
(:mod:`te_llama.kernels.swiglu_backward`), and the fused kernel's tile sizes. Llama-3-8B's MLP (intermediate 14336) at
4,096 tokens (shape B's layer) and 8,192 tokens (shape A's).

    python benchmarks/swiglu_backward.py --out swiglu_backward.json
"""

from __future__ import annotations

import argparse
import json

import torch

from te_llama.kernels import swiglu_backward
from te_llama.kernels import swiglu_backward_triton as kernel
from te_llama.bench.suite import environment, median_ms

TILES = [(32, 128, 4), (32, 128, 8), (32, 64, 4), (64, 64, 8), (64, 128, 8)]


def measure(rows: int, inner: int) -> dict:
    from transformer_engine.pytorch.tensor.float8_tensor import Float8Quantizer

    import transformer_engine_torch as tex  # loadable once transformer_engine.pytorch is imported

    grad = (torch.randn(rows, inner, device="cuda") * 1e-3).to(torch.bfloat16)
    act_in = (torch.randn(rows, 2 * inner, device="cuda") * 3).to(torch.bfloat16)
    q = Float8Quantizer(scale=torch.tensor([4096.0], device="cuda"), amax=torch.zeros(1, device="cuda"),
                        fp8_dtype=tex.DType.kFloat8E5M2)
    q.internal = True
    q.set_usage(rowwise=True, columnwise=True)

    def timed(run) -> float:
        return median_ms(run, repeats=30, warmup=5)

    def fused():
        fc1_bias = None  # noqa: F841  (a bias-free MLP, as TE's backward holds it)
        return swiglu_backward.dswiglu_quantize(grad, act_in, q)

    moved_fused = grad.numel() * 2 + act_in.numel() * 2 + act_in.numel() * 2  # read bf16, write FP8 twice
    moved_te = moved_fused + act_in.numel() * 2 * 2  # plus the bfloat16 gradient written and read back
    row = {"rows": rows, "inner": inner,
           "te_dgated_act_ms": timed(lambda: tex.dswiglu(grad, act_in, None)),
           "te_two_kernels_ms": timed(lambda: tex.bgrad_quantize(tex.dswiglu(grad, act_in, None), q)),
           "fused_ms": timed(fused), "bytes_fused": moved_fused, "bytes_te": moved_te, "tiles": {}}
    default = (kernel.BLOCK_M, kernel.BLOCK_N, kernel.NUM_WARPS)
    for tile in TILES:
        kernel.BLOCK_M, kernel.BLOCK_N, kernel.NUM_WARPS = tile
        row["tiles"]["x".join(map(str, tile))] = timed(fused)
    kernel.BLOCK_M, kernel.BLOCK_N, kernel.NUM_WARPS = default
    row["fused_tb_per_s"] = moved_fused / row["fused_ms"] / 1e9
    row["te_tb_per_s"] = moved_te / row["te_two_kernels_ms"] / 1e9
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="swiglu_backward.json")
    args = parser.parse_args()
    rows = [measure(4096, 14336), measure(8192, 14336)]
    for row in rows:
        print(f"{row['rows']} x {row['inner']}: TE {row['te_two_kernels_ms']:.3f} ms ({row['te_tb_per_s']:.2f} TB/s; "
              f"dgated_act {row['te_dgated_act_ms']:.3f}), fused {row['fused_ms']:.3f} ms "
              f"({row['fused_tb_per_s']:.2f} TB/s), tiles {row['tiles']}")
    with open(args.out, "w") as handle:
        json.dump({**environment(), "command": "python benchmarks/swiglu_backward.py", "rows": rows}, handle,
                  indent=1)


if __name__ == "__main__":
    main()
