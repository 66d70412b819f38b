"""How much error the tensor cores' fast FP8 accumulation adds to the backward GEMMs, against split accumulation.

For each backward GEMM of one Llama-3-8B layer (dgrad and wgrad of QKV, the attention output, fc1 and fc2), FP8
operands with per-tensor scales (E5M2 gradients, E4M3 activations and weights, as in TE's HYBRID format) are
multiplied by cuBLAS with split accumulation (TE's default for gradients) and with fast accumulation, both with a
float32 output. Both are compared with the float64 product of the same dequantized operands, so the error is the
accumulation's alone. For scale, the FP8 quantization's own error is the float64 product of the dequantized
operands against the float64 product of the BF16 originals.

    python benchmarks/fp8_accumulation_error.py --out benchmarks/results/fp8_accumulation_error_h200.json

Operands are random: ``gaussian`` (zero mean) and ``shifted`` (mean equal to the standard deviation, so partial
sums grow with the inner dimension, the hard case for a short accumulator).
"""

from __future__ import annotations

import argparse
import json

import torch

HIDDEN, INTERMEDIATE, QKV = 4096, 14336, 4096 + 2 * 1024
# name: (output rows, output columns, inner dimension) for T tokens; dgrad's inner dimension is the layer's
# output width, wgrad's the token count.
GEMMS = {
    "qkv dgrad": lambda t: (t, HIDDEN, QKV),
    "proj dgrad": lambda t: (t, HIDDEN, HIDDEN),
    "fc1 dgrad": lambda t: (t, HIDDEN, 2 * INTERMEDIATE),
    "fc2 dgrad": lambda t: (t, INTERMEDIATE, HIDDEN),
    "qkv wgrad": lambda t: (QKV, HIDDEN, t),
    "proj wgrad": lambda t: (HIDDEN, HIDDEN, t),
    "fc1 wgrad": lambda t: (2 * INTERMEDIATE, HIDDEN, t),
    "fc2 wgrad": lambda t: (HIDDEN, INTERMEDIATE, t),
}


def operand(rows: int, cols: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(rows, cols, device="cuda", generator=generator)
    return (x + 1.0 if kind == "shifted" else x).to(torch.bfloat16)


def quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor scaling from the current amax, as TE's current scaling does: (fp8 tensor, dequantizing scale)."""
    scale = torch.finfo(dtype).max / x.abs().amax().float()
    return (x.float() * scale).to(dtype), scale.reciprocal()


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def measure(name: str, tokens: int, kind: str, seed: int) -> dict:
    rows, cols, inner = GEMMS[name](tokens)
    generator = torch.Generator("cuda").manual_seed(seed)
    a = operand(rows, inner, kind, generator)  # the gradient: dgrad's dY, wgrad's dY^T
    b = operand(cols, inner, kind, generator)  # dgrad: W^T; wgrad: X^T (column-major for cuBLAS)
    a8, a_inv = quantize(a, torch.float8_e5m2)
    b8, b_inv = quantize(b, torch.float8_e4m3fn)
    exact = a.double() @ b.double().t()
    dequantized = (a8.double() * a_inv.double()) @ (b8.double() * b_inv.double()).t()
    row = {"gemm": name, "tokens": tokens, "operands": kind, "m": rows, "n": cols, "k": inner,
           "fp8_quantization_rel_error": rel(dequantized, exact)}
    for mode, fast in (("split", False), ("fast", True)):
        out = torch._scaled_mm(a8, b8.t(), scale_a=a_inv, scale_b=b_inv, out_dtype=torch.float32,
                               use_fast_accum=fast)
        row[f"{mode}_accumulation_rel_error"] = rel(out, dequantized)
        row[f"{mode}_max_abs_error_over_rms"] = ((out.double() - dequantized).abs().amax()
                                                 / dequantized.pow(2).mean().sqrt()).item()
        del out
    row["fast_over_quantization"] = row["fast_accumulation_rel_error"] / row["fp8_quantization_rel_error"]
    del a, b, a8, b8, exact, dequantized
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", default="4096,16384", help="token counts (wgrad's inner dimension)")
    parser.add_argument("--operands", default="gaussian,shifted")
    args = parser.parse_args()
    rows = []
    header = (f"{'gemm':11s} {'tokens':>6s} {'operands':9s} {'k':>6s} {'FP8 quant':>9s} {'split':>9s} "
              f"{'fast':>9s} {'fast/quant':>10s}")
    print(header)
    for kind in args.operands.split(","):
        for tokens in map(int, args.tokens.split(",")):
            for name in GEMMS:
                row = measure(name, tokens, kind, seed=len(rows))
                rows.append(row)
                print(f"{name:11s} {tokens:6d} {kind:9s} {row['k']:6d} {row['fp8_quantization_rel_error']:9.2e} "
                      f"{row['split_accumulation_rel_error']:9.2e} {row['fast_accumulation_rel_error']:9.2e} "
                      f"{row['fast_over_quantization']:10.3f}", flush=True)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cublas": torch.backends.cuda.preferred_blas_library().name, "rows": rows}
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
