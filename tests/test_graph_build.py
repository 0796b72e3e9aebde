"""OSMGraphBuilder: geometry pipeline, node types, tags, compact form, determinism and errors."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import shapely
import torch
from shapely.geometry import LineString, MultiLineString, MultiPolygon, Point, Polygon, box

from geolink.errors import InputError
from geolink.graph.build import OSMGraphBuilder
from geolink.graph.schema import EDGE_TYPES, NODE_TYPES, validate_graph
from geolink.graph.storage import materialize_x
from geolink.graph.tags import TagVocabulary
from tests.data_helpers import HashEncoder

BBOX = (0.0, 0.0, 1.0, 1.0)
POLY = (box(0.1, 0.1, 0.4, 0.4), "building:building")
LINE = (LineString([(0.05, 0.2), (0.9, 0.2)]), "highway:residential")
POINT = (Point(0.2, 0.2), "amenity:bench")


@pytest.fixture(scope="module")
def builder(minilm_encoder):
    return OSMGraphBuilder(tag_encoder=minilm_encoder, tag_weights="official")


@pytest.mark.parametrize("present", [c for r in range(4) for c in itertools.combinations(NODE_TYPES, r)])
def test_every_node_type_present_or_absent(builder, present):
    features = [f for t, f in zip(NODE_TYPES, (POLY, LINE, POINT), strict=True) if t in present]
    graph = builder.build(features, bbox=BBOX)
    validate_graph(graph, feature_dim=384)
    for t in NODE_TYPES:
        assert graph[t].num_nodes == (1 if t in present else 0)
        assert graph[t].x.dtype == torch.float32 and graph[t].pos.dtype == torch.float32
    for edge_type in EDGE_TYPES:
        assert graph[edge_type].edge_index.dtype == torch.long
    assert graph.bbox.dtype == torch.float64 and graph.bbox.tolist() == [list(BBOX)] and graph.crs == "EPSG:4326"
    if {"polygon", "line"} <= set(present):
        assert graph["line", "to", "polygon"].edge_index.shape[1] == 1  # the road crosses the building
    if {"polygon", "point"} <= set(present):
        assert graph["point", "to", "polygon"].edge_attr.tolist() == [[0.0, 1.0]]  # inside the building: within


def test_empty_tile(builder):
    graph, report = builder.build([], bbox=BBOX, return_report=True)
    validate_graph(graph, feature_dim=384)
    assert all(graph[t].x.shape == (0, 384) for t in NODE_TYPES)
    assert all(graph[e].edge_index.shape == (2, 0) for e in EDGE_TYPES)
    assert report.features == 0


def test_a_polygon_make_valid_leaves_invalid_is_repaired_or_dropped(builder):
    """Found by the builder fuzz test: GEOS ``make_valid`` returns an invalid collection for this self-intersecting
    ring (a near-zero coordinate), and clipping that raised a GEOS TopologyException. The builder repairs it another
    way; a polygon nothing repairs is dropped and counted."""
    from geolink.graph.build import repair_polygons

    ring = [(0.5, 0.0, -10), (0.0, 0.0, -10), (-2.512829770709928e-60, 1.0, -10), (1.0, 0.0, -10), (0.0, 1.0, -10),
            (1.0, 1.0, -18.743563525888973)]
    assert not shapely.is_valid(shapely.make_valid(Polygon(ring)))  # the GEOS behaviour this guards against
    graph, report = builder.build([(Polygon(ring), "building:building")], bbox=BBOX, return_report=True)
    validate_graph(graph, feature_dim=384)
    assert report.repaired == 1 and graph["polygon"].num_nodes >= 1
    assert shapely.is_valid(repair_polygons(np.array([Polygon(ring)], dtype=object))).all()


def test_multipart_invalid_and_outside(builder):
    bowtie = Polygon([(0.1, 0.1), (0.3, 0.3), (0.3, 0.1), (0.1, 0.3)])  # self-intersecting
    assert not bowtie.is_valid
    features = [
        (MultiPolygon([box(0.1, 0.6, 0.2, 0.7), box(0.5, 0.6, 0.6, 0.7)]), "landuse:grass"),
        (bowtie, "building:building"),
        (box(2, 2, 3, 3), "building:building"),  # outside
        (box(0.8, 0.8, 1.5, 1.5), "landuse:forest"),  # clipped
        (MultiLineString([[(0.1, 0.9), (0.2, 0.9)], [(0.3, 0.9), (0.4, 0.9)]]), "highway:path"),
        (Point(5, 5), "amenity:bench"),  # outside
        (Polygon(), "building:building"),  # empty
        (Polygon([(0.5, 0.5), (0.6, 0.6), (0.7, 0.7), (0.5, 0.5)]), "building:building"),  # zero area
    ]
    graph, report = builder.build(features, bbox=BBOX, return_report=True)
    validate_graph(graph, feature_dim=384)
    assert report.outside_bbox == 2 and report.clipped == 1 and report.repaired >= 1
    assert report.dropped_empty == 1 and report.dropped_degenerate >= 1
    assert graph["polygon"].num_nodes == 2 + 2 + 1  # two parts, the repaired bowtie's two triangles, the clipped one
    assert graph["line"].num_nodes == 2 and report.split_parts >= 3
    # node order follows the features: the grass parts first, forest last
    grass = builder.tag_encoder.encode(["landuse:grass"])[0]
    torch.testing.assert_close(graph["polygon"].x[0], grass)
    torch.testing.assert_close(graph["polygon"].x[1], grass)
    assert graph["polygon"].pos[4, 3].tolist() == pytest.approx([0.9, 0.1])  # clipped forest centroid, v flipped
    assert graph["polygon"].pos.min() >= 0 and graph["polygon"].pos.max() <= 1


def test_inside_geometries_used_as_given(builder):
    line = LineString([(0.9, 0.1), (0.5, 0.5), (0.1, 0.2)])
    graph = builder.build([(line, "highway:path")], bbox=BBOX)
    np.testing.assert_allclose(graph["line"].pos[0].numpy(), [[line.centroid.x, 1 - line.centroid.y],
                                                              [0.9, 0.9], [0.1, 0.8]], rtol=1e-6)


def test_point_only_tiles(builder):
    for xy, delaunay in [([(0.5, 0.5)], 0), ([(0.2, 0.2), (0.7, 0.7)], 0), ([(0.2, 0.2), (0.7, 0.2), (0.5, 0.8)], 6),
                         ([(0.1, 0.1), (0.2, 0.2), (0.3, 0.3)], 0)]:
        graph = builder.build([(Point(p), "amenity:bench") for p in xy], bbox=BBOX)
        validate_graph(graph, feature_dim=384)
        attr = graph["point", "to", "point"].edge_attr
        assert int(attr[:, 1].sum()) == delaunay and int(attr[:, 0].sum()) == len(xy)
        assert graph["point"].pos.shape == (len(xy), 1, 2)


def test_tags_unknown_keys_and_weights(builder, minilm_encoder):
    import math

    from geolink.graph.tags import load_key_frequency

    freq = load_key_frequency("official")
    features = [
        (Point(0.1, 0.1), "building:building;zzunknownkey:value"),  # unknown key in a label: weight 0
        (Point(0.2, 0.1), {"building": "yes", "name": "Kiasma", "zzunknownkey": "v"}),  # dict: unknown keys dropped
        (Point(0.3, 0.1), "zzunknownkey:a;zzother:b"),  # all unknown: plain mean
        (Point(0.4, 0.1), {"name": "only a name"}),  # nothing kept: dropped
        (Point(0.5, 0.1), {"building": "yes", "roof:shape": "gabled"}),
    ]
    graph, report = builder.build(features, bbox=BBOX, return_report=True)
    assert report.dropped_no_tags == 1 and report.unknown_keys == 3
    emb = {s: minilm_encoder.encode([s])[0] for s in ("building:building", "zzunknownkey:a", "zzother:b",
                                                     "roof shape:gabled")}
    x = graph["point"].x
    torch.testing.assert_close(x[0], emb["building:building"])
    torch.testing.assert_close(x[1], emb["building:building"])
    torch.testing.assert_close(x[2], (emb["zzunknownkey:a"] + emb["zzother:b"]) / 2)
    wb, wr = math.log(freq["building"]), math.log(freq["roof shape"])
    torch.testing.assert_close(x[3], (wb * emb["building:building"] + wr * emb["roof shape:gabled"]) / (wb + wr))


def test_compact_form_and_determinism(builder):
    features = [POLY, LINE, POINT, (Point(0.8, 0.8), "amenity:bench;bench:backrest"), (Point(0.9, 0.1), "shop:bakery")]
    vocabulary = TagVocabulary()
    compact = builder.build(features, bbox=BBOX, vocabulary=vocabulary)
    assert "x" not in compact["point"] and compact["point"].tags.shape == (3, 2)
    assert compact["point"].tags[0, 1] == -1 and compact["point"].tag_weight.sum(1).tolist() == pytest.approx([1] * 3)
    table = builder.tag_encoder.embedding_table(vocabulary)
    materialize_x(compact, table)
    full = builder.build(features, bbox=BBOX)
    again = builder.build(features, bbox=BBOX)
    for t in NODE_TYPES:
        torch.testing.assert_close(compact[t].x, full[t].x, rtol=1e-6, atol=1e-7)
        assert full[t].x.numpy().tobytes() == again[t].x.numpy().tobytes()
        assert full[t].pos.numpy().tobytes() == again[t].pos.numpy().tobytes()
    for e in EDGE_TYPES:
        assert torch.equal(full[e].edge_index, again[e].edge_index) and torch.equal(full[e].edge_attr,
                                                                                    again[e].edge_attr)


class Frame:
    """The minimal (Geo)DataFrame surface build_from_frames reads (geopandas is an optional dependency)."""

    def __init__(self, columns: dict, crs: str | None = None):
        self._columns, self.crs = columns, crs
        self.columns = list(columns)

    def __getitem__(self, key):
        return self._columns[key]


def test_build_from_frames(builder):
    polygons = Frame({"geometry": [POLY[0]], "label": [POLY[1]]}, crs="EPSG:4326")
    lines = Frame({"geometry": [LINE[0]], "highway": ["residential"], "name": [None]})
    graph = builder.build_from_frames(polygons=polygons, lines=lines, bbox=BBOX)
    direct = builder.build([POLY, LINE], bbox=BBOX)
    for t in NODE_TYPES:
        torch.testing.assert_close(graph[t].x, direct[t].x)


def test_reprojection(builder):
    pytest.importorskip("pyproj", reason="pip install geolink[osm]")
    from geolink.graph.readers import reproject

    bbox = (24.93, 60.16, 24.95, 60.17)
    poly = (box(24.935, 60.162, 24.94, 60.165), "building:building")
    projected = reproject(np.array([poly[0]]), "EPSG:4326", "EPSG:3857")[0]
    a = builder.build([poly], bbox=bbox)
    b = builder.build([(projected, poly[1])], bbox=bbox, feature_crs="EPSG:3857")
    torch.testing.assert_close(a["polygon"].pos, b["polygon"].pos, atol=1e-4, rtol=0)


def test_clear_errors(builder):
    with pytest.raises(ValueError, match="empty bbox"):
        builder.build([POLY], bbox=(1, 0, 0, 1))
    with pytest.raises(ValueError, match="not in degrees"):
        builder.build([POLY], bbox=(500000, 6000000, 500200, 6000200))
    with pytest.raises(ValueError, match="feature_crs"):
        builder.build([(box(2.7e6, 8.4e6, 2.71e6, 8.41e6), "building:building")], bbox=BBOX)
    with pytest.raises(TypeError, match="shapely geometry"):
        builder.build([({"type": "Point"}, "a:b")], bbox=BBOX)
    with pytest.raises(ValueError, match="tag_encoder"):
        OSMGraphBuilder(None).build([POLY], bbox=BBOX)
    with pytest.raises(FileNotFoundError, match="tag-stats"):
        OSMGraphBuilder(None, tag_weights="/nonexistent.json")
    projected = OSMGraphBuilder(builder.tag_encoder).build([(box(10, 10, 20, 20), "building:building")],
                                                           bbox=(0, 0, 100, 100), crs="EPSG:32635")
    assert projected.crs == "EPSG:32635" and projected["polygon"].num_nodes == 1
    # anchors in the projected tile: the centroid (15, 15) of a 100 m tile is at u = 0.15, v = 1 - 0.15
    torch.testing.assert_close(projected["polygon"].pos[0, 3], torch.tensor([0.15, 0.85]))


# ----------------------------------------------------------------------------------------------------------------
# issue 9, item 7: a CRS mix-up is named, not a silently empty graph; non-finite coordinates are dropped and counted
ATHENS = [(box(23.70, 37.90, 23.71, 37.91), "building:building"), (Point(23.705, 37.905), "amenity:bench")]
ATHENS_BBOX = (23.69, 37.89, 23.72, 37.92)
ATHENS_3857 = (2637000.0, 4563000.0, 2641000.0, 4567000.0)  # the same area in web-mercator metres


@pytest.fixture(scope="module")
def hash_builder():
    return OSMGraphBuilder(tag_encoder=HashEncoder(), tag_weights="official")


def test_lonlat_features_with_a_web_mercator_bbox_warn_or_raise(hash_builder):
    with pytest.warns(UserWarning, match=r"no feature intersects the bbox.*taken to be in crs EPSG:3857.*"
                                         r"\[23\.7, 37\.9, 23\.71, 37\.91\].*\[2637000\.0, 4563000\.0.*"
                                         r"feature_crs='EPSG:4326'"):
        graph, report = hash_builder.build(ATHENS, bbox=ATHENS_3857, crs="EPSG:3857", return_report=True)
    validate_graph(graph, feature_dim=HashEncoder.dim)
    assert report.outside_bbox == 2 and sum(report.nodes.values()) == 0
    strict = OSMGraphBuilder(tag_encoder=HashEncoder(), tag_weights="official", strict=True)
    with pytest.raises(InputError, match="no feature intersects the bbox.*crs EPSG:3857"):
        strict.build(ATHENS, bbox=ATHENS_3857, crs="EPSG:3857")
    with warnings.catch_warnings():  # the fix the message names works, without a warning
        warnings.simplefilter("error")
        fixed = strict.build(ATHENS, bbox=ATHENS_3857, crs="EPSG:3857", feature_crs="EPSG:4326")
    assert fixed["polygon"].num_nodes == 1 and fixed["point"].num_nodes == 1


def test_swapped_lat_lon_is_named(hash_builder):
    swapped = (ATHENS_BBOX[1], ATHENS_BBOX[0], ATHENS_BBOX[3], ATHENS_BBOX[2])
    with pytest.warns(UserWarning, match=r"crs EPSG:4326.*\[37\.89, 23\.69, 37\.92, 23\.72\].*look like \(lat, lon\)"):
        graph = hash_builder.build(ATHENS, bbox=swapped)
    assert sum(graph[t].num_nodes for t in NODE_TYPES) == 0
    with pytest.warns(UserWarning, match="crs EPSG:32635.*crs EPSG:4326"):  # a wrong feature_crs: both CRSs named
        hash_builder.build(ATHENS, bbox=ATHENS_BBOX, feature_crs="EPSG:32635")


@pytest.mark.parametrize("bad", [
    Point(float("nan"), 37.9),
    Point(23.7, float("inf")),
    Polygon([(23.70, 37.90), (float("nan"), 37.90), (23.71, 37.91)]),  # a raw GEOSException before
    LineString([(23.70, 37.90), (23.71, float("-inf"))]),
    MultiPolygon([box(23.70, 37.90, 23.701, 37.901), Polygon([(0, 0), (float("nan"), 1), (1, 1)])]),
])
def test_non_finite_coordinates_are_dropped_and_counted(hash_builder, bad):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no misleading "not in degrees" error, no warning: the rest is in the bbox
        graph, report = hash_builder.build([(bad, "amenity:bench"), *ATHENS], bbox=ATHENS_BBOX, return_report=True)
    validate_graph(graph, feature_dim=HashEncoder.dim)
    assert report.dropped_nonfinite == 1 and report.outside_bbox == 0
    assert graph["polygon"].num_nodes == 1 and graph["point"].num_nodes == 1


def test_only_non_finite_features_give_an_empty_graph_without_a_crs_warning(hash_builder):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graph, report = hash_builder.build([(Point(float("nan"), 1.0), "amenity:bench")], bbox=ATHENS_BBOX,
                                           return_report=True)
    assert report.dropped_nonfinite == 1 and sum(report.nodes.values()) == 0


def test_non_string_tag_keys_are_taken_as_text(hash_builder):
    keep_all = OSMGraphBuilder(tag_encoder=HashEncoder(), tag_weights="official", tag_filter=None)
    graph, report = keep_all.build([(Point(23.705, 37.905), {1: "x", "amenity": "bench"})], bbox=ATHENS_BBOX,
                                   return_report=True)
    assert graph["point"].num_nodes == 1 and report.unknown_keys == 1  # the key "1" is kept, unknown to the table
    default = hash_builder.build([(Point(23.705, 37.905), {1: "x", "amenity": "bench"})], bbox=ATHENS_BBOX)
    assert default["point"].num_nodes == 1
