"""te_llama.te_patches on a stand-in module: explicit install, removal, the TE version check, the scopes."""

import logging
import sys
import types

import pytest

from te_llama import te_patches


@pytest.fixture
def stand_in(monkeypatch):
    """A module ``stand_in`` with ``scale(x) = 2x``, a replacement ``plus_one`` of it, and TE 2.20.2 installed."""
    module = types.ModuleType("stand_in")
    module.scale = lambda x: 2 * x
    monkeypatch.setitem(sys.modules, "stand_in", module)
    monkeypatch.setitem(te_patches.REPLACEMENTS, "plus_one", te_patches.Replacement(
        ("stand_in",), "scale", lambda original: lambda x: original(x) + 1, "the old path runs"))
    monkeypatch.setattr(te_patches, "te_version", lambda: "2.20.2")
    monkeypatch.setattr(te_patches, "_said", set())
    return module


def test_install_is_explicit_idempotent_and_reversible(stand_in, caplog):
    original = stand_in.scale
    assert not te_patches.installed("plus_one") and stand_in.scale(3) == 6  # nothing happens on its own
    with caplog.at_level(logging.INFO, logger="te_llama"):
        assert te_patches.install("plus_one")
    assert "replaced Transformer Engine's stand_in.scale (plus_one; te_llama.te_patches.remove('plus_one')" in caplog.text
    assert stand_in.scale(3) == 7 and stand_in.scale.original is original and te_patches.installed("plus_one")
    replaced = stand_in.scale
    assert te_patches.install("plus_one") and stand_in.scale is replaced  # a second install changes nothing
    te_patches.remove("plus_one")
    assert stand_in.scale is original and not te_patches.installed("plus_one")
    te_patches.remove("plus_one")  # removing again is a no-op
    assert stand_in.scale is original


@pytest.mark.parametrize("version", ["2.19.0", "2.21.0", None, "not-a-version"])
def test_an_untested_te_version_keeps_tes_code_and_says_so_once(stand_in, monkeypatch, caplog, version):
    monkeypatch.setattr(te_patches, "te_version", lambda: version)
    with caplog.at_level(logging.WARNING, logger="te_llama"):
        assert not te_patches.install("plus_one")
        assert not te_patches.install("plus_one")
    assert stand_in.scale(3) == 6
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and f"{te_patches.TESTED_TE}" in messages[0] and "the old path runs" in messages[0]


def test_a_missing_attribute_is_reported_and_left_alone(stand_in, caplog):
    del stand_in.scale
    with caplog.at_level(logging.WARNING, logger="te_llama"):
        assert not te_patches.install("plus_one")
    assert not hasattr(stand_in, "scale")
    assert "stand_in has no scale in Transformer Engine 2.20.2: the old path runs" in caplog.text


def test_tested_versions():
    assert te_patches.tested("2.20.2") and te_patches.tested("2.20.0")
    assert not te_patches.tested("2.8.0") and not te_patches.tested("2.21.0") and not te_patches.tested(None)


def test_the_rowwise_cache_scope_nests_and_restores():
    assert not te_patches._scope.rowwise
    with te_patches.rowwise_weight_cache_scope():
        assert te_patches._scope.rowwise
        with te_patches.rowwise_weight_cache_scope(False):
            assert not te_patches._scope.rowwise
        assert te_patches._scope.rowwise
    assert not te_patches._scope.rowwise


def test_package_import_installs_nothing():
    assert all(not te_patches.installed(name) for name in te_patches.REPLACEMENTS)
