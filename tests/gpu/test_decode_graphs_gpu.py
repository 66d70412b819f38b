"""Decode graphs on TE in BF16: generate() with the decode step replayed as a CUDA graph gives the eager static-cache
run's tokens and logits (the same kernels on the same inputs), and the graph is what ran."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

import small_llama
from te_llama import TELlamaForCausalLM

pytestmark = pytest.mark.gpu

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(**small_llama.CONFIG, eos_token_id=None, bos_token_id=None, pad_token_id=0)
    return TELlamaForCausalLM.from_config(config, dtype=torch.bfloat16, device="cuda", backend="te").eval()


def _generate(model, ids, mask, **mode):
    # disable_compile: without decode graphs generate() would torch.compile the forward for a static cache on CUDA;
    # the comparison is with the eager layers
    torch.manual_seed(5)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, pad_token_id=0,
                         cache_implementation="static", disable_compile=True, return_dict_in_generate=True,
                         output_scores=True, **mode)
    return out.sequences, torch.stack(out.scores, dim=1).float()  # scores: [rows, steps, vocab]


def _compare(eager, graphs, prompt_length: int) -> dict:
    """Per row: the new tokens both runs share from the start, the largest logit difference over those steps against
    the logits' spread, and where the tokens part, eager's margin between the two tokens against that spread."""
    (eager_ids, eager_scores), (graph_ids, graph_scores) = eager, graphs
    rows = []
    for row in range(eager_ids.shape[0]):
        differ = (eager_ids[row, prompt_length:] != graph_ids[row, prompt_length:]).nonzero()
        same = int(differ[0]) if len(differ) else NEW_TOKENS
        steps = min(same + 1, NEW_TOKENS)  # the logits of the first differing step come from equal prefixes too
        spread = (eager_scores[row, :steps].amax(-1) - eager_scores[row, :steps].amin(-1)).clamp_min(1e-6)
        difference = (eager_scores[row, :steps] - graph_scores[row, :steps]).abs().amax(-1) / spread
        margin = None
        if same < NEW_TOKENS:
            logits = eager_scores[row, same]
            margin = ((logits[eager_ids[row, prompt_length + same]] - logits[graph_ids[row, prompt_length + same]])
                      / spread[same]).item()
        rows.append(dict(equal_new_tokens=same, max_logit_difference=difference.max().item(), tie_margin=margin))
    return rows


def _left_padded():
    ids = small_llama.batch(3, size=4, seq=32)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[3, :17] = 0
    return ids, mask


def _eager_then_graphs(model, ids, mask, **mode):
    """(eager run, graph run, second graph run on a new StaticCache, replays, recorded steps' keys)."""
    model.disable_decode_graphs()
    eager = _generate(model, ids, mask, **mode)
    model.enable_decode_graphs()
    graphs = _generate(model, ids, mask, **mode)
    again = _generate(model, ids, mask, **mode)  # a new StaticCache, which the recorded step adopts
    replays, steps = model.decode_graph_replays(), list(model.model.te_settings.decode_graphs.steps)
    model.disable_decode_graphs()
    return eager, graphs, again, replays, steps


def test_greedy_graph_replays_give_the_eager_static_cache_tokens(model, record):
    ids, mask = _left_padded()
    eager, graphs, again, replays, steps = _eager_then_graphs(model, ids, mask, do_sample=False)
    comparison = _compare(eager, graphs, 32)
    record(test="decode_graphs_bf16_greedy", rows=comparison, replays=replays)
    assert replays == 2 * (NEW_TOKENS - 1) and steps == [(4, 32 + NEW_TOKENS - 1, torch.bfloat16, None)]
    assert torch.equal(again[0], graphs[0]) and torch.equal(again[1], graphs[1])  # replays repeat exactly
    # The same kernels on the same inputs: identical in practice. Allowed: BF16 rounding noise in the logits, and a
    # token that parts only where eager's own logits are within that noise of a tie.
    assert all(row["max_logit_difference"] < 1e-2 for row in comparison), comparison
    assert all(row["tie_margin"] is None or row["tie_margin"] < 1e-2 for row in comparison), comparison


def test_beam_search_reorders_the_adopted_cache_like_eager(model, record):
    ids, mask = _left_padded()
    eager, graphs, again, replays, steps = _eager_then_graphs(model, ids, mask, num_beams=2, do_sample=False)
    finite = eager[1].isfinite()
    difference = (eager[1] - graphs[1])[finite].abs().max().item()
    record(test="decode_graphs_bf16_beam_search", equal=torch.equal(eager[0], graphs[0]),
           max_score_difference=difference, replays=replays)
    assert replays == 2 * (NEW_TOKENS - 1) and steps == [(8, 32 + NEW_TOKENS - 1, torch.bfloat16, None)]
    assert torch.equal(again[0], graphs[0])
    # Each step copies the reordered cache back into the step's memory; the beams then see eager's keys and values,
    # the same numbers, so the beams' choices (exact comparisons of scores) are eager's.
    assert torch.equal(graphs[0], eager[0]) and torch.equal(graphs[1].isfinite(), finite) and difference < 1e-2


def test_batch_one_replays_and_a_dynamic_cache_stays_eager(model):
    ids = small_llama.batch(4, size=1, seq=16)
    mask = torch.ones_like(ids)
    model.disable_decode_graphs()
    eager = _generate(model, ids, mask)
    model.enable_decode_graphs()
    graphs = _generate(model, ids, mask)
    assert model.decode_graph_replays() == NEW_TOKENS - 1
    dynamic = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)  # HF's default DynamicCache
    assert model.decode_graph_replays() == NEW_TOKENS - 1 and dynamic.shape[1] == 16 + 8
    model.disable_decode_graphs()
    comparison = _compare(eager, graphs, 16)
    assert comparison[0]["max_logit_difference"] < 1e-2 and (comparison[0]["tie_margin"] or 0) < 1e-2, comparison


def test_fp8_current_scaling_decode_steps_replay_on_the_kept_weight_cast(model, record):
    """FP8 (current scaling, in_eval): each call's first decode step casts the weights eagerly, the later steps replay
    the recorded step on that cast; the same kernels and the same FP8 weights as the eager run."""
    from te_llama import FP8Config

    ids, mask = _left_padded()
    model.enable_fp8(FP8Config(recipe="current", in_eval=True))
    try:
        eager, graphs, again, replays, steps = _eager_then_graphs(model, ids, mask, do_sample=False)
    finally:
        model.disable_fp8()
    comparison = _compare(eager, graphs, 32)
    record(test="decode_graphs_fp8_current_greedy", rows=comparison, replays=replays)
    assert replays == 2 * (NEW_TOKENS - 2) and steps == [(4, 32 + NEW_TOKENS - 1, torch.bfloat16, "current")]
    assert torch.equal(again[0], graphs[0]) and torch.equal(again[1], graphs[1])
    assert all(row["max_logit_difference"] < 1e-2 for row in comparison), comparison
    assert all(row["tie_margin"] is None or row["tie_margin"] < 1e-2 for row in comparison), comparison
