"""Cutting a region into tiles and building every tile's graph into a folder.

Owns tile definitions (:class:`Tile`: a grid over a bbox by tile size in metres or degrees or by a rows × columns
count, image footprints, GeoTIFF bounds), the region-wide spatial index that hands each tile its features
(:class:`RegionIndex`: one STRtree for the whole region, one query per tile), and :func:`build_tiles`, the engine
of ``geolink build-graphs``: sharding, resumability, worker processes, the shared tag vocabulary and the index.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from geolink.graph.build import BBox, OSMGraphBuilder, PreparedTile, check_bbox
from geolink.graph.tags import TagVocabulary

_METRES_PER_DEGREE = 111_320.0


@dataclass(frozen=True)
class Tile:
    """One tile: a name (used as the file name), its bbox (west, south, east, north) and CRS."""

    name: str
    bbox: BBox
    crs: str = "EPSG:4326"


def parse_tile_size(size: str | float) -> tuple[float, str]:
    """``"200m"`` → (200, "m"); ``"0.002deg"`` / ``0.002`` → (0.002, "deg")."""
    if isinstance(size, int | float):
        return float(size), "deg"
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*(m|km|deg|°)?\s*", str(size))
    if not match:
        raise ValueError(f"tile size {size!r} not understood: use e.g. '200m', '1km' or '0.002deg'")
    value, unit = float(match.group(1)), match.group(2) or "deg"
    if unit == "km":
        value, unit = value * 1000, "m"
    if value <= 0:
        raise ValueError(f"tile size must be positive, got {size!r}")
    return value, "deg" if unit == "°" else unit


def grid_tiles(bbox: Iterable[float], tile_size: str | float | None = None, shape: tuple[int, int] | None = None,
               crs: str = "EPSG:4326") -> list[Tile]:
    """Tiles covering ``bbox`` row by row from the north-west corner, named ``r<row>_c<col>``.

    Args:
        bbox: the region (west, south, east, north) in ``crs``.
        tile_size: side length, ``"200m"`` or degrees; in a geographic CRS metres are converted at the region's
            central latitude (equirectangular). Edge tiles are cut at the region boundary.
        shape: (rows, columns) instead of ``tile_size``: the region split into equal tiles.
        crs: the region CRS.
    """
    west, south, east, north = check_bbox(bbox, crs)
    if (tile_size is None) == (shape is None):
        raise ValueError("pass exactly one of tile_size (e.g. '200m') and shape=(rows, columns)")
    if shape is not None:
        rows, cols = (int(v) for v in shape)
        if rows < 1 or cols < 1:
            raise ValueError(f"shape must be positive (rows, columns), got {shape}")
        xs, ys = np.linspace(west, east, cols + 1), np.linspace(north, south, rows + 1)
    else:
        value, unit = parse_tile_size(tile_size)
        geographic = str(crs).upper() in ("EPSG:4326", "OGC:CRS84", "CRS84")
        if unit == "m" and geographic:
            dy = value / _METRES_PER_DEGREE
            dx = dy / math.cos(math.radians((south + north) / 2))
        elif unit == "deg" and not geographic:
            raise ValueError(f"tile size in degrees but crs {crs!r} is projected: give the size in metres")
        else:
            dx = dy = value
        cols, rows = math.ceil((east - west) / dx - 1e-9), math.ceil((north - south) / dy - 1e-9)
        xs = np.minimum(west + dx * np.arange(cols + 1), east)
        ys = np.maximum(north - dy * np.arange(rows + 1), south)
    width = max(len(str(len(ys) - 2)), 3)
    return [Tile(f"r{r:0{width}d}_c{c:0{width}d}", (float(xs[c]), float(ys[r + 1]), float(xs[c + 1]), float(ys[r])),
                 str(crs)) for r in range(len(ys) - 1) for c in range(len(xs) - 1)]


def footprint_tiles(footprints: Iterable[Any], crs: str = "EPSG:4326", names: Sequence[str] | None = None
                    ) -> list[Tile]:
    """Tiles from image footprints: bboxes ``(west, south, east, north)``, shapely geometries (their bounds) or
    GeoTIFF paths (their bounds and CRS, see :func:`geotiff_bounds`)."""
    tiles = []
    for k, item in enumerate(footprints):
        tile_crs = crs
        if isinstance(item, str | Path):
            bbox, tile_crs = geotiff_bounds(item)
            name = Path(item).stem
        elif isinstance(item, shapely.Geometry):
            bbox, name = tuple(shapely.bounds(item)), f"tile_{k:06d}"
        else:
            bbox, name = tuple(item), f"tile_{k:06d}"
        if names is not None:
            name = names[k]
        tiles.append(Tile(name, check_bbox(bbox, tile_crs), tile_crs))
    return tiles


def geotiff_bounds(path: str | Path) -> tuple[BBox, str]:
    """Bounds (west, south, east, north) and CRS (``EPSG:<code>``) of a north-up GeoTIFF, read from its GeoTIFF tags
    with Pillow (no GDAL needed).

    Raises:
        ValueError: the file has no georeferencing (ModelPixelScale + ModelTiepoint) or is rotated.
    """
    from PIL import Image

    with Image.open(path) as image:
        tags = image.tag_v2
        width, height = image.size
        scale, tie = tags.get(33550), tags.get(33922)
        transform = tags.get(34264)
        keys = tags.get(34735)
    if transform is not None:
        a, b, _, c, d, e, _, f = (float(v) for v in list(transform)[:8])
        if b or d:
            raise ValueError(f"{path} is rotated; only north-up GeoTIFFs are supported")
        west, north, sx, sy = c, f, a, -e
    elif scale is not None and tie is not None:
        i, j, _, x, y, _ = (float(v) for v in list(tie)[:6])
        sx, sy = float(scale[0]), float(scale[1])
        west, north = x - i * sx, y + j * sy
    else:
        raise ValueError(f"{path} has no GeoTIFF georeferencing (ModelPixelScale/ModelTiepoint tags)")
    crs = "EPSG:4326"
    if keys is not None:
        values = [int(v) for v in keys]
        for n in range(1, values[3] + 1):
            key_id, location, _, value = values[4 * n:4 * n + 4]
            if key_id in (3072, 2048) and location == 0 and value not in (0, 32767):
                crs = f"EPSG:{value}"
                if key_id == 3072:
                    break
    return (west, north - height * sy, west + width * sx, north), crs


class RegionIndex:
    """All features of a region behind one STRtree; :meth:`features_in` returns a tile's candidates in input order.

    Args:
        features: ``(geometry, tags)`` pairs of the whole region (e.g. :func:`geolink.graph.io.read_osm`).
        crs: their CRS.
    """

    def __init__(self, features: Iterable[tuple[shapely.Geometry, Any]], crs: str = "EPSG:4326") -> None:
        pairs = list(features)
        self.geoms = np.array([g for g, _ in pairs], dtype=object) if pairs else np.zeros(0, dtype=object)
        self.tags = [t for _, t in pairs]
        self.crs = str(crs)
        self.tree = shapely.STRtree(self.geoms)

    def __len__(self) -> int:
        return len(self.geoms)

    @property
    def bounds(self) -> BBox:
        """(west, south, east, north) of all features."""
        return tuple(float(v) for v in shapely.total_bounds(self.geoms))

    def indices_in(self, bbox: Iterable[float]) -> np.ndarray:
        """Sorted indices of the features intersecting ``bbox`` (in the region CRS)."""
        return np.sort(self.tree.query(shapely.box(*bbox), predicate="intersects"))

    def features_in(self, bbox: Iterable[float]) -> list[tuple[shapely.Geometry, Any]]:
        """The features intersecting ``bbox``, in input order (not yet clipped)."""
        return [(self.geoms[i], self.tags[i]) for i in self.indices_in(bbox)]


def _tile_query_box(tile: Tile, region_crs: str) -> BBox:
    if tile.crs == region_crs:
        return tile.bbox
    from geolink.graph.io import reproject

    return tuple(shapely.bounds(reproject(np.array([shapely.box(*tile.bbox)], dtype=object), tile.crs,
                                          region_crs)[0]))


# the state worker processes inherit (fork) instead of receiving it pickled per task
_WORKER: dict[str, Any] = {}


def _prepare_tile(k: int) -> tuple[int, PreparedTile]:
    region: RegionIndex = _WORKER["region"]
    builder: OSMGraphBuilder = _WORKER["builder"]
    tile: Tile = _WORKER["tiles"][k]
    features = region.features_in(_tile_query_box(tile, region.crs))
    feature_crs = None if region.crs == tile.crs else region.crs
    return k, builder.prepare(features, tile.bbox, tile.crs, feature_crs=feature_crs).strip()


def parse_shard(shard: str | None) -> tuple[int, int]:
    """``"2/8"`` → (2, 8) (0-based shard index); None → (0, 1)."""
    if shard is None:
        return 0, 1
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard)
    if not match or not int(match.group(1)) < int(match.group(2)):
        raise ValueError(f"--shard must be i/n with 0 <= i < n (e.g. 0/4), got {shard!r}")
    return int(match.group(1)), int(match.group(2))


def build_tiles(region: RegionIndex, tiles: Sequence[Tile], out: str | Path, builder: OSMGraphBuilder,
                tag_encoder: Any = None, shard: tuple[int, int] = (0, 1), workers: int = 1,
                chunk_size: int = 64, progress: bool = True) -> dict[str, Any]:
    """Build and store the graphs of ``tiles`` (those of this shard) into ``out``; rerunning skips finished tiles.

    Layout of ``out``: ``tiles/<name>.safetensors`` (compact graphs, see :func:`geolink.graph.io.save_graph`),
    ``<vocab>.json`` (the tag vocabulary, append-only), ``<vocab>.safetensors`` (its ``[V, D]`` embedding table,
    when ``tag_encoder`` is given), ``<index>.jsonl`` (one line per finished tile: name, file, bbox, crs, node
    counts, report, vocab). Unsharded runs use ``vocab``/``index``; shard ``i/n`` uses ``vocab.shard-i-of-n`` and
    ``index.shard-i-of-n`` so machines never write the same file. The index line is written last, after the
    vocabulary it depends on, so an interrupted run resumes cleanly.

    Args:
        region: the features of the whole region.
        tiles: every tile of the region (the shard picks tiles ``k`` with ``k % n == i``).
        out: output folder.
        builder: the graph builder (its tag encoder is not used; see ``tag_encoder``).
        tag_encoder: embeds the vocabulary into the table; None stores ids + vocabulary only.
        shard: (i, n).
        workers: processes for the geometry work (fork start method; 1 = in process).
        chunk_size: tiles per commit of vocabulary + index.
        progress: show a progress bar.

    Returns:
        A summary: tiles built / skipped, nodes, vocabulary size, output paths.
    """
    from tqdm.auto import tqdm

    from geolink.graph.io import save_graph, save_vocabulary

    out = Path(out)
    (out / "tiles").mkdir(parents=True, exist_ok=True)
    index_i, count = shard
    suffix = "" if count == 1 else f".shard-{index_i}-of-{count}"
    vocab_name, index_path = f"vocab{suffix}", out / f"index{suffix}.jsonl"
    names = [t.name for t in tiles]
    if len(set(names)) != len(names):
        raise ValueError("tile names must be unique (they are the file names)")
    done = set()
    if index_path.is_file():
        with open(index_path, encoding="utf-8") as handle:
            done = {json.loads(line)["name"] for line in handle if line.strip()}
    vocab_path = out / f"{vocab_name}.json"
    vocabulary = TagVocabulary.load(vocab_path) if vocab_path.is_file() else TagVocabulary()
    todo = [k for k in range(index_i, len(tiles), count) if tiles[k].name not in done]
    summary = {"tiles": len(range(index_i, len(tiles), count)), "built": 0, "skipped": len(range(index_i, len(tiles),
                                                                                                  count)) - len(todo),
               "nodes": 0, "out": str(out)}
    _WORKER.update(region=region, builder=builder, tiles=tiles)
    pool = None
    if workers > 1 and len(todo) > 1:
        import multiprocessing

        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
        pool = multiprocessing.get_context(method).Pool(workers)
    bar = tqdm(total=len(todo), desc="building tile graphs", unit="tile", disable=not progress)
    try:
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start:start + chunk_size]
            results = (pool.imap(_prepare_tile, chunk) if pool is not None else map(_prepare_tile, chunk))
            staged = []
            for k, prepared in results:
                graph = builder.to_graph(prepared, vocabulary=vocabulary, materialize=False)
                staged.append((tiles[k], graph, prepared.report))
                bar.update(1)
            table = tag_encoder.embedding_table(vocabulary) if tag_encoder is not None else None
            info = tag_encoder.info() if tag_encoder is not None else {}
            save_vocabulary(out, vocabulary, vocab_name, table, **info)
            lines = []
            for tile, graph, report in staged:
                file = f"tiles/{tile.name}.safetensors"
                save_graph(graph, out / file, vocab=vocab_name, name=tile.name)
                lines.append(json.dumps({"name": tile.name, "file": file, "bbox": list(tile.bbox), "crs": tile.crs,
                                         "vocab": vocab_name, "nodes": report.nodes, "report": report.as_dict()}))
                summary["nodes"] += sum(report.nodes.values())
            with open(index_path, "a", encoding="utf-8") as handle:
                handle.write("".join(line + "\n" for line in lines))
                handle.flush()
                os.fsync(handle.fileno())
            summary["built"] += len(staged)
            if tag_encoder is not None and hasattr(tag_encoder, "save_cache"):
                tag_encoder.save_cache()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
        _WORKER.clear()
    if not (out / f"{vocab_name}.json").is_file():
        save_vocabulary(out, vocabulary, vocab_name, tag_encoder.embedding_table(vocabulary) if tag_encoder else None)
    summary["vocabulary"] = len(vocabulary)
    return summary


def iter_tile_features(region: RegionIndex, tiles: Iterable[Tile]) -> Iterator[tuple[Tile, list[tuple[Any, Any]]]]:
    """Each tile with its candidate features (one STRtree query per tile on the region index)."""
    for tile in tiles:
        yield tile, region.features_in(_tile_query_box(tile, region.crs))


def _csv_floats(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers, got {text!r}") from None


def build_graphs_command(pbf: str | None = None, vector: str | None = None, out: str = "graphs",
                         tile_size: str | None = None, grid: str | None = None, footprints: Sequence[str] | None = None,
                         bbox: str | Sequence[float] | None = None, crs: str = "EPSG:4326",
                         text_model: str | None = None, pooling: str = "official", text_cache: str | None = None,
                         tag_weights: str = "official", keys: str | None = None, deny_keys: str | None = None,
                         workers: int = 1, shard: str | None = None, device: str | None = None,
                         progress: bool = True) -> dict[str, Any]:
    """Everything ``geolink build-graphs`` does: read, tile, build, store. Returns :func:`build_tiles`'s summary
    plus timings and peak memory (see the CLI help for the arguments)."""
    import resource
    import time

    from geolink.graph.io import read_features, read_osm
    from geolink.graph.tags import TagFilter

    start = time.perf_counter()
    shard_spec = parse_shard(shard)
    tag_filter = TagFilter(allow=frozenset(keys.split(",")) if keys else None,
                           deny=frozenset(deny_keys.split(",")) if deny_keys else frozenset())
    region_bbox = tuple(_csv_floats(bbox, "--bbox")) if isinstance(bbox, str) else bbox
    if region_bbox is not None:
        check_bbox(region_bbox, "EPSG:4326" if pbf else crs)
    if pbf:
        features, data_crs = list(read_osm(pbf, bbox=region_bbox, tag_filter=tag_filter, key_frequency=tag_weights,
                                           progress=progress)), "EPSG:4326"
    elif vector:
        features, data_crs = read_features(vector)
        data_crs = data_crs or crs
    else:
        raise ValueError("pass --pbf or --vector")
    if not footprints and data_crs != crs and features:  # one reprojection for the whole region, not per tile
        from geolink.graph.io import reproject

        geoms = reproject(np.array([g for g, _ in features], dtype=object), data_crs, crs)
        features, data_crs = list(zip(geoms, (t for _, t in features), strict=True)), crs
        if region_bbox is not None:
            region_bbox = tuple(shapely.bounds(reproject(np.array([shapely.box(*region_bbox)], dtype=object),
                                                         "EPSG:4326", crs)[0])) if pbf else region_bbox
    region = RegionIndex(features, data_crs)
    if footprints:
        if len(footprints) == 1 and footprints[0].lower().endswith(".json"):
            with open(footprints[0], encoding="utf-8") as handle:
                tiles = footprint_tiles(json.load(handle), crs)
        else:
            tiles = footprint_tiles(footprints, crs)
    else:
        if region_bbox is None:
            if len(region) == 0:
                raise ValueError("no features with kept tags in the input; check --keys / --tag-weights")
            region_bbox = region.bounds  # already in the tile CRS (reprojected above)
        if grid:
            match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", grid)
            if not match:
                raise ValueError(f"--grid must be ROWSxCOLS, e.g. 6x4, got {grid!r}")
            tiles = grid_tiles(region_bbox, shape=(int(match.group(1)), int(match.group(2))), crs=crs)
        else:
            tiles = grid_tiles(region_bbox, tile_size=tile_size or "200m", crs=crs)
    encoder = None
    if text_model:
        from geolink.graph.text import TagEncoder

        encoder = TagEncoder(text_model, pooling=pooling, device=device, cache_dir=text_cache)
    builder = OSMGraphBuilder(None, tag_weights=tag_weights, tag_filter=tag_filter if keys or deny_keys else "auto")
    read_s = time.perf_counter() - start
    summary = build_tiles(region, tiles, out, builder, tag_encoder=encoder, shard=shard_spec, workers=workers,
                          progress=progress)
    total = time.perf_counter() - start
    summary.update(features=len(region), read_s=round(read_s, 3), total_s=round(total, 3),
                   tiles_per_s=round(summary["built"] / max(total - read_s, 1e-9), 2),
                   peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    return summary


def merge_shards(out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Merge the per-shard vocabularies of a folder built with ``--shard i/n`` into the single ``vocab`` the
    unsharded layout uses: tile ids are remapped, tables concatenated, shard index/vocabulary files removed.

    Run it once every shard has finished. Idempotent: a folder without shard files is left as it is.

    Returns:
        A summary: tiles rewritten, merged vocabulary size.
    """
    import torch
    from tqdm.auto import tqdm

    from geolink.graph.io import load_graph, load_table, save_graph, save_vocabulary

    out = Path(out)
    indexes = sorted(out.glob("index.shard-*.jsonl"))
    if not indexes:
        return {"tiles": 0, "vocabulary": None, "out": str(out)}
    merged = TagVocabulary.load(out / "vocab.json") if (out / "vocab.json").is_file() else TagVocabulary()
    tables: list[torch.Tensor | None] = []
    if (out / "vocab.json").is_file():
        tables.append(load_table(out, "vocab") if (out / "vocab.safetensors").is_file() else None)
    entries, mappings, infos = [], {}, {}
    for index in indexes:
        name = index.name[len("index."):-len(".jsonl")]
        vocab_name = f"vocab.{name}"
        shard_vocab = TagVocabulary.load(out / f"{vocab_name}.json")
        with open(out / f"{vocab_name}.json", encoding="utf-8") as handle:
            infos[vocab_name] = {k: v for k, v in json.load(handle).items() if k != "strings"}
        before = len(merged)
        mappings[vocab_name] = torch.from_numpy(merged.add(shard_vocab.strings))
        has_table = (out / f"{vocab_name}.safetensors").is_file()
        table = load_table(out, vocab_name) if has_table else None
        tables.append(table[(mappings[vocab_name] >= before).numpy()] if table is not None else None)
        with open(index, encoding="utf-8") as handle:
            entries += [json.loads(line) for line in handle if line.strip()]
    for entry in tqdm(entries, desc="merging shards", unit="tile", disable=not progress):
        graph = load_graph(out / entry["file"])
        mapping = mappings[entry["vocab"]]
        for t in ("polygon", "line", "point"):
            ids = graph[t].tags
            graph[t].tags = torch.where(ids >= 0, mapping[ids.clamp(min=0)], ids)
        save_graph(graph, out / entry["file"], vocab="vocab", name=entry["name"])
        entry["vocab"] = "vocab"
    with_tables = [t for t in tables if t is not None]
    table = torch.cat(with_tables) if with_tables and len(with_tables) == len(tables) else None
    info = next(iter(infos.values()), {})
    save_vocabulary(out, merged, "vocab", table, **info)
    with open(out / "index.jsonl", "a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(e) + "\n" for e in entries))
    for index in indexes:
        name = index.name[len("index."):-len(".jsonl")]
        for path in (index, out / f"vocab.{name}.json", out / f"vocab.{name}.safetensors"):
            path.unlink(missing_ok=True)
    return {"tiles": len(entries), "vocabulary": len(merged), "out": str(out)}
