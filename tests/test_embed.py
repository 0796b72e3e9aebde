"""``geolink embed`` on real data: the official example tiles written as GeoTIFFs (native size in EPSG:4326, resized
2 × 2, reprojected to UTM), their per-type GeoJSON files as the OSM source, and the bundled tiny demo model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely

from tests.conftest import shared_path

rasterio = pytest.importorskip("rasterio")
pq = pytest.importorskip("pyarrow.parquet")

from geolink.embed import EmbedConfig, embed, grid_windows  # noqa: E402
from geolink.embed.windows import window_offsets  # noqa: E402

FI = "a472140250_FI_21"  # polygons, lines and points
US = "a702502933_US_21"
UTM_FI = "EPSG:32634"  # lon 21° E


def tile_folder(name: str) -> Path:
    return shared_path("official_examples", "osm_tiles", name)


def geojsons(name: str) -> list[str]:
    return [str(p) for p in sorted(tile_folder(name).glob("*.geojson"))]


def write_tile(name: str, out: Path, factor: int = 1, crs: str | None = None) -> Path:
    """The tile's JPEG as a GeoTIFF over its meta.json bbox (EPSG:4326), resized ``factor`` × or reprojected."""
    from PIL import Image
    from rasterio.transform import from_bounds
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    folder = tile_folder(name)
    west, south, east, north = json.loads((folder / "meta.json").read_text())["bbox_west_south_east_north"]
    image = Image.open(folder / f"{name}.jpg").convert("RGB")
    if factor != 1:
        image = image.resize((image.width * factor, image.height * factor), Image.BICUBIC)
    pixels = np.asarray(image).transpose(2, 0, 1)
    transform = from_bounds(west, south, east, north, pixels.shape[2], pixels.shape[1])
    profile = {"driver": "GTiff", "count": 3, "dtype": "uint8", "crs": "EPSG:4326", "transform": transform,
               "width": pixels.shape[2], "height": pixels.shape[1]}
    if crs is not None:
        dst_transform, width, height = calculate_default_transform("EPSG:4326", crs, pixels.shape[2],
                                                                   pixels.shape[1], west, south, east, north)
        target = np.zeros((3, height, width), dtype=np.uint8)
        reproject(pixels, target, src_transform=transform, src_crs="EPSG:4326", dst_transform=dst_transform,
                  dst_crs=crs, resampling=Resampling.bilinear)
        pixels = target
        profile.update(crs=crs, transform=dst_transform, width=width, height=height, nodata=0)
    with rasterio.open(out, "w", **profile) as dataset:
        dataset.write(pixels)
    return out


@pytest.fixture(scope="module", autouse=True)
def tag_cache(tmp_path_factory):
    """The on-disk tag-embedding cache of these tests: a temporary folder, not the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GEOLINK_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def rasters(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("rasters")
    return {"native": write_tile(FI, folder / "fi.tif"), "big": write_tile(FI, folder / "fi_2x2.tif", factor=2),
            "utm": write_tile(FI, folder / "fi_utm.tif", crs=UTM_FI), "us": write_tile(US, folder / "us.tif")}


def run(images, osm, out: Path, **options) -> tuple[dict, object]:
    import geopandas

    summary = embed(EmbedConfig(images=tuple(images), osm=tuple(osm), out=out, workers=options.pop("workers", 0),
                                quiet=True, **options))
    return summary, geopandas.read_parquet(out)


@pytest.fixture(scope="module")
def native_run(rasters, tmp_path_factory):
    out = tmp_path_factory.mktemp("native") / "fi.parquet"
    return run([rasters["native"], rasters["big"]], geojsons(FI), out) + (out,)


# -------------------------------------------------------------------------------------------------------- windows
@pytest.mark.parametrize("length", [1, 100, 224, 225, 282, 448, 500])
def test_window_offsets_cover_the_axis_with_the_last_shifted_inward(length):
    offsets = window_offsets(length, 224)
    assert offsets[0] == 0 and offsets == sorted(set(offsets))
    if length <= 224:
        assert offsets == [0]  # one (padded) window
    else:
        assert offsets[-1] + 224 == length  # ends at the edge
        assert all(b - a == 224 for a, b in zip(offsets[:-2], offsets[1:-1], strict=True))  # stride = tile
        assert 0 < offsets[-1] - offsets[-2] <= 224  # the last overlaps its neighbour (or abuts it)


def test_osm_coverage_counts_the_pixels_under_polygons_and_touched_by_lines_and_points():
    from rasterio.transform import from_origin

    from geolink.embed import Window, osm_coverage

    transform, window = from_origin(100, 50, 1, 1), Window(10, 20, 10)  # pixel (row 10, col 20) is at x 120, y 40
    half = shapely.box(120, 30, 125, 40)  # the window's left half
    assert osm_coverage([(half, "building:yes")], transform, window) == 0.5
    point = shapely.Point(128.5, 35.5)  # one pixel of the right half
    assert osm_coverage([(half, "a:b"), (point, "c:d")], transform, window) == 0.51
    assert osm_coverage([], transform, window) == 0.0


def test_the_table_has_one_row_per_window_with_footprints_in_the_raster_crs(native_run, rasters):
    summary, table, out = native_run
    expected = []
    for key in ("native", "big"):
        with rasterio.open(rasters[key]) as dataset:
            windows = grid_windows(dataset.height, dataset.width, 224)
            expected += [(str(rasters[key]), w.row, w.col, shapely.box(*w.bounds(dataset.transform))) for w in windows]
    assert [(r.image, r.row, r.col) for r in table.itertuples()] == [e[:3] for e in expected]
    for row, (*_, box) in zip(table.itertuples(), expected, strict=True):
        assert shapely.normalize(row.geometry).equals_exact(shapely.normalize(box), 1e-9)
    assert table.crs.to_epsg() == 4326
    assert summary["rows"] == len(table) == summary["fused"] + summary["image"]
    assert table["valid_fraction"].between(0, 1).all() and table["osm_coverage"].between(0, 1).all()
    # the native tile (192 px wide) is narrower than a window: padded, its valid fraction says so
    native = table[table.image == str(rasters["native"])]
    assert np.allclose(native.valid_fraction, 192 / 224)
    assert set(table["mode"]) <= {"fused", "image"}
    assert (table[table["mode"] == "fused"].num_nodes >= 1).all()
    info = json.loads(pq.read_schema(out).metadata[b"geolink"])
    assert info["model"] == "geolink_tiny.demo" and info["text_model"] == "minilm" and info["tile_size"] == 224
    assert "OpenStreetMap" in info["osm_attribution"] and "fusion(x, g)[-1].mean((2, 3))" in json.dumps(info)
    geo = json.loads(pq.read_schema(out).metadata[b"geo"])
    assert geo["version"] == "1.1.0" and geo["columns"]["geometry"]["covering"]["bbox"]["xmin"] == ["bbox", "xmin"]


def test_one_window_rebuilt_by_hand_with_the_public_api_gives_the_stored_embedding(native_run, rasters):
    """rasterio window read → normalise → OSMGraphBuilder → fusion encoder, by hand, against the file."""
    import torch
    from rasterio.windows import Window

    from geolink.graph.build import OSMGraphBuilder
    from geolink.graph.readers import read_geojson
    from geolink.registry import load_model, resolve_data_config, tag_encoder_for
    from geolink.runtime import normalise

    _, table, _ = native_run
    row = table[(table.image == str(rasters["big"])) & (table["mode"] == "fused")].iloc[-1]  # an edge window
    with rasterio.open(rasters["big"]) as dataset:
        pixels = dataset.read(window=Window(row.col, row.row, 224, 224))
        bounds = rasterio.windows.bounds(Window(row.col, row.row, 224, 224), dataset.transform)
    data = resolve_data_config("geolink_tiny.demo")
    image = normalise(torch.from_numpy(pixels), data["mean"], data["std"])[None]
    features = [f for path in geojsons(FI) for f in read_geojson(path)[0]
                if f[0].intersects(shapely.box(*bounds))]
    graph = OSMGraphBuilder(tag_encoder=tag_encoder_for("geolink_tiny.demo"), tag_weights="official").build(
        features, bbox=bounds, crs="EPSG:4326")
    fusion = load_model("geolink_tiny.demo", component="fusion").eval()
    with torch.no_grad():
        expected = fusion(image, graph)[-1].mean((2, 3))[0].numpy()
    assert row.num_nodes == sum(graph[t].num_nodes for t in ("polygon", "line", "point"))
    np.testing.assert_allclose(np.asarray(row.embedding, dtype=np.float32), expected, rtol=1e-4, atol=1e-5)


def test_utm_raster_and_a_mixed_crs_job(rasters, tmp_path):
    summary, table = run([rasters["utm"]], geojsons(FI), tmp_path / "utm.parquet")
    assert table.crs.to_epsg() == 32634 and summary["fused"] >= 1
    with rasterio.open(rasters["utm"]) as dataset:
        footprint = shapely.box(*dataset.bounds)
    assert shapely.union_all(table.geometry.values).buffer(1e-6).covers(footprint)
    # two CRSs in one job: one file, footprints reprojected to lon/lat (documented)
    _, mixed = run([rasters["native"], rasters["utm"]], geojsons(FI), tmp_path / "mixed.parquet")
    assert mixed.crs.to_string() == "OGC:CRS84"
    west, south, east, north = json.loads((tile_folder(FI) / "meta.json").read_text())["bbox_west_south_east_north"]
    assert shapely.box(west, south, east, north).buffer(1e-3).covers(shapely.union_all(mixed.geometry.values))
    # the same place gives the same graph size in either CRS (window footprints differ, so only roughly)
    assert set(mixed["mode"]) == {"fused"}


def test_without_osm_every_window_is_image_mode_with_the_image_encoder_embedding(rasters, tmp_path):
    import torch

    from geolink.registry import load_model, resolve_data_config
    from geolink.runtime import normalise

    summary, table = run([rasters["native"]], ["none"], tmp_path / "none.parquet")
    assert set(table["mode"]) == {"image"} and (table.num_nodes == 0).all() and (table.osm_coverage == 0).all()
    assert summary["image"] == len(table) and "image_embedding" not in table.columns
    with rasterio.open(rasters["native"]) as dataset:
        pixels = np.zeros((3, 224, 224), dtype=np.uint8)
        pixels[:, :, :dataset.width] = dataset.read(window=rasterio.windows.Window(0, 0, dataset.width, 224))
    data = resolve_data_config("geolink_tiny.demo")
    image = normalise(torch.from_numpy(pixels), data["mean"], data["std"])[None]
    encoder = load_model("geolink_tiny.demo", component="image").eval()
    with torch.no_grad():
        expected = encoder.forward_features(image)[0, 1:].mean(0).numpy()
    np.testing.assert_allclose(np.asarray(table.embedding.iloc[0], dtype=np.float32), expected, rtol=1e-4, atol=1e-5)
    assert len(expected) == 192


def test_auto_mode_falls_back_to_image_below_min_nodes_and_keeps_both_widths(native_run, rasters, tmp_path):
    counts = sorted(set(native_run[1][native_run[1].image == str(rasters["big"])].num_nodes))
    assert len(counts) > 1, "the windows of the 2 x 2 tile should differ in node count"
    threshold = counts[-1]  # only the busiest windows stay fused
    _, table = run([rasters["big"]], geojsons(FI), tmp_path / "auto.parquet", min_nodes=threshold)
    fused, image = table[table["mode"] == "fused"], table[table["mode"] == "image"]
    assert len(fused) and len(image)
    assert (fused.num_nodes >= threshold).all() and (image.num_nodes < threshold).all()
    assert fused.image_embedding.isna().all() and image.embedding.isna().all()
    assert {len(v) for v in fused.embedding} == {128} and {len(v) for v in image.image_embedding} == {192}


def test_duckdb_reads_the_output(native_run):
    duckdb = pytest.importorskip("duckdb")
    _, table, out = native_run
    rows = duckdb.sql(f"SELECT mode, count(*) AS n, avg(num_nodes) FROM read_parquet('{out}') GROUP BY mode "
                      "ORDER BY mode").fetchall()
    assert {mode: n for mode, n, _ in rows} == table["mode"].value_counts().to_dict()


def test_worker_processes_give_the_same_table(native_run, rasters, tmp_path):
    _, table, _ = native_run
    _, parallel = run([rasters["native"], rasters["big"]], geojsons(FI), tmp_path / "w2.parquet", workers=2,
                      batch_size=3)
    assert parallel.drop(columns=["embedding", "image_embedding"], errors="ignore").equals(
        table.drop(columns=["embedding", "image_embedding"], errors="ignore"))
    np.testing.assert_allclose(np.stack(parallel.embedding), np.stack(table.embedding), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- resume, overwrite
def test_a_killed_run_resumed_gives_the_uninterrupted_table(native_run, rasters, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from geolink.errors import ConfigError

    _, table, _ = native_run
    out = tmp_path / "killed.parquet"
    command = [sys.executable, "-m", "geolink.cli", "embed", str(rasters["native"]), str(rasters["big"]), "--osm",
               *geojsons(FI), "--out", str(out), "--workers", "0", "--batch-size", "1", "--part-size", "1", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = out.with_name(out.name + ".parts")
    deadline = time.monotonic() + 240
    while not list(parts.glob("part-*.parquet")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    committed = len(list(parts.glob("part-*.parquet")))
    assert 1 <= committed < len(table), "the run should be killed after its first part and before its end"
    assert not out.exists()
    with pytest.raises(ConfigError, match="resume"):  # never reused silently
        run([rasters["native"], rasters["big"]], geojsons(FI), out)
    summary, resumed = run([rasters["native"], rasters["big"]], geojsons(FI), out, resume=True)
    assert summary["resumed_windows"] == committed and summary["fused"] + summary["image"] == len(table) - committed
    assert resumed.drop(columns="embedding").equals(table.drop(columns="embedding"))
    np.testing.assert_allclose(np.stack(resumed.embedding), np.stack(table.embedding), rtol=1e-4, atol=1e-5)
    assert not parts.exists()


def test_an_existing_output_is_refused_then_moved_aside_with_overwrite(rasters, tmp_path):
    from geolink.errors import ConfigError

    out = tmp_path / "o.parquet"
    out.write_bytes(b"an earlier result")
    with pytest.raises(ConfigError, match="already exists"):
        run([rasters["native"]], ["none"], out)
    with pytest.warns(UserWarning, match="moved to"):
        _, table = run([rasters["native"]], ["none"], out, overwrite=True)
    assert (tmp_path / "o.parquet.previous-1" / "o.parquet").read_bytes() == b"an earlier result"
    assert len(table) == 2
    summary = embed(EmbedConfig(images=(rasters["native"],), osm=("none",), out=out, resume=True, quiet=True))
    assert summary["note"] == "already complete"


# --------------------------------------------------------------------------------------------------- bad inputs
def write_raster(path: Path, count: int = 3, dtype: str = "uint8", crs: str | None = "EPSG:32634",
                 size: int = 300) -> Path:
    from rasterio.transform import from_origin

    pixels = (np.arange(count * size * size) % 251).reshape(count, size, size).astype(dtype)
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=count, dtype=dtype, crs=crs,
                       transform=from_origin(500000, 7000000, 1, 1)) as dataset:
        dataset.write(pixels)
    return path


def test_bad_rasters_get_one_error_naming_the_file(tmp_path):
    from geolink.embed.windows import inspect_raster
    from geolink.errors import DataError, InputError

    cases = {"no_crs.tif": ({"crs": None}, InputError, "has no CRS"),
             "four_bands.tif": ({"count": 4}, InputError, "gives 4 band"),
             "complex.tif": ({"dtype": "complex64"}, InputError, "pixel type complex64")}
    for name, (options, error, words) in cases.items():
        path = write_raster(tmp_path / name, **options)
        with pytest.raises(error, match=words) as caught:
            inspect_raster(path, in_chans=3)
        assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    assert inspect_raster(tmp_path / "no_crs.tif", 3, crs="EPSG:32634").crs == "EPSG:32634"  # crs overrides
    assert inspect_raster(tmp_path / "four_bands.tif", 3, bands=(3, 2, 1)).bands == (3, 2, 1)
    garbage = tmp_path / "garbage.tif"
    garbage.write_bytes(b"II*\x00 this is not a GeoTIFF" * 10)
    with pytest.raises(DataError, match="garbage.tif cannot be read as a raster"):
        inspect_raster(garbage, 3)
    with pytest.raises(InputError, match="pass scale"):  # integer pixels other than uint8 need a scale
        from geolink.embed.windows import scale_for

        scale_for("uint16", None, tmp_path / "x.tif")


def test_the_command_line_prints_one_line_for_a_raster_without_crs(tmp_path, capsys):
    from geolink.cli import main

    path = write_raster(tmp_path / "no_crs.tif", crs=None)
    code = main(["embed", str(path), "--osm", "none", "--out", str(tmp_path / "o.parquet"), "--workers", "0",
                 "--quiet"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and str(path) in errors[0] and "pass crs" in errors[0]


def test_a_damaged_raster_stops_the_job_unless_keep_going(rasters, tmp_path):
    from geolink.errors import DataError

    good = write_raster(tmp_path / "good.tif", size=300)
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    garbage = tmp_path / "garbage.tif"
    garbage.write_bytes(b"not a raster at all")
    with pytest.raises(DataError, match="truncated.tif is damaged"):
        run([good, truncated], ["none"], tmp_path / "stop.parquet")
    with pytest.warns(UserWarning, match="keep_going"):
        summary, table = run([good, truncated, garbage], ["none"], tmp_path / "go.parquet", keep_going=True,
                             overwrite=True)
    assert summary["failed_rasters"] == 1 and summary["failed_windows"] == 4  # 300 px: 2 x 2 windows each
    assert set(table.image) == {str(good)} and len(table) == 4


def test_osm_that_misses_the_rasters_warns_and_embeds_images_alone(rasters, tmp_path):
    with pytest.warns(UserWarning, match="do not overlap image"):
        summary, table = run([rasters["us"]], geojsons(FI), tmp_path / "miss.parquet")
    assert set(table["mode"]) == {"image"} and summary["fused"] == 0 and (table.num_nodes == 0).all()


def test_an_empty_osm_source_warns_and_an_unreadable_one_is_an_error(tmp_path):
    from geolink.embed import OSMSources
    from geolink.errors import DataError

    empty = tmp_path / "empty.geojson"
    empty.write_text('{"type": "FeatureCollection", "features": []}')
    with pytest.warns(UserWarning, match="empty.geojson holds no feature"):
        assert len(OSMSources([empty])) == 0
    broken = tmp_path / "broken.geojson"
    broken.write_text("")
    with pytest.raises(DataError, match=r"broken\.geojson (cannot be read|is not valid JSON)"):
        OSMSources([broken])


# ------------------------------------------------------------------------------------------- shards and engines
def test_shards_split_the_windows_without_overlap_and_cover_the_job(native_run, rasters, tmp_path):
    from geolink.graph.tiles import TileShard

    _, table, _ = native_run
    shards = [run([rasters["native"], rasters["big"]], geojsons(FI), tmp_path / f"s{i}.parquet",
                  shard=TileShard(i, 2))[1] for i in range(2)]
    keys = [set(zip(s.image, s.row, s.col, strict=True)) for s in shards]
    assert not keys[0] & keys[1] and keys[0] | keys[1] == set(zip(table.image, table.row, table.col, strict=True))
    assert {len(k) for k in keys} == {len(table) // 2}


def test_the_ray_engine_gives_the_local_table(native_run, rasters, tmp_path):
    ray = pytest.importorskip("ray")
    _, table, _ = native_run
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary, distributed = run([rasters["native"], rasters["big"]], geojsons(FI), tmp_path / "ray.parquet",
                                   engine="ray", workers=1, batch_size=4)
    finally:
        ray.shutdown()
    assert summary["rows"] == len(table)
    distributed = distributed.sort_values(["image", "row", "col"]).reset_index(drop=True)
    local = table.sort_values(["image", "row", "col"]).reset_index(drop=True)
    assert distributed.drop(columns="embedding").equals(local.drop(columns="embedding"))
    np.testing.assert_allclose(np.stack(distributed.embedding), np.stack(local.embedding), rtol=1e-4, atol=1e-5)


def test_maps_are_georeferenced_pca_quicklooks_on_the_patch_grid(rasters, tmp_path):
    summary, _ = run([rasters["big"]], geojsons(FI), tmp_path / "maps.parquet", maps=tmp_path / "maps")
    [path] = summary["maps"]
    with rasterio.open(rasters["big"]) as raster, rasterio.open(path) as quicklook:
        assert quicklook.count == 3 and quicklook.crs == raster.crs
        assert (quicklook.height, quicklook.width) == (-(-raster.height // 16), -(-raster.width // 16))
        assert np.allclose([quicklook.transform.a, quicklook.transform.e],
                           [raster.transform.a * 16, raster.transform.e * 16])
        assert np.allclose(quicklook.bounds[0::3], raster.bounds[0::3])  # same west / north corner
        pixels = quicklook.read()
    assert (pixels >= 1).all(), "every patch cell of the raster is covered by a window"
    assert len(np.unique(pixels.reshape(3, -1), axis=1).T) > 10  # the features vary over the scene
