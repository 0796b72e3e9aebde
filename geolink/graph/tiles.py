"""Cutting a region into tiles and building every tile's graph into a folder: the ``geolink build-graphs`` job.

Owns tile definitions (:class:`Tile`: a grid over a bbox by a :class:`TileSize` in metres or degrees or by a
rows × columns count, image footprints, GeoTIFF bounds), reading a region's OSM source into the region-wide spatial
index that hands each tile its features (:func:`read_region` → :class:`RegionIndex`: one STRtree for the whole
region, one query per tile), and the job itself: :class:`BuildGraphsConfig` → :func:`build_graphs`, whose engine
:func:`build_tiles` does sharding (:class:`TileShard`), resumability, worker processes, the shared tag vocabulary
and the index; :func:`merge_shards` joins the vocabularies of a sharded build.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from geolink.errors import ConfigError, DataError, InputError
from geolink.graph.build import OSMGraphBuilder, PreparedTile, check_bbox
from geolink.graph.readers import (
    BBox,
    is_geographic,
    read_features,
    read_osm,
    reproject,
    reproject_bbox,
    require_file,
)
from geolink.graph.storage import MAX_INDEX_BYTES, load_graph, load_table, read_jsonl, save_graph, save_vocabulary
from geolink.graph.tags import TagFilter, TagVocabulary
from geolink.graph.text import POOLINGS
from geolink.runtime import Engine, import_ray

_METRES_PER_DEGREE = 111_320.0


@dataclass(frozen=True)
class Tile:
    """One tile: a name (used as the file name), its bbox (west, south, east, north) and CRS."""

    name: str
    bbox: BBox
    crs: str = "EPSG:4326"


class TileUnit(str, Enum):
    """Unit of a :class:`TileSize`."""

    METRES = "m"
    DEGREES = "deg"


@dataclass(frozen=True)
class TileSize:
    """The side of a square tile: ``TileSize(200, TileUnit.METRES)``, ``TileSize(0.002, TileUnit.DEGREES)``.

    Raises:
        InputError: the value is not a positive number.
    """

    value: float
    unit: TileUnit = TileUnit.METRES

    def __post_init__(self) -> None:
        object.__setattr__(self, "unit", TileUnit(self.unit))
        if not (isinstance(self.value, int | float) and math.isfinite(self.value) and self.value > 0):
            raise InputError(f"tile_size must be a positive length, got {self.value!r}")

    @classmethod
    def from_string(cls, text: str) -> TileSize:
        """``"200m"``, ``"1km"`` (= 1000 m), ``"0.002deg"`` / ``"0.002°"``; a bare number is in degrees.

        Raises:
            InputError: the text is not a positive number with one of these units.
        """
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*(m|km|deg|°)?\s*", str(text))
        if not match:
            raise InputError(f"tile_size {text!r} not understood: use e.g. '200m', '1km' or '0.002deg'")
        value, unit = float(match.group(1)), match.group(2) or "deg"
        if unit == "km":
            value, unit = value * 1000, "m"
        return cls(value, TileUnit.DEGREES if unit in ("deg", "°") else TileUnit.METRES)

    def __str__(self) -> str:
        return f"{self.value:g}{self.unit.value}"


DEFAULT_TILE_SIZE = TileSize(200, TileUnit.METRES)
"""The tile size of a grid when neither a size nor a rows × columns shape is given."""


def grid_tiles(bbox: Iterable[float], tile_size: TileSize | None = None, shape: tuple[int, int] | None = None,
               crs: str = "EPSG:4326") -> list[Tile]:
    """Tiles covering ``bbox`` row by row from the north-west corner, named ``r<row>_c<col>``.

    Raises:
        InputError: both or neither of ``tile_size`` and ``shape``, a non-positive shape, or degrees in a projected
            CRS.

    Args:
        bbox: the region (west, south, east, north) in ``crs``.
        tile_size: side length; in a geographic CRS metres are converted at the region's central latitude
            (equirectangular). Edge tiles are cut at the region boundary.
        shape: (rows, columns) instead of ``tile_size``: the region split into equal tiles.
        crs: the region CRS.
    """
    west, south, east, north = check_bbox(bbox, crs)
    if (tile_size is None) == (shape is None):
        raise InputError("pass exactly one of tile_size (e.g. TileSize(200, TileUnit.METRES)) and "
                         "shape=(rows, columns)")
    if shape is not None:
        rows, cols = (int(v) for v in shape)
        if rows < 1 or cols < 1:
            raise InputError(f"shape must be positive (rows, columns), got {shape}")
        xs, ys = np.linspace(west, east, cols + 1), np.linspace(north, south, rows + 1)
    else:
        geographic = is_geographic(crs)
        if tile_size.unit is TileUnit.METRES and geographic:
            dy = tile_size.value / _METRES_PER_DEGREE
            dx = dy / math.cos(math.radians((south + north) / 2))
        elif tile_size.unit is TileUnit.DEGREES and not geographic:
            raise InputError(f"tile_size {tile_size} is in degrees but crs {crs!r} is projected: give it in metres")
        else:
            dx = dy = tile_size.value
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
        MissingInputError: the file does not exist.
        DataError: the file has no georeferencing (ModelPixelScale + ModelTiepoint) or is rotated.
    """
    from PIL import Image

    with Image.open(require_file(path, "GeoTIFF")) as image:
        tags = image.tag_v2
        width, height = image.size
        scale, tie = tags.get(33550), tags.get(33922)
        transform = tags.get(34264)
        keys = tags.get(34735)
    if transform is not None:
        a, b, _, c, d, e, _, f = (float(v) for v in list(transform)[:8])
        if b or d:
            raise DataError(f"{path} is rotated; only north-up GeoTIFFs are supported")
        west, north, sx, sy = c, f, a, -e
    elif scale is not None and tie is not None:
        i, j, _, x, y, _ = (float(v) for v in list(tie)[:6])
        sx, sy = float(scale[0]), float(scale[1])
        west, north = x - i * sx, y + j * sy
    else:
        raise DataError(f"{path} has no GeoTIFF georeferencing (ModelPixelScale/ModelTiepoint tags)")
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
        features: ``(geometry, tags)`` pairs of the whole region (e.g. :func:`geolink.graph.readers.read_osm`).
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
    return tile.bbox if tile.crs == region_crs else reproject_bbox(tile.bbox, tile.crs, region_crs)


def read_region(pbf: str | Path | None = None, vector: str | Path | None = None, *, crs: str = "EPSG:4326",
                bbox: Iterable[float] | None = None, to_crs: str | None = None, tag_filter: TagFilter | None = None,
                tag_weights: str | Path | None = "official", progress: bool = False) -> RegionIndex:
    """Read a region's OSM source into one :class:`RegionIndex`: source → features → (reprojection) → index.

    Args:
        pbf: an OSM extract (``.osm.pbf`` / ``.osm``), read for ``bbox`` only; its features are in EPSG:4326.
        vector: instead of ``pbf``, any file :func:`~geolink.graph.readers.read_features` reads.
        crs: the CRS of ``vector`` when the file names none.
        bbox: with ``pbf``, the (west, south, east, north) extent to read, in degrees.
        to_crs: reproject every feature once to this CRS (the tiles' CRS), instead of tile by tile.
        tag_filter: with ``pbf``, which keys to keep (default: keys of the key-frequency table).
        tag_weights: with ``pbf``, the key-frequency table ``tag_filter`` checks against.
        progress: show a progress bar while reading.

    Raises:
        InputError: both or neither of ``pbf`` and ``vector``.
        MissingInputError: the source file does not exist.
    """
    if (pbf is None) == (vector is None):
        raise InputError("pass exactly one OSM source: pbf or vector")
    if pbf is not None:
        features = list(read_osm(pbf, bbox=bbox, tag_filter=tag_filter, key_frequency=tag_weights,
                                 progress=progress))
        data_crs = "EPSG:4326"
    else:
        from tqdm.auto import tqdm

        with tqdm(total=1, desc=f"reading {Path(vector).name}", unit="file", disable=not progress) as bar:
            features, data_crs = read_features(vector)
            bar.set_postfix(features=len(features))
            bar.update(1)
        data_crs = data_crs or crs
    if to_crs is not None and str(to_crs) != str(data_crs):
        if features:
            geoms = reproject(np.array([g for g, _ in features], dtype=object), data_crs, to_crs)
            features = list(zip(geoms, (t for _, t in features), strict=True))
        data_crs = to_crs
    return RegionIndex(features, data_crs)


# the state worker processes inherit (fork) instead of receiving it pickled per task
_WORKER: dict[str, Any] = {}
#: new tag strings embedded per step of the "tag embedding" progress bar of :func:`build_tiles` (the strings of a
#: chunk of neighbouring tiles go through the text model together, sorted by token count)
EMBED_STEP = 1024


def _prepare_tile(k: int) -> tuple[int, PreparedTile]:
    region: RegionIndex = _WORKER["region"]
    builder: OSMGraphBuilder = _WORKER["builder"]
    tile: Tile = _WORKER["tiles"][k]
    features = region.features_in(_tile_query_box(tile, region.crs))
    feature_crs = None if region.crs == tile.crs else region.crs
    return k, builder.prepare(features, tile.bbox, tile.crs, feature_crs=feature_crs).strip()


@dataclass(frozen=True)
class TileShard:
    """Shard ``index`` of ``count`` (0-based): the tiles ``k`` with ``k % count == index``, so ``count`` machines
    build one region without writing the same file.

    Raises:
        InputError: not ``0 <= index < count``.
    """

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.index, int) and isinstance(self.count, int) and 0 <= self.index < self.count):
            raise InputError(f"shard must be index/count with 0 <= index < count (e.g. 0/4), got "
                             f"{self.index}/{self.count}")

    @classmethod
    def from_string(cls, text: str) -> TileShard:
        """``"2/8"`` → ``TileShard(2, 8)``.

        Raises:
            InputError: the text is not ``i/n`` with ``0 <= i < n``.
        """
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
        if not match:
            raise InputError(f"shard must be i/n with 0 <= i < n (e.g. 0/4), got {text!r}")
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def suffix(self) -> str:
        """File-name suffix of this shard's index and vocabulary (empty when unsharded)."""
        return "" if self.count == 1 else f".shard-{self.index}-of-{self.count}"

    def positions(self, total: int) -> range:
        """Positions of this shard's tiles among ``total`` tiles."""
        return range(self.index, total, self.count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def build_tiles(region: RegionIndex, tiles: Sequence[Tile], out: str | Path, builder: OSMGraphBuilder,
                tag_encoder: Any = None, shard: TileShard = TileShard(), workers: int = 1,
                chunk_size: int = 64, progress: bool = True, max_tiles: int | None = None) -> dict[str, Any]:
    """Build and store the graphs of ``tiles`` (those of this shard) into ``out``; rerunning skips finished tiles.

    Layout of ``out``: ``tiles/<name>.safetensors`` (compact graphs, see :func:`geolink.graph.storage.save_graph`),
    ``<vocab>.json`` (the tag vocabulary, append-only), ``<vocab>.safetensors`` (its ``[V, D]`` embedding table,
    when ``tag_encoder`` is given), ``<index>.jsonl`` (one line per finished tile: name, file, bbox, crs, node
    counts, report, vocab). Unsharded runs use ``vocab``/``index``; shard ``i/n`` uses ``vocab.shard-i-of-n`` and
    ``index.shard-i-of-n`` so machines never write the same file. The index line is written last, after the
    vocabulary it depends on, so an interrupted run resumes cleanly, and the resumed folder is byte for byte the folder
    of an uninterrupted run (the vocabulary grows in tile order, embeddings do not depend on their batch, and every
    file has one byte layout).

    Args:
        region: the features of the whole region.
        tiles: every tile of the region (the shard picks its own).
        out: output folder.
        builder: the graph builder (its tag encoder is not used; see ``tag_encoder``).
        tag_encoder: embeds the vocabulary into the table; None stores ids + vocabulary only.
        shard: which tiles this run builds.
        workers: processes for the geometry work (fork start method; 1 = in process).
        chunk_size: tiles per commit of vocabulary + index.
        progress: show one progress bar per stage: geometry (tiles), tag embedding (new vocabulary strings, with
            ``tag_encoder``) and write (tiles).
        max_tiles: stop after building this many tiles (a time-boxed run); rerunning resumes with the next tile.

    Returns:
        A summary: tiles built / skipped, nodes, vocabulary size, output paths.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    (out / "tiles").mkdir(parents=True, exist_ok=True)
    vocab_name, index_path = f"vocab{shard.suffix}", out / f"index{shard.suffix}.jsonl"
    names = [t.name for t in tiles]
    if len(set(names)) != len(names):
        raise InputError("tile names must be unique (they are the file names)")
    done = set()
    if index_path.is_file():  # a torn last line (a killed run) is cut off, so that tile is rebuilt
        done = {entry.get("name") for entry in read_jsonl(index_path, "graph folder index", repair=True)
                if isinstance(entry, dict)}
    vocab_path = out / f"{vocab_name}.json"
    vocabulary = TagVocabulary.load(vocab_path) if vocab_path.is_file() else TagVocabulary()
    mine = shard.positions(len(tiles))
    todo = [k for k in mine if tiles[k].name not in done]
    if max_tiles is not None:
        if max_tiles < 0:
            raise InputError(f"max_tiles must be at least 0, got {max_tiles}")
        todo = todo[:max_tiles]
    summary = {"tiles": len(mine), "built": 0, "skipped": len(mine) - len(todo), "nodes": 0, "out": str(out)}
    _WORKER.update(region=region, builder=builder, tiles=tiles)
    pool = None
    if workers > 1 and len(todo) > 1:
        import multiprocessing

        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
        pool = multiprocessing.get_context(method).Pool(workers)
    # one bar per stage, each advancing chunk by chunk: tiles through geometry, tags through the text model, tiles
    # written (the embedding of a chunk's new tags is the slow stage with a text model)
    stages = [("geometry", "tile", len(todo)), *([("tag embedding", "tag", 0)] if tag_encoder is not None else []),
              ("write", "tile", len(todo))]
    bars = {desc: tqdm(total=total, desc=desc, unit=unit, disable=not progress) for desc, unit, total in stages}
    embedded = 0  # vocabulary strings whose embeddings this run has computed (the vocabulary only grows)
    try:
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start:start + chunk_size]
            results = (pool.imap(_prepare_tile, chunk) if pool is not None else map(_prepare_tile, chunk))
            staged = []
            for k, prepared in results:
                graph = builder.to_graph(prepared, vocabulary=vocabulary, materialize=False)
                staged.append((tiles[k], graph, prepared.report))
                bars["geometry"].update(1)
            table, info = None, {}
            if tag_encoder is not None:
                bars["tag embedding"].total = len(vocabulary)
                bars["tag embedding"].refresh()
                for first in range(embedded, len(vocabulary), EMBED_STEP):
                    new = vocabulary.strings[first:first + EMBED_STEP]
                    tag_encoder.embedding_table(new)
                    bars["tag embedding"].update(len(new))
                embedded = len(vocabulary)
                table, info = tag_encoder.embedding_table(vocabulary), tag_encoder.info()
            save_vocabulary(out, vocabulary, vocab_name, table, **info)
            lines = []
            for tile, graph, report in staged:
                file = f"tiles/{tile.name}.safetensors"
                save_graph(graph, out / file, vocab=vocab_name, name=tile.name)
                lines.append(json.dumps({"name": tile.name, "file": file, "bbox": list(tile.bbox), "crs": tile.crs,
                                         "vocab": vocab_name, "nodes": report.nodes, "report": report.as_dict()}))
                summary["nodes"] += sum(report.nodes.values())
                bars["write"].update(1)
            with open(index_path, "a", encoding="utf-8") as handle:
                handle.write("".join(line + "\n" for line in lines))
                handle.flush()
                os.fsync(handle.fileno())
            summary["built"] += len(staged)
            if tag_encoder is not None and hasattr(tag_encoder, "save_cache"):
                tag_encoder.save_cache()
    finally:
        for bar in bars.values():
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


@dataclass
class BuildGraphsConfig:
    """Cut a region into tiles and write each tile's OSM graph (DESIGN §3, compact safetensors) plus the shared tag
    vocabulary (and its embedding table with text_model) and an index. Rerunning skips finished tiles; shard i/n
    splits the tiles between machines."""

    out: Path = field(metadata={"help": "output folder"})
    pbf: Path | None = field(default=None, metadata={"help": "OpenStreetMap extract (.osm.pbf / .osm)"})
    vector: Path | None = field(default=None, metadata={
        "help": "vector file with tags (GeoJSON; .gpkg/.shp/... need geolink[geo])"})
    merge_shards: bool = field(default=False, metadata={
        "help": "after all shard runs finished: merge their vocabularies into one for the folder"})
    tile_size: TileSize | None = field(default=None, metadata={
        "help": "tile side, e.g. 200m, 1km or 0.002deg (default 200m)"})
    grid: tuple[int, int] | None = field(default=None, metadata={
        "help": "split the bbox into ROWS x COLS equal tiles, e.g. 6 4", "metavar": ("ROWS", "COLS")})
    footprints: tuple[Path, ...] | None = field(default=None, metadata={
        "help": "GeoTIFF images (or a JSON list of [w, s, e, n] bboxes): one tile per image footprint"})
    bbox: tuple[float, float, float, float] | None = field(default=None, metadata={
        "help": "region west south east north, in degrees with pbf, else in crs (default: the data's extent)",
        "metavar": ("WEST", "SOUTH", "EAST", "NORTH")})
    crs: str = field(default="EPSG:4326", metadata={"help": "tile CRS"})
    text_model: str | None = field(default=None, metadata={
        "help": "text model: 'minilm' (offline), 'clip' (the official one), a folder or a Hub id; stores the "
                "embedding table (without it only the vocabulary is stored)"})
    pooling: str = field(default="official", metadata={"help": f"tag pooling: {', '.join(POOLINGS)}"})
    text_cache: Path | None = field(default=None, metadata={"help": "folder for the on-disk tag embedding cache"})
    tag_weights: str = field(default="official", metadata={
        "help": "key-frequency JSON, or official for the table shipped with geolink"})
    keys: tuple[str, ...] | None = field(default=None, metadata={
        "help": "OSM keys to keep (default: keys of the frequency table)"})
    deny_keys: tuple[str, ...] | None = field(default=None, metadata={"help": "OSM keys to drop"})
    text_dtype: str = field(default="float32", metadata={
        "help": "text model precision: float32, or bfloat16 (faster; only where the hardware multiplies bf16 "
                "natively: GPUs, CPUs with avx512_bf16 or AMX)"})
    tag_table: Path | None = field(default=None, metadata={
        "help": "tag-embedding table to start the text model warm from (geolink tag-table)"})
    workers: int = field(default=1, metadata={"help": "processes for the geometry work"})
    max_tiles: int | None = field(default=None, metadata={
        "help": "stop after building this many tiles (rerun to resume; the result is the same as one run)"})
    shard: TileShard | None = field(default=None, metadata={
        "help": "i/n: build only the tiles k with k mod n = i (e.g. $SLURM_ARRAY_TASK_ID/8)"})
    engine: Engine = field(default=Engine.LOCAL, metadata={
        "help": "local, or ray: one shard per Ray task (workers tasks, default one per cluster CPU), then merged; "
                "out must be a folder every Ray node can write (pip install geolink[distributed])"})
    device: str = field(default="auto", metadata={"help": "text model device (auto: cuda if available)"})
    quiet: bool = field(default=False, metadata={"help": "no progress bars"})

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.pbf = Path(self.pbf) if self.pbf is not None else None
        self.vector = Path(self.vector) if self.vector is not None else None
        self.text_cache = Path(self.text_cache) if self.text_cache is not None else None
        if self.footprints is not None:
            self.footprints = tuple(Path(p) for p in self.footprints)
        sources = [name for name in ("pbf", "vector", "merge_shards") if getattr(self, name)]
        if len(sources) != 1:
            raise ConfigError(f"pass exactly one of pbf, vector and merge_shards (got {', '.join(sources) or 'none'})")
        tiling = [name for name in ("tile_size", "grid", "footprints") if getattr(self, name) is not None]
        if len(tiling) > 1:
            raise ConfigError(f"pass at most one of tile_size, grid and footprints (got {', '.join(tiling)})")
        if self.grid is not None:
            self.grid = tuple(self.grid)
            if len(self.grid) != 2 or min(self.grid) < 1:
                raise ConfigError(f"grid must be two positive integers (rows, columns), got {self.grid}")
        if self.footprints is not None and not self.footprints:
            raise ConfigError("footprints is empty: pass GeoTIFF images or one JSON file of bboxes")
        if self.bbox is not None:
            try:
                self.bbox = check_bbox(self.bbox, "EPSG:4326" if self.pbf else self.crs)
            except InputError as err:
                raise ConfigError(f"bbox: {err}") from None
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.workers < 1:
            raise ConfigError(f"workers must be at least 1, got {self.workers}")
        self.engine = Engine(self.engine)
        if self.engine is Engine.RAY and (self.shard is not None or self.merge_shards):
            raise ConfigError("engine ray splits the tiles itself: pass neither shard nor merge_shards with it")
        if self.text_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"text_dtype must be float32 or bfloat16, got {self.text_dtype!r}")
        if self.max_tiles is not None and self.max_tiles < 0:
            raise ConfigError(f"max_tiles must be at least 0, got {self.max_tiles}")
        self.tag_table = Path(self.tag_table) if self.tag_table is not None else None
        if self.tag_table is not None and not self.text_model:
            raise ConfigError("tag_table needs text_model (the model the table was made with)")

    def tag_filter(self) -> TagFilter:
        """The key filter of ``keys`` / ``deny_keys``."""
        return TagFilter(allow=frozenset(self.keys) if self.keys else None, deny=frozenset(self.deny_keys or ()))


def _footprint_tiles(footprints: Sequence[Path], crs: str) -> list[Tile]:
    if len(footprints) == 1 and footprints[0].name.lower().endswith(".json"):
        with open(require_file(footprints[0], "footprints file", MAX_INDEX_BYTES), encoding="utf-8") as handle:
            return footprint_tiles(json.load(handle), crs)
    return footprint_tiles(footprints, crs)


def build_graphs(config: BuildGraphsConfig) -> dict[str, Any]:
    """The ``geolink build-graphs`` job: read, tile, build, store (or, with ``merge_shards``, :func:`merge_shards`).

    Returns:
        :func:`build_tiles`'s summary plus features read, timings and peak memory.

    Raises:
        MissingInputError: an input file does not exist.
        InputError: the input has no feature with a kept tag and no bbox was given.
    """
    import resource
    import time

    progress = not config.quiet
    if config.merge_shards:
        return merge_shards(config.out, progress=progress)
    if config.engine is Engine.RAY and not (config.out / "index.jsonl").exists():
        return _build_graphs_on_ray(config)
    start = time.perf_counter()
    keep = config.tag_filter()
    # one reprojection for the whole region, not per tile (footprint tiles each keep their own CRS)
    region = read_region(config.pbf, config.vector, crs=config.crs, bbox=config.bbox,
                         to_crs=None if config.footprints else config.crs, tag_filter=keep,
                         tag_weights=config.tag_weights, progress=progress)
    if config.footprints:
        tiles = _footprint_tiles(config.footprints, config.crs)
    else:
        region_bbox = config.bbox
        if region_bbox is not None and config.pbf is not None:
            region_bbox = reproject_bbox(region_bbox, "EPSG:4326", config.crs)
        if region_bbox is None:
            if len(region) == 0:
                raise InputError("no features with kept tags in the input; check keys / tag_weights")
            region_bbox = region.bounds  # already in the tile CRS (reprojected above)
        if config.grid is not None:
            tiles = grid_tiles(region_bbox, shape=config.grid, crs=config.crs)
        else:
            tiles = grid_tiles(region_bbox, tile_size=config.tile_size or DEFAULT_TILE_SIZE, crs=config.crs)
    encoder = None
    if config.text_model:
        import torch

        from geolink.graph.text import TagEncoder

        encoder = TagEncoder(config.text_model, pooling=config.pooling, device=config.device,
                             cache_dir=config.text_cache, dtype=getattr(torch, config.text_dtype),
                             table=config.tag_table)
    builder = OSMGraphBuilder(None, tag_weights=config.tag_weights,
                              tag_filter=keep if config.keys or config.deny_keys else "auto")
    read_s = time.perf_counter() - start
    summary = build_tiles(region, tiles, config.out, builder, tag_encoder=encoder, shard=config.shard or TileShard(),
                          workers=config.workers, progress=progress, max_tiles=config.max_tiles)
    total = time.perf_counter() - start
    summary.update(features=len(region), read_s=round(read_s, 3), total_s=round(total, 3),
                   tiles_per_s=round(summary["built"] / max(total - read_s, 1e-9), 2),
                   peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    return summary


def _build_graphs_on_ray(config: BuildGraphsConfig) -> dict[str, Any]:
    """``engine=ray``: the tiles split into ``n`` shards (``workers``, or one per cluster CPU), each built by one Ray
    task running this job locally (the same per-tile functions, :class:`TileShard` ``i/n``), then
    :func:`merge_shards` on the driver. Rerunning resumes: each shard skips its finished tiles. Once merged, the
    folder has an ``index.jsonl`` and a rerun takes the local path, which skips every finished tile."""
    from tqdm.auto import tqdm

    ray = import_ray()
    count = config.workers if config.workers > 1 else max(1, int(ray.cluster_resources().get("CPU", 1)))
    task = ray.remote(num_cpus=1)(_build_shard)
    shards = [replace(config, engine=Engine.LOCAL, shard=TileShard(i, count), workers=1, quiet=True)
              for i in range(count)]
    pending = [task.remote(shard) for shard in shards]
    summaries = []
    with tqdm(total=count, desc="ray shards", unit="shard", disable=config.quiet) as bar:
        while pending:
            done, pending = ray.wait(pending)
            summaries += ray.get(done)
            bar.update(len(done))
    merged = merge_shards(config.out, progress=not config.quiet)
    return {**merged, "shards": count, "built": sum(s["built"] for s in summaries),
            "skipped": sum(s["skipped"] for s in summaries), "nodes": sum(s["nodes"] for s in summaries)}


def _build_shard(config: BuildGraphsConfig) -> dict[str, Any]:
    """One Ray task of :func:`_build_graphs_on_ray`: this shard's tiles, built as the local engine builds them."""
    return build_graphs(config)


def merge_shards(out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Merge the per-shard vocabularies of a folder built with ``shard=TileShard(i, n)`` into the single ``vocab`` the
    unsharded layout uses: tile ids are remapped, tables concatenated, shard index/vocabulary files removed.

    Run it once every shard has finished. Idempotent: a folder without shard files is left as it is.

    Returns:
        A summary: tiles rewritten, merged vocabulary size.
    """
    import torch
    from tqdm.auto import tqdm

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
        entries += read_jsonl(index, "graph folder index", repair=True)
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
    if (out / "index.jsonl").is_file():
        read_jsonl(out / "index.jsonl", "graph folder index", repair=True)  # append on a fresh line
    with open(out / "index.jsonl", "a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(e) + "\n" for e in entries))
    for index in indexes:
        name = index.name[len("index."):-len(".jsonl")]
        for path in (index, out / f"vocab.{name}.json", out / f"vocab.{name}.safetensors"):
            path.unlink(missing_ok=True)
    return {"tiles": len(entries), "vocabulary": len(merged), "out": str(out)}
