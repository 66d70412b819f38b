"""FP8 weights cast once per weight update (te_llama.training.weight_cache): what TE computes when told by hand, no stale
casts after optimizer steps, the same in CUDA graphs; and only the row-wise copy cached
(te_llama.training.weight_cache_rowwise), with the same results as TE's two cached copies."""

import contextlib

import pytest
import torch
from small_llama import batch, rel, train
from small_llama import model as uncached_model
from small_llama import passes as forward_backward

from te_llama import te_patches
from te_llama.training import weight_cache_rowwise

pytestmark = pytest.mark.gpu


@contextlib.contextmanager
def replacement(name: str, on: bool):
    """Run with te-llama's replacement ``name`` of a TE function in place, or with TE's own function."""
    if on:
        assert te_patches.install(name)
    else:
        te_patches.remove(name)
    try:
        yield
    finally:
        te_patches.install(name)


def model(fp8, graphs=False, cache=True):
    built = uncached_model(fp8, graphs)
    built.cache_fp8_weights = cache
    return built


def test_passes_without_updates_cast_once_as_te_by_hand(record):
    auto, by_hand, uncached = model("delayed"), model("delayed", cache=False), model("delayed", cache=False)
    losses, grads = forward_backward(auto, 5)
    losses_by_hand, grads_by_hand = forward_backward(by_hand, 5, flags=[None, True, False, False, False])
    losses_uncached, grads_uncached = forward_backward(uncached, 5)
    record(test="weight_cache_no_updates", losses=losses, losses_by_hand=losses_by_hand,
           losses_uncached=losses_uncached, reuses=auto.fp8_weight_reuses())
    assert auto.fp8_weight_reuses() == 3 and uncached.fp8_weight_reuses() == 0
    assert losses == losses_by_hand
    assert all(torch.equal(grads[k], grads_by_hand[k]) for k in grads)
    # against casting every time: delayed scaling's scales move after the first pass, so close, not equal
    assert max(abs(a - b) / b for a, b in zip(losses, losses_uncached)) < 2e-3
    assert max(rel(grads[k], grads_uncached[k]) for k in grads) < 2e-2


@pytest.mark.parametrize("graphs", [False, True])
def test_optimizer_steps_recast_the_weights(graphs, record):
    """Memorise one batch with a large learning rate, two micro-batches per step: every step's first loss must
    be the loss of the updated weights (a stale cast would repeat the previous step's loss)."""
    cached, uncached = model("delayed", graphs=graphs), model("delayed", graphs=graphs, cache=False)
    x, runs = batch(2), []
    for m in (cached, uncached):
        optimizer, losses = torch.optim.AdamW(m.parameters(), lr=3e-3), []
        for _ in range(3):
            for _ in range(2):
                loss = m(input_ids=x, labels=x).loss
                (loss / 2).backward()
                losses.append(loss.item())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        runs.append(losses)
    record(test="weight_cache_optimizer_steps", graphs=graphs, losses_cached=runs[0], losses_uncached=runs[1],
           reuses=cached.fp8_weight_reuses())
    assert cached.fp8_weight_reuses() == 2  # the second micro-batch of each step after the first
    firsts = runs[1][::2]  # each step's first loss moves by more than the tolerance below: a stale cast would show
    assert min(abs(a - b) / b for a, b in zip(firsts[1:], firsts)) > 1e-2
    assert max(abs(a - b) / b for a, b in zip(*runs)) < 5e-3


def test_graph_replays_skip_the_cast_between_updates(record):
    graphed, eager = model("delayed", graphs=True), model("delayed")
    losses_graphed, grads_graphed = forward_backward(graphed, 5)
    losses_eager, grads_eager = forward_backward(eager, 5)
    record(test="weight_cache_graphs", losses_graphed=losses_graphed, losses_eager=losses_eager,
           replays=graphed.cuda_graph_replays(), reuses=graphed.fp8_weight_reuses())
    # recorded without caching at the first pass, again with caching at the second (it repeats the weights)
    assert graphed.cuda_graph_replays() == 4 and graphed.fp8_weight_reuses() == 3
    assert graphed.model.layers[0].cuda_graph.caches_weights
    # both cast at the first two passes and reuse the second cast: the same FP8 weights and scales
    assert losses_graphed == losses_eager
    assert all(torch.equal(grads_graphed[k], grads_eager[k]) for k in grads_eager)


def test_graphs_record_weight_caching_only_once_a_cast_is_kept(record):
    """With an optimizer step after every pass a caching graph would cast and transpose for nothing; passes over
    unchanged weights record the graphs again, with caching."""
    m = model("delayed", graphs=True)
    losses = train(m, 3)
    graph = m.model.layers[0].cuda_graph
    assert not graph.caches_weights and m.cuda_graph_replays() == 3 and m.fp8_weight_reuses() == 0
    losses += forward_backward(m, 3)[0]
    record(test="weight_cache_graphs_recorded_when_kept", losses=losses, replays=m.cuda_graph_replays(),
           reuses=m.fp8_weight_reuses())
    assert m.model.layers[0].cuda_graph is not graph and m.model.layers[0].cuda_graph.caches_weights
    assert m.cuda_graph_replays() == 2 and m.fp8_weight_reuses() == 1


def test_a_graph_without_caching_recorded_after_one_with_caching_still_casts(record):
    """TE's "skip the weight cast" flag is global: a caching graph leaves it set, and a graph recorded without
    caching afterwards must not obey it (it trained on stale weights before cuda_graphs hid the flag)."""
    forward_backward(model("delayed", graphs=True), 3)  # the last replay reused the cast: the flag says skip
    graphed, eager = model("delayed", graphs=True, cache=False), model("delayed", cache=False)
    losses_graphed, losses_eager = train(graphed, 4), train(eager, 4)
    record(test="weight_cache_then_uncached_graph", losses_graphed=losses_graphed, losses_eager=losses_eager)
    assert graphed.cuda_graph_replays() == 4
    assert max(abs(a - b) / b for a, b in zip(losses_graphed, losses_eager)) < 2e-3


def test_a_failed_forward_casts_again_at_the_next(record):
    m = model("delayed")
    forward_backward(m, 3)  # the second pass's cast is kept, the third reused it
    optimizer = torch.optim.SGD(m.parameters(), lr=1.0)
    x = batch(1)
    m(input_ids=x, labels=x).loss.backward()
    optimizer.step()  # the weights change: the next forward is to refresh the kept cast
    optimizer.zero_grad(set_to_none=True)

    def fail(module, args):
        raise RuntimeError("stop before the first layer's cast")

    hook = m.model.layers[0].register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="stop before"):
        m(input_ids=x, labels=x)
    hook.remove()
    reuses = m.fp8_weight_reuses()
    forward_backward(m, 2)
    assert m.fp8_weight_reuses() == reuses + 1  # cast again after the failure, then reused once


def cached_copies(m) -> list[tuple[bool, bool]]:
    """(row-wise copy, transpose) present, for each cached FP8 weight of the model."""
    return [(ws._data is not None, ws._transpose is not None) for ws in weight_cache_rowwise.cached_weights(m)]


@pytest.mark.parametrize("graphs", [False, True])
def test_rowwise_cache_equals_te_two_copy_cache(monkeypatch, graphs, record):
    """The transpose made in the backward from the cached row-wise bytes is the one TE's cast writes: the same
    losses and gradients bit for bit; between passes only row-wise copies are cached, dropped layer by layer."""
    dropped = []
    drop = weight_cache_rowwise.drop_transposes
    monkeypatch.setattr(weight_cache_rowwise, "drop_transposes", lambda layer: dropped.append(drop(layer)))
    runs = {}
    for rowwise in (False, True):
        m = model("delayed", graphs=graphs)
        with replacement("rowwise_weight_cache", rowwise):
            runs[rowwise] = forward_backward(m, 5) + (cached_copies(m), m.fp8_weight_reuses())
    (losses_te, grads_te, copies_te, reuses_te), (losses, grads, copies, reuses) = runs[False], runs[True]
    record(test="weight_cache_rowwise", graphs=graphs, losses_two_copies=losses_te, losses_rowwise=losses,
           cached_two_copies=copies_te, cached_rowwise=copies, drops=dropped)
    assert reuses == reuses_te == 3
    assert losses == losses_te and all(torch.equal(grads[k], grads_te[k]) for k in grads_te)
    assert copies_te == [(True, True)] * 8  # 2 layers x (QKV, projection, FC1, FC2)
    assert copies == [(True, False)] * 8
    # The first pass casts without caching. In the pass that fills the cache, TE keeps a detached copy of its
    # cast (``new_fc1_ws.detach()`` in LayerNormMLP), so the backward transposes the object the pass saved, which
    # goes with the pass: nothing to drop. From then on each layer's backward drops its 4 transposes.
    if graphs:  # the backward's Python, and so the drop, runs only while TE warms up and records the graphs
        assert 4 in dropped and set(dropped) <= {0, 4}
    else:
        assert dropped == [0, 0] + [4, 4] * 3


def test_rowwise_cache_holds_less_memory(monkeypatch, record):
    """Between passes the cache holds half the bytes of TE's two copies (the transposes live only within a layer's
    backward)."""
    held = {}
    for rowwise in (False, True):
        m = model("delayed")
        with replacement("rowwise_weight_cache", rowwise):
            forward_backward(m, 3)
        torch.cuda.synchronize()
        held[rowwise] = sum(t.numel() for ws in weight_cache_rowwise.cached_weights(m)
                            for t in (ws._data, ws._transpose) if t is not None)
        del m
    record(test="weight_cache_rowwise_bytes", two_copies=held[False], rowwise=held[True])
    assert held[True] * 2 == held[False] > 0
