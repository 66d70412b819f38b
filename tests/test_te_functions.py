"""Swapping a module-level function for te-llama's (te_llama.te_functions), on a stand-in module."""

import logging
import types

from te_llama import te_functions


def make_module():
    module = types.ModuleType("stand_in")
    module.scale = lambda x: 2 * x
    return module


def plus_one(original):
    return lambda x: original(x) + 1


def test_replaces_once_and_keeps_the_original():
    module = make_module()
    original = module.scale
    assert te_functions.replace(module, "scale", plus_one, "marked", "unused")
    assert module.scale(3) == 7 and module.scale.original is original and module.scale.marked
    replaced = module.scale
    assert te_functions.replace(module, "scale", plus_one, "marked", "unused")  # a second install changes nothing
    assert module.scale is replaced and module.scale(3) == 7


def test_a_missing_function_is_reported_and_left_alone(caplog):
    module = make_module()
    with caplog.at_level(logging.WARNING, logger="te_llama"):
        assert not te_functions.replace(module, "shift", plus_one, "marked", "the old path runs")
    assert not hasattr(module, "shift")
    assert "stand_in has no shift in this TE version: the old path runs" in caplog.text
