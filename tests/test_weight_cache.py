"""When te-llama casts FP8 weights again and when it reuses the cached cast (te_llama.training.weight_cache)."""

import torch

from te_llama.training.weight_cache import FP8WeightCache

RECIPE = object()


def make():
    params = [torch.nn.Parameter(torch.randn(4, 4)) for _ in range(3)]
    return params, FP8WeightCache(params)


def step(params, optimizer):
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_an_optimizer_step_after_every_forward_never_caches():
    params, cache = make()
    optimizer = torch.optim.AdamW(params, lr=0.1)
    decisions = []
    for _ in range(4):
        decisions.append(cache.is_first_microbatch(RECIPE))
        step(params, optimizer)
    assert decisions == [None] * 4  # a plain cast each time: no cached copy, no extra memory
    assert cache.reuses == 0


def test_forwards_without_weight_updates_reuse_one_cast():
    params, cache = make()
    assert [cache.is_first_microbatch(RECIPE) for _ in range(5)] == [None, True, False, False, False]
    assert cache.reuses == 3


def test_gradient_accumulation_casts_once_per_optimizer_step():
    params, cache = make()
    optimizer = torch.optim.AdamW(params, lr=0.1, fused=True)  # fused AdamW leaves version counters alone
    windows = []
    for _ in range(3):
        windows.append([cache.is_first_microbatch(RECIPE) for _ in range(4)])
        step(params, optimizer)
    assert windows == [[None, True, False, False], [True, False, False, False], [True, False, False, False]]


def test_in_place_changes_new_storage_and_recipe_changes_recast():
    params, cache = make()
    cache.is_first_microbatch(RECIPE), cache.is_first_microbatch(RECIPE)  # cached
    with torch.no_grad():
        params[1].mul_(2)  # load_state_dict, manual edits: the version counter moves
    assert cache.is_first_microbatch(RECIPE) is True
    assert cache.is_first_microbatch(RECIPE) is False
    params[2].data = params[2].data.clone()  # a new storage
    assert cache.is_first_microbatch(RECIPE) is True
    other = object()
    assert cache.is_first_microbatch(other) is True
    assert cache.is_first_microbatch(other) is False


def test_weights_changed_by_hand_recasts():
    params, cache = make()
    cache.is_first_microbatch(RECIPE), cache.is_first_microbatch(RECIPE)
    params[0].data.add_(1)  # invisible to version counters and optimizers
    assert cache.is_first_microbatch(RECIPE) is False  # hence weights_changed()
    cache.weights_changed()
    assert cache.is_first_microbatch(RECIPE) is True
    assert cache.is_first_microbatch(RECIPE) is False


def test_graphs_always_get_a_bool_and_never_keep_a_first_cast():
    params, cache = make()
    optimizer = torch.optim.SGD(params, lr=0.1)
    # the first cast (delayed scaling's scale 1) is redone at the second forward, which is kept
    assert [cache.is_first_microbatch(RECIPE, always_cache=True) for _ in range(4)] == [True, True, False, False]
    step(params, optimizer)
    assert cache.is_first_microbatch(RECIPE, always_cache=True) is True
    assert cache.is_first_microbatch(RECIPE, always_cache=True) is False


def test_graphs_with_an_optimizer_step_after_every_forward_never_keep_a_cast():
    params, cache = make()
    optimizer = torch.optim.SGD(params, lr=0.1)
    for _ in range(3):
        assert cache.is_first_microbatch(RECIPE, always_cache=True) is True
        step(params, optimizer)
    assert cache.reuses == 0 and cache._cached is None


def test_keeps_casts_once_a_forward_repeats_the_weights():
    """What CUDA graphs are recorded for: with TE's weight caching only once a cast would be kept."""
    params, cache = make()
    optimizer = torch.optim.SGD(params, lr=0.1)
    for _ in range(3):  # an optimizer step after every forward: never
        assert not cache.keeps_casts(RECIPE)
        cache.is_first_microbatch(RECIPE)
        step(params, optimizer)
    cache.is_first_microbatch(RECIPE)
    assert cache.keeps_casts(RECIPE)  # the next forward sees the weights of the previous one
    assert cache.is_first_microbatch(RECIPE) is True
    step(params, optimizer)
    assert cache.keeps_casts(RECIPE)  # a kept cast is refreshed after an update, not dropped
