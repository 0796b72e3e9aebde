"""The stored graph format, vocabulary files and the one tag-mixing kernel (geolink.graph.storage)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import shapely
import torch
from safetensors.torch import save_file
from shapely.geometry import Point, box

from geolink.errors import DataError
from geolink.graph.build import OSMGraphBuilder
from geolink.graph.schema import EDGE_TYPES, NODE_TYPES, NUM_ANCHORS, validate_graph
from geolink.graph.storage import (
    REVERSE_EDGE_TYPE,
    graph_from_tensors,
    graph_tensors,
    load_graph,
    materialize_x,
    mix_tags,
    pad_tags,
    save_graph,
    save_safetensors,
)
from geolink.graph.tags import TagVocabulary
from tests.data_helpers import BBOX, HashEncoder, random_features

FEATURES = [(box(0.1, 0.1, 0.4, 0.4), "building:building;roof shape:gabled"),
            (shapely.LineString([(0, 0.2), (1, 0.2)]), "highway:residential"),
            (Point(0.2, 0.2), "amenity:bench"), (Point(0.7, 0.7), "amenity:bench"),
            (Point(0.8, 0.2), "shop:bakery")]


def test_save_load_roundtrip(tmp_path, minilm_encoder):
    builder = OSMGraphBuilder(minilm_encoder)
    vocabulary = TagVocabulary()
    compact = builder.build(FEATURES, bbox=(0, 0, 1, 1), vocabulary=vocabulary, materialize=True)
    path = save_graph(compact, tmp_path / "g.safetensors")
    assert b"pickle" not in path.read_bytes()[:64]
    table = minilm_encoder.embedding_table(vocabulary)
    loaded = load_graph(path, table=table)
    validate_graph(loaded, feature_dim=384)
    for t in NODE_TYPES:
        assert torch.equal(loaded[t].x, compact[t].x)  # one kernel: the builder's x, bit for bit
        assert torch.equal(loaded[t].pos, compact[t].pos) and torch.equal(loaded[t].tags, compact[t].tags)
    for e in EDGE_TYPES:
        assert torch.equal(loaded[e].edge_index, compact[e].edge_index), e
        assert torch.equal(loaded[e].edge_attr, compact[e].edge_attr), e
    assert loaded.crs == "EPSG:4326" and torch.equal(loaded.bbox, compact.bbox)
    full = builder.build(FEATURES, bbox=(0, 0, 1, 1))
    reloaded = load_graph(save_graph(full, tmp_path / "full.safetensors"))
    for t in NODE_TYPES:
        assert torch.equal(reloaded[t].x, full[t].x)
    save_file({"a": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(DataError, match="not a geolink graph"):
        load_graph(tmp_path / "other.safetensors")


def test_stored_size_is_exactly_the_compact_layout(tmp_path):
    """A tile file holds the bbox, 8 bytes per anchor, 2 per node (tag count), 8 per tag (int32 id + float32
    weight) and 5 per stored edge (int16 pair + uint8 relation code); transposed edge types are not stored."""
    graph = OSMGraphBuilder(None).build(FEATURES, bbox=(0, 0, 1, 1), vocabulary=TagVocabulary(), materialize=False)
    tensors = graph_tensors(graph)
    assert not any(k.startswith(tuple(f"{s}__to__{d}." for s, _, d in REVERSE_EDGE_TYPE)) for k in tensors)
    nodes = {t: graph[t].num_nodes for t in NODE_TYPES}
    tags = sum(int((graph[t].tags >= 0).sum()) for t in NODE_TYPES)
    stored_edges = sum(graph[e].edge_index.shape[1] for e in EDGE_TYPES if e not in REVERSE_EDGE_TYPE)
    assert (nodes, tags, stored_edges) == ({"polygon": 1, "line": 1, "point": 3}, 6, 15)
    expected = 4 * 8 + sum(8 * NUM_ANCHORS[t] * n + 2 * n for t, n in nodes.items()) + 8 * tags + 5 * stored_edges
    assert sum(v.numel() * v.element_size() for v in tensors.values()) == expected == 245
    path = save_graph(graph, tmp_path / "g.safetensors")
    data = path.read_bytes()
    (header,) = struct.unpack("<Q", data[:8])
    assert len(data) == 8 + header + expected  # nothing but the JSON header besides the tensors


def test_mix_tags_is_the_weighted_sum_over_each_nodes_tags():
    table = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    ids, weights, counts = torch.tensor([1, 4, 0, 5, 2, 2]), torch.tensor([0.25, 0.75, 1.0, 0.5, 0.3, 0.2]), \
        torch.tensor([2, 1, 0, 3])
    x = mix_tags(table, ids, weights, counts)
    expected = torch.stack([0.25 * table[1] + 0.75 * table[4], table[0], torch.zeros(4),
                            0.5 * table[5] + 0.3 * table[2] + 0.2 * table[2]])
    torch.testing.assert_close(x, expected)
    assert mix_tags(table, ids[:0], weights[:0], counts[:0]).shape == (0, 4)
    with pytest.raises(DataError, match="tag id 6 but the table has 6 rows"):
        mix_tags(table, torch.tensor([6]), torch.ones(1), torch.tensor([1]))


def test_pad_tags_slots_each_nodes_tags_from_the_left():
    ids, weight = pad_tags(np.array([7, 8, 9, 3]), np.array([0.5, 0.5, 1.0, 1.0]), np.array([2, 0, 1, 1]))
    assert ids.tolist() == [[7, 8], [-1, -1], [9, -1], [3, -1]]
    assert weight.tolist() == [[0.5, 0.5], [0.0, 0.0], [1.0, 0.0], [1.0, 0.0]]
    empty_ids, empty_weight = pad_tags(np.zeros(0), np.zeros(0), np.zeros(0))
    assert empty_ids.shape == empty_weight.shape == (0, 0)


def test_builder_stored_graphs_and_shards_share_the_kernel():
    """x from the builder, from the padded compact form and from the stored CSR form are identical bit for bit."""
    encoder = HashEncoder()
    vocabulary = TagVocabulary()
    built = OSMGraphBuilder(encoder).build(random_features(5, 40), BBOX, vocabulary=vocabulary, materialize=True)
    table = encoder.embedding_table(vocabulary)
    flat = {k: v.reshape(-1) for k, v in graph_tensors(built).items()}
    from_csr = graph_from_tensors(flat, built.crs, table)
    from_padded = materialize_x(graph_from_tensors(flat, built.crs), table)
    for t in NODE_TYPES:
        assert built[t].num_nodes > 0, t
        assert torch.equal(from_csr[t].x, built[t].x) and torch.equal(from_padded[t].x, built[t].x), t
        weights = built[t].tag_weight.double()
        rows = table.double()[built[t].tags.clamp(min=0)] * (weights * (built[t].tags >= 0)).unsqueeze(-1)
        torch.testing.assert_close(built[t].x.double(), rows.sum(1), rtol=1e-6, atol=1e-7)


def _compact_graph():
    vocabulary = TagVocabulary()
    return OSMGraphBuilder(None).build(FEATURES, bbox=(0, 0, 1, 1), vocabulary=vocabulary, materialize=False)


@pytest.mark.parametrize(("key", "edit", "problem"), [
    ("polygon.pos", lambda v: v.fill_(float("nan")), "'polygon.pos' holds NaN"),
    ("point.tag_weight", lambda v: v.fill_(float("nan")), "'point.tag_weight' holds NaN"),
    ("point.tag_ids", lambda v: v.fill_(-1), "'point.tag_ids' holds ids from -1"),
    ("point.tag_count", lambda v: v.fill_(9), "'point.tag_count' does not match"),
    ("point__to__point.edge_index", lambda v: v.fill_(99), "'point__to__point.edge_index' refers to nodes outside"),
    ("line__to__polygon.relation", lambda v: v.fill_(50), "'line__to__polygon.relation' holds code 50"),
])
def test_corrupt_stored_graph_columns_are_named(tmp_path, key, edit, problem):
    tensors = graph_tensors(_compact_graph())
    assert tensors[key].numel(), key  # the edit must hit real values
    edit(tensors[key])
    save_file(tensors, str(tmp_path / "g.safetensors"), metadata={"format": "geolink-graph/1", "crs": "EPSG:4326"})
    with pytest.raises(DataError, match=f"graph file .*g.safetensors: stored graph column {problem}"):
        load_graph(tmp_path / "g.safetensors")


def test_stored_graph_that_is_a_fifo_or_garbage_is_refused(tmp_path):
    import os

    os.mkfifo(tmp_path / "fifo.safetensors")
    with pytest.raises(DataError, match="fifo.safetensors is not a regular file"):
        load_graph(tmp_path / "fifo.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x05" * 40)
    with pytest.raises(DataError, match="junk.safetensors is not a readable safetensors file"):
        load_graph(tmp_path / "junk.safetensors")


def test_byte_flips_in_a_stored_graph_decode_to_a_valid_graph_or_raise_data_error(tmp_path):
    """Fuzz (the shard harness of tests/test_data_shards.py): random byte flips in a stored tile graph, as
    build-graphs writes it, decode to a graph that passes validate_graph, or raise DataError naming the file."""
    from tests.test_data_shards import fuzz_byte_flips

    vocabulary = TagVocabulary()
    graph = OSMGraphBuilder(None).build(random_features(3, 16), BBOX, vocabulary=vocabulary, materialize=False)
    path = save_graph(graph, tmp_path / "tiles" / "r000_c000.safetensors", vocab="vocab", name="r000_c000")
    table = HashEncoder().embedding_table(vocabulary)

    def decode():
        validate_graph(load_graph(path, table), feature_dim=table.shape[1])

    decode()  # the unflipped file is valid
    fuzz_byte_flips(path, decode, DataError, max_examples=150)
def test_safetensors_files_have_one_byte_layout(tmp_path):
    """Metadata in any insertion order gives the same bytes (the safetensors package writes it in hash order, which
    changes between processes); the file is the safetensors format: it loads back, and with one metadata key it is
    byte for byte what the safetensors package writes."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = {"b.x": torch.randn(3, 4), "a": torch.arange(5), "m": torch.ones(2, dtype=torch.bfloat16),
               "flag": torch.tensor([True, False]), "empty": torch.zeros(0, 2)}
    forward = save_safetensors(tensors, tmp_path / "one.safetensors", {"crs": "EPSG:4326", "vocab": "vocab", "z": "ü"})
    backward = save_safetensors(dict(reversed(tensors.items())), tmp_path / "two.safetensors",
                                {"z": "ü", "vocab": "vocab", "crs": "EPSG:4326"})
    assert forward.read_bytes() == backward.read_bytes()
    loaded = load_file(str(forward))
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    with safe_open(str(forward), framework="pt") as handle:
        assert handle.metadata() == {"crs": "EPSG:4326", "vocab": "vocab", "z": "ü"}
    save_file(tensors, str(tmp_path / "package.safetensors"), metadata={"format": "x"})
    ours = save_safetensors(tensors, tmp_path / "ours.safetensors", {"format": "x"})
    assert ours.read_bytes() == (tmp_path / "package.safetensors").read_bytes()
    assert not list(tmp_path.glob("*.tmp"))
