"""The LM-head loss's per-chunk step on the GPU: te_llama's Triton kernel against the ``torch.compile``d step it
replaced, for one chunk of Llama 3 logits (512 tokens x 128,256, bf16), each recorded in a CUDA graph and replayed
(``triton.testing.do_bench_cudagraph``; launched one call at a time from Python, the launch would be timed); then
the whole chunked LM head + loss, forward and backward, at the token counts of the benchmark's shapes A and B
(``triton.testing.do_bench``: the GEMMs keep the GPU busy), the two steps alternating, twice, with the peak memory
of each. ``--sweep`` also times the kernel's tile settings; ``--chunks`` other chunk sizes (tokens) for the kernel.

    python benchmarks/lm_head_loss.py --out lm_head_loss.json [--sweep] [--chunks 1024,2048]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import torch
from triton.testing import do_bench, do_bench_cudagraph

import te_llama.kernels.lm_head_loss_triton as kernel
from te_llama.model import lm_head_loss
from te_llama.bench.suite import environment

VOCAB, HIDDEN, CHUNK = 128256, 4096, 512


def chunk_inputs(rows: int = CHUNK):
    generator = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(rows, VOCAB, device="cuda", generator=generator) * 4).to(torch.bfloat16)
    targets = torch.randint(0, VOCAB, (rows,), device="cuda", generator=generator)
    scale = torch.full((rows,), 1.0 / 8192, device="cuda")
    grad = torch.empty_like(logits)
    loss = torch.empty(rows, device="cuda")
    return logits, targets, scale, grad, loss


def time_chunk_step(step, inputs) -> float:
    step(*inputs)  # compile / warm up outside the recording
    return do_bench_cudagraph(lambda: step(*inputs), rep=50)


def whole_loss(tokens: int, chunk: int | None, step: str = "auto") -> tuple[float, float]:
    """(ms, peak GiB above the inputs) of the chunked LM head + loss, forward and backward, at ``tokens``."""
    generator = torch.Generator(device="cuda").manual_seed(1)
    hidden = (torch.randn(tokens, HIDDEN, device="cuda", generator=generator)).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, device="cuda", generator=generator) * 0.02).to(torch.bfloat16)
    weight.requires_grad_()
    labels = torch.randint(0, VOCAB, (1, tokens), device="cuda", generator=generator)

    def run():
        hidden.grad = weight.grad = None
        lm_head_loss.linear_cross_entropy(hidden[None], weight, labels, chunk=chunk, step=step).backward()

    run()
    ms = do_bench(run, rep=1500)
    hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return ms, (torch.cuda.max_memory_allocated() - base) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--sweep", action="store_true", help="also time BLOCK x NUM_WARPS settings")
    parser.add_argument("--chunks", default="", help="comma-separated chunk sizes (tokens) to time the kernel with")
    args = parser.parse_args()
    report = {**environment(), "chunk": [CHUNK, VOCAB], "kernel_defaults": {
        "BLOCK": kernel.BLOCK, "NUM_WARPS": kernel.NUM_WARPS}}
    inputs = chunk_inputs()
    moved = 3 * inputs[0].numel() * inputs[0].element_size()  # two reads of the logits, one write of the gradient
    compiled = torch.compile(lm_head_loss.loss_and_logit_grad, fullgraph=True)
    steps = {"compiled": compiled, "kernel": lm_head_loss.loss_and_logit_grad_kernel}
    outputs = {}
    for name, step in steps.items():
        ms = time_chunk_step(step, inputs)
        report[f"chunk_{name}_ms"] = ms
        report[f"chunk_{name}_tb_s_at_3_passes"] = moved / ms / 1e9
        outputs[name] = (inputs[3].clone(), inputs[4].clone())
        print(name, f"{ms:.4f} ms", flush=True)
    (grad_c, loss_c), (grad_k, loss_k) = outputs["compiled"], outputs["kernel"]
    report["kernel_vs_compiled"] = {
        "gradient_elements_differing": int((grad_c != grad_k).sum()), "gradient_elements": grad_c.numel(),
        "gradient_max_abs_difference": float((grad_c.float() - grad_k.float()).abs().max()),
        "loss_max_relative_difference": float(((loss_c - loss_k).abs() / loss_c.abs()).max())}
    print(json.dumps(report["kernel_vs_compiled"]), flush=True)
    if args.sweep:
        defaults = (kernel.BLOCK, kernel.NUM_WARPS)
        sweep = []
        for block, warps in itertools.product((2048, 4096, 8192, 16384), (4, 8, 16, 32)):
            kernel.BLOCK, kernel.NUM_WARPS = block, warps
            sweep.append({"BLOCK": block, "NUM_WARPS": warps,
                          "ms": time_chunk_step(lm_head_loss.loss_and_logit_grad_kernel, inputs)})
            print(json.dumps(sweep[-1]), flush=True)
        kernel.BLOCK, kernel.NUM_WARPS = defaults
        report["sweep"] = sweep
    settings = [("compiled", "compiled", None), ("kernel", "kernel", None)]
    settings += [(f"kernel_chunk{chunk}", "kernel", int(chunk)) for chunk in args.chunks.split(",") if chunk]
    report["whole"] = []
    for repeat in range(2):
        for shape, tokens in (("A", 8192), ("B", 4096)):
            for name, step, chunk in settings:
                ms, peak = whole_loss(tokens, chunk, step)
                default = tokens if step == "kernel" else lm_head_loss.chunk_tokens(VOCAB)  # the kernel: one chunk
                report["whole"].append({"shape": shape, "tokens": tokens, "step": name, "repeat": repeat,
                                        "chunk": chunk or default, "ms": ms, "peak_gib_above_inputs": peak})
                print(json.dumps(report["whole"][-1]), flush=True)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
