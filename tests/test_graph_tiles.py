"""Tiling, the region index, and the build-graphs job: typed config, sharding, resuming, merging, CRSs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from shapely.geometry import Point, box

from geolink.cli import main
from geolink.data.folders import GraphFolder
from geolink.demo import TILES
from geolink.errors import ConfigError, DataError, InputError, MissingInputError
from geolink.graph.build import OSMGraphBuilder
from geolink.graph.readers import read_geojson, read_osm, reproject
from geolink.graph.schema import EDGE_TYPES, NODE_TYPES, validate_graph
from geolink.graph.storage import load_graph
from geolink.graph.tags import TagVocabulary
from geolink.graph.tiles import (
    BuildGraphsConfig,
    RegionIndex,
    TileShard,
    TileSize,
    TileUnit,
    build_graphs,
    footprint_tiles,
    geotiff_bounds,
    grid_tiles,
    read_region,
)

HELSINKI_SMALL = (24.940, 60.166, 24.950, 60.172)


def test_tile_size_from_string():
    assert TileSize.from_string("200m") == TileSize(200, TileUnit.METRES)
    assert TileSize.from_string(" 1.5km ") == TileSize(1500, TileUnit.METRES)
    assert TileSize.from_string("0.002deg") == TileSize.from_string("0.002°") == TileSize(0.002, TileUnit.DEGREES)
    assert TileSize.from_string("0.5") == TileSize(0.5, TileUnit.DEGREES)  # a bare number is in degrees
    assert str(TileSize.from_string("1km")) == "1000m"
    for bad in ("big", "200 ft", "-3m", "", "m"):
        with pytest.raises(InputError, match="tile_size"):
            TileSize.from_string(bad)
    with pytest.raises(InputError, match="positive"):
        TileSize.from_string("0m")


def test_tile_shard_from_string():
    shard = TileShard.from_string(" 1 / 4 ")
    assert shard == TileShard(1, 4) and shard.suffix == ".shard-1-of-4" and str(shard) == "1/4"
    assert list(shard.positions(10)) == [1, 5, 9] and TileShard().suffix == ""
    for bad in ("4/4", "1-4", "a/b", "", "-1/4"):
        with pytest.raises(InputError, match="shard"):
            TileShard.from_string(bad)


def test_tiles_grid_and_footprints():
    tiles = grid_tiles((24.0, 60.0, 24.01, 60.005), tile_size=TileSize(200, TileUnit.METRES))
    assert tiles[0].name == "r000_c000" and tiles[0].bbox[3] == 60.005  # north-west first
    width_m = (tiles[0].bbox[2] - tiles[0].bbox[0]) * 111320 * np.cos(np.radians(60.0025))
    assert width_m == pytest.approx(200, rel=1e-6) and len(tiles) == 3 * 3
    assert max(t.bbox[2] for t in tiles) == 24.01 and min(t.bbox[1] for t in tiles) == 60.0
    grid = grid_tiles((0, 0, 4, 6), shape=(6, 4), crs="EPSG:32635")
    assert len(grid) == 24 and grid[5].bbox == (1.0, 4.0, 2.0, 5.0)
    with pytest.raises(InputError, match="projected"):
        grid_tiles((0, 0, 4, 6), tile_size=TileSize(0.5, TileUnit.DEGREES), crs="EPSG:32635")
    with pytest.raises(InputError, match="exactly one"):
        grid_tiles((0, 0, 1, 1))
    assert [t.bbox for t in footprint_tiles([(0, 0, 1, 1), box(1, 1, 2, 3)])] == [(0, 0, 1, 1), (1, 1, 2, 3)]


def test_build_graphs_config_validation(tmp_path):
    pbf = tmp_path / "city.osm.pbf"
    with pytest.raises(ConfigError, match="exactly one of pbf, vector and merge_shards"):
        BuildGraphsConfig(out=tmp_path)
    with pytest.raises(ConfigError, match="got pbf, vector"):
        BuildGraphsConfig(out=tmp_path, pbf=pbf, vector=tmp_path / "a.geojson")
    with pytest.raises(ConfigError, match="at most one of tile_size, grid and footprints.*tile_size, grid"):
        BuildGraphsConfig(out=tmp_path, pbf=pbf, tile_size=TileSize(200), grid=(2, 2))
    with pytest.raises(ConfigError, match="grid"):
        BuildGraphsConfig(out=tmp_path, pbf=pbf, grid=(0, 3))
    with pytest.raises(ConfigError, match="bbox.*not in degrees"):
        BuildGraphsConfig(out=tmp_path, pbf=pbf, bbox=(385000, 6672000, 386000, 6673000), crs="EPSG:3067")
    with pytest.raises(ConfigError, match="workers"):
        BuildGraphsConfig(out=tmp_path, pbf=pbf, workers=0)
    with pytest.raises(ConfigError, match="pooling must be one of official"):
        BuildGraphsConfig(out=tmp_path, pbf=pbf, pooling="max")
    config = BuildGraphsConfig(out=str(tmp_path), vector=str(tmp_path / "a.geojson"),
                               bbox=(385000, 6672000, 386000, 6673000), crs="EPSG:3067", keys=("building",))
    assert config.out == tmp_path and config.vector == tmp_path / "a.geojson"  # a bbox in crs with a vector source
    assert config.tag_filter().allow == frozenset({"building"})
    with pytest.raises(MissingInputError, match="a.geojson"):
        build_graphs(config)


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
    with pytest.raises(DataError, match="georeferencing"):
        geotiff_bounds(tmp_path / "plain.tif")
    with pytest.raises(MissingInputError, match="nothing.tif"):
        geotiff_bounds(tmp_path / "nothing.tif")


def test_region_index_one_query_per_tile():
    features = [(box(i, 0, i + 0.5, 0.5), f"building:{i}") for i in range(10)] + [(Point(5.2, 0.2), "a:b")]
    region = RegionIndex(features)
    assert region.indices_in((4.9, 0, 5.6, 1)).tolist() == [5, 10]
    assert [t for _, t in region.features_in((0, 0, 1.2, 1))] == ["building:0", "building:1"]


def test_read_region_reprojects_once(shared_data):
    pytest.importorskip("pyproj", reason="pip install geolink[osm]")
    vector = shared_data / "official_examples" / "osm_tiles" / "a702502933_US_21" / "a702502933_US_21_polygon.geojson"
    features = read_geojson(vector)[0]
    region = read_region(vector=vector, to_crs="EPSG:3857")
    assert region.crs == "EPSG:3857" and len(region) == len(features)
    expected = reproject(np.array([g for g, _ in features], dtype=object), "EPSG:4326", "EPSG:3857")
    assert all(a.equals_exact(b, 1e-6) for a, b in zip(region.geoms, expected, strict=True))
    assert read_region(vector=vector).crs == "EPSG:4326"
    with pytest.raises(InputError, match="exactly one OSM source"):
        read_region()
    with pytest.raises(MissingInputError, match="missing.geojson"):
        read_region(vector=vector.with_name("missing.geojson"))


@pytest.fixture(scope="module")
def built_folder(shared_data, minilm_path, tmp_path_factory):
    pytest.importorskip("osmium", reason="pip install geolink[osm]")
    out = tmp_path_factory.mktemp("graphs")
    pbf = str(shared_data / "osm" / "helsinki.osm.pbf")
    args = ["build-graphs", "--pbf", pbf, "--bbox", *map(str, HELSINKI_SMALL), "--grid", "2", "3", "--out", str(out),
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
    region = RegionIndex(read_osm(pbf, bbox=HELSINKI_SMALL))
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



def test_build_graphs_resume_repairs_a_torn_index_line(built_folder, tmp_path, capsys):
    """A build killed in the middle of its index append: the rerun drops the torn line with a warning naming the
    file, rebuilds that tile and ends with the same index and tiles as the uninterrupted run."""
    out, _, args = built_folder
    copy = tmp_path / "graphs"
    shutil.copytree(out, copy)
    index = copy / "index.jsonl"
    lines = index.read_text().splitlines(keepends=True)
    index.write_text("".join(lines[:-1]) + lines[-1][:25])
    (copy / json.loads(lines[-1])["file"]).unlink()
    with pytest.warns(UserWarning, match="dropped a torn last line"):
        GraphFolder(copy)
    args = [copy if a == str(out) else a for a in args]
    assert main([str(a) for a in args]) == 0
    assert f"{index}: dropped a torn last line" in capsys.readouterr().err
    assert index.read_text() == "".join(lines)
    assert sorted(p.name for p in (copy / "tiles").iterdir()) == sorted(p.name for p in (out / "tiles").iterdir())
    for tile in (out / "tiles").iterdir():  # byte for byte (one safetensors layout, batch-independent embeddings)
        assert (copy / "tiles" / tile.name).read_bytes() == tile.read_bytes()
    assert len(GraphFolder(copy)) == 6


def test_interrupted_build_graphs_resumes_to_the_same_bytes(built_folder, tmp_path):
    """Stopped after 1 tile, then after 2 more, then resumed to the end (new processes' worth of encoders, cold
    caches): every file of the folder (tiles, vocabulary, embedding table, index) is byte for byte the uninterrupted
    build's."""
    out, _, args = built_folder
    resumed = tmp_path / "resumed"
    args = [a if a != str(out) else str(resumed) for a in args]
    for stop in (["--max-tiles", "1"], ["--max-tiles", "2"], []):
        assert main(args + stop) == 0
        if stop:
            assert len((resumed / "index.jsonl").read_text().splitlines()) in (1, 3)

    def files(folder):
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    want, got = files(out), files(resumed)
    assert sorted(got) == sorted(want) and "vocab.safetensors" in got and len(got) == 9
    assert [name for name in want if got[name] != want[name]] == []


def test_build_graphs_shards_and_workers(built_folder, tmp_path, minilm_encoder):
    out, pbf, _ = built_folder
    sharded = tmp_path / "sharded"
    base = {"pbf": pbf, "bbox": HELSINKI_SMALL, "grid": (2, 3), "out": sharded, "quiet": True}
    assert build_graphs(BuildGraphsConfig(**base, shard=TileShard(0, 2), workers=2))["built"] == 3
    assert build_graphs(BuildGraphsConfig(**base, shard=TileShard(1, 2)))["built"] == 3
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
    assert_same_graphs(GraphFolder(sharded, tag_encoder=minilm_encoder), GraphFolder(out))


def assert_same_graphs(folder, expected):
    """The same tiles in the same order, with the same node features, positions and edges (the vocabularies of a
    sharded build are ordered differently, so stored tag ids may differ)."""
    assert len(folder) == len(expected) == 6
    for k in range(len(expected)):
        a, b = folder[k], expected[k]
        assert a.name == b.name
        for t in NODE_TYPES:
            torch.testing.assert_close(a[t].x, b[t].x, rtol=1e-5, atol=1e-6)
            assert torch.equal(a[t].pos, b[t].pos)
        for e in EDGE_TYPES:
            assert torch.equal(a[e].edge_index, b[e].edge_index)


def test_build_graphs_on_a_local_ray_instance_gives_the_local_folder(built_folder, tmp_path, minilm_path):
    """engine ray: one shard per Ray task, merged on the driver: the same tiles and node features as the local build;
    a rerun of the finished folder builds nothing."""
    ray = pytest.importorskip("ray")
    out, pbf, _ = built_folder
    distributed = tmp_path / "ray"
    config = BuildGraphsConfig(pbf=pbf, bbox=HELSINKI_SMALL, grid=(2, 3), out=distributed, text_model=str(minilm_path),
                               engine="ray", workers=2, quiet=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = build_graphs(config)
        assert summary["shards"] == 2 and summary["built"] == 6
        assert build_graphs(config)["built"] == 0
    finally:
        ray.shutdown()
    assert not list(distributed.glob("*shard*"))
    assert_same_graphs(GraphFolder(distributed), GraphFolder(out))


def test_engine_ray_refuses_a_shard():
    with pytest.raises(ConfigError, match="engine ray splits the tiles itself"):
        BuildGraphsConfig(pbf=Path("x.osm.pbf"), out=Path("o"), engine="ray", shard=TileShard(0, 2))


def test_build_graphs_projected_crs(shared_data, tmp_path):
    pytest.importorskip("osmium", reason="pip install geolink[osm]")
    pytest.importorskip("pyproj", reason="pip install geolink[osm]")
    out = tmp_path / "utm"
    pbf = shared_data / "osm" / "helsinki.osm.pbf"
    summary = build_graphs(BuildGraphsConfig(out=out, pbf=pbf, bbox=HELSINKI_SMALL, tile_size=TileSize(300),
                                             crs="EPSG:3067", quiet=True))
    entries = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert summary["built"] == len(entries) == 6
    west, south, east, north = entries[0]["bbox"]
    assert entries[0]["crs"] == "EPSG:3067" and east - west == pytest.approx(300) and west > 1e5
    graph = load_graph(out / entries[0]["file"])
    assert graph.crs == "EPSG:3067"
    # the nodes the input implies: the features of the tile, reprojected to the tile CRS, built directly
    features = list(read_osm(pbf, bbox=HELSINKI_SMALL))
    geoms = reproject(np.array([g for g, _ in features], dtype=object), "EPSG:4326", "EPSG:3067")
    region = RegionIndex(zip(geoms, (t for _, t in features), strict=True), "EPSG:3067")
    direct = OSMGraphBuilder(None).build(region.features_in(entries[0]["bbox"]), entries[0]["bbox"], "EPSG:3067",
                                         vocabulary=TagVocabulary(), materialize=False)
    for t in NODE_TYPES:
        assert graph[t].num_nodes == direct[t].num_nodes == entries[0]["nodes"][t] > 0, t
        assert torch.equal(graph[t].pos, direct[t].pos), t
        assert graph[t].pos.min() >= 0 and graph[t].pos.max() <= 1, t


def test_build_graphs_vector_and_footprints(shared_data, tmp_path, minilm_encoder):
    tile = shared_data / "official_examples" / "osm_tiles" / "a702502933_US_21"
    bbox = json.loads((tile / "meta.json").read_text())["bbox_west_south_east_north"]
    footprints = tmp_path / "footprints.json"
    footprints.write_text(json.dumps([bbox]))
    vector = tile / "a702502933_US_21_polygon.geojson"
    out = tmp_path / "vec"
    assert build_graphs(BuildGraphsConfig(out=out, vector=vector, footprints=(footprints,), quiet=True))["built"] == 1
    stored = GraphFolder(out, tag_encoder=minilm_encoder)[0]
    direct = OSMGraphBuilder(minilm_encoder).build(read_geojson(vector)[0], bbox=bbox)
    for t in NODE_TYPES:
        torch.testing.assert_close(stored[t].x, direct[t].x, rtol=1e-5, atol=1e-6)
    for e in EDGE_TYPES:
        assert torch.equal(stored[e].edge_index, direct[e].edge_index)
    with pytest.raises(MissingInputError, match="nowhere.json"):
        build_graphs(BuildGraphsConfig(out=out, vector=vector, footprints=(tmp_path / "nowhere.json",)))


def test_build_graphs_progress_names_each_stage(minilm_path, tmp_path, capsys):
    tile = "a472140250_FI_21"
    vector = TILES / tile / f"{tile}_polygon.geojson"
    out = tmp_path / "graphs"
    assert main(["build-graphs", "--vector", str(vector), "--grid", "2", "2", "--text-model", str(minilm_path),
                 "--out", str(out)]) == 0
    stderr = capsys.readouterr().err
    vocabulary = len(json.loads((out / "vocab.json").read_text())["strings"])
    # the last state of each bar: read (one file), geometry and write (4 tiles), tag embedding (every vocabulary tag)
    for stage, done in ((f"reading {vector.name}", "1/1"), ("geometry", "4/4"),
                        ("tag embedding", f"{vocabulary}/{vocabulary}"), ("write", "4/4")):
        assert re.search(rf"{re.escape(stage)}: 100%.*\b{done} ", stderr), f"no finished {stage!r} bar in {stderr!r}"
    assert stderr.index("reading") < stderr.index("geometry") < stderr.index("tag embedding") < stderr.index("write")
    assert main(["build-graphs", "--vector", str(vector), "--grid", "2", "2", "--out", str(tmp_path / "quiet"),
                 "--quiet"]) == 0
    assert capsys.readouterr().err == ""  # quiet: no bars
