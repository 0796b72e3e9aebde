"""Topology: every relation of DESIGN §3 on hand-made geometries, Delaunay corner cases, and the vectorised code
equal to the per-pair reference on random layouts."""

from __future__ import annotations

import graph_reference as ref
import numpy as np
import pytest
import shapely
from shapely.geometry import LineString, Point, box

from geolink.graph.relations import all_relations, delaunay_relations, same_dim_relations
from geolink.graph.schema import EDGE_TYPES, RELATIONS


def named(edges, edge_type):
    edge_index, relation = edges
    names = RELATIONS[edge_type]
    return [(int(s), int(d), names[int(r)]) for (s, d), r in zip(edge_index.T.tolist(), relation.tolist(), strict=True)]


PP = ("polygon", "to", "polygon")
LL = ("line", "to", "line")


def test_polygon_relations():
    polygons = np.array([box(0, 0, 2, 2), box(2, 0, 3, 1), box(1, 1, 3, 3), box(0.5, 0.5, 1, 1), box(5, 5, 6, 6)])
    got = set(named(same_dim_relations(polygons), PP))
    assert {(i, i, "self") for i in range(5)} <= got
    assert {(0, 1, "touches"), (1, 0, "touches"), (0, 2, "overlaps"), (2, 0, "overlaps"),
            (0, 3, "covers"), (3, 0, "covered_by")} <= got
    assert not any(4 in (s, d) and s != d for s, d, _ in got)  # disjoint: no edge


def test_identical_geometries_official_quirk():
    """Identical geometries are covers/covered_by (lower index covered_by), never equals, as officially."""
    polygons = np.array([box(0, 0, 1, 1), box(0, 0, 1, 1)])
    got = named(same_dim_relations(polygons), PP)
    assert got == [(0, 0, "self"), (0, 1, "covered_by"), (1, 0, "covers"), (1, 1, "self")]


def test_line_relations_crossing_lines_overlap():
    lines = np.array([LineString([(0, 0), (2, 2)]), LineString([(0, 2), (2, 0)]), LineString([(2, 2), (3, 2)]),
                      LineString([(0.5, 0.5), (1, 1)])])
    got = set(named(same_dim_relations(lines), LL))
    assert {(0, 1, "overlaps"), (0, 2, "touches"), (0, 3, "covers"), (3, 0, "covered_by")} <= got


def test_cross_type_relations():
    polygons = np.array([box(0, 0, 2, 2)])
    lines = np.array([LineString([(0.5, 0.5), (1.5, 0.5)]), LineString([(1, 1), (3, 1)]),
                      LineString([(2, 0), (3, 0)])])
    points = np.array([Point(1, 1.5), Point(0, 1), Point(2.5, 1)])
    edges = all_relations(polygons, lines, points)
    assert named(edges[("line", "to", "polygon")], ("line", "to", "polygon")) == [
        (0, 0, "covered_by"), (1, 0, "crosses"), (2, 0, "touches")]
    assert named(edges[("polygon", "to", "line")], ("polygon", "to", "line")) == [
        (0, 0, "covers"), (0, 1, "crosses"), (0, 2, "touches")]
    assert named(edges[("point", "to", "polygon")], ("point", "to", "polygon")) == [
        (0, 0, "within"), (1, 0, "touches")]
    assert named(edges[("polygon", "to", "point")], ("polygon", "to", "point")) == [
        (0, 0, "contains"), (0, 1, "touches")]
    assert named(edges[("point", "to", "line")], ("point", "to", "line")) == [(2, 1, "within")]
    assert named(edges[("line", "to", "point")], ("line", "to", "point")) == [(1, 2, "contains")]


@pytest.mark.parametrize(("xy", "expected_delaunay"), [
    ([], 0), ([(0, 0)], 0), ([(0, 0), (1, 0)], 0), ([(0, 0), (1, 0), (0, 1)], 6), ([(0, 0), (1, 1), (2, 2)], 0),
    ([(0, 0), (1, 1), (2, 2), (3, 3)], 0), ([(0, 0), (0, 0), (0, 0)], 0), ([(0, 0), (1, 0), (0, 1), (1, 1)], 10),
])
def test_delaunay_corner_cases(xy, expected_delaunay):
    edge_index, relation = delaunay_relations(np.array(xy, dtype=float).reshape(-1, 2))
    n = len(xy)
    assert int((relation == 1).sum()) == expected_delaunay
    assert edge_index[:, relation == 0].tolist() == [list(range(n)), list(range(n))]  # self edges last
    pairs = {tuple(e) for e in edge_index[:, relation == 1].T.tolist()}
    assert all((d, s) in pairs for s, d in pairs)


def test_official_point_threshold():
    three = np.array([(0, 0), (1, 0), (0, 1)], dtype=float)
    assert (delaunay_relations(three, min_points=4)[1] == 1).sum() == 0
    assert (delaunay_relations(three, min_points=3)[1] == 1).sum() == 6


def random_layout(seed: int, n: int):
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 10, (n, 2))
    sizes = rng.uniform(0.2, 2, (n, 2))
    polygons = list(shapely.box(centres[:, 0], centres[:, 1], centres[:, 0] + sizes[:, 0], centres[:, 1] + sizes[:, 1]))
    polygons += list(shapely.buffer(shapely.points(rng.uniform(0, 10, (n // 2, 2))), 0.7, quad_segs=3))
    polygons.append(polygons[0])  # an identical pair
    grid = np.round(rng.uniform(0, 10, (n, 2, 2)))  # snapped: shared endpoints, collinear overlaps
    lines = [LineString(seg) for seg in grid if not np.array_equal(seg[0], seg[1])]
    points = list(shapely.points(np.round(rng.uniform(0, 10, (n, 2)), 1))) + [Point(c) for c in grid[:5, 0]]
    return polygons, lines, points


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_equals_reference(seed):
    polygons, lines, points = random_layout(seed, 60)
    got = all_relations(np.array(polygons), np.array(lines), np.array(points))
    expected = ref.relations(polygons, lines, points)
    for edge_type in EDGE_TYPES:
        assert named(got[edge_type], edge_type) == expected[edge_type], edge_type
