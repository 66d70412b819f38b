"""One layer's RoPE (query and key, forward and backward) on the GPU: te_llama's kernel against Transformer Engine's
fused RoPE, at Llama-3-8B's head layout (query and key as views of the projection output, as TE's attention makes
them), for the token counts of the benchmark's shapes. Each operation is recorded in a CUDA graph and replayed
(``triton.testing.do_bench_cudagraph``), as the model's graphs run it: launched from Python one call at a time,
the Triton launch (tens of microseconds of host time) would be timed instead of the kernel. The forward +
backward times include adding the gradient into the inputs' ``.grad`` (the same add for both).

    python benchmarks/rope_apply.py --out rope_apply.json
"""

from __future__ import annotations

import argparse
import json

import torch
from triton.testing import do_bench_cudagraph

from te_llama.benchmark import environment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from transformer_engine.pytorch.attention.rope import apply_rotary_pos_emb as te_rope

    from te_llama.rope import angle_table
    from te_llama.rope_apply import apply_rope

    heads, groups, dim = 32, 8, 128
    rows = []
    for batch, seq in ((1, 4096), (2, 4096), (8, 256)):
        mixed = torch.randn(batch, seq, heads + 2 * groups, dim, device="cuda").to(torch.bfloat16)
        inv_freq = 1.0 / 500000.0 ** (torch.arange(0, dim, 2, device="cuda").float() / dim)
        angles = angle_table(torch.arange(seq, device="cuda"), inv_freq)
        views = tuple(view.detach().requires_grad_()
                      for view in (mixed[:, :, :heads], mixed[:, :, heads:heads + groups]))
        grads = [torch.randn(v.shape, device="cuda").to(torch.bfloat16) for v in views]
        row = {"batch": batch, "seq": seq}
        for name, fn in (("te", lambda t: te_rope(t, angles, "bshd", fused=True)),
                         ("te_llama", lambda t: apply_rope(t, angles, "bshd"))):
            def forward():
                return [fn(v) for v in views]

            def step():
                for out, grad in zip(forward(), grads):
                    out.backward(grad)

            with torch.no_grad():
                row[f"{name}_forward_ms"] = do_bench_cudagraph(forward, rep=50)
            row[f"{name}_forward_backward_ms"] = do_bench_cudagraph(step, rep=50)
        moved = 2 * mixed[:, :, :heads + groups].numel() * 2  # bytes read and written by one forward
        row["te_llama_forward_tb_s"] = moved / row["te_llama_forward_ms"] / 1e9
        row["te_forward_tb_s"] = moved / row["te_forward_ms"] / 1e9
        rows.append(row)
        print(json.dumps(row))
    with open(args.out, "w") as handle:
        json.dump({**environment(), "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
