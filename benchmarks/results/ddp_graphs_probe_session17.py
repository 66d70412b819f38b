"""Probe: where recording te-llama's CUDA graphs fails under DDP, and which change lets it record.
Run under torchrun with 2 processes. Flags pick the variation."""
import argparse, faulthandler, os, sys, traceback, json
from pathlib import Path
import torch, torch.distributed as dist
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "gpu"))
import small_llama
import te_llama.modeling as modeling

faulthandler.enable()
p = argparse.ArgumentParser()
p.add_argument("--fp8", default="delayed")
p.add_argument("--no-broadcast-buffers", action="store_true")
p.add_argument("--side-stream-ddp", action="store_true")
p.add_argument("--record-before-ddp", action="store_true")
p.add_argument("--no-ddp", action="store_true")  # process group up, model not wrapped
p.add_argument("--steps", type=int, default=6)
p.add_argument("--out", required=True)
a = p.parse_args()
modeling._refuse_graphs_in_several_processes = lambda: None  # the probe records anyway
rank = int(os.environ["RANK"]); world = int(os.environ["WORLD_SIZE"])
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group("nccl")
model = small_llama.model(fp8=None if a.fp8 == "off" else a.fp8, graphs=True)
ids = small_llama.batch(0, size=8)[rank * 4:(rank + 1) * 4]
result = {"variation": vars(a), "rank": rank}
try:
    if a.record_before_ddp:
        loss = model(input_ids=ids, labels=ids).loss; loss.backward(); model.zero_grad(set_to_none=True)
        result["recorded_before_ddp"] = model.cuda_graph_replays()
    kwargs = {"broadcast_buffers": not a.no_broadcast_buffers}
    if a.no_ddp:
        trained = model
    elif a.side_stream_ddp:
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            trained = torch.nn.parallel.DistributedDataParallel(model, **kwargs)
        torch.cuda.current_stream().wait_stream(s)
    else:
        trained = torch.nn.parallel.DistributedDataParallel(model, **kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(a.steps):
        loss = trained(input_ids=ids, labels=ids).loss
        loss.backward()
        if a.no_ddp:
            for prm in model.parameters():
                dist.all_reduce(prm.grad, op=dist.ReduceOp.AVG)
        opt.step(); opt.zero_grad(set_to_none=True)
        m = loss.detach().clone(); dist.all_reduce(m, op=dist.ReduceOp.AVG); losses.append(m.item())
    w = torch.cat([q.detach().float().flatten() for q in model.parameters()])
    ws = [torch.empty_like(w) for _ in range(world)]; dist.all_gather(ws, w)
    result.update(ok=True, losses=losses, replays=model.cuda_graph_replays(),
                  weights_equal=bool(torch.equal(ws[0], ws[1])))
except Exception as e:
    result.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0]}", traceback=traceback.format_exc())
print("PROBE " + json.dumps({k: v for k, v in result.items() if k != "traceback"}), flush=True)
if rank == 0:
    Path(a.out).write_text(json.dumps(result, indent=1))
os._exit(0)
