"""Training data for ``te-llama finetune``: read, validate, tokenize, pack into fixed-length blocks.

Accepted inputs: a plain-text file (documents separated by blank lines), a JSONL file with a ``text`` field or
``prompt``/``completion`` pairs (only the completion is trained on), or a local HF ``datasets`` directory
(``save_to_disk``) with the same fields. Documents are tokenized with the model's tokenizer, each ended with EOS, and
packed into blocks of ``seq_len`` tokens; a long document continues into the next block, nothing is truncated.
The last, partial block is padded (padding is masked out of attention and loss).

By default every document attends only to itself: a block's ``position_ids`` restart at 0 where a document (or
its continuation) starts, and the first token of each is not a label, as HF's ``DataCollatorWithFlattening``
does. te-llama runs such blocks padding-free on TE's fused attention (:mod:`te_llama.model.packed`).
``across_documents=True`` gives plain blocks instead, whose tokens attend to everything before them in the block.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE = -100


class DataError(ValueError):
    """Training data that cannot be used, with the file (and line) at fault."""


@dataclass(frozen=True)
class Example:
    text: str = ""
    prompt: str | None = None  # prompt/completion pairs: the prompt is context only


def _from_record(record: dict, where: str) -> Example:
    if isinstance(record.get("text"), str):
        return Example(text=record["text"])
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return Example(text=record["completion"], prompt=record["prompt"])
    raise DataError(f"{where}: expected a 'text' field or 'prompt' and 'completion' fields (strings)")


def _read_jsonl(path: Path, skip_bad_lines: bool) -> tuple[list[Example], list[int]]:
    examples, bad = [], []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise DataError("not a JSON object")
                examples.append(_from_record(record, f"{path}:{number}"))
            except (json.JSONDecodeError, DataError):
                bad.append(number)
    if bad and not skip_bad_lines:
        shown = ", ".join(map(str, bad[:10])) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise DataError(f"{path}: {len(bad)} malformed line(s): {shown} (each line must be a JSON object with "
                        "'text' or 'prompt'/'completion'); fix them or pass --skip-bad-lines")
    return examples, bad


def _read_dataset_dir(path: Path) -> list[Example]:
    try:
        import datasets
    except ImportError as error:
        raise DataError(f"{path} is a datasets directory; reading it needs: pip install 'te-llama[data]'") from error
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    return [_from_record(row, f"{path} row {i}") for i, row in enumerate(loaded)]


def read_examples(path: str | Path, skip_bad_lines: bool = False) -> tuple[list[Example], int]:
    """Examples from ``path`` and the number of skipped bad lines."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    skipped = 0
    if path.is_dir():
        if not (path / "dataset_info.json").is_file() and not (path / "dataset_dict.json").is_file():
            raise DataError(f"{path}: a directory, but not a datasets directory (no dataset_info.json)")
        examples = _read_dataset_dir(path)
    elif path.suffix in (".jsonl", ".json"):
        examples, bad = _read_jsonl(path, skip_bad_lines)
        skipped = len(bad)
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"{path}: cannot read as UTF-8 text ({error})") from error
        examples = [Example(text=part.strip()) for part in text.split("\n\n") if part.strip()]
    examples = [e for e in examples if e.text.strip()]
    if not examples:
        raise DataError(f"{path}: no training text in it (empty, or every record empty)")
    return examples, skipped


def tokenize_and_pack(examples: list[Example], tokenizer, seq_len: int,
                      across_documents: bool = False) -> list[dict[str, torch.Tensor]]:
    """Blocks of ``seq_len`` tokens with labels and, unless ``across_documents``, position ids restarting at each
    document; prompt tokens and padding get label -100 (see the module docstring)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    labels: list[int] = []
    starts: list[bool] = []
    for example in examples:
        prompt = tokenizer(example.prompt, add_special_tokens=False).input_ids if example.prompt else []
        body = tokenizer(example.text, add_special_tokens=False).input_ids + [eos]
        ids += prompt + body
        labels += [IGNORE] * len(prompt) + body
        starts += [True] + [False] * (len(prompt) + len(body) - 1)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    blocks = []
    for start in range(0, len(ids), seq_len):
        chunk, chunk_labels = ids[start:start + seq_len], labels[start:start + seq_len]
        missing = seq_len - len(chunk)
        block = {"input_ids": torch.tensor(chunk + [pad] * missing),
                 "labels": torch.tensor(chunk_labels + [IGNORE] * missing),
                 "attention_mask": torch.tensor([1] * len(chunk) + [0] * missing)}
        if not across_documents:
            positions, position = [], 0
            for index, first in enumerate(starts[start:start + seq_len]):
                position = 0 if first or index == 0 else position + 1
                positions.append(position)
                if first:  # nothing before it in its document to predict it from
                    block["labels"][index] = IGNORE
            block["position_ids"] = torch.tensor(positions + list(range(position + 1, position + 1 + missing)))
        blocks.append(block)
    return [b for b in blocks if (b["labels"] != IGNORE).any()]


def split_blocks(blocks: list, eval_fraction: float, seed: int = 0, min_eval: int = 1) -> tuple[list, list]:
    """A shuffled train/eval split of the blocks (at least ``min_eval`` eval blocks when possible)."""
    order = list(range(len(blocks)))
    random.Random(seed).shuffle(order)
    n_eval = max(min_eval, round(len(blocks) * eval_fraction)) if len(blocks) > min_eval else 0
    eval_ids, train_ids = order[:n_eval], order[n_eval:]
    if not train_ids:
        raise DataError(f"only {len(blocks)} block(s) of training data: too little to hold out an evaluation split")
    return [blocks[i] for i in sorted(train_ids)], [blocks[i] for i in sorted(eval_ids)]
