"""Where does B's reserved memory go, with and without the FP8 weight cache? (eleventh session's probe, as run on
the GPU but for this docstring; not part of the package.) Builds VARIANT as the benchmark does, records torch's
allocator history over four training steps, and writes the memory per step, the pools after the last forward and
every new segment with its call site to OUT.json (condensed in memory_segments_B_h200_session11.json).

    python3 memory_probe_session11.py VARIANT OUT.json   # env TE_LLAMA_FP8_WEIGHT_CACHE decides the cache
"""
import sys, json, os, collections, time
import torch
from te_llama import benchmark as bm

variant, out_path = sys.argv[1], sys.argv[2]
steps = int(os.environ.get("PROBE_STEPS", "4"))
fix = os.environ.get("PROBE_FIX", "")
shape = bm.SHAPES["B"]
dev = torch.device("cuda")
model, opt, ids = bm.prepare_variant(variant, shape, dev)
torch.cuda.reset_peak_memory_stats()
torch.cuda.memory._record_memory_history(max_entries=3_000_000, stacks="python")
MARK = 1536 * 512
rows = []
snap_fwd = None
for step in range(steps):
    m = torch.empty(MARK + step * 512, dtype=torch.uint8, device=dev); del m
    t = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    if step == steps - 1:
        torch.cuda.synchronize(); snap_fwd = torch.cuda.memory._snapshot()
    loss.backward()
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    s = torch.cuda.memory_stats()
    rows.append({"step": step, "s": round(time.perf_counter() - t, 3),
                 "alloc_gib": s["allocated_bytes.all.current"] / 2**30, "reserved_gib": s["reserved_bytes.all.current"] / 2**30,
                 "peak_alloc_gib": s["allocated_bytes.all.peak"] / 2**30, "peak_reserved_gib": s["reserved_bytes.all.peak"] / 2**30,
                 "reuses": model.fp8_weight_reuses() if hasattr(model, "fp8_weight_reuses") else None})
    print(rows[-1], flush=True)
snap = torch.cuda.memory._snapshot()
torch.cuda.memory._record_memory_history(enabled=None)

def where(frames, n=5):
    keep = [f"{os.path.basename(f['filename'])}:{f['line']}:{f['name']}" for f in frames
            if ("te_llama" in f["filename"] or "transformer_engine" in f["filename"] or "autograd" in f["filename"])]
    return keep[:n]

trace = snap["device_traces"][0]
label = "before"
reserved = allocated = 0
seg_events = []
peak = (0, None)
per_label = collections.defaultdict(lambda: {"segment_alloc_gib": 0.0, "segment_free_gib": 0.0, "n": 0})
for i, e in enumerate(trace):
    a = e["action"]
    if a == "alloc" and MARK <= e["size"] < MARK + 64 * 512:
        label = f"step{(e['size'] - MARK) // 512}"
    if a in ("segment_alloc", "segment_map"):
        reserved += e["size"]; per_label[label]["segment_alloc_gib"] += e["size"] / 2**30; per_label[label]["n"] += 1
        seg_events.append({"label": label, "i": i, "mib": round(e["size"] / 2**20, 1), "stream": e.get("stream"),
                           "where": where(e.get("frames", []))})
        if reserved > peak[0]:
            peak = (reserved, {"label": label, "i": i, "where": where(e.get("frames", []), 8)})
    elif a in ("segment_free", "segment_unmap"):
        reserved -= e["size"]; per_label[label]["segment_free_gib"] += e["size"] / 2**30
    elif a == "alloc":
        allocated += e["size"]
    elif a == "free_completed":
        allocated -= e["size"]

def seg_summary(s, top=25):
    pools = collections.defaultdict(lambda: {"reserved_gib": 0.0, "allocated_gib": 0.0, "segments": 0})
    segs = []
    for g in s["segments"]:
        pid = str(g.get("segment_pool_id")); st = g.get("stream")
        p = pools[f"pool {pid} stream {st} {g.get('segment_type')}"]
        p["reserved_gib"] += g["total_size"] / 2**30; p["allocated_gib"] += g["allocated_size"] / 2**30; p["segments"] += 1
        free = g["total_size"] - g["allocated_size"]
        active = collections.Counter()
        for b in g["blocks"]:
            if b["state"] == "active_allocated":
                active[" | ".join(where(b.get("frames", []), 2)) or "?"] += b["size"]
        segs.append({"pool": pid, "stream": st, "total_mib": round(g["total_size"] / 2**20, 1), "free_mib": round(free / 2**20, 1),
                     "largest_free_mib": round(max([b["size"] for b in g["blocks"] if b["state"] == "inactive"] or [0]) / 2**20, 1),
                     "active": {k: round(v / 2**20, 1) for k, v in active.most_common(3)}})
    segs.sort(key=lambda x: -x["free_mib"])
    return {"pools": pools, "free_gib": sum(x["free_mib"] for x in segs) / 1024, "top_free_segments": segs[:top],
            "segment_sizes_mib": collections.Counter(round(x["total_mib"]) for x in segs).most_common(30)}

res = {"variant": variant, "cache": os.environ.get("TE_LLAMA_FP8_WEIGHT_CACHE"), "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
       "fix": fix, "gpu": torch.cuda.get_device_name(), "steps": rows, "trace_events": len(trace),
       "trace_peak_reserved_gib": peak[0] / 2**30, "trace_peak_at": peak[1], "by_label": per_label,
       "segment_allocs": seg_events, "after_forward": seg_summary(snap_fwd), "end": seg_summary(snap)}
json.dump(res, open(out_path, "w"), indent=1, default=str)
print("segment allocs", len(seg_events), "by label", json.dumps(per_label), flush=True)
print("free at forward end GiB", res["after_forward"]["free_gib"], "pools", json.dumps(res["after_forward"]["pools"]), flush=True)
