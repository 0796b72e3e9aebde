"""Readers (GeoJSON, frames, .osm.pbf), CRS tests and reprojection, key counting and the tag-stats job."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import shapely
from shapely.geometry import Point

from geolink.cli import main
from geolink.errors import ConfigError, InputError, MissingInputError
from geolink.graph.build import OSMGraphBuilder
from geolink.graph.readers import (
    KeyCounter,
    TagStatsConfig,
    is_geographic,
    read_features,
    read_geojson,
    read_osm,
    reproject_bbox,
    tag_stats,
)
from geolink.graph.tags import TagFilter


def test_key_counter():
    counter = KeyCounter()
    counter.add({"building": "yes", "roof:shape": "flat"})
    counter.add("building:building;building:building")
    counter.add(None)
    assert counter.table() == {"building": 2, "roof shape": 1} and counter.objects == 3
    assert counter.table(min_count=2) == {"building": 2}


def test_read_geojson_example(shared_data):
    tile = shared_data / "official_examples" / "osm_tiles" / "a702502933_US_21"
    features, crs = read_geojson(tile / "a702502933_US_21_line.geojson")
    assert crs == "EPSG:4326" and len(features) == 6 and features[1][1] == "highway:service;oneway:oneway"
    assert read_features(tile / "a702502933_US_21_point.geojson")[0][0][0].geom_type == "Point"
    with pytest.raises(InputError, match="unknown vector file type"):
        read_features(tile / "a702502933_US_21.jpg")
    with pytest.raises(MissingInputError, match="missing.geojson"):
        read_features(tile / "missing.geojson")
    assert read_features([Point(0, 0), (Point(1, 1), "a:b")])[0][1] == (Point(1, 1), "a:b")


def test_read_osm_pbf(shared_data):
    pytest.importorskip("osmium", reason="pip install geolink[osm]")
    features = list(read_osm(shared_data / "osm" / "test.osm.pbf"))
    kinds = {g.geom_type for g, _ in features}
    assert {"Point", "LineString", "Polygon"} <= kinds
    assert all(isinstance(tags, dict) and tags for _, tags in features)
    assert all(" " not in k for _, tags in features for k in tags)  # raw OSM keys
    only = list(read_osm(shared_data / "osm" / "test.osm.pbf", tag_filter=TagFilter(allow={"building"})))
    assert only and all(set(tags) == {"building"} for _, tags in only)
    west, south, east, north = shapely.total_bounds(np.array([g for g, _ in features]))
    half = (west, south, (west + east) / 2, north)
    subset = list(read_osm(shared_data / "osm" / "test.osm.pbf", bbox=half))
    assert 0 < len(subset) < len(features)
    with pytest.raises(MissingInputError, match="nowhere.osm.pbf"):
        next(read_osm(shared_data / "osm" / "nowhere.osm.pbf"))


def test_is_geographic_is_the_one_crs_test():
    assert all(is_geographic(crs) for crs in ("EPSG:4326", "epsg:4326", "OGC:CRS84", "WGS 84", "EPSG:4258"))
    assert not any(is_geographic(crs) for crs in ("EPSG:3067", "EPSG:3857", "EPSG:32635"))


def test_reproject_bbox():
    assert reproject_bbox((24.9, 60.1, 25.0, 60.2), "EPSG:4326", "EPSG:4326") == (24.9, 60.1, 25.0, 60.2)
    pytest.importorskip("pyproj", reason="pip install geolink[osm]")
    west, south, east, north = reproject_bbox((0.0, 0.0, 1.0, 1.0), "EPSG:4326", "EPSG:3857")
    assert (west, south) == pytest.approx((0.0, 0.0), abs=1e-6)
    assert (east, north) == pytest.approx((111319.49, 111325.14), abs=0.01)  # Web Mercator metres at the equator
    with pytest.raises(InputError, match="EPSG:999999"):
        reproject_bbox((0, 0, 1, 1), "EPSG:4326", "EPSG:999999")


def test_tag_stats_cli(shared_data, tmp_path, capsys):
    pytest.importorskip("osmium", reason="pip install geolink[osm]")
    out = tmp_path / "freq.json"
    assert main(["tag-stats", str(shared_data / "osm" / "test.osm.pbf"), "--out", str(out), "--quiet"]) == 0
    table = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["keys"] == len(table)
    assert table and list(table.values()) == sorted(table.values(), reverse=True)
    assert all(":" not in k for k in table)
    builder = OSMGraphBuilder(None, tag_weights=out)
    assert builder.frequency == {k: float(v) for k, v in table.items()}


def test_tag_stats_job_on_labels(shared_data, tmp_path):
    tile = shared_data / "official_examples" / "osm_tiles" / "a702502933_US_21" / "a702502933_US_21_line.geojson"
    summary = tag_stats(TagStatsConfig(inputs=(tile,), out=tmp_path / "labels.json", quiet=True))
    assert summary == {"out": str(tmp_path / "labels.json"), "keys": summary["keys"], "objects": 6}
    table = json.loads((tmp_path / "labels.json").read_text())
    assert table["highway"] == 6 and len(table) == summary["keys"]
    assert tag_stats(TagStatsConfig(inputs=(tile,), out=tmp_path / "frequent.json", min_count=6))["keys"] < len(table)


def test_tag_stats_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="inputs"):
        TagStatsConfig(inputs=(), out=tmp_path / "freq.json")
    with pytest.raises(ConfigError, match="min_count"):
        TagStatsConfig(inputs=(tmp_path / "a.geojson",), out=tmp_path / "freq.json", min_count=0)
    with pytest.raises(MissingInputError, match="a.geojson"):
        tag_stats(TagStatsConfig(inputs=(tmp_path / "a.geojson",), out=tmp_path / "freq.json"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="notes.txt"):
        tag_stats(TagStatsConfig(inputs=(tmp_path / "notes.txt",), out=tmp_path / "freq.json"))


def test_geopandas_formats_need_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "geopandas", None)  # as if not installed: `import geopandas` raises ImportError
    path = tmp_path / "layer.gpkg"
    path.write_bytes(b"")
    with pytest.raises(ImportError, match=r"geolink\[geo\]"):
        read_features(path)
