"""The OSM side of a job and the per-window dataset: :class:`OSMSources` reads each source once and keeps one
spatial index per raster CRS; :class:`EmbedDataset` is a ``torch`` Dataset of ``(window image, window graph, window
metadata)`` over the windows of one or more rasters, usable in any training or inference loop.

A window's graph is ``OSMGraphBuilder(tag_encoder=..., tag_weights="official").build(features, bbox=<window
bounds>, crs=<raster CRS>)`` with ``features`` the source features (reprojected to the raster's CRS) that intersect
the window, in source order then file order: the graph a user gets by building the same window by hand.

``osm_coverage`` (an OpenStreetMap completeness score in [0, 1]): the share of the window's pixels covered by the
intersecting features: under a polygon (pixel centre inside) or touched by a line or a point (so a mapped road
counts for one pixel-wide stroke at the raster's resolution); 0 without OSM.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import torch
from torch.utils.data import Dataset

from geolink.embed.windows import RasterInfo, Window, grid_windows, read_window, scale_for, to_model_input
from geolink.errors import DataError, GeoLinkError, InputError
from geolink.graph.build import OSMGraphBuilder
from geolink.graph.readers import OSM_SUFFIXES, BBox, is_geographic, read_features, read_osm, reproject
from geolink.graph.schema import NODE_TYPES
from geolink.graph.tiles import RegionIndex

NO_OSM = "none"
"""The OSM source that means "no OpenStreetMap": every window is embedded from its image alone."""
MODES = ("auto", "fused", "image")
"""Window modes: ``auto`` chooses per window (``fused`` with at least ``min_nodes`` nodes, else ``image``)."""


def _same_crs(a: str, b: str) -> bool:
    return str(a) == str(b) or (is_geographic(a) and is_geographic(b))


class OSMSources:
    """The OSM sources of a job, each read once: ``.osm.pbf`` / ``.osm`` streamed with a bbox filter, GeoJSON
    (including the official per-type files with a ``label`` column), GeoPackage, GeoParquet and what else geopandas
    reads; features are reprojected once per raster CRS and indexed (one STRtree per CRS, see :meth:`index`).

    Args:
        sources: the files.
        bbox: (west, south, east, north) in degrees: the extent read from a PBF (the rasters' footprints).
        tag_weights: the key-frequency table that filters a PBF's keys.

    Raises:
        MissingInputError: a source does not exist.
        DataError: a source cannot be read as vector data (the message names it).

    A source without features (an empty file, or a PBF with nothing in ``bbox``) gives a warning naming it.
    """

    def __init__(self, sources: Sequence[str | Path], bbox: BBox | None = None,
                 tag_weights: str | Path | None = "official") -> None:
        self.sources = [Path(s) for s in sources]
        self.parts: list[tuple[Path, list[tuple[Any, Any]], str]] = []
        for path in self.sources:
            features, crs = self._read(path, bbox, tag_weights)
            if not features:
                warnings.warn(f"OSM source {path} holds no feature{' in the rasters bbox' if bbox else ''}; it adds "
                              "nothing to the graphs", UserWarning, stacklevel=2)
            self.parts.append((path, features, crs))
        self._indexes: dict[str, RegionIndex] = {}

    @staticmethod
    def _read(path: Path, bbox: BBox | None, tag_weights: Any) -> tuple[list[tuple[Any, Any]], str]:
        try:
            if path.name.lower().endswith(OSM_SUFFIXES):
                if not path.is_file():
                    from geolink.errors import MissingInputError

                    raise MissingInputError(f"OSM source {path} not found (check the path)")
                return list(read_osm(path, bbox=bbox, key_frequency=tag_weights)), "EPSG:4326"
            features, crs = read_features(path)
            return features, crs or "EPSG:4326"
        except GeoLinkError:
            raise
        except (ValueError, OSError, KeyError, TypeError, RuntimeError) as err:
            raise DataError(f"OSM source {path} cannot be read ({type(err).__name__}: "
                            f"{' '.join(str(err).split())[:160]}); check the file") from None

    def __len__(self) -> int:
        return sum(len(features) for _, features, _ in self.parts)

    def index(self, crs: str) -> RegionIndex:
        """Every feature, in source order, reprojected to ``crs`` and indexed (made once per CRS)."""
        key = str(crs)
        if key not in self._indexes:
            pairs: list[tuple[Any, Any]] = []
            for _, features, source_crs in self.parts:
                if not features:
                    continue
                geoms = np.array([g for g, _ in features], dtype=object)
                if not _same_crs(source_crs, key):
                    geoms = reproject(geoms, source_crs, key)
                pairs += zip(geoms, (t for _, t in features), strict=True)
            self._indexes[key] = RegionIndex(pairs, key)
        return self._indexes[key]

    def tags(self) -> Iterable[Any]:
        """The tags of every feature (to embed a job's tag strings once, before its windows)."""
        for _, features, _ in self.parts:
            for _, tags in features:
                yield tags


def osm_coverage(features: Sequence[tuple[Any, Any]], transform: Any, window: Window) -> float:
    """The share of the window's pixels covered by ``features``: under a polygon (pixel centre inside) or touched by
    a line or point (see the module docstring); ``transform`` is the raster's."""
    if not features:
        return 0.0
    from affine import Affine
    from rasterio.features import rasterize

    t = transform
    origin = (t.a * window.col + t.b * window.row + t.c, t.d * window.col + t.e * window.row + t.f)
    local = Affine(t.a, t.b, origin[0], t.d, t.e, origin[1])
    geoms = [g for g, _ in features]
    dims = shapely.get_dimensions(np.asarray(geoms, dtype=object))
    shape = (window.size, window.size)
    covered = np.zeros(shape, dtype=bool)
    areas = [g for g, d in zip(geoms, dims, strict=True) if d == 2]
    others = [g for g, d in zip(geoms, dims, strict=True) if d != 2]
    if areas:
        covered |= rasterize(areas, out_shape=shape, transform=local, fill=0, default_value=1, dtype="uint8") > 0
    if others:
        covered |= rasterize(others, out_shape=shape, transform=local, fill=0, default_value=1, dtype="uint8",
                             all_touched=True) > 0
    return float(covered.mean())


class EmbedDataset(Dataset):
    """``(image, graph, meta)`` per window of ``rasters`` (row-major per raster, rasters in order).

    Args:
        rasters: the checked rasters (:func:`~geolink.embed.windows.inspect_raster`).
        tile_size: window side in pixels.
        mean, std: the model's normalisation.
        sources: the OSM sources, or None (every window in image mode, graphs None).
        tag_encoder: embeds the graphs' tags (None: graphs hold no ``x``; then only counts are useful).
        scale: the divisor of non-uint8 pixels (see :func:`~geolink.embed.windows.scale_for`).
        mode: ``auto``, ``fused`` or ``image`` (:data:`MODES`).
        min_nodes: fewest nodes for ``fused`` under ``auto``.
        min_valid: windows whose valid fraction is below it are skipped (image None); a window without a valid
            pixel always is.
        windows: ``(raster position, Window)`` pairs to serve instead of every window (resume, shards).

    Items:
        ``image``: ``[C, S, S]`` float32 normalised, None for a skipped window; ``graph``: the window's
        ``HeteroData`` for a ``fused`` window, else None; ``meta``: ``image`` (path), ``raster``, ``row``, ``col``,
        ``mode``, ``num_nodes``, ``osm_coverage``, ``valid_fraction``, ``skipped``, and ``error`` (the message)
        for a window whose pixels cannot be read (a damaged file): the consumer decides to stop or go on.
    """

    def __init__(self, rasters: Sequence[RasterInfo], tile_size: int, mean: Sequence[float], std: Sequence[float],
                 sources: OSMSources | None = None, tag_encoder: Any = None, scale: float | None = None,
                 mode: str = "auto", min_nodes: int = 1, min_valid: float = 0.05,
                 windows: Sequence[tuple[int, Window]] | None = None) -> None:
        if mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == "fused" and sources is None:
            raise InputError("mode 'fused' needs OSM sources; pass sources or use mode 'auto' / 'image'")
        self.rasters = list(rasters)
        for info in self.rasters:
            scale_for(info.dtype, scale, info.path)  # refuse an integer raster without scale before any window
        self.tile_size = int(tile_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.sources = sources
        self.builder = OSMGraphBuilder(tag_encoder=tag_encoder, tag_weights="official")
        self.scale, self.mode, self.min_nodes, self.min_valid = scale, mode, int(min_nodes), float(min_valid)
        self.windows = list(windows) if windows is not None else [
            (k, window) for k, info in enumerate(self.rasters)
            for window in grid_windows(info.height, info.width, self.tile_size)]
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.windows)

    def _source(self, k: int) -> Any:
        if self._pid != os.getpid():  # a forked worker: never share the parent's file handles
            self._handles, self._pid = {}, os.getpid()
        if k not in self._handles:
            self._handles[k] = self.rasters[k].open()
        return self._handles[k]

    def close(self) -> None:
        """Close the open rasters of this process."""
        for handle in self._handles.values():
            handle.close()
        self._handles = {}

    def graph_of(self, k: int, window: Window) -> tuple[Any, list[tuple[Any, Any]]]:
        """The window's graph (or None without sources) and its candidate features."""
        if self.sources is None:
            return None, []
        info = self.rasters[k]
        bounds = window.bounds(info.transform)
        features = self.sources.index(info.crs).features_in(bounds)
        with warnings.catch_warnings():  # a feature that only touches the window edge is no CRS mix-up
            warnings.filterwarnings("ignore", message="no feature intersects the bbox")
            return self.builder.build(features, bbox=bounds, crs=info.crs), features

    def __getitem__(self, position: int) -> tuple[torch.Tensor | None, Any, dict[str, Any]]:
        k, window = self.windows[position]
        info = self.rasters[k]
        meta = {"image": str(info.path), "raster": k, "row": window.row, "col": window.col, "valid_fraction": 0.0,
                "num_nodes": 0, "osm_coverage": 0.0, "mode": "image", "skipped": True}
        try:
            pixels, valid = read_window(self._source(k), info, window)
        except DataError as err:  # reported by the consumer (a worker's exception would arrive as a traceback)
            return None, None, {**meta, "error": str(err)}
        valid_fraction = meta["valid_fraction"] = float(valid.mean())
        meta["skipped"] = valid_fraction <= 0.0 or valid_fraction < self.min_valid
        if meta["skipped"]:
            return None, None, meta
        image = to_model_input(pixels, self.scale, self.mean, self.std)
        graph, features = self.graph_of(k, window)
        if graph is not None:
            meta["num_nodes"] = int(sum(graph[t].num_nodes for t in NODE_TYPES))
            meta["osm_coverage"] = osm_coverage(features, info.transform, window)
        fused = self.mode == "fused" or (self.mode == "auto" and graph is not None
                                         and meta["num_nodes"] >= self.min_nodes)
        meta["mode"] = "fused" if fused else "image"
        return image, graph if fused else None, meta


def collate_windows(items: Sequence[tuple[torch.Tensor | None, Any, dict[str, Any]]]
                    ) -> tuple[torch.Tensor | None, list[Any], list[dict[str, Any]]]:
    """A batch of :class:`EmbedDataset` items: ``(images [B', C, S, S] of the kept windows or None, their graphs
    (None for image windows), every window's meta in order)``."""
    kept = [item for item in items if item[0] is not None]
    images = torch.stack([item[0] for item in kept]) if kept else None
    return images, [item[1] for item in kept], [item[2] for item in items]


def job_fingerprint(values: dict[str, Any]) -> str:
    """A stable text of the settings that shape a job's rows (stored with its parts to refuse a different resume)."""
    return json.dumps(values, sort_keys=True, default=str)


def check_overlap(sources: OSMSources, rasters: Sequence[RasterInfo]) -> list[Path]:
    """The rasters no source feature overlaps, each with a warning: their windows fall back to image mode."""
    missed = []
    for info in rasters:
        index = sources.index(info.crs)
        if len(index) == 0 or not len(index.tree.query(info.footprint, predicate="intersects")):
            missed.append(info.path)
            warnings.warn(f"the OSM sources do not overlap image {info.path}; its windows are embedded from the "
                          "image alone (mode image)", UserWarning, stacklevel=2)
    return missed
