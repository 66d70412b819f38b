"""Logits of te-llama (reference backend, fp32) against transformers' LlamaForCausalLM."""

import pytest
import torch

from conftest import relative_error, tiny_config
from te_llama import TELlamaForCausalLM

CONFIGS = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(),
    "mqa": dict(num_key_value_heads=1),
    "head_dim": dict(head_dim=24),
    "tied": dict(tie_word_embeddings=True),
    "bias": dict(attention_bias=True, mlp_bias=True),
    "rope_linear": dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0)),
    "rope_dynamic": dict(max_position_embeddings=16,
                         rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)),
    "rope_llama3": dict(rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                             low_freq_factor=1.0, high_freq_factor=4.0,
                                             original_max_position_embeddings=32)),
    "rope_yarn": dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                           original_max_position_embeddings=32)),
    "legacy_rope_fields": dict(rope_theta=5000.0, rope_scaling=dict(rope_type="linear", factor=3.0)),
}


def load_pair(hf_checkpoint, **config):
    directory, hf = hf_checkpoint(tiny_config(**config))
    te = TELlamaForCausalLM.from_pretrained(directory, dtype=torch.float32, device="cpu")
    return hf, te


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_hf(hf_checkpoint, name):
    hf, te = load_pair(hf_checkpoint, **CONFIGS[name])
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = hf(ids).logits, te(ids).logits
    assert relative_error(actual, expected) < 1e-5


def test_yarn_attention_factor_is_not_one():
    from te_llama.model.rope import rope_attention_scaling

    assert rope_attention_scaling(tiny_config(**CONFIGS["rope_yarn"])) > 1.05


def padded_batch(side: str):
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 128, (3, 24), generator=generator)
    mask = torch.ones_like(ids)
    for row, pad in enumerate((0, 5, 11)):
        if pad:
            if side == "right":
                mask[row, -pad:] = 0
            else:
                mask[row, :pad] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("positions", ["default", "from_mask"])
def test_padded_batches_match_hf_on_real_tokens(hf_checkpoint, side, positions):
    hf, te = load_pair(hf_checkpoint)
    ids, mask = padded_batch(side)
    kwargs = {"attention_mask": mask}
    if positions == "from_mask":
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected, actual = hf(ids, **kwargs).logits, te(ids, **kwargs).logits
    real = mask.bool()
    assert torch.isfinite(actual).all()
    assert relative_error(actual[real], expected[real]) < 1e-5


@pytest.mark.parametrize("batch", ["rows", "right-padded"])
def test_hidden_states_match_hf(hf_checkpoint, batch):
    hf, te = load_pair(hf_checkpoint)
    ids, mask = padded_batch("right")
    kwargs = {"attention_mask": mask} if batch == "right-padded" else {}
    with torch.no_grad():
        expected, actual = (model(ids, output_hidden_states=True, **kwargs).hidden_states for model in (hf, te))
    assert len(actual) == len(expected) == te.config.num_hidden_layers + 1
    real = mask.bool() if kwargs else torch.ones_like(mask, dtype=torch.bool)
    for layer, (a, e) in enumerate(zip(actual, expected)):
        assert relative_error(a[real], e[real]) < 1e-5, layer


def test_mask_types_chosen_for_te():
    from te_llama.model.masks import te_mask_from_hf

    _, right = padded_batch("right")
    _, left = padded_batch("left")
    assert te_mask_from_hf(None, 3, 24).mask_type == "causal"
    assert te_mask_from_hf(torch.ones(3, 24), 3, 24).mask_type == "causal"
    assert te_mask_from_hf(right, 3, 24).mask_type == "padding_causal"
    converted = te_mask_from_hf(left, 3, 24)
    assert converted.mask_type == "arbitrary"
    assert not converted.mask.all(dim=-1).any(), "every query row must keep a key to attend to"


def test_packed_documents_in_one_row_match_each_document_alone(hf_checkpoint):
    # position_ids that restart mark packed documents: HF builds a block-causal mask, te-llama keeps it.
    hf, te = load_pair(hf_checkpoint)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(4))
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4]])
    with torch.no_grad():
        actual = te(ids, position_ids=positions).logits
        first, second = hf(ids[:, :7]).logits, hf(ids[:, 7:]).logits
    assert relative_error(actual, torch.cat([first, second], dim=1)) < 1e-5


def test_gradients_match_hf(hf_checkpoint):
    from te_llama.checkpoint.weight_mapping import te_to_hf

    hf, te = load_pair(hf_checkpoint, attention_bias=True, mlp_bias=True)
    hf.train(), te.train()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    hf(ids, labels=ids).loss.backward()
    te(ids, labels=ids).loss.backward()
    te_grads = te_to_hf({k: p.grad for k, p in te.named_parameters()})
    for name, param in hf.named_parameters():
        assert relative_error(te_grads[name], param.grad) < 1e-5, name


def test_rows_without_mask_skip_hf_mask_creation(hf_checkpoint, monkeypatch):
    """No mask and no position ids (training on fixed-length blocks): te-llama hands its layers a causal marker
    instead of letting HF check its made-up position ids for packed sequences, a check that waits for the GPU."""
    import transformers.masking_utils as masking_utils

    hf, te = load_pair(hf_checkpoint)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        with_mask = te(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    hf.train(), te.train()
    expected_loss = hf(input_ids=ids, labels=ids).loss

    def refuse(*args, **kwargs):
        raise AssertionError("HF's packed-sequence check ran")

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", refuse)
    with pytest.raises(AssertionError, match="packed-sequence"):  # HF's own model does run it
        hf(input_ids=ids, use_cache=False)
    with torch.no_grad():
        actual = te(input_ids=ids).logits
    loss = te(input_ids=ids, labels=ids).loss
    assert relative_error(actual, expected) < 1e-5
    assert torch.equal(actual, with_mask)
    assert abs(loss.item() - expected_loss.item()) < 1e-5
