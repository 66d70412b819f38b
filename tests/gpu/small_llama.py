"""A 2-layer Llama on the TE backend and the runs the GPU tests compare: training with an optimizer, and passes
over one batch without one; and random HF models saved for te-llama to load."""

import torch
from transformers import LlamaConfig

from te_llama import TELlamaForCausalLM

CONFIG = dict(vocab_size=1024, hidden_size=512, intermediate_size=1408, num_hidden_layers=2, num_attention_heads=8,
              num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)


def model(fp8=None, graphs=False, **config):
    """The small model (``CONFIG`` with ``config`` overrides), seeded, in training mode; ``graphs``: CUDA graphs."""
    torch.manual_seed(0)
    built = TELlamaForCausalLM.from_config(LlamaConfig(**{**CONFIG, **config}), dtype=torch.bfloat16,
                                           device="cuda", backend="te", fp8=fp8).train()
    return built.enable_cuda_graphs() if graphs else built


def batch(seed, size=4, seq=256):
    return torch.randint(0, 1024, (size, seq), device="cuda", generator=torch.Generator("cuda").manual_seed(seed))


def train(m, steps, micro_batches=1, **forward):
    """AdamW steps on fresh batches: the losses of every micro-batch."""
    optimizer = torch.optim.AdamW(m.parameters(), lr=1e-3)
    losses = []
    for step in range(steps):
        for micro in range(micro_batches):
            x = batch(100 * step + micro)
            loss = m(input_ids=x, labels=x, **forward).loss
            (loss / micro_batches).backward()
            losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses


def passes(m, steps, x=None, flags=None):
    """``steps`` forward + backward passes over one batch (``batch(1)`` by default) without an optimizer: the
    losses and the last pass's gradients. ``flags``: TE's ``is_first_microbatch`` for each pass, by hand."""
    x = batch(1) if x is None else x
    losses = []
    for step in range(steps):
        extra = {} if flags is None else {"is_first_microbatch": flags[step]}
        loss = m(input_ids=x, labels=x, **extra).loss
        loss.backward()
        losses.append(loss.item())
        grads = {name: p.grad.clone() for name, p in m.named_parameters() if p.grad is not None}
        m.zero_grad(set_to_none=True)
    return losses, grads


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def worst_rel(grads, reference):
    """``(largest relative difference, parameter name)`` between two gradient dicts."""
    return max((((g.float() - reference[n].float()).norm() / reference[n].float().norm().clamp_min(1e-30)).item(), n)
               for n, g in grads.items())


def saved_hf_model(tmp_path, name, config):
    """A random HF model of the config's family in bf16 on the GPU (norms and biases perturbed), saved to
    ``tmp_path / name``: (directory, model)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    torch.manual_seed(0)
    model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config).to(device="cuda", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for key, param in model.named_parameters():
            if "norm" in key or key.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    directory = tmp_path / name
    model.save_pretrained(directory)
    return directory, model
