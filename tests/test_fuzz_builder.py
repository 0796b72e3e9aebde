"""Property-based fuzz test of the graph builder (issue 9): random valid and invalid geometries and tags.

The invariant: :meth:`OSMGraphBuilder.build` returns a graph that passes ``validate_graph``, or raises a
``GeoLinkError``; never any other exception. Geometries mix NaN/inf, empty, multi-part, collections, parts outside
the bbox, 3-D and huge coordinates; tags are label strings or dicts with random keys and values. The example count
is bounded so the test stays well under 30 s; the stand-in text model is the hash encoder of ``data_helpers``.
"""

from __future__ import annotations

import warnings

import pytest
import shapely
from shapely.geometry import (
    GeometryCollection,
    LineString,
    MultiLineString,
    MultiPoint,
    MultiPolygon,
    Point,
    Polygon,
)

from geolink.errors import GeoLinkError
from geolink.graph.build import OSMGraphBuilder
from geolink.graph.schema import validate_graph
from tests.data_helpers import HashEncoder

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

BBOXES = [((0.0, 0.0, 1.0, 1.0), "EPSG:4326"), ((10.0, 50.0, 10.01, 50.01), "EPSG:4326"),
          ((0.0, 0.0, 1000.0, 1000.0), "EPSG:32635")]

BAD = st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e300, -1e300, 1e15, -1e15])


def coordinates(low: float, high: float, bad: bool) -> st.SearchStrategy[float]:
    """Coordinates around ``[low, high]`` (a bbox side, half of it again on each side), and with ``bad`` sometimes
    NaN, infinite or huge ones."""
    span = high - low
    ordinary = st.one_of(st.floats(low - span / 2, high + span / 2, allow_nan=False), st.sampled_from([low, high]))
    return st.one_of(ordinary, ordinary, BAD) if bad else ordinary


def geometries(tile: tuple[tuple[float, float, float, float], str], bad: bool) -> st.SearchStrategy[shapely.Geometry]:
    """Geometries around ``tile``'s bbox: points, lines, polygons with holes (2-D or 3-D), multi-parts, empties and
    nested collections; with ``bad``, NaN/inf/huge coordinates among them."""
    west, south, east, north = tile[0]
    x, y, z = coordinates(west, east, bad), coordinates(south, north, bad), coordinates(-10, 10, bad)
    coord = st.one_of(st.tuples(x, y), st.tuples(x, y, z))
    coords2, coords3 = st.tuples(x, y), st.tuples(x, y, z)

    def vertex_lists(min_size: int, max_size: int) -> st.SearchStrategy[list]:
        return st.one_of(st.lists(coords2, min_size=min_size, max_size=max_size),
                         st.lists(coords3, min_size=min_size, max_size=max_size))

    point = coord.map(Point)
    line = vertex_lists(2, 6).map(LineString)
    polygon = st.builds(Polygon, vertex_lists(3, 7), st.lists(st.lists(coords2, min_size=3, max_size=5), max_size=1))
    empty = st.sampled_from([Point(), LineString(), Polygon(), MultiPolygon(), GeometryCollection()])
    single = st.one_of(point, line, polygon)
    multi = st.one_of(st.lists(point, min_size=1, max_size=3).map(MultiPoint),
                      st.lists(line, min_size=1, max_size=3).map(MultiLineString),
                      st.lists(polygon, min_size=1, max_size=3).map(MultiPolygon))
    return st.one_of(single, single, multi, empty,
                     st.lists(st.one_of(single, multi, empty), max_size=3).map(GeometryCollection))


tag_key = st.one_of(st.sampled_from(["building", "highway", "amenity", "landuse", "name", "roof:shape", ""]),
                    st.text(max_size=8), st.integers(-5, 5))
tag_value = st.one_of(st.sampled_from(["yes", "residential", "bench", " ", ""]), st.text(max_size=8),
                      st.integers(), st.floats(), st.none())
labels = st.sampled_from(["building:building", "highway:residential", "amenity:bench", "", "a:b;c:d"])
tags = st.one_of(labels, labels, st.dictionaries(tag_key, tag_value, max_size=4), st.none())


@st.composite
def tiles(draw: st.DrawFn) -> tuple[tuple[float, float, float, float], str, list]:
    """A bbox, its CRS and up to 8 ``(geometry, tags)`` features around it. Shapely itself refuses some drawn
    vertex lists (e.g. a ring of 3 points with a NaN, mixed 2-D/3-D parts): those are not builder inputs, so
    they are redrawn."""
    tile = draw(st.sampled_from(BBOXES))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            features = draw(st.lists(st.tuples(st.one_of(geometries(tile, False), geometries(tile, True)), tags),
                                     max_size=8))
        except (ValueError, shapely.errors.GEOSException):
            hypothesis.reject()
    return tile[0], tile[1], features


@pytest.fixture(scope="module")
def builders():
    return {strict: OSMGraphBuilder(tag_encoder=HashEncoder(), tag_weights="official", strict=strict)
            for strict in (False, True)}


@settings(max_examples=250, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(tile=tiles(), strict=st.booleans())
def test_build_returns_a_valid_graph_or_raises_a_geolink_error(builders, tile, strict):
    bbox, crs, features = tile
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the no-intersection warning is part of the contract, not a failure
        try:
            graph, report = builders[strict].build(features, bbox=bbox, crs=crs, return_report=True)
        except GeoLinkError as error:
            event(f"{type(error).__name__}: {str(error)[:40]}")  # outcomes shown by --hypothesis-show-statistics
            return
    event("graph with nodes" if sum(report.nodes.values()) else "empty graph")
    validate_graph(graph, feature_dim=HashEncoder.dim)
    assert report.features == len(features)
    assert sum(report.nodes.values()) == sum(graph[t].num_nodes for t in report.nodes)
