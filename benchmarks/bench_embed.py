"""``geolink embed`` benchmarks (issue 11): pipeline efficiency, windows/s against a naive per-window loop, and peak
memory at 1× and 4× the raster area.

Input: a SYNTHETIC raster (smooth random uint8 RGB, EPSG:3067) over a square in the middle of the Helsinki PBF's
bbox (``../shared/data/osm/helsinki.osm.pbf``, the OSM source); 1× is 3 × 3 windows of 224 px (``--quick``) or 8 × 8,
4× the same square at twice the resolution (4× the pixels and windows).

Measures, side by side in one run (median (min–max) over ``--runs``):

- pipeline efficiency = time of the encoders' forward on the same windows (model alone: the same batches, already
  read and built, same batch size) / end-to-end ``geolink embed`` time on them, for the release architecture
  (``geolink_vit_large_patch16_224``, random weights saved to a temporary folder) and the bundled tiny model. Two
  figures: against the whole job (model loading, OSM reading and tag embedding included) and against its window loop
  (``total_s - setup_s``: the part that grows with the raster);
- windows/s of ``geolink embed`` against a naive loop (per window: open the raster, read the PBF for the window's
  bbox, build the graph, encode it alone), tiny model;
- peak RSS (main process + DataLoader workers, each run in a fresh process) at 1× and 4× the area, tiny model.

Run from the repository root: ``python benchmarks/bench_embed.py --quick`` (minutes on 2 cores) or without
``--quick`` (8 × 8 windows, ``--runs 3``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import SHARED, describe_run, spread

from geolink.embed import EmbedConfig, embed
from geolink.embed.dataset import EmbedDataset, OSMSources, collate_windows
from geolink.embed.encoder import load_window_encoder
from geolink.embed.windows import inspect_raster

PBF = SHARED / "osm" / "helsinki.osm.pbf"
CENTRE = (24.9443, 60.1716)  # the middle of the PBF's bbox (lon, lat)
SIDE_M = 1000.0


def synthetic_raster(path: Path, pixels: int, seed: int = 0) -> Path:
    """A SYNTHETIC ``pixels`` × ``pixels`` uint8 RGB GeoTIFF (EPSG:3067), a ``SIDE_M`` square around ``CENTRE``."""
    import pyproj
    import rasterio
    from rasterio.transform import from_origin

    x, y = pyproj.Transformer.from_crs("EPSG:4326", "EPSG:3067", always_xy=True).transform(*CENTRE)
    gsd = SIDE_M / pixels
    rng = np.random.default_rng(seed)
    profile = {"driver": "GTiff", "width": pixels, "height": pixels, "count": 3, "dtype": "uint8",
               "crs": "EPSG:3067", "transform": from_origin(x - SIDE_M / 2, y + SIDE_M / 2, gsd, gsd),
               "tiled": True, "blockxsize": 256, "blockysize": 256}
    with rasterio.open(path, "w", **profile) as dataset:
        for _, window in dataset.block_windows(1):
            rows = np.arange(window.row_off, window.row_off + window.height)[:, None]
            cols = np.arange(window.col_off, window.col_off + window.width)[None, :]
            base = 128 + 60 * np.sin(rows / 37.0) * np.cos(cols / 53.0)
            block = np.stack([base + rng.normal(0, 20, base.shape) for _ in range(3)])
            dataset.write(np.clip(block, 0, 255).astype(np.uint8), window=window)
    return path


def release_model_folder(folder: Path) -> Path:
    """``geolink_vit_large_patch16_224`` with random weights (MiniLM-width tags), saved for ``--model``."""
    import geolink

    if not (folder / "config.json").is_file():
        model = geolink.create_model("geolink_vit_large_patch16_224", component="fusion", osm={"text_dim": 384})
        model.save_pretrained(folder)
    return folder


def config_for(raster: Path, out: Path, model: str, batch_size: int, workers: int) -> EmbedConfig:
    """A job config; also forgets the models loaded by earlier jobs of this process, so that every timed job loads
    its model and text model as a fresh ``geolink embed`` does."""
    from geolink.embed import encoder, job

    encoder._fusion_model.cache_clear()
    job._tag_encoder.cache_clear()
    return EmbedConfig(images=(raster,), osm=(str(PBF),), out=out, model=model, text_model="minilm",
                       batch_size=batch_size, workers=workers, device="cpu", precision="fp32", quiet=True,
                       overwrite=True)


def encoder_only_seconds(raster: Path, model: str, batch_size: int) -> float:
    """The model alone on the job's windows: every batch read and built first, then only the forwards timed."""
    from geolink.graph.text import TagEncoder

    encoder, data = load_window_encoder(model, "cpu", "fp32")
    info = inspect_raster(raster, 3)
    sources = OSMSources([PBF], bbox=(CENTRE[0] - 0.02, CENTRE[1] - 0.01, CENTRE[0] + 0.02, CENTRE[1] + 0.01))
    dataset = EmbedDataset([info], 224, data["mean"], data["std"], sources=sources,
                           tag_encoder=TagEncoder("minilm", device="cpu"))
    batches = [collate_windows([dataset[k] for k in range(start, min(start + batch_size, len(dataset)))])
               for start in range(0, len(dataset), batch_size)]
    start = time.perf_counter()
    for images, graphs, metas in batches:
        encoder(images, graphs, [m["mode"] for m in metas if not m["skipped"]])
    return time.perf_counter() - start


def naive_seconds(raster: Path, model: str) -> tuple[float, int]:
    """Per window: open the raster, read the PBF for the window, build, encode alone (the model loaded once)."""
    import rasterio
    from rasterio.windows import Window

    from geolink.graph.build import OSMGraphBuilder
    from geolink.graph.readers import read_osm, reproject, reproject_bbox
    from geolink.graph.text import TagEncoder
    from geolink.runtime import normalise

    encoder, data = load_window_encoder(model, "cpu", "fp32")
    builder = OSMGraphBuilder(tag_encoder=TagEncoder("minilm", device="cpu"), tag_weights="official")
    info = inspect_raster(raster, 3)
    from geolink.embed.windows import grid_windows

    windows = grid_windows(info.height, info.width, 224)
    start = time.perf_counter()
    for window in windows:
        with rasterio.open(raster) as dataset:
            pixels = dataset.read(window=Window(window.col, window.row, 224, 224))
            crs = dataset.crs.to_string()
        bounds = window.bounds(info.transform)
        features = list(read_osm(PBF, bbox=reproject_bbox(bounds, crs, "EPSG:4326")))
        geoms = reproject(np.array([g for g, _ in features], dtype=object), "EPSG:4326", crs) if features else []
        graph = builder.build(list(zip(geoms, (t for _, t in features), strict=True)), bbox=bounds, crs=crs)
        image = normalise(torch.from_numpy(pixels), data["mean"], data["std"])[None]
        nodes = sum(graph[t].num_nodes for t in ("polygon", "line", "point"))
        encoder(image, [graph], ["fused" if nodes else "image"])
    return time.perf_counter() - start, len(windows)


PEAK_SCRIPT = """
import json, resource, sys
from pathlib import Path
from geolink.embed import EmbedConfig, embed
summary = embed(EmbedConfig(images=(Path(sys.argv[1]),), osm=(sys.argv[2],), out=Path(sys.argv[3]), text_model="minilm",
                            workers=int(sys.argv[4]), device="cpu", precision="fp32", quiet=True, overwrite=True))
own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"windows": summary["rows"], "main_mb": own, "worker_mb": children}))
"""


def peak_rss(raster: Path, out: Path, workers: int) -> dict:
    """Peak RSS of a fresh ``embed`` process (main, and the largest DataLoader worker)."""
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(raster), str(PBF), str(out), str(workers)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 x 3 windows at 1x (else 8 x 8), one run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-large", action="store_true", help="skip the ViT-L efficiency")
    args = parser.parse_args()
    runs = 1 if args.quick else args.runs
    side = 3 * 224 if args.quick else 8 * 224
    print(describe_run())
    print(f"input: SYNTHETIC {side} x {side} px raster over central Helsinki (EPSG:3067), OSM: {PBF.name}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        one = synthetic_raster(tmp / "synthetic_1x.tif", side)
        four = synthetic_raster(tmp / "synthetic_4x.tif", 2 * side)
        models = {"tiny (geolink_tiny.demo)": "geolink_tiny.demo"}
        if not args.skip_large:
            models["release ViT-L (random weights)"] = str(release_model_folder(tmp / "vitl"))
        print("\n| model | windows | encoder alone s | embed total s | embed window loop s | efficiency (total) | "
              "efficiency (loop) |\n|---|---:|---:|---:|---:|---:|---:|")
        for name, model in models.items():
            alone = [encoder_only_seconds(one, model, args.batch_size) for _ in range(runs)]
            totals, loops, windows = [], [], 0
            for _ in range(runs):
                summary = embed(config_for(one, tmp / "o.parquet", model, args.batch_size, args.workers))
                totals.append(summary["total_s"])
                loops.append(summary["total_s"] - summary["setup_s"])
                windows = summary["rows"]
            a = float(np.median(alone))
            print(f"| {name} | {windows} | {spread(alone)} | {spread(totals)} | {spread(loops)} | "
                  f"{a / float(np.median(totals)):.2f} | {a / float(np.median(loops)):.2f} |")
        naive = [naive_seconds(one, "geolink_tiny.demo") for _ in range(runs)]
        loops, totals = [], []
        for _ in range(runs):
            summary = embed(config_for(one, tmp / "o.parquet", "geolink_tiny.demo", args.batch_size, args.workers))
            loops.append(summary["rows"] / (summary["total_s"] - summary["setup_s"]))
            totals.append(summary["rows"] / summary["total_s"])
        naive_rates = [count / seconds for seconds, count in naive]
        print("\n| tiny model, 1x | windows/s | vs naive |\n|---|---:|---:|")
        print(f"| naive per-window loop | {spread(naive_rates)} | 1.0× |")
        print(f"| geolink embed, window loop | {spread(loops)} | "
              f"{np.median(loops) / np.median(naive_rates):.1f}× |")
        print(f"| geolink embed, whole job | {spread(totals)} | {np.median(totals) / np.median(naive_rates):.1f}× |")
        print(f"\n| raster (tiny model, workers={args.workers}) | windows | peak RSS main MB | "
              "peak RSS largest worker MB |\n|---|---:|---:|---:|")
        for label, raster in (("1x", one), ("4x", four)):
            peak = peak_rss(raster, tmp / f"peak_{label}.parquet", args.workers)
            print(f"| {label} | {peak['windows']} | {peak['main_mb']:.0f} | {peak['worker_mb']:.0f} |")


if __name__ == "__main__":
    main()
