"""Trial (twelfth session): SwiGLU FP8 kernels whose transposed copy is quantized from a transposed float tile
(tl.trans before the FP8 cast), so no 8-bit tile is ever stored in two layouts or transposed in 8 bits.
Forward: silu(gate)*up -> FP8 row-major + transposed (against one-layout launches and TE's gated_act + transpose).
Backward: main's _dswiglu_fp8 against variants transposing the bf16 / fp32 tile. Bytes checked, then timed."""
import sys, json, torch
import transformer_engine.pytorch  # noqa: F401
import transformer_engine_torch as tex
from transformer_engine.pytorch.tensor.float8_tensor import Float8Quantizer
import triton, triton.language as tl
from triton.testing import do_bench
from te_llama import swiglu_backward_triton as main_bwd

F8 = torch.float8_e4m3fn


@triton.jit
def fwd(act_in_ptr, out_ptr, out_t_ptr, scale_ptr, scale_inv_ptr, amax_ptr, rows, inner, ROW: tl.constexpr,
        TRANS: tl.constexpr, TMODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0); pid_n = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M); n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = (m[:, None] < rows) & (n[None, :] < inner)
    gate = tl.load(act_in_ptr + m[:, None] * (2 * inner) + n[None, :], mask=inside, other=0.0).to(tl.float32)
    up = tl.load(act_in_ptr + m[:, None] * (2 * inner) + inner + n[None, :], mask=inside, other=0.0).to(tl.float32)
    act = gate * tl.sigmoid(gate) * up
    tl.atomic_max(amax_ptr, tl.max(tl.abs(act)))
    scale = tl.load(scale_ptr)
    if (pid_m == 0) & (pid_n == 0):
        tl.store(scale_inv_ptr, tl.math.div_rn(1.0, scale))
    if ROW:
        tl.store(out_ptr + m[:, None] * inner + n[None, :], (act * scale).to(out_ptr.dtype.element_ty), mask=inside)
    if TRANS:
        if TMODE == 0:  # transposed float tile, quantized after the transpose
            act_t = tl.trans(act)
            t_inside = (n[:, None] < inner) & (m[None, :] < rows)
            tl.store(out_t_ptr + n[:, None] * rows + m[None, :], (act_t * scale).to(out_t_ptr.dtype.element_ty),
                     mask=t_inside)
        else:  # the tenth session's trial: the same FP8 tensor stored transposed
            tl.store(out_t_ptr + n[None, :] * rows + m[:, None], (act * scale).to(out_t_ptr.dtype.element_ty),
                     mask=inside)


@triton.jit
def bwd(grad_ptr, act_in_ptr, out_ptr, out_t_ptr, scale_ptr, scale_inv_ptr, amax_ptr, rows, inner,
        TMODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0); pid_n = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M); n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = (m[:, None] < rows) & (n[None, :] < inner)
    row = m[:, None]; col = n[None, :]
    grad = tl.load(grad_ptr + row * inner + col, mask=inside, other=0.0).to(tl.float32)
    gate = tl.load(act_in_ptr + row * (2 * inner) + col, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(act_in_ptr + row * (2 * inner) + inner + col, mask=inside, other=0.0).to(tl.float32)
    sigmoid = tl.sigmoid(gate)
    silu = gate * sigmoid
    dsilu = gate * (sigmoid * (1.0 - sigmoid)) + sigmoid
    d_gate_b = (dsilu * grad * up).to(tl.bfloat16)
    d_up_b = (grad * silu).to(tl.bfloat16)
    d_gate = d_gate_b.to(tl.float32)
    d_up = d_up_b.to(tl.float32)
    tl.atomic_max(amax_ptr, tl.maximum(tl.max(tl.abs(d_gate)), tl.max(tl.abs(d_up))))
    scale = tl.load(scale_ptr)
    if (pid_m == 0) & (pid_n == 0):
        tl.store(scale_inv_ptr, tl.math.div_rn(1.0, scale))
    ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + row * (2 * inner) + col, (d_gate * scale).to(ty), mask=inside)
    tl.store(out_ptr + row * (2 * inner) + inner + col, (d_up * scale).to(ty), mask=inside)
    if TMODE == 0:  # transpose the bf16 tiles
        g_t = tl.trans(d_gate_b).to(tl.float32)
        u_t = tl.trans(d_up_b).to(tl.float32)
    else:  # transpose the float32 tiles
        g_t = tl.trans(d_gate)
        u_t = tl.trans(d_up)
    t_inside = (n[:, None] < inner) & (m[None, :] < rows)
    tl.store(out_t_ptr + n[:, None] * rows + m[None, :], (g_t * scale).to(ty), mask=t_inside)
    tl.store(out_t_ptr + (n[:, None] + inner) * rows + m[None, :], (u_t * scale).to(ty), mask=t_inside)


def u8(t):
    return t.view(torch.uint8)


res = {"triton": triton.__version__, "gpu": torch.cuda.get_device_name()}
for rows, inner in [(4096, 14336), (8192, 14336), (1000, 1400)]:
    gen = torch.Generator("cuda").manual_seed(0)
    act_in = (torch.randn(rows, 2 * inner, device="cuda", generator=gen) * 3).to(torch.bfloat16)
    grad = (torch.randn(rows, inner, device="cuda", generator=gen) * 1e-3).to(torch.bfloat16)
    scale = torch.tensor([64.0], device="cuda")
    key = f"{rows}x{inner}"
    # forward reference: TE's gated_act (rowwise FP8) and its transpose
    q = Float8Quantizer(scale=scale.clone(), amax=torch.zeros(1, device="cuda"), fp8_dtype=tex.DType.kFloat8E4M3)
    q.set_usage(rowwise=True, columnwise=False)
    te_out = tex.swiglu(act_in, q)
    te_row = u8(te_out._data)
    te_t = te_row.t().contiguous()
    res[f"{key} te forward ms (gated_act)"] = round(do_bench(lambda: tex.swiglu(act_in, q), warmup=20, rep=100), 4)
    res[f"{key} te fp8 transpose ms"] = round(do_bench(lambda: te_row.t().contiguous(), warmup=20, rep=100), 4)
    tr = torch.empty(inner, rows, dtype=torch.uint8, device="cuda")
    for bm, bn, warps in [(32, 128, 4), (64, 64, 8), (64, 128, 8), (32, 64, 4)]:
        grid = (triton.cdiv(rows, bm), triton.cdiv(inner, bn))
        for tmode in (0, 1):
            out = torch.zeros(rows, inner, dtype=torch.uint8, device="cuda"); out_t = torch.zeros(inner, rows, dtype=torch.uint8, device="cuda")
            amax, sinv = torch.zeros(1, device="cuda"), torch.zeros(1, device="cuda")
            run = lambda: fwd[grid](act_in, out.view(F8), out_t.view(F8), scale, sinv, amax, rows, inner, ROW=True, TRANS=True, TMODE=tmode, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)
            try:
                run(); torch.cuda.synchronize()
                r = {"row_vs_te": int((out != te_row).sum()), "t_vs_te": int((out_t != te_t).sum()),
                     "amax_eq": bool(amax.item() == q.amax.item()), "scale_inv": sinv.item()}
                if rows >= 4096:
                    r["ms"] = round(do_bench(run, warmup=20, rep=100), 4)
            except Exception as e:
                r = {"error": repr(e)[:400]}
            res[f"{key} fwd {bm}x{bn}x{warps} tmode{tmode}"] = r
            print(key, "fwd", bm, bn, warps, tmode, r, flush=True)
    # backward: main kernel is the reference
    ref = torch.empty(rows, 2 * inner, dtype=F8, device="cuda"); ref_t = torch.empty(2 * inner, rows, dtype=F8, device="cuda")
    amax0, sinv0 = torch.zeros(1, device="cuda"), torch.zeros(1, device="cuda")
    main_run = lambda: main_bwd.dswiglu_fp8(grad, act_in, scale, amax0, ref, ref_t, sinv0, bias_grad=False)
    main_run(); torch.cuda.synchronize()
    if rows >= 4096:
        res[f"{key} bwd main ms"] = round(do_bench(main_run, warmup=20, rep=100), 4)
    assert torch.equal(u8(ref_t), u8(ref).t().contiguous())
    for bm, bn, warps in [(32, 128, 4), (64, 64, 8), (64, 128, 8), (32, 64, 4)]:
        grid = (triton.cdiv(rows, bm), triton.cdiv(inner, bn))
        for tmode in (0, 1):
            out = torch.zeros(rows, 2 * inner, dtype=torch.uint8, device="cuda"); out_t = torch.zeros(2 * inner, rows, dtype=torch.uint8, device="cuda")
            amax, sinv = torch.zeros(1, device="cuda"), torch.zeros(1, device="cuda")
            run = lambda: bwd[grid](grad, act_in, out.view(F8), out_t.view(F8), scale, sinv, amax, rows, inner, TMODE=tmode, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)
            try:
                run(); torch.cuda.synchronize()
                r = {"row_vs_main": int((out != u8(ref)).sum()), "t_vs_main": int((out_t != u8(ref_t)).sum()),
                     "amax_eq": bool(amax.item() == amax0.item())}
                if rows >= 4096:
                    r["ms"] = round(do_bench(run, warmup=20, rep=100), 4)
            except Exception as e:
                r = {"error": repr(e)[:400]}
            res[f"{key} bwd {bm}x{bn}x{warps} tmode{tmode}"] = r
            print(key, "bwd", bm, bn, warps, tmode, r, flush=True)
json.dump(res, open(sys.argv[1], "w"), indent=1)
