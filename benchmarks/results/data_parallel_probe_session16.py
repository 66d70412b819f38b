"""What nn.DataParallel does to a te-llama model on two GPUs with the refusal bypassed, and to the same model's
single-GPU forward afterwards."""
import json, sys
import torch
sys.path.insert(0, "tests/gpu")
import small_llama
from te_llama import TELlamaForCausalLM

TELlamaForCausalLM._refuse_data_parallel = lambda self: None
m = small_llama.model()
x = small_llama.batch(0, size=4)
out = {"single_before": m(input_ids=x, labels=x).loss.item()}
try:
    loss = torch.nn.DataParallel(m)(input_ids=x, labels=x).loss
    out["data_parallel_loss"] = loss.mean().item()
    loss.mean().backward()
except Exception as error:
    out["data_parallel_error"] = repr(error)[:600]
m.zero_grad(set_to_none=True)
out["single_after"] = m(input_ids=x, labels=x).loss.item()
print(json.dumps(out))
