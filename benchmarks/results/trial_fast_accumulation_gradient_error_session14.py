"""Trial (fourteenth session): how far FP8 gradients move from BF16 ones with split (TE's default) or fast
accumulation in the backward GEMMs, at Llama-3-8B layer shapes (2 layers, 1 x 4,096 tokens, delayed scaling)."""
import importlib
import json
import sys

import torch
from transformers import LlamaConfig

from te_llama import TELlamaForCausalLM

cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                  num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192,
                  tie_word_embeddings=False)
mods = [importlib.import_module(f"transformer_engine.pytorch.module.{n}")
        for n in ("linear", "layernorm_linear", "layernorm_mlp")]
ids = torch.randint(0, 32000, (1, 4096), device="cuda", generator=torch.Generator("cuda").manual_seed(1))


def grads(fp8, fast):
    for m in mods:
        m._2X_ACC_DGRAD = m._2X_ACC_WGRAD = not fast
    torch.manual_seed(0)
    model = TELlamaForCausalLM.from_config(cfg, dtype=torch.bfloat16, device="cuda", backend="te", fp8=fp8).train()
    for _ in range(4):  # delayed scaling: settle the amax history first
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    out = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None and "layers." in n}
    del model
    torch.cuda.empty_cache()
    return loss.item(), out


loss_ref, ref = grads(None, False)
rows = {"bf16_loss": loss_ref}
kept = {}
for name, fast in (("split", False), ("split_again", False), ("fast", True)):
    loss, g = grads("delayed", fast)
    kept[name] = g
    rel = {n: ((g[n] - ref[n]).norm() / ref[n].norm()).item() for n in ref}
    rows[name] = {"loss": loss, "rel_err_by_param": rel, "max": max(rel.values()),
                  "mean": sum(rel.values()) / len(rel)}
    print(name, "loss", loss, "mean rel err", rows[name]["mean"], "max", rows[name]["max"], flush=True)
direct = {n: ((kept["fast"][n] - kept["split"][n]).norm() / kept["split"][n].norm()).item() for n in ref}
rows["fast_vs_split"] = {"rel_diff_by_param": direct, "max": max(direct.values()),
                         "mean": sum(direct.values()) / len(direct)}
print("fast vs split: mean rel diff", rows["fast_vs_split"]["mean"], "max", rows["fast_vs_split"]["max"], flush=True)
again = {n: ((kept["split_again"][n] - kept["split"][n]).norm() / kept["split"][n].norm()).item() for n in ref}
rows["split_vs_split"] = {"rel_diff_by_param": again, "max": max(again.values()), "mean": sum(again.values()) / len(again)}
print("split vs split: mean rel diff", rows["split_vs_split"]["mean"], "max", rows["split_vs_split"]["max"], flush=True)
rows["gpu"] = torch.cuda.get_device_name()
json.dump(rows, open(sys.argv[1], "w"), indent=1)
