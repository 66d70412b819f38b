"""Perplexity of a causal LM on tokenized blocks (token-weighted over every labelled token)."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from te_llama.commands.data import IGNORE


@torch.no_grad()
def perplexity(model, blocks: list[dict[str, torch.Tensor]], batch_size: int = 4, progress: bool = True) -> float:
    """exp(mean next-token loss) over all labelled tokens of ``blocks`` (model in eval mode)."""
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    batches = range(0, len(blocks), batch_size)
    for start in tqdm(batches, desc="perplexity", leave=False, disable=not progress):
        batch = {k: torch.stack([b[k] for b in blocks[start:start + batch_size]]).to(model.device)
                 for k in ("input_ids", "labels", "attention_mask", "position_ids") if k in blocks[0]}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch.get("position_ids")).logits.float()
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=IGNORE, reduction="sum")
        total_loss += loss.item()
        total_tokens += int((labels != IGNORE).sum())
    model.train(was_training)
    return math.exp(total_loss / max(total_tokens, 1))
