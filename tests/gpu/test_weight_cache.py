"""FP8 weights cast once per weight update (te_llama.weight_cache): what TE computes when told by hand, no stale
casts after optimizer steps, and the same in CUDA graphs."""

import pytest
import torch

from test_cuda_graphs import batch, rel
from test_cuda_graphs import model as uncached_model

pytestmark = pytest.mark.gpu


def model(fp8, graphs=False, cache=True):
    built = uncached_model(fp8, graphs)
    built.cache_fp8_weights = cache
    return built


def forward_backward(m, steps, flags=None):
    """``steps`` forward + backward passes of one batch without an optimizer step: losses and the last gradients."""
    x, losses = batch(1), []
    for step in range(steps):
        extra = {} if flags is None else {"is_first_microbatch": flags[step]}
        loss = m(input_ids=x, labels=x, **extra).loss
        loss.backward()
        losses.append(loss.item())
        grads = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
        m.zero_grad(set_to_none=True)
    return losses, grads


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
    assert graphed.cuda_graph_replays() == 5 and graphed.fp8_weight_reuses() == 3
    # both cast at the first two passes and reuse the second cast: the same FP8 weights and scales
    assert losses_graphed == losses_eager
    assert all(torch.equal(grads_graphed[k], grads_eager[k]) for k in grads_eager)


def test_a_graph_without_caching_recorded_after_one_with_caching_still_casts(record):
    """TE's "skip the weight cast" flag is global: a caching graph leaves it set, and a graph recorded without
    caching afterwards must not obey it (it trained on stale weights before cuda_graphs hid the flag)."""
    from test_cuda_graphs import train

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
