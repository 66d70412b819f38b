"""Which way of writing one FP8 tile in both layouts does Triton (3.6 on the GPU machine) get right? (eleventh
session's probe, as run on the GPU but for this docstring; results in trial_swiglu_forward_store_probe_h200.json.)
MODE 0 stores one FP8 tensor twice, 1 its bytes (uint8 bitcast) twice, 2 the transposed copy from an inline-asm copy
of the bytes, 3 the transposed copy as ``tl.trans`` of values, offsets and mask; each is compared with two launches
that store one layout each.

    python3 trial_swiglu_forward_store_probe_session11.py out.json
"""
import sys, json, torch
import triton, triton.language as tl

@triton.jit
def fwd(act_in_ptr, out_ptr, out_t_ptr, scale_ptr, rows, inner, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        MODE: tl.constexpr, ROW: tl.constexpr, TRANS: tl.constexpr):
    pid_m = tl.program_id(0); pid_n = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M); n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = (m[:, None] < rows) & (n[None, :] < inner)
    row = m[:, None]; col = n[None, :]
    gate = tl.load(act_in_ptr + row * (2 * inner) + col, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(act_in_ptr + row * (2 * inner) + inner + col, mask=inside, other=0.0).to(tl.float32)
    act = gate * tl.sigmoid(gate) * up
    scale = tl.load(scale_ptr)
    q = (act * scale).to(tl.float8e4nv)
    if MODE == 0:      # as the trial: one FP8 tensor, two stores
        a = q; b = q
    elif MODE == 1:    # bytes: bitcast to uint8 first (outputs are uint8 views)
        a = q.to(tl.uint8, bitcast=True); b = a
    elif MODE == 2:    # an opaque copy of the bytes for the transposed store
        a = q.to(tl.uint8, bitcast=True)
        b = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [a], dtype=tl.uint8, is_pure=False, pack=4)
    elif MODE == 3:    # transposed store of tl.trans(q)
        a = q.to(tl.uint8, bitcast=True); b = a
    if ROW:
        tl.store(out_ptr + row * inner + col, a, mask=inside)
    if TRANS:
        if MODE == 3:
            tl.store(out_t_ptr + tl.trans(col * rows + row), tl.trans(b), mask=tl.trans(inside))
        else:
            tl.store(out_t_ptr + col * rows + row, b, mask=inside)

res = {"triton": triton.__version__, "gpu": torch.cuda.get_device_name()}
for rows, inner in [(4096, 14336), (2048, 1408), (1000, 1400)]:
    act_in = (torch.randn(rows, 2 * inner, device="cuda") * 3).to(torch.bfloat16)
    scale = torch.tensor([64.0], device="cuda")
    for bm_, bn, warps in [(64, 128, 8), (32, 128, 4)]:
        grid = (triton.cdiv(rows, bm_), triton.cdiv(inner, bn))
        ref = torch.zeros(rows, inner, dtype=torch.uint8, device="cuda")
        fwd[grid](act_in, ref, ref, scale, rows, inner, BLOCK_M=bm_, BLOCK_N=bn, MODE=1, ROW=True, TRANS=False, num_warps=warps)
        ref_t = torch.zeros(inner, rows, dtype=torch.uint8, device="cuda")
        fwd[grid](act_in, ref_t, ref_t, scale, rows, inner, BLOCK_M=bm_, BLOCK_N=bn, MODE=1, ROW=False, TRANS=True, num_warps=warps)
        torch.cuda.synchronize()
        res[f"{rows}x{inner} {bm_}x{bn}x{warps} separate launches differ"] = int((ref.t() != ref_t).sum())
        for mode in range(4):
            out = torch.zeros(rows, inner, dtype=torch.uint8, device="cuda"); out_t = torch.zeros(inner, rows, dtype=torch.uint8, device="cuda")
            try:
                if mode == 0:
                    fwd[grid](act_in, out.view(torch.float8_e4m3fn), out_t.view(torch.float8_e4m3fn), scale, rows, inner, BLOCK_M=bm_, BLOCK_N=bn, MODE=0, ROW=True, TRANS=True, num_warps=warps)
                else:
                    fwd[grid](act_in, out, out_t, scale, rows, inner, BLOCK_M=bm_, BLOCK_N=bn, MODE=mode, ROW=True, TRANS=True, num_warps=warps)
                torch.cuda.synchronize()
                r = {"row_wrong": int((out != ref).sum()), "t_wrong": int((out_t != ref_t).sum())}
                if rows == 4096 and mode in (0, 1, 2):
                    t = triton.testing.do_bench(lambda: fwd[grid](act_in, out, out_t, scale, rows, inner, BLOCK_M=bm_, BLOCK_N=bn, MODE=max(mode, 1), ROW=True, TRANS=True, num_warps=warps), warmup=20, rep=100)
                    r["ms"] = round(t, 4)
            except Exception as e:
                r = {"error": repr(e)[:300]}
            res[f"{rows}x{inner} {bm_}x{bn}x{warps} mode{mode}"] = r
for k, v in res.items(): print(k, v, flush=True)
json.dump(res, open(sys.argv[1], "w"), indent=1)
