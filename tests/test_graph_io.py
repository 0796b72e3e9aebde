"""Readers, tiling, the stored format and the `geolink build-graphs` / `geolink tag-stats` commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely
import torch
from shapely.geometry import Point, box

from geolink.cli import main
from geolink.graph.build import OSMGraphBuilder
from geolink.graph.io import GraphFolder, load_graph, read_features, read_geojson, read_osm, save_graph
from geolink.graph.schema import EDGE_TYPES, NODE_TYPES, validate_graph
from geolink.graph.tags import (
    KeyCounter,
    TagFilter,
    TagVocabulary,
    parse_label,
    tag_string,
    tag_weights,
    tags_to_strings,
)
from geolink.graph.tiles import RegionIndex, footprint_tiles, geotiff_bounds, grid_tiles, parse_shard

HELSINKI_SMALL = "24.940,60.166,24.950,60.172"


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
    with pytest.raises(TypeError, match="label string"):
        tags_to_strings(42)
    vocab = TagVocabulary(["a:b"])
    assert vocab.add(["c:d", "a:b"]).tolist() == [1, 0] and len(vocab) == 2
    with pytest.raises(KeyError, match="not in the vocabulary"):
        vocab.ids(["x:y"])


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
    with pytest.raises(ValueError, match="unknown vector file type"):
        read_features(tile / "a702502933_US_21.jpg")
    with pytest.raises(FileNotFoundError):
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


def test_tiles_grid_and_footprints(tmp_path):
    tiles = grid_tiles((24.0, 60.0, 24.01, 60.005), tile_size="200m")
    assert tiles[0].name == "r000_c000" and tiles[0].bbox[3] == 60.005  # north-west first
    width_m = (tiles[0].bbox[2] - tiles[0].bbox[0]) * 111320 * np.cos(np.radians(60.0025))
    assert width_m == pytest.approx(200, rel=1e-6) and len(tiles) == 3 * 3
    assert max(t.bbox[2] for t in tiles) == 24.01 and min(t.bbox[1] for t in tiles) == 60.0
    grid = grid_tiles((0, 0, 4, 6), shape=(6, 4), crs="EPSG:32635")
    assert len(grid) == 24 and grid[5].bbox == (1.0, 4.0, 2.0, 5.0)
    with pytest.raises(ValueError, match="200m"):
        grid_tiles((0, 0, 1, 1), tile_size="big")
    with pytest.raises(ValueError, match="exactly one"):
        grid_tiles((0, 0, 1, 1))
    assert [t.bbox for t in footprint_tiles([(0, 0, 1, 1), box(1, 1, 2, 3)])] == [(0, 0, 1, 1), (1, 1, 2, 3)]
    assert parse_shard("1/4") == (1, 4)
    with pytest.raises(ValueError, match="i/n"):
        parse_shard("4/4")


def test_geotiff_bounds(tmp_path):
    from PIL import Image, TiffImagePlugin

    info = TiffImagePlugin.ImageFileDirectory_v2()
    info[33550] = (0.5, 0.25, 0.0)  # pixel size
    info[33922] = (0.0, 0.0, 0.0, 500000.0, 6700000.0, 0.0)  # tie point: pixel (0,0) -> (x, y)
    info[34735] = (1, 1, 0, 1, 3072, 0, 1, 32635)  # ProjectedCSTypeGeoKey = EPSG:32635
    path = tmp_path / "tile.tif"
    Image.new("RGB", (200, 100)).save(path, tiffinfo=info)
    bbox, crs = geotiff_bounds(path)
    assert bbox == (500000.0, 6699975.0, 500100.0, 6700000.0) and crs == "EPSG:32635"
    assert footprint_tiles([path])[0].name == "tile"
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.tif")
    with pytest.raises(ValueError, match="georeferencing"):
        geotiff_bounds(tmp_path / "plain.tif")


def test_region_index_one_query_per_tile():
    features = [(box(i, 0, i + 0.5, 0.5), f"building:{i}") for i in range(10)] + [(Point(5.2, 0.2), "a:b")]
    region = RegionIndex(features)
    assert region.indices_in((4.9, 0, 5.6, 1)).tolist() == [5, 10]
    assert [t for _, t in region.features_in((0, 0, 1.2, 1))] == ["building:0", "building:1"]


def test_save_load_roundtrip(tmp_path, minilm_encoder):
    features = [(box(0.1, 0.1, 0.4, 0.4), "building:building;roof shape:gabled"),
                (shapely.LineString([(0, 0.2), (1, 0.2)]), "highway:residential"),
                (Point(0.2, 0.2), "amenity:bench"), (Point(0.7, 0.7), "amenity:bench"),
                (Point(0.8, 0.2), "shop:bakery")]
    builder = OSMGraphBuilder(minilm_encoder)
    vocabulary = TagVocabulary()
    compact = builder.build(features, bbox=(0, 0, 1, 1), vocabulary=vocabulary, materialize=True)
    path = save_graph(compact, tmp_path / "g.safetensors")
    assert path.stat().st_size < 20_000
    assert b"pickle" not in path.read_bytes()[:64]
    table = minilm_encoder.embedding_table(vocabulary)
    loaded = load_graph(path, table=table)
    validate_graph(loaded, feature_dim=384)
    for t in NODE_TYPES:
        torch.testing.assert_close(loaded[t].x, compact[t].x, rtol=1e-6, atol=1e-7)
        assert torch.equal(loaded[t].pos, compact[t].pos) and torch.equal(loaded[t].tags, compact[t].tags)
    for e in EDGE_TYPES:
        assert torch.equal(loaded[e].edge_index, compact[e].edge_index), e
        assert torch.equal(loaded[e].edge_attr, compact[e].edge_attr), e
    assert loaded.crs == "EPSG:4326" and torch.equal(loaded.bbox, compact.bbox)
    full = builder.build(features, bbox=(0, 0, 1, 1))
    reloaded = load_graph(save_graph(full, tmp_path / "full.safetensors"))
    for t in NODE_TYPES:
        assert torch.equal(reloaded[t].x, full[t].x)
    with pytest.raises(ValueError, match="not a geolink graph"):
        from safetensors.torch import save_file

        save_file({"a": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
        load_graph(tmp_path / "other.safetensors")


@pytest.fixture(scope="module")
def built_folder(shared_data, minilm_path, tmp_path_factory):
    pytest.importorskip("osmium", reason="pip install geolink[osm]")
    out = tmp_path_factory.mktemp("graphs")
    pbf = str(shared_data / "osm" / "helsinki.osm.pbf")
    args = ["build-graphs", "--pbf", pbf, "--bbox", HELSINKI_SMALL, "--grid", "2x3", "--out", str(out),
            "--text-model", str(minilm_path), "--quiet"]
    assert main(args) == 0
    return out, pbf, args


def test_build_graphs_cli(built_folder, minilm_encoder):
    out, pbf, args = built_folder
    lines = (out / "index.jsonl").read_text().splitlines()
    assert len(lines) == 6 and (out / "vocab.json").is_file() and (out / "vocab.safetensors").is_file()
    folder = GraphFolder(out)
    assert len(folder) == 6
    graph = folder["r000_c000"]
    validate_graph(graph, feature_dim=384)
    entry = json.loads(lines[0])
    region = RegionIndex(read_osm(pbf, bbox=tuple(map(float, HELSINKI_SMALL.split(",")))))
    direct = OSMGraphBuilder(minilm_encoder).build(region.features_in(entry["bbox"]), bbox=entry["bbox"])
    for t in NODE_TYPES:
        torch.testing.assert_close(graph[t].x, direct[t].x, rtol=1e-5, atol=1e-6)
    for e in EDGE_TYPES:
        assert torch.equal(graph[e].edge_index, direct[e].edge_index)
    # resumability: a rerun skips every finished tile and changes nothing
    before = {p.name: p.read_bytes() for p in (out / "tiles").iterdir()}
    assert main(args) == 0
    assert len((out / "index.jsonl").read_text().splitlines()) == 6
    assert {p.name: p.read_bytes() for p in (out / "tiles").iterdir()} == before


def test_build_graphs_shards_and_workers(built_folder, tmp_path, minilm_encoder):
    out, pbf, args = built_folder
    sharded = tmp_path / "sharded"
    base = ["build-graphs", "--pbf", pbf, "--bbox", HELSINKI_SMALL, "--grid", "2x3", "--out", str(sharded), "--quiet"]
    assert main([*base, "--shard", "0/2", "--workers", "2"]) == 0
    assert main([*base, "--shard", "1/2"]) == 0
    names = [sorted(json.loads(line)["name"] for line in (sharded / f"index.shard-{i}-of-2.jsonl").read_text()
                    .splitlines()) for i in range(2)]
    assert len(names[0]) == 3 and len(names[1]) == 3 and not set(names[0]) & set(names[1])
    assert not (sharded / "vocab.shard-0-of-2.safetensors").exists()  # no text model: vocabulary only
    table = GraphFolder(out).table("vocab")
    assert table.shape == (len(json.loads((out / "vocab.json").read_text())["strings"]), 384)
    for name in names[0] + names[1]:
        a = load_graph(sharded / "tiles" / f"{name}.safetensors")
        b = load_graph(out / "tiles" / f"{name}.safetensors")
        for e in EDGE_TYPES:
            assert torch.equal(a[e].edge_index, b[e].edge_index)
        for t in NODE_TYPES:
            assert torch.equal(a[t].pos, b[t].pos)
    # merging the shards gives one vocabulary for the folder, with the same node features
    assert main(["build-graphs", "--merge-shards", "--out", str(sharded), "--quiet"]) == 0
    assert not list(sharded.glob("*shard*")) and (sharded / "vocab.json").is_file()
    merged = GraphFolder(sharded, tag_encoder=minilm_encoder)
    full = GraphFolder(out)
    assert len(merged) == len(full) == 6
    for k in range(6):
        a, b = merged[k], full[k]
        assert a.name == b.name
        for t in NODE_TYPES:
            torch.testing.assert_close(a[t].x, b[t].x, rtol=1e-5, atol=1e-6)


def test_tag_stats_cli(shared_data, tmp_path):
    pytest.importorskip("osmium", reason="pip install geolink[osm]")
    out = tmp_path / "freq.json"
    assert main(["tag-stats", str(shared_data / "osm" / "test.osm.pbf"), "--out", str(out), "--quiet"]) == 0
    table = json.loads(out.read_text())
    assert table and list(table.values()) == sorted(table.values(), reverse=True)
    assert all(":" not in k for k in table)
    builder = OSMGraphBuilder(None, tag_weights=out)
    assert builder.frequency == {k: float(v) for k, v in table.items()}
    label_out = tmp_path / "labels.json"
    tile = shared_data / "official_examples" / "osm_tiles" / "a702502933_US_21" / "a702502933_US_21_line.geojson"
    assert main(["tag-stats", str(tile), "--out", str(label_out), "--quiet"]) == 0
    assert json.loads(label_out.read_text())["highway"] == 6


def test_build_graphs_projected_crs(shared_data, tmp_path):
    pytest.importorskip("osmium", reason="pip install geolink[osm]")
    pytest.importorskip("pyproj", reason="pip install geolink[osm]")
    out = tmp_path / "utm"
    args = ["build-graphs", "--pbf", str(shared_data / "osm" / "helsinki.osm.pbf"), "--bbox", HELSINKI_SMALL,
            "--tile-size", "300m", "--crs", "EPSG:3067", "--out", str(out), "--quiet"]
    assert main(args) == 0
    entries = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    west, south, east, north = entries[0]["bbox"]
    assert entries[0]["crs"] == "EPSG:3067" and east - west == pytest.approx(300) and west > 1e5
    graph = load_graph(out / entries[0]["file"])
    assert graph.crs == "EPSG:3067"
    for t in NODE_TYPES:
        assert graph[t].pos.numel() == 0 or (graph[t].pos.min() >= 0 and graph[t].pos.max() <= 1)


def test_build_graphs_vector_and_footprints(shared_data, tmp_path, minilm_encoder):
    tile = shared_data / "official_examples" / "osm_tiles" / "a702502933_US_21"
    bbox = json.loads((tile / "meta.json").read_text())["bbox_west_south_east_north"]
    footprints = tmp_path / "footprints.json"
    footprints.write_text(json.dumps([bbox]))
    vector = tile / "a702502933_US_21_polygon.geojson"
    out = tmp_path / "vec"
    assert main(["build-graphs", "--vector", str(vector), "--footprints", str(footprints), "--out", str(out),
                 "--quiet"]) == 0
    stored = GraphFolder(out, tag_encoder=minilm_encoder)[0]
    direct = OSMGraphBuilder(minilm_encoder).build(read_geojson(vector)[0], bbox=bbox)
    for t in NODE_TYPES:
        torch.testing.assert_close(stored[t].x, direct[t].x, rtol=1e-5, atol=1e-6)
    for e in EDGE_TYPES:
        assert torch.equal(stored[e].edge_index, direct[e].edge_index)
    with pytest.raises(ValueError, match="--grid"):
        main(["build-graphs", "--vector", str(vector), "--grid", "3by3", "--out", str(tmp_path / "x"), "--quiet"])


def test_official_table_by_name(tmp_path, monkeypatch):
    from geolink.graph.tags import load_key_frequency

    monkeypatch.chdir(tmp_path)
    shipped = load_key_frequency("official")
    assert load_key_frequency("tag_key_frequency.json") == shipped and len(shipped) == 2790
    (tmp_path / "tag_key_frequency.json").write_text('{"building": 10}')
    assert load_key_frequency("tag_key_frequency.json") == {"building": 10.0}  # an existing file wins


def test_lazy_package_imports():
    """``import geolink.graph`` loads no shapely; no module of geolink.graph imports geolink.models."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, geolink.graph as g; assert 'shapely' not in sys.modules; g.OSMGraphBuilder"
    subprocess.run([sys.executable, "-c", code], check=True)
    for path in (Path(__file__).resolve().parents[1] / "geolink" / "graph").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.startswith("geolink.models") for n in names), path


def test_geopandas_formats_need_the_extra(tmp_path):
    import importlib.util

    if importlib.util.find_spec("geopandas") is not None:
        pytest.skip("geopandas is installed: the missing-extra error cannot be shown")
    path = tmp_path / "layer.gpkg"
    path.write_bytes(b"")
    with pytest.raises(ImportError, match=r"geolink\[geo\]"):
        read_features(path)
