"""Diagnose `te-llama finetune --cuda-graphs` under torchrun (eighteenth session). In call 1, finetune still refused
--cuda-graphs with several processes, so the script was run with DIAG_GRAPHS defaulting to "1": it enabled the graphs
right after from_pretrained (as finetune would). Every process logs to $OUT/diag_rank{r}.log, flushed per line:
each decoder-stack call (replay or eager, why), each TE amax all-reduce, each DDP bucket all-reduce, each
Python-level collective, each optimizer step."""
import os, sys, time, traceback
import torch, torch.distributed as dist

rank = int(os.environ.get("RANK", 0))
log = open(os.path.join(os.environ["OUT"], f"diag_rank{rank}.log"), "w", buffering=1)
t0 = time.time()
seq = [0]

def say(*a):
    seq[0] += 1
    log.write(f"{seq[0]:5d} {time.time()-t0:8.3f} " + " ".join(str(x) for x in a) + "\n")

from te_llama import modeling, cuda_graphs
orig_fp = modeling.TELlamaForCausalLM.from_pretrained.__func__
def from_pretrained(cls, *a, **k):
    m = orig_fp(cls, *a, **k)
    if os.environ.get("DIAG_GRAPHS", "0") == "1":
        m.enable_cuda_graphs(); say("enable_cuda_graphs")
    return m
modeling.TELlamaForCausalLM.from_pretrained = classmethod(from_pretrained)

orig_lf = cuda_graphs.StackGraph.layer_forward
def layer_forward(self, layer_idx, hidden_states, mask_type, *a, **k):
    if layer_idx == 0:
        reason = self.eager_reason(hidden_states, mask_type)
        grads = sum(p.grad is not None for p in self.params)
        say("stack", tuple(hidden_states.shape), "grad" if torch.is_grad_enabled() else "nograd",
            "train" if self.calls[0].layers[0].training else "eval", "armed" if self.armed else "unarmed",
            "REPLAY" if reason is None else f"EAGER[{reason}]", f"grads_held={grads}/{len(self.params)}",
            f"replays_done={self.replays_done}")
    return orig_lf(self, layer_idx, hidden_states, mask_type, *a, **k)
cuda_graphs.StackGraph.layer_forward = layer_forward

orig_rec = cuda_graphs.record_layer_graphs
def record_layer_graphs(*a, **k):
    say("RECORD start"); g = orig_rec(*a, **k); say("RECORD done"); return g
cuda_graphs.record_layer_graphs = record_layer_graphs

try:
    from transformer_engine.pytorch.quantization import FP8GlobalStateManager as M
    orig_red = M.reduce_tensor_across_group_op_max
    def red(tensor, group):
        say("TE amax all_reduce", tensor.numel(), "capturing" if torch.cuda.is_current_stream_capturing() else "")
        return orig_red(tensor, group)
    M.reduce_tensor_across_group_op_max = staticmethod(red)
except ImportError:
    say("no TE")

orig_ar = dist.all_reduce
def all_reduce(tensor, *a, **k):
    g = k.get("group") or (a[1] if len(a) > 1 else None)
    say("dist.all_reduce", tensor.numel(), tensor.dtype, tensor.device, dist.get_backend(g) if g is not None else "default",
        "|", " < ".join(f"{f.name}" for f in traceback.extract_stack(limit=6)[:-1]))
    return orig_ar(tensor, *a, **k)
dist.all_reduce = all_reduce

from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
def hook(state, bucket):
    say("DDP bucket", bucket.index(), bucket.buffer().numel(), "last" if bucket.is_last() else "")
    return default_hooks.allreduce_hook(None, bucket)
orig_ddp = torch.nn.parallel.DistributedDataParallel.__init__
def ddp_init(self, *a, **k):
    say("DDP init", {kk: v for kk, v in k.items() if kk != "device_ids"})
    orig_ddp(self, *a, **k)
    self.register_comm_hook(None, hook)
torch.nn.parallel.DistributedDataParallel.__init__ = ddp_init

from transformers import Trainer
orig_ts = Trainer.training_step
def training_step(self, *a, **k):
    say("--- training_step", self.state.global_step)
    out = orig_ts(self, *a, **k)
    say("--- training_step done", self.state.global_step)
    return out
Trainer.training_step = training_step

from te_llama.cli import main
sys.exit(main(sys.argv[1:]))
