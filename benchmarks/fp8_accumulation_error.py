"""How much error the tensor cores' fast FP8 accumulation adds to the backward GEMMs, against split accumulation.

For each backward GEMM of one Llama-3-8B layer (dgrad and wgrad of QKV, the attention output, fc1 and fc2), FP8
operands with per-tensor scales (E5M2 gradients, E4M3 activations and weights, as in TE's HYBRID format) are
multiplied by cuBLAS with split accumulation (TE's default for gradients) and with fast accumulation, both with a
float32 output. Both are compared with the float64 product of the same dequantized operands, so the error is the
accumulation's alone. For scale, the FP8 quantization's own error is the float64 product of the dequantized
operands against the float64 product of the BF16 originals.

    python benchmarks/fp8_accumulation_error.py --out benchmarks/results/fp8_accumulation_error_h200.json

Operands are random: ``gaussian`` (zero mean) and ``shifted`` (mean equal to the standard deviation, so partial
sums grow with the inner dimension, the hard case for a short accumulator). ``--capture`` takes real ones
instead, on the CPU: one forward + backward of SmolLM2-135M (real weights) over 4,096 tokens of English text, the
inputs and output gradients of one decoder layer's projections (in TE's layout: QKV fused, gate and up fused),
quantized to FP8 as above, with the quantization's error computed there in float64. ``--real`` then runs those
GEMMs on the GPU (the file is small enough to travel to the GPU machine, where the weights cannot):

    python benchmarks/fp8_accumulation_error.py --capture .gpu/smollm2_layer15_operands.pt    # CPU
    python benchmarks/fp8_accumulation_error.py --real .gpu/smollm2_layer15_operands.pt --out ...  # GPU
"""

from __future__ import annotations

import argparse
import json
import os

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


def dequantized_product(a8, a_inv, b8, b_inv) -> torch.Tensor:
    """The float64 product ``a @ b.t()`` of the dequantized FP8 operands: what an exact accumulator would give."""
    return (a8.double() * a_inv.double()) @ (b8.double() * b_inv.double()).t()


def quantize_pair(a: torch.Tensor, b: torch.Tensor) -> tuple:
    """``a`` (the gradient) in E5M2 and ``b`` in E4M3, each with its dequantizing scale, their
    :func:`dequantized_product` and the quantization's error: that product against the originals' float64 one."""
    a8, a_inv = quantize(a, torch.float8_e5m2)
    b8, b_inv = quantize(b, torch.float8_e4m3fn)
    dequantized = dequantized_product(a8, a_inv, b8, b_inv)
    return a8, a_inv, b8, b_inv, dequantized, rel(dequantized, a.double() @ b.double().t())


def accumulation_errors(a8, a_inv, b8, b_inv, dequantized: torch.Tensor, quantization_error: float) -> dict:
    """cuBLAS's FP8 product with split and with fast accumulation (float32 output) against ``dequantized``."""
    row = {"fp8_quantization_rel_error": quantization_error}
    for mode, fast in (("split", False), ("fast", True)):
        out = torch._scaled_mm(a8, b8.t(), scale_a=a_inv, scale_b=b_inv, out_dtype=torch.float32,
                               use_fast_accum=fast)
        row[f"{mode}_accumulation_rel_error"] = rel(out, dequantized)
        row[f"{mode}_max_abs_error_over_rms"] = ((out.double() - dequantized).abs().amax()
                                                 / dequantized.pow(2).mean().sqrt()).item()
        del out
    row["fast_over_quantization"] = row["fast_accumulation_rel_error"] / quantization_error
    return row


def measure(name: str, tokens: int, kind: str, seed: int) -> dict:
    rows, cols, inner = GEMMS[name](tokens)
    generator = torch.Generator("cuda").manual_seed(seed)
    a = operand(rows, inner, kind, generator)  # the gradient: dgrad's dY, wgrad's dY^T
    b = operand(cols, inner, kind, generator)  # dgrad: W^T; wgrad: X^T (column-major for cuBLAS)
    a8, a_inv, b8, b_inv, dequantized, quantization_error = quantize_pair(a, b)
    row = {"gemm": name, "tokens": tokens, "operands": kind, "m": rows, "n": cols, "k": inner,
           **accumulation_errors(a8, a_inv, b8, b_inv, dequantized, quantization_error)}
    del a, b, a8, b8, dequantized
    torch.cuda.empty_cache()
    return row


def capture(path: str, layer: int, batch: int, seq: int) -> None:
    """Real operands of one SmolLM2-135M layer's backward GEMMs, quantized, with the quantization error (CPU)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from te_llama.commands.assets import english_text, smollm2_checkpoint, wiki_text

    checkpoint = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ids = tokenizer(wiki_text() + "\n\n" + english_text(), return_tensors="pt").input_ids[0]
    ids = ids[: batch * seq].view(batch, seq)
    model = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).train()
    block = model.model.layers[layer]
    linears = {"q": block.self_attn.q_proj, "k": block.self_attn.k_proj, "v": block.self_attn.v_proj,
               "proj": block.self_attn.o_proj, "gate": block.mlp.gate_proj, "up": block.mlp.up_proj,
               "fc2": block.mlp.down_proj}
    inputs, grads = {}, {}

    def keep(name):
        def hook(module, args, output):
            inputs[name] = args[0].detach().flatten(0, 1)
            output.register_hook(lambda grad: grads.__setitem__(name, grad.detach().flatten(0, 1)))
        return hook

    for name, linear in linears.items():
        linear.register_forward_hook(keep(name))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    weight = {name: linear.weight.detach() for name, linear in linears.items()}
    fused = {  # TE's layout: one QKV and one gate-then-up projection
        "qkv": (inputs["q"], torch.cat([grads[n] for n in "qkv"], 1), torch.cat([weight[n] for n in "qkv"], 0)),
        "proj": (inputs["proj"], grads["proj"], weight["proj"]),
        "fc1": (inputs["gate"], torch.cat([grads["gate"], grads["up"]], 1),
                torch.cat([weight["gate"], weight["up"]], 0)),
        "fc2": (inputs["fc2"], grads["fc2"], weight["fc2"]),
    }
    gemms = []
    for name, (x, dy, w) in fused.items():
        x, dy, w = (t.to(torch.bfloat16) for t in (x, dy, w))
        # dgrad: dX = dY W (k = outputs); wgrad: dW = dY^T X (k = tokens). ``b`` is stored as (n, k).
        for kind, a, b in (("dgrad", dy, w.t().contiguous()), ("wgrad", dy.t().contiguous(), x.t().contiguous())):
            a8, a_inv, b8, b_inv, _, quantization_error = quantize_pair(a, b)
            gemms.append({"gemm": f"{name} {kind}", "a": a8, "a_inv": a_inv, "b": b8, "b_inv": b_inv,
                          "fp8_quantization_rel_error": quantization_error})
            print(f"{name} {kind}: m={a.shape[0]} n={b.shape[0]} k={a.shape[1]} quantization "
                  f"{quantization_error:.2e}", flush=True)
    source = {"model": str(checkpoint.name), "layer": layer, "tokens": batch * seq, "batch": batch, "seq": seq,
              "loss": loss.item(), "text": "te_llama.commands.assets.wiki_text() + english_text()"}
    temporary = path + ".partial"
    torch.save({"source": source, "gemms": gemms}, temporary)
    os.replace(temporary, path)


def measure_real(path: str) -> list[dict]:
    """Split against fast accumulation on the GEMMs of a :func:`capture` file (GPU)."""
    captured = torch.load(path)
    rows = []
    for gemm in captured["gemms"]:
        a8, a_inv, b8, b_inv = (gemm[key].cuda() for key in ("a", "a_inv", "b", "b_inv"))
        rows.append({"gemm": gemm["gemm"], "m": a8.shape[0], "n": b8.shape[0], "k": a8.shape[1], "operands": "real",
                     **captured["source"],
                     **accumulation_errors(a8, a_inv, b8, b_inv, dequantized_product(a8, a_inv, b8, b_inv),
                                           gemm["fp8_quantization_rel_error"])})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON file to write")
    parser.add_argument("--tokens", default="4096,16384", help="token counts (wgrad's inner dimension)")
    parser.add_argument("--operands", default="gaussian,shifted")
    parser.add_argument("--capture", metavar="FILE", help="CPU: write one SmolLM2 layer's real FP8 operands")
    parser.add_argument("--layer", type=int, default=15, help="--capture: the decoder layer")
    parser.add_argument("--real", metavar="FILE", help="GPU: measure the GEMMs of a --capture file")
    args = parser.parse_args()
    if args.capture:
        capture(args.capture, args.layer, batch=4, seq=1024)
        return
    if args.out is None:
        parser.error("--out is required unless --capture is given")
    header = (f"{'gemm':11s} {'tokens':>6s} {'operands':9s} {'k':>6s} {'FP8 quant':>9s} {'split':>9s} "
              f"{'fast':>9s} {'fast/quant':>10s}")
    print(header)
    rows = measure_real(args.real) if args.real else []
    for kind in [] if args.real else args.operands.split(","):
        for tokens in map(int, args.tokens.split(",")):
            for name in GEMMS:
                rows.append(measure(name, tokens, kind, seed=len(rows)))
    for row in rows:
        print(f"{row['gemm']:11s} {row.get('tokens', 0):6d} {row['operands']:9s} {row['k']:6d} "
              f"{row['fp8_quantization_rel_error']:9.2e} {row['split_accumulation_rel_error']:9.2e} "
              f"{row['fast_accumulation_rel_error']:9.2e} {row['fast_over_quantization']:10.3f}", flush=True)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cublas": torch.backends.cuda.preferred_blas_library().name, "rows": rows}
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
