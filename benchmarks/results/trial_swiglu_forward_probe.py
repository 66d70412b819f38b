"""Trial probe (tenth session, not part of the package): does the trial's fused SwiGLU forward write its transposed
FP8 copy right? ``trial_kernels`` is ``src/te_llama/swiglu_fp8_triton.py`` of ``trial_swiglu_forward_session10.patch``
applied to 4563573, copied to ``.gpu/s10/trial_kernels.py``. Run on the GPU as
``python3 .gpu/s10/probe.py out.json``; results in ``trial_swiglu_forward_probe_h200.json``."""
import sys, torch, json
import transformer_engine.pytorch  # noqa
import triton, triton.language as tl
sys.path.insert(0, ".gpu/s10")
import trial_kernels as k

@triton.jit
def fwd_plain(act_in_ptr, out_ptr, out_t_ptr, scale_ptr, rows, inner, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BARRIER: tl.constexpr, RECOMPUTE: tl.constexpr):
    pid_m = tl.program_id(0); pid_n = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M); n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = (m[:, None] < rows) & (n[None, :] < inner)
    row = m[:, None]; col = n[None, :]
    gate = tl.load(act_in_ptr + row * (2 * inner) + col, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(act_in_ptr + row * (2 * inner) + inner + col, mask=inside, other=0.0).to(tl.float32)
    act = gate * tl.sigmoid(gate) * up
    scale = tl.load(scale_ptr)
    q = (act * scale).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * inner + col, q, mask=inside)
    if BARRIER:
        tl.debug_barrier()
    if RECOMPUTE:
        q2 = (act * scale).to(tl.float16).to(out_ptr.dtype.element_ty)
        tl.store(out_t_ptr + col * rows + row, q2, mask=inside)
    else:
        tl.store(out_t_ptr + col * rows + row, q, mask=inside)

res = {}
f8 = torch.float8_e4m3fn
for rows, inner in [(4096, 14336), (2048, 1408)]:
    act_in = (torch.randn(rows, 2 * inner, device="cuda") * 3).to(torch.bfloat16)
    scale, amax, sinv = torch.tensor([64.0], device="cuda"), torch.zeros(1, device="cuda"), torch.zeros(1, device="cuda")
    def check(out, out_t):
        torch.cuda.synchronize(); return int((out.view(torch.uint8).t() != out_t.view(torch.uint8)).sum())
    for name, fill in [("empty", None), ("zeros", 0), ("ones", 1)]:
        out = torch.empty(rows, inner, dtype=torch.uint8, device="cuda"); out_t = torch.empty(inner, rows, dtype=torch.uint8, device="cuda")
        if fill is not None: out.fill_(fill); out_t.fill_(fill)
        k.swiglu_fp8(act_in, scale, amax, out.view(f8), out_t.view(f8), sinv)
        res[f"{rows}x{inner} trial kernel, buffers {name}"] = check(out, out_t)
    for barrier in (False, True):
        for recompute in (False, True):
            out = torch.zeros(rows, inner, dtype=torch.uint8, device="cuda"); out_t = torch.zeros(inner, rows, dtype=torch.uint8, device="cuda")
            fwd_plain[(triton.cdiv(rows, 64), triton.cdiv(inner, 128))](act_in, out.view(f8), out_t.view(f8), scale, rows, inner, BLOCK_M=64, BLOCK_N=128, BARRIER=barrier, RECOMPUTE=recompute, num_warps=8)
            res[f"{rows}x{inner} plain kernel barrier={barrier} recompute_via_fp16={recompute}"] = check(out, out_t)
    out_t = torch.zeros(inner, rows, dtype=torch.uint8, device="cuda")
    k.swiglu_fp8(act_in, scale, amax, None, out_t.view(f8), sinv)
    ref = torch.zeros(rows, inner, dtype=torch.uint8, device="cuda"); k.swiglu_fp8(act_in, scale, amax, ref.view(f8), None, sinv)
    res[f"{rows}x{inner} transposed-only launch vs rowwise-only launch"] = check(ref, out_t)
    bad = (ref.t() != out_t)
    res[f"{rows}x{inner} wrong transposed rows by index mod 4"] = [int(bad[i::4].any(dim=1).sum()) for i in range(4)]
    res[f"{rows}x{inner} wrong rows all zero"] = bool((out_t[bad.any(dim=1)] == 0).all())
for kk, v in res.items(): print(kk, v, flush=True)
json.dump(res, open(sys.argv[1], "w"), indent=1)
