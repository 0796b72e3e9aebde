"""Tag strings, weights, filters, the vocabulary, the shipped key-frequency table, and the lazy package imports."""

from __future__ import annotations

import numpy as np
import pytest

from geolink.errors import MissingInputError
from geolink.graph.tags import (
    TagFilter,
    TagVocabulary,
    load_key_frequency,
    node_weights,
    parse_label,
    tag_string,
    tag_weights,
    tags_to_strings,
)


def test_tag_strings():
    assert tag_string("roof:shape", "gabled") == "roof shape:gabled"
    assert tag_string("building", "yes") == "building:building"
    assert parse_label("highway:service;oneway:oneway;") == ["highway:service", "oneway:oneway"]
    freq = {"building": np.e ** 2, "roof shape": np.e}
    kept = tags_to_strings({"building": "yes", "roof:shape": "flat", "name": "X", "source": None}, freq, TagFilter())
    assert kept == ["building:building", "roof shape:flat"]
    assert tags_to_strings({"building": "yes", "name": "X"}, freq, TagFilter(known_only=False, deny={"building"})) == [
        "name:X"]
    assert tags_to_strings({"building": "yes", "roof:shape": "flat"}, freq, TagFilter(allow={"roof:shape"})) == [
        "roof shape:flat"]
    np.testing.assert_allclose(tag_weights(["building:building", "roof shape:flat", "zz:1"], freq), [2, 1, 0])
    nodes = [["building:building", "roof shape:flat", "zz:1"], ["zz:2"], ["roof shape:gabled"]]
    np.testing.assert_allclose(node_weights(nodes, freq), [2 / 3, 1 / 3, 0, 1, 1])  # log weights, else uniform
    np.testing.assert_allclose(node_weights(nodes, None), [1 / 3, 1 / 3, 1 / 3, 1, 1])
    assert node_weights([], freq).shape == (0,)
    weight_memo: dict[str, float] = {}
    for _ in range(2):  # remembered weights are the computed ones
        np.testing.assert_array_equal(node_weights(nodes, freq, weight_memo), node_weights(nodes, freq))
    assert weight_memo["roof shape:flat"] == 1 and len(weight_memo) == 5
    memo = {}
    tags = {"building": "yes", "roof:shape": "flat", "name": "X", "levels": 3, "note": ["a"]}
    first = tags_to_strings(tags, freq, TagFilter(known_only=False), memo)
    assert first == tags_to_strings(tags, freq, TagFilter(known_only=False)) == [
        "building:building", "roof shape:flat", "name:X", "levels:3", "note:['a']"]
    assert memo[("building", "yes")] == "building:building" and ("note", ["a"]) not in list(memo)
    assert tags_to_strings(tags, freq, TagFilter(known_only=False), memo) == first  # from the memo
    with pytest.raises(TypeError, match="label string"):
        tags_to_strings(42)
    vocab = TagVocabulary(["a:b"])
    assert vocab.add(["c:d", "a:b"]).tolist() == [1, 0] and len(vocab) == 2
    with pytest.raises(KeyError, match="not in the vocabulary"):
        vocab.ids(["x:y"])


def test_official_table_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = load_key_frequency("official")
    assert load_key_frequency("tag_key_frequency.json") == shipped and len(shipped) == 2790
    (tmp_path / "tag_key_frequency.json").write_text('{"building": 10}')
    assert load_key_frequency("tag_key_frequency.json") == {"building": 10.0}  # an existing file wins
    with pytest.raises(MissingInputError, match="missing.json"):
        load_key_frequency(tmp_path / "missing.json")


def test_lazy_package_imports():
    """``import geolink.graph`` loads no shapely; every public name resolves from its module."""
    import subprocess
    import sys

    import geolink.graph

    code = "import sys, geolink.graph as g; assert 'shapely' not in sys.modules; g.OSMGraphBuilder"
    subprocess.run([sys.executable, "-c", code], check=True)
    for name in geolink.graph.__all__:
        value = getattr(geolink.graph, name)
        assert name.isupper() or value.__module__.startswith("geolink.graph."), name
