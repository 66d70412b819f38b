"""Trial: RoPE kernel tiles (elements per program, warps), GPU time from CUDA-graph replays, against TE."""
import sys, json, torch
import transformer_engine.pytorch  # noqa: F401
from transformer_engine.pytorch.attention.rope import apply_rotary_pos_emb as te_rope
from triton.testing import do_bench_cudagraph
from te_llama import rope_apply_triton as kernel
from te_llama.rope_apply import apply_rope

res = {}
heads, groups, dim = 32, 8, 128
for batch, seq in ((1, 4096), (2, 4096)):
    mixed = torch.randn(batch, seq, heads + 2 * groups, dim, device="cuda").to(torch.bfloat16)
    inv = 1.0 / 500000.0 ** (torch.arange(0, dim, 2, device="cuda").float() / dim)
    f = torch.arange(seq, device="cuda").float()[:, None] * inv[None, :]
    angles = torch.cat((f, f), -1)[:, None, None, :].contiguous()
    views = (mixed[:, :, :heads].detach().requires_grad_(), mixed[:, :, heads:heads + groups].detach().requires_grad_())
    grads = [torch.randn(v.shape, device="cuda").to(torch.bfloat16) for v in views]
    def bench(fn):
        def fwd():
            return [fn(v) for v in views]
        def step():
            for o, g in zip(fwd(), grads):
                o.backward(g)
        with torch.no_grad():
            a = do_bench_cudagraph(fwd, rep=50)
        return round(a, 4), round(do_bench_cudagraph(step, rep=50) - a, 4)
    res[f"{batch}x{seq} te (fwd, bwd)"] = bench(lambda t: te_rope(t, angles, "bshd", fused=True))
    print(res, flush=True)
    for tile in (1024, 2048, 4096, 8192, 16384):
        for warps in (1, 2, 4, 8):
            kernel.TILE_ELEMENTS, kernel.NUM_WARPS = tile, warps
            try:
                res[f"{batch}x{seq} ours tile={tile} warps={warps}"] = bench(lambda t: apply_rope(t, angles, "bshd"))
            except Exception as e:
                res[f"{batch}x{seq} ours tile={tile} warps={warps}"] = repr(e)[:200]
            print(f"{batch}x{seq} tile={tile} warps={warps}", res[f"{batch}x{seq} ours tile={tile} warps={warps}"], flush=True)
json.dump(res, open(sys.argv[1], "w"), indent=1)
