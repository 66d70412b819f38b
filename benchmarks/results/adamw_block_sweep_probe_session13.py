"""te_llama.AdamW's Triton kernel over shape A's parameters (2.8B bf16): BLOCK x num_warps, CUDA-graph replays."""
import json, sys
import torch
from triton.testing import do_bench_cudagraph
import triton
from te_llama.adamw_triton import _adamw_update

shapes = [(128256, 4096)] * 2 + [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)] * 8
params = [torch.randn(s, device="cuda").to(torch.bfloat16) for s in shapes]
grads = [torch.randn_like(p) for p in params]
m = [torch.zeros_like(p) for p in params]
v = [torch.zeros_like(p) for p in params]
numel = sum(p.numel() for p in params)
rows = []
for block in (1024, 2048, 4096, 8192, 16384):
    for warps in (4, 8, 16):
        def step():
            for p, g, a, b in zip(params, grads, m, v):
                n = p.numel()
                _adamw_update[(triton.cdiv(n, block),)](p, g, a, b, n, 1e-5, 0.9, 0.999, 1e-8, 0.01, 1e-5, 0.5,
                                                         BLOCK=block, num_warps=warps)
        ms = do_bench_cudagraph(step, rep=100)
        rows.append({"BLOCK": block, "num_warps": warps, "ms": ms, "tb_s": 14 * numel / ms / 1e9})
        print(json.dumps(rows[-1]), flush=True)
json.dump({"gpu": torch.cuda.get_device_name(), "params": numel, "rows": rows}, open(sys.argv[1], "w"), indent=1)
