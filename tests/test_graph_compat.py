"""The vectorised builder equals the straightforward official-semantics reference on real tiles."""

from __future__ import annotations

import json
import math
from pathlib import Path

import graph_reference as ref
import numpy as np
import pytest
import shapely

from geolink.graph.build import OSMGraphBuilder, polygon_anchors
from geolink.graph.readers import read_geojson, read_osm
from geolink.graph.schema import EDGE_TYPES, NODE_TYPES, RELATIONS, validate_graph
from geolink.graph.tags import load_key_frequency
from geolink.graph.tiles import RegionIndex, grid_tiles

HELSINKI_BBOX = (24.9351762, 60.1641550, 24.9534145, 60.1791130)


def example_tiles(shared: Path) -> list[tuple[str, list, tuple, list]]:
    """(name, features in polygon/line/point file order, bbox, per-type label lists) of the official tiles."""
    tiles = []
    for folder in sorted((shared / "official_examples" / "osm_tiles").iterdir()):
        bbox = tuple(json.loads((folder / "meta.json").read_text())["bbox_west_south_east_north"])
        features, by_type = [], {}
        for kind in NODE_TYPES:
            path = folder / f"{folder.name}_{kind}.geojson"
            rows = read_geojson(path)[0] if path.exists() else []
            by_type[kind] = rows
            features.extend(rows)
        tiles.append((folder.name, features, bbox, by_type))
    return tiles


def edges_as_lists(graph, edge_type) -> list[tuple[int, int, str]]:
    store = graph[edge_type]
    names = RELATIONS[edge_type]
    return [(int(s), int(d), names[int(r)]) for (s, d), r in zip(store.edge_index.T.tolist(),
                                                                   store.edge_attr.argmax(1).tolist(), strict=True)]


@pytest.fixture(scope="module")
def tiles(shared_data):
    return example_tiles(shared_data)


def test_example_tiles_match_reference(tiles, minilm_encoder):
    frequency = load_key_frequency("official")
    builder = OSMGraphBuilder(tag_encoder=minilm_encoder, tag_weights="official")
    seen_types = set()
    for name, features, bbox, by_type in tiles:
        graph = builder.build(features, bbox=bbox)
        validate_graph(graph, feature_dim=384)
        geoms = {t: [g for g, _ in by_type[t]] for t in NODE_TYPES}
        expected = ref.relations(geoms["polygon"], geoms["line"], geoms["point"])
        for edge_type in EDGE_TYPES:
            got = edges_as_lists(graph, edge_type)
            assert got == expected[edge_type], f"{name} {edge_type}"
            assert graph[edge_type].edge_attr.sum(1).eq(1).all()
            seen_types |= {r for _, _, r in got}
        for t in NODE_TYPES:
            assert graph[t].num_nodes == len(by_type[t]), f"{name}: node order/count of {t}"
            want_pos = np.array([ref.normalise(ref.anchors(t, g), bbox) for g in geoms[t]])
            want_pos = want_pos.reshape(-1, *graph[t].pos.shape[1:])
            np.testing.assert_array_equal(graph[t].pos.numpy(), want_pos.astype(np.float32), err_msg=f"{name} {t}")
            for k, (_, label) in enumerate(by_type[t]):
                want = ref.node_feature(label, minilm_encoder.model, minilm_encoder.tokenizer, frequency)
                np.testing.assert_allclose(graph[t].x[k].numpy(), want, rtol=1e-5, atol=2e-6, err_msg=f"{name} {t} {k}")
    assert {"self", "touches", "covers", "covered_by", "delaunay", "within", "contains"} <= seen_types


def test_interior_anchors_are_inside(tiles):
    builder = OSMGraphBuilder(None)
    for _, features, bbox, _ in tiles:
        polygons = builder.prepare(features, bbox).geoms["polygon"]
        if len(polygons) == 0:
            continue
        raw = polygon_anchors(polygons)
        assert shapely.contains_xy(np.repeat(polygons, 3), raw[:, :3, 0].ravel(), raw[:, :3, 1].ravel()).all()
        np.testing.assert_array_equal(raw[:, 3], shapely.get_coordinates(shapely.centroid(polygons)))


@pytest.fixture(scope="module")
def helsinki(shared_data):
    pytest.importorskip("osmium", reason="pip install geolink[osm]")
    return RegionIndex(read_osm(shared_data / "osm" / "helsinki.osm.pbf"))


def test_dense_helsinki_tile_matches_reference(helsinki):
    tile = max(grid_tiles(HELSINKI_BBOX, shape=(6, 4)), key=lambda t: len(helsinki.indices_in(t.bbox)))
    features = helsinki.features_in(tile.bbox)
    assert len(features) >= 500
    builder = OSMGraphBuilder(None)
    prepared = builder.prepare(features, tile.bbox)
    report = prepared.report
    assert report.clipped > 0 and sum(report.nodes.values()) >= 500
    geoms = prepared.geoms
    assert all(len(geoms[t]) > 0 for t in NODE_TYPES)
    expected = ref.relations(list(geoms["polygon"]), list(geoms["line"]), list(geoms["point"]))
    for edge_type in EDGE_TYPES:
        edge_index, relation = prepared.edges[edge_type]
        names = RELATIONS[edge_type]
        got = [(int(s), int(d), names[int(r)]) for (s, d), r in zip(edge_index.T.tolist(), relation.tolist(),
                                                                      strict=True)]
        assert got == expected[edge_type], edge_type
    for t in NODE_TYPES:
        want = np.array([ref.normalise(ref.anchors(t, g), tile.bbox) for g in geoms[t]], dtype=np.float32)
        np.testing.assert_array_equal(prepared.pos[t], want.reshape(prepared.pos[t].shape))
    # deterministic: the same input gives bit-identical output
    again = builder.prepare(features, tile.bbox)
    for t in NODE_TYPES:
        assert prepared.pos[t].tobytes() == again.pos[t].tobytes()
        assert prepared.tags[t] == again.tags[t]
    assert all(np.array_equal(prepared.edges[e][0], again.edges[e][0]) for e in EDGE_TYPES)
    assert not math.isnan(float(np.concatenate([prepared.pos[t].ravel() for t in NODE_TYPES]).sum()))
