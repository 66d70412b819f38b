"""Padded and packed batches run padding-free as TE's thd stream (te_llama.model.packed), with HF's results.

Every check compares with plain HF run on each document alone, in fp32 on the reference backend: logits, the
loss and every gradient. The layouts are the ones users feed: rows of packed documents with restarting
position ids, right and left padding, HF's DataCollatorWithFlattening with and without its flash-attention
keyword arguments; and a forward under FP8 whose token count TE's GEMMs cannot take, padded inside.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DataCollatorWithFlattening

from conftest import relative_error, tiny_config
from te_llama import TELlamaForCausalLM
from te_llama.model import decoder_stack
from te_llama.model.packed import packed_sequences

LENGTHS = [(5, 9), (3, 7, 6), (11,)]  # documents per row


@pytest.fixture
def pair(hf_checkpoint):
    directory, hf = hf_checkpoint(tiny_config())
    return hf, TELlamaForCausalLM.from_pretrained(directory, dtype=torch.float32, device="cpu")


def documents(seed: int = 0) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randint(1, 128, (n,), generator=generator) for n in row] for row in LENGTHS]


def packed_rows(rows: list[list[torch.Tensor]], width: int = 20, left: bool = False):
    """input_ids, attention_mask, position_ids and labels of rows of packed documents, padded to ``width``."""
    ids, mask, positions, labels = (torch.zeros(len(rows), width, dtype=torch.long) for _ in range(4))
    labels.fill_(-100)
    for r, row in enumerate(rows):
        used = sum(len(doc) for doc in row)
        column = width - used if left else 0
        for doc in row:
            n = len(doc)
            ids[r, column:column + n], positions[r, column:column + n] = doc, torch.arange(n)
            mask[r, column:column + n], labels[r, column + 1:column + n] = 1, doc[1:]
            column += n
    return ids, mask, positions, labels


def hf_alone(hf, rows) -> tuple[list[torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """HF on each document alone: logits per document, the mean loss over every document's labels, gradients."""
    hf.zero_grad()
    logits, total, count = [], 0.0, 0
    for doc in (doc for row in rows for doc in row):
        out = hf(input_ids=doc[None])
        logits.append(out.logits[0].detach())
        step = torch.nn.functional.cross_entropy(out.logits[0, :-1], doc[1:], reduction="sum")
        total, count = total + step, count + len(doc) - 1
    (total / count).backward()
    return logits, (total / count).detach(), {name: p.grad.clone() for name, p in hf.named_parameters()}


def te_gradients(te) -> dict[str, torch.Tensor]:
    from te_llama.checkpoint.weight_mapping import te_to_hf

    return te_to_hf({name: p.grad for name, p in te.named_parameters()},
                    tie_word_embeddings=bool(te.config.tie_word_embeddings))


def assert_same_gradients(te, expected: dict[str, torch.Tensor]) -> None:
    actual = te_gradients(te)
    assert actual.keys() <= expected.keys()
    for name, grad in actual.items():
        assert relative_error(grad, expected[name]) < 1e-5, name


@pytest.mark.parametrize("left", [False, True], ids=["right_padded", "left_padded"])
def test_rows_of_packed_documents_match_each_document_alone(pair, stream_calls, left):
    hf, te = pair
    rows = documents()
    ids, mask, positions, labels = packed_rows(rows, left=left)
    expected_logits, expected_loss, expected_grads = hf_alone(hf, rows)
    te.train()
    out = te(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels)
    out.loss.backward()
    assert stream_calls and stream_calls[0].cu_seqlens.tolist() == [0, 5, 14, 17, 24, 30, 41]
    assert relative_error(out.loss, expected_loss) < 1e-5
    assert_same_gradients(te, expected_grads)
    te.eval()
    with torch.no_grad():
        logits = te(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    real = logits[mask.bool()]
    assert relative_error(real, torch.cat(expected_logits)) < 1e-5


@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
def test_data_collator_with_flattening_matches_each_document_alone(pair, stream_calls, flash_kwargs):
    hf, te = pair
    rows = documents(1)
    features = [{"input_ids": doc.tolist()} for row in rows for doc in row]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)(features)
    assert ("cu_seq_lens_q" in batch) == flash_kwargs
    _, expected_loss, expected_grads = hf_alone(hf, rows)
    te.train()
    out = te(**batch)
    out.loss.backward()
    assert len(stream_calls) == te.config.num_hidden_layers
    assert relative_error(out.loss, expected_loss) < 1e-5
    assert_same_gradients(te, expected_grads)


def test_padded_batches_equal_hf_with_its_mask(pair, stream_calls):
    hf, te = pair
    ids = torch.randint(1, 128, (3, 16), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, 11:] = 0  # right padding
    mask[1, :6] = 0  # left padding
    with torch.no_grad():
        expected, actual = hf(ids, attention_mask=mask).logits, te(ids, attention_mask=mask).logits
    assert stream_calls and stream_calls[0].real_tokens == int(mask.sum())
    assert relative_error(actual[mask.bool()], expected[mask.bool()]) < 1e-5
    assert torch.isfinite(actual).all()


def test_whole_rows_keep_the_fused_layer(pair, stream_calls):
    _, te = pair
    ids = torch.randint(1, 128, (2, 16))
    with torch.no_grad():
        te(ids)
        te(ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(16).expand(2, 16))
    assert stream_calls == []


def test_fp8_token_alignment_is_padded_inside(pair, stream_calls, monkeypatch):
    # On the CPU there is no FP8; what is tested is the stream te-llama builds for it: 2 rows of 13 tokens, padded to 32.
    hf, te = pair
    monkeypatch.setattr(decoder_stack.StackSettings, "fp8_active", lambda self, training: True)
    monkeypatch.setattr(decoder_stack, "token_alignment", lambda recipe: 16)
    ids = torch.randint(1, 128, (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, actual = hf(ids).logits, te(ids).logits
    assert stream_calls[0].cu_seqlens.tolist() == [0, 13, 26, 32]
    assert relative_error(actual, expected) < 1e-5


def test_packed_sequences_layout():
    positions = torch.tensor([[0, 1, 2, 0, 1, 5, 6, 0], [3, 4, 5, 6, 7, 8, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 1, 1]])
    layout = packed_sequences(torch.zeros(2, 8), mask, positions, alignment=8)
    # Row 0: documents at 0 (3 tokens), 3 (2), 5 (2: positions jump); row 1: one document of 6; then 3 padding.
    assert layout.cu_seqlens.tolist() == [0, 3, 5, 7, 13, 16]
    assert layout.token_index.tolist() == [0, 1, 2, 3, 4, 5, 6, 10, 11, 12, 13, 14, 15]
    assert (layout.max_seqlen, layout.real_tokens, layout.stream_tokens) == (6, 13, 16)
    assert packed_sequences(torch.zeros(2, 8), None, torch.arange(8).expand(2, 8)) is None
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        packed_sequences(torch.zeros(1, 8), cu_seq_lens=torch.tensor([0, 5, 4, 8]))
