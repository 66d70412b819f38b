"""Text generation helpers: prompts through the chat template when the tokenizer has one, streamed output."""

from __future__ import annotations

import torch
from transformers import TextStreamer


def encode_prompt(tokenizer, prompt: str) -> torch.Tensor:
    """Token ids for ``prompt``: a user turn through the chat template if there is one, else plain text."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    return tokenizer(prompt, return_tensors="pt").input_ids


@torch.no_grad()
def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 64, stream: bool = True) -> tuple[str, list]:
    """Greedy generation; prints tokens as they come when ``stream``. Returns (text, new token ids)."""
    ids = encode_prompt(tokenizer, prompt).to(model.device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                            streamer=streamer, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    new = output[0, ids.shape[1]:].tolist()
    return tokenizer.decode(new, skip_special_tokens=True), new
