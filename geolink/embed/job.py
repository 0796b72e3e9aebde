"""The ``geolink embed`` job: GeoTIFFs + OpenStreetMap → one GeoLink embedding per window, in a GeoParquet file.

:class:`EmbedConfig` (the flags) → :func:`embed`: check the rasters, read each OSM source once, then stream the
windows through a ``DataLoader`` (workers read pixels and build graphs while the model encodes the previous batch)
into :class:`WindowEncoder`, committing finished windows in atomically written parts, and assemble the final table.

With rasters in several CRSs the job writes ONE file whose footprints are reprojected to OGC:CRS84 (lon/lat,
densified edges); with a single CRS the footprints stay in it.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import functools
import os
import re
import shutil
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from geolink.embed.dataset import NO_OSM, EmbedDataset, OSMSources, check_overlap, collate_windows, job_fingerprint
from geolink.embed.encoder import WindowEncoder, load_window_encoder, window_errors
from geolink.embed.output import (
    EMBEDDING_DEFINITIONS,
    ODBL_ATTRIBUTION,
    embedding_columns,
    part_paths,
    read_parts,
    rows_table,
    write_atomic,
    write_geoparquet,
)
from geolink.embed.windows import RasterInfo, expand_images, inspect_raster
from geolink.errors import ConfigError, DataError, InputError
from geolink.graph.readers import reproject, reproject_bbox
from geolink.graph.tiles import TileShard
from geolink.runtime import Engine, Precision, option

MULTI_CRS = "OGC:CRS84"
"""The CRS of a file whose rasters are in several CRSs (footprints reprojected)."""


class EmbedMode(str, enum.Enum):
    """How windows are embedded: ``auto`` (fused with at least ``min_nodes`` OSM nodes, else image), ``fused``,
    ``image``."""

    AUTO = "auto"
    FUSED = "fused"
    IMAGE = "image"


class Bands(tuple):
    """1-based band indexes, written ``1,2,3`` on the command line."""

    @classmethod
    def from_string(cls, text: str) -> Bands:
        """``"4,3,2"`` → ``Bands((4, 3, 2))``.

        Raises:
            InputError: not a comma-separated list of positive integers.
        """
        if not re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", str(text)):
            raise InputError(f"bands must be 1-based band numbers separated by commas (e.g. 1,2,3), got {text!r}")
        return cls(int(v) for v in str(text).split(","))


@dataclasses.dataclass
class EmbedConfig:
    """Embed every window of GeoTIFF/COG images with a GeoLink model and the OpenStreetMap data around it, into one
    GeoParquet file (one row per window: footprint, mode, OSM node count and coverage, embedding).

    Windows of tile_size pixels cover each raster row-major from its top-left corner; a window with at least
    min_nodes OSM nodes is embedded by the fusion encoder (mode fused), others by the image encoder alone (mode
    image). Finished windows are committed in parts as the run goes: resume continues a killed run."""

    images: tuple[Path, ...] = dataclasses.field(metadata={
        "help": "GeoTIFF/COG files, folders of them or globs", "positional": True})
    osm: tuple[str, ...] = dataclasses.field(metadata={
        "help": "OSM sources (.osm.pbf, GeoJSON, GeoPackage, GeoParquet), or none", "metavar": "SOURCE"})
    out: Path = dataclasses.field(metadata={"help": "output GeoParquet file"})
    model: str = option("geolink_tiny.demo", "pretrained tag, model folder, Hub id or official .pth (fusion or "
                                             "pretraining weights)")
    text_model: str | None = option(None, "text model of the OSM tags (default: the model tag's text model)")
    tile_size: int | None = option(None, "window side in pixels (default: the model's input size)")
    gsd: float | None = option(None, "resample each raster to this ground sample distance (CRS units) first")
    bands: Bands | None = option(None, "1-based bands to read, e.g. 1,2,3 (default: all)")
    scale: float | None = option(None, "divisor taking non-uint8 pixels to [0, 1], e.g. 10000 (uint8: 255; "
                                       "float: 1)")
    crs: str | None = option(None, "CRS of rasters that have none, e.g. EPSG:32633")
    mode: EmbedMode = option(EmbedMode.AUTO, "auto: fused where a window has min_nodes OSM nodes, else image")
    min_nodes: int = option(1, "fewest OSM nodes for a fused window under mode auto")
    min_valid: float = option(0.05, "skip windows whose valid (non-nodata) pixel fraction is below this")
    batch_size: int = option(16, "windows per forward pass")
    workers: int = option(2, "DataLoader worker processes reading pixels and building graphs (0: in process)")
    device: str = option("auto", "torch device (auto: cuda if available)")
    precision: Precision = option(Precision.AUTO, "autocast precision (auto: bf16/fp16 on GPU, fp32 on CPU)")
    resume: bool = option(False, "continue a killed run from its committed parts")
    overwrite: bool = option(False, "move an existing output aside (<out>.previous-<n>) and start again")
    keep_going: bool = option(False, "skip (and count) unreadable rasters and windows instead of stopping")
    maps: Path | None = option(None, "folder for one GeoTIFF per raster: a 3-band PCA quick-look of the patch "
                                     "features, georeferenced")
    engine: Engine = option(Engine.LOCAL, "local, or ray (a Ray cluster; pip install geolink[distributed])")
    shard: TileShard | None = option(None, "i/n: embed only the windows k with k mod n = i (job arrays)")
    part_size: int = option(256, "windows per committed part")
    text_cache: Path | None = option(None, "folder of the on-disk tag-embedding cache (default: "
                                           "<geolink cache>/tags)")
    quiet: bool = option(False, "no progress bar")

    def __post_init__(self) -> None:
        self.images = tuple(Path(p) for p in self.images)
        self.osm = tuple(str(s) for s in self.osm)
        self.out = Path(self.out)
        self.mode, self.engine = EmbedMode(self.mode), Engine(self.engine)
        self.maps = Path(self.maps) if self.maps is not None else None
        self.precision = Precision(self.precision)
        self.text_cache = Path(self.text_cache) if self.text_cache is not None else None
        if self.bands is not None:
            self.bands = Bands(self.bands)
        if not self.images:
            raise ConfigError("images is empty: pass GeoTIFF files, folders or globs")
        if not self.osm:
            raise ConfigError("osm is empty: pass OSM sources, or none")
        if NO_OSM in self.osm and len(self.osm) > 1:
            raise ConfigError("osm: none cannot be combined with other sources")
        if self.osm == (NO_OSM,) and self.mode is EmbedMode.FUSED:
            raise ConfigError("mode fused needs OSM sources (osm is none); use mode auto or image")
        if self.out.suffix.lower() != ".parquet":
            raise ConfigError(f"out must be a .parquet file, got {self.out}")
        for name in ("batch_size", "part_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.workers < 0 or self.min_nodes < 0:
            raise ConfigError(f"workers and min_nodes must be >= 0, got {self.workers} and {self.min_nodes}")
        if self.tile_size is not None and self.tile_size < 1:
            raise ConfigError(f"tile_size must be positive, got {self.tile_size}")
        if not 0.0 <= self.min_valid <= 1.0:
            raise ConfigError(f"min_valid must be in [0, 1], got {self.min_valid}")
        for name in ("gsd", "scale"):
            value = getattr(self, name)
            if value is not None and not (np.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number, got {value}")
        if self.maps is not None and self.engine is Engine.RAY:
            raise ConfigError("maps are drawn by engine local only; leave maps out or use engine local")
        if self.resume and self.overwrite:
            raise ConfigError("pass resume or overwrite, not both")

    @property
    def sources(self) -> tuple[str, ...]:
        """The OSM source files (empty for none)."""
        return () if self.osm == (NO_OSM,) else self.osm


def text_model_of(config: EmbedConfig) -> str:
    """The text model: ``config.text_model``, else the model tag's.

    Raises:
        ConfigError: a model that is not a tag and no ``text_model``.
    """
    if config.text_model:
        return config.text_model
    from geolink.registry import get_pretrained_tag, list_pretrained

    if config.model in list_pretrained() and get_pretrained_tag(config.model).text_model:
        return get_pretrained_tag(config.model).text_model
    raise ConfigError(f"model {config.model} is not a pretrained tag, so its text model is unknown: pass text_model "
                      "(e.g. minilm or clip, the one the model was trained with)")


# --------------------------------------------------------------------------------------------------- the output
def parts_folder(out: Path) -> Path:
    """Where a run commits its parts: ``<out>.parts/``."""
    return out.with_name(out.name + ".parts")


def prepare_output(out: Path, resume: bool, overwrite: bool) -> None:
    """Never replace an output silently: an existing ``out`` (or its parts) needs ``resume`` (continue) or
    ``overwrite`` (move both aside to ``<out>.previous-<n>`` and start again, the trainer's policy).

    Raises:
        ConfigError: ``out`` or its parts exist and neither ``resume`` nor ``overwrite`` is set.
    """
    existing = [path for path in (out, parts_folder(out)) if path.exists()]
    if not existing or resume:
        return
    if not overwrite:
        raise ConfigError(f"out {out} already exists ({', '.join(p.name for p in existing)}); pass resume to "
                          f"continue it, overwrite to start again (the old output is moved to "
                          f"{out.name}.previous-<n>), or choose another out file")
    taken = [int(m.group(1)) for p in out.parent.glob(f"{out.name}.previous-*")
             if (m := re.fullmatch(re.escape(out.name) + r"\.previous-(\d+)", p.name))]
    aside = out.parent / f"{out.name}.previous-{max(taken, default=0) + 1}"
    aside.mkdir()
    for path in existing:
        os.replace(path, aside / path.name)
    warnings.warn(f"overwrite: the previous output {out} was moved to {aside}", UserWarning, stacklevel=2)


def file_crs(rasters: Sequence[RasterInfo]) -> str:
    """The CRS of the file: the rasters' one CRS, else :data:`MULTI_CRS`."""
    crss = list(dict.fromkeys(info.crs for info in rasters))
    return crss[0] if len(crss) == 1 else MULTI_CRS


def footprint_in(info: RasterInfo, geometry: shapely.Geometry, crs: str) -> shapely.Geometry:
    """A window footprint in the file CRS (reprojected with densified edges when it differs)."""
    if info.crs == crs:
        return geometry
    dense = shapely.segmentize(geometry, max(abs(info.transform.a), abs(info.transform.e)) * 16)
    return reproject(np.array([dense], dtype=object), info.crs, crs)[0]


def _raster_bbox_wgs84(rasters: Sequence[RasterInfo]) -> tuple[float, float, float, float]:
    boxes = np.array([reproject_bbox(shapely.bounds(info.footprint), info.crs, "EPSG:4326") for info in rasters])
    return float(boxes[:, 0].min()), float(boxes[:, 1].min()), float(boxes[:, 2].max()), float(boxes[:, 3].max())


# ------------------------------------------------------------------------------------------------------ the job
def _inspect_all(config: EmbedConfig, paths: Sequence[Path], in_chans: int) -> tuple[list[RasterInfo], list[str]]:
    rasters, failed = [], []
    for path in paths:
        try:
            rasters.append(inspect_raster(path, in_chans, config.bands, config.crs, config.gsd))
        except DataError as err:
            if not config.keep_going:
                raise
            failed.append(str(path))
            warnings.warn(f"{err}; skipped (keep_going)", UserWarning, stacklevel=3)
    if not rasters:
        raise DataError("no readable image among images; check the files")
    return rasters, failed


@functools.lru_cache(maxsize=2)
def _tag_encoder(text_model: str, device: str, cache: Path) -> Any:
    """The tag encoder of a text model, loaded once per process (its cache only ever holds deterministic values)."""
    from geolink.graph.text import TagEncoder

    return TagEncoder(text_model, device=device, cache_dir=cache)


def prepare_job(config: EmbedConfig) -> dict[str, Any]:
    """Everything a run needs before its first window: model, rasters, sources, tag encoder, dataset, columns, the
    windows still to do. Shared by the local and the Ray engines."""
    paths = expand_images(config.images)
    encoder, data = load_window_encoder(config.model, config.device, config.precision)
    image_encoder = encoder.image_encoder
    tile_size = config.tile_size or int(data["input_size"][-1])
    if tile_size % image_encoder.patch_size:
        raise ConfigError(f"tile_size {tile_size} is not a multiple of the model's patch size "
                          f"{image_encoder.patch_size}")
    rasters, failed = _inspect_all(config, paths, image_encoder.in_chans)
    sources = tag_encoder = None
    text_model = None
    if config.sources:
        sources = OSMSources(config.sources, bbox=_raster_bbox_wgs84(rasters))
        check_overlap(sources, rasters)
        text_model = text_model_of(config)
        from geolink.convert import cache_dir

        tag_encoder = _tag_encoder(text_model, config.device, config.text_cache or cache_dir() / "tags")
    dataset = EmbedDataset(rasters, tile_size, data["mean"], data["std"], sources=sources, tag_encoder=tag_encoder,
                           scale=config.scale, mode=config.mode.value, min_nodes=config.min_nodes,
                           min_valid=config.min_valid)
    if tag_encoder is not None:  # embed every tag string once, here: workers then only read the cache
        strings = {s for tags in sources.tags() for s in dataset.builder.tag_strings(tags)}
        tag_encoder.encode(sorted(strings), progress=not config.quiet)
        tag_encoder.save_cache()
    windows = dataset.windows
    if config.shard is not None:
        windows = [windows[k] for k in config.shard.positions(len(windows))]
    modes = {"auto": ["fused", "image"] if sources is not None else ["image"], "fused": ["fused"],
             "image": ["image"]}[config.mode.value]
    columns = embedding_columns(modes, **{f"{m}_dim": d for m, d in encoder.dims.items()})
    crs = file_crs(rasters)
    info = {"model": config.model, "model_revision": _model_revision(config.model), "text_model": text_model,
            "geolink_version": _version(), "tile_size": tile_size, "mode": config.mode.value,
            "min_nodes": config.min_nodes, "gsd": config.gsd, "bands": list(config.bands) if config.bands else None,
            "scale": config.scale, "mean": list(data["mean"]), "std": list(data["std"]),
            "osm_sources": [str(s) for s in config.sources],
            "osm_attribution": ODBL_ATTRIBUTION if config.sources else None,
            "embedding": {name: EMBEDDING_DEFINITIONS[m] if m != "*" else EMBEDDING_DEFINITIONS for name, (m, _) in
                          columns.items()},
            "osm_coverage": "share of the window's pixels under an OSM polygon (pixel centre inside) or touched by an "
                            "OSM line or point",
            "crs": crs, "shard": str(config.shard) if config.shard else None}
    fingerprint = job_fingerprint({k: v for k, v in info.items() if k != "geolink_version"}
                                  | {"images": [str(r.path) for r in rasters]})
    return {"encoder": encoder, "data": data, "tile_size": tile_size, "rasters": rasters, "failed": failed,
            "sources": sources, "tag_encoder": tag_encoder, "dataset": dataset, "windows": windows,
            "columns": columns, "crs": crs, "info": info, "fingerprint": fingerprint}


def _version() -> str:
    import geolink

    return geolink.__version__


def _model_revision(model: str) -> str | None:
    from geolink.registry import get_pretrained_tag, list_pretrained

    if model in list_pretrained():
        return get_pretrained_tag(model).revision
    checksums = Path(model) / "checksums.json"
    return checksums.read_text(encoding="utf-8").strip()[:200] if checksums.is_file() else None


def _open_parts(out: Path, fingerprint: str, resume: bool) -> tuple[Path, set[tuple[str, int, int]], int]:
    """The parts folder (made, or checked against ``fingerprint`` on resume), the windows already done and the
    next part number."""
    import pyarrow.parquet as pq

    folder = parts_folder(out)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / "job.json"
    if stamp.is_file() and stamp.read_text(encoding="utf-8") != fingerprint:
        raise ConfigError(f"resume: {folder} holds a run with other settings (model, tiles, sources or images "
                          "differ); pass overwrite to start again")
    if not stamp.is_file():
        temporary = stamp.with_name(".job.json.tmp")
        temporary.write_text(fingerprint, encoding="utf-8")
        os.replace(temporary, stamp)
    for stale in folder.glob(".*.tmp"):  # a part a killed run was writing: never committed
        stale.unlink()
    done: set[tuple[str, int, int]] = set()
    paths = part_paths(folder)
    for path in paths:
        table = pq.read_table(path, columns=["image", "row", "col"])
        done.update(zip(table["image"].to_pylist(), table["row"].to_pylist(), table["col"].to_pylist(), strict=True))
    number = max((int(p.stem.split("-")[-1]) for p in paths), default=-1) + 1
    return folder, done, number


def embed(config: EmbedConfig) -> dict[str, Any]:
    """The ``geolink embed`` job (see :class:`EmbedConfig`); the Python entry point of the same job.

    Returns:
        A summary: windows embedded (fused / image), skipped (low valid fraction), failed, rasters, the output file,
        timings and windows per second.

    Raises:
        ConfigError: an existing output without resume / overwrite, a resume with other settings.
        InputError, DataError: a bad raster or OSM source (the message names the file).
    """
    start = time.perf_counter()
    out = config.out
    if config.resume and out.is_file() and not parts_folder(out).exists():
        return {"out": str(out), "windows": 0, "resumed": True, "note": "already complete"}
    prepare_output(out, config.resume, config.overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    job = prepare_job(config)
    folder, done, number = _open_parts(out, job["fingerprint"], config.resume)
    dataset: EmbedDataset = job["dataset"]
    todo = [(k, w) for k, w in job["windows"] if (str(dataset.rasters[k].path), w.row, w.col) not in done]
    summary = {"out": str(out), "rasters": len(job["rasters"]), "failed_rasters": len(job["failed"]),
               "windows": len(job["windows"]), "resumed_windows": len(job["windows"]) - len(todo), "fused": 0,
               "image": 0, "skipped": 0, "failed_windows": 0}
    setup_s = time.perf_counter() - start
    parts = PartWriter(folder, number, job, config.part_size)
    if config.engine is Engine.RAY:
        from geolink.embed.distributed import run_ray

        counts = run_ray(config, job, todo, parts)
    else:
        counts = run_local(config, job, todo, parts)
    summary.update({k: summary[k] + counts.get(k, 0) for k in ("fused", "image", "skipped", "failed_windows")})
    if "maps" in counts:
        summary["maps"] = counts["maps"]
    table = read_parts(folder, job["columns"])
    order = {str(info.path): k for k, info in enumerate(job["rasters"])}
    keys = np.lexsort((np.asarray(table["col"]), np.asarray(table["row"]),
                       np.asarray([order.get(p, len(order)) for p in table["image"].to_pylist()])))
    table = table.take(keys)
    write_geoparquet(table, out, job["crs"], job["info"])
    shutil.rmtree(folder)
    total = time.perf_counter() - start
    summary.update(rows=table.num_rows, setup_s=round(setup_s, 3), total_s=round(total, 3),
                   windows_per_s=round((summary["fused"] + summary["image"]) / max(total - setup_s, 1e-9), 2))
    return summary


class PartWriter:
    """Commits finished windows of a run as parts: every ``part_size`` rows one Parquet file, written atomically
    (both engines use it, so ``resume`` continues a run of either).

    Args:
        folder: the parts folder; number: the next part number.
        job: :func:`prepare_job`'s result (rasters, tile size, columns, file CRS).
    """

    def __init__(self, folder: Path, number: int, job: dict[str, Any], part_size: int) -> None:
        self.folder, self.number, self.job, self.part_size = folder, number, job, part_size
        self.metas: list[dict[str, Any]] = []
        self.geometries: list[shapely.Geometry] = []
        self.embeddings: list[np.ndarray] = []

    def add(self, metas: Sequence[dict[str, Any]], embeddings: Sequence[np.ndarray]) -> None:
        """Queue embedded windows (their footprints made here); commit when a part is full."""
        from geolink.embed.windows import Window

        for meta, embedding in zip(metas, embeddings, strict=True):
            info = self.job["dataset"].rasters[meta["raster"]]
            window = Window(int(meta["row"]), int(meta["col"]), self.job["tile_size"])
            self.metas.append(meta)
            self.geometries.append(footprint_in(info, window.footprint(info.transform), self.job["crs"]))
            self.embeddings.append(embedding)
        if len(self.metas) >= self.part_size:
            self.commit()

    def commit(self) -> None:
        """Write the queued windows as the next part."""
        if self.metas:
            table = rows_table(self.metas, self.geometries, self.embeddings, self.job["columns"])
            write_atomic(table, self.folder / f"part-{self.number:06d}.parquet")
            self.number += 1
        self.metas, self.geometries, self.embeddings = [], [], []


def run_local(config: EmbedConfig, job: dict[str, Any], todo: Sequence[tuple[int, Any]], parts: PartWriter
              ) -> dict[str, int]:
    """Embed ``todo`` in this process: a DataLoader (``config.workers`` processes reading pixels and building
    graphs) feeding batched inference; finished windows go to ``parts``."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    encoder: WindowEncoder = job["encoder"]
    subset = copy.copy(job["dataset"])
    subset.windows = list(todo)
    workers = config.workers if len(todo) > 1 else 0
    loader = DataLoader(subset, batch_size=config.batch_size, num_workers=workers, collate_fn=collate_windows,
                        multiprocessing_context="fork" if workers else None, prefetch_factor=4 if workers else None)
    counts: dict[str, Any] = {"fused": 0, "image": 0, "skipped": 0, "failed_windows": 0}
    maps = None
    if config.maps is not None:
        from geolink.embed.maps import RasterMaps

        maps = RasterMaps(config.maps, job["dataset"].rasters, encoder.image_encoder.patch_size)
    with tqdm(total=len(todo), desc="embedding", unit="window", disable=config.quiet) as bar:
        for images, graphs, metas in loader:
            counts["failed_windows"] += window_errors(metas, config.keep_going)
            counts["skipped"] += sum(m["skipped"] and not m.get("error") for m in metas)
            kept = [m for m in metas if not m["skipped"]]
            if kept:
                embeddings, patch_maps = encoder(images, graphs, [m["mode"] for m in kept], maps is not None)
                parts.add(kept, embeddings)
                for meta, patch_map in zip(kept, patch_maps or (), strict=False):
                    maps.add(meta, patch_map)
                for meta in kept:
                    counts[meta["mode"]] += 1
            bar.update(len(metas))
    parts.commit()
    if maps is not None:
        counts["maps"] = maps.write()
    return counts
