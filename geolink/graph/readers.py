"""Reading OSM vectors: files, frames and extracts → ``(geometry, tags)`` features, their CRS, and key counts.

Owns the readers (GeoJSON natively; GeoPackage/Shapefile/... through geopandas; ``.osm.pbf``/``.osm`` through
pyosmium, streaming, with tag filtering in the reader; (Geo)DataFrames; lists of shapely objects), the one test of
"is this CRS geographic?" (:func:`is_geographic`), reprojection (pyproj), the OSM conventions that tell areas from
closed lines (:func:`is_area`), and key counting over a corpus (:class:`KeyCounter`, the ``geolink tag-stats`` job:
:class:`TagStatsConfig` → :func:`tag_stats`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from geolink.errors import ConfigError, DataError, InputError, MissingInputError
from geolink.graph.storage import MAX_GEOJSON_BYTES, MAX_INPUT_BYTES, check_file
from geolink.graph.tags import TagFilter, Tags, load_key_frequency, normalize_key, parse_label, tag_key
from geolink.runtime import require_module

Feature = tuple[shapely.Geometry, Any]
BBox = tuple[float, float, float, float]
"""(west, south, east, north)."""

OSM_SUFFIXES = (".osm.pbf", ".pbf", ".osm", ".osm.bz2", ".osm.gz")
"""File name endings read as OpenStreetMap data (pyosmium)."""
GEOJSON_SUFFIXES = (".geojson", ".json")
"""File name endings read as GeoJSON."""
_GEOPANDAS_SUFFIXES = (".gpkg", ".shp", ".fgb", ".parquet", ".gml", ".kml", ".gdb", ".zip")
_GEOGRAPHIC_CRS = frozenset({"EPSG:4326", "OGC:CRS84", "CRS84", "WGS84", "EPSG:4258"})


def require_file(path: str | Path, what: str, max_bytes: int = MAX_INPUT_BYTES) -> Path:
    """``path`` as a Path, checked before reading: an existing folder (some vector formats are folders), or a regular
    file (not a FIFO, a device or a link to one) of at most ``max_bytes`` bytes (:func:`~geolink.graph.storage.
    check_file`).

    Raises:
        MissingInputError: ``path`` does not exist (naming it and ``what`` it is).
        DataError: it is not a regular file or folder, or is too large.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise MissingInputError(f"{what} {path} not found (check the path)")
    if not path.is_dir():
        check_file(path, what, max_bytes)
    return path


# ---------------------------------------------------------------------------------------------- CRS


def is_geographic(crs: str) -> bool:
    """Whether ``crs`` is a longitude/latitude CRS in degrees (WGS 84 / CRS84 / ETRS89 spellings)."""
    return str(crs).upper().replace(" ", "") in _GEOGRAPHIC_CRS


def reproject(geoms: np.ndarray | Iterable[shapely.Geometry], src_crs: str, dst_crs: str) -> np.ndarray:
    """Reproject shapely geometries from ``src_crs`` to ``dst_crs`` (pyproj, x/y = lon/lat order).

    Raises:
        InputError: pyproj does not know one of the CRSs.
    """
    pyproj = require_module("pyproj", "osm")
    geoms = np.asarray(list(geoms) if not isinstance(geoms, np.ndarray) else geoms, dtype=object)
    try:
        transformer = pyproj.Transformer.from_crs(src_crs, dst_crs, always_xy=True)
    except pyproj.exceptions.CRSError as err:
        raise InputError(f"cannot reproject from {src_crs!r} to {dst_crs!r}: {err}") from err
    return shapely.transform(geoms, lambda xy: np.stack(transformer.transform(xy[:, 0], xy[:, 1]), axis=1))


def reproject_bbox(bbox: Iterable[float], src_crs: str, dst_crs: str) -> BBox:
    """The bounds in ``dst_crs`` of the box ``bbox`` (west, south, east, north) of ``src_crs`` (its corners
    reprojected); ``bbox`` itself when the CRSs are the same."""
    bbox = tuple(float(v) for v in bbox)
    if str(src_crs) == str(dst_crs):
        return bbox
    return tuple(float(v) for v in shapely.bounds(reproject(np.array([shapely.box(*bbox)], dtype=object), src_crs,
                                                            dst_crs)[0]))


def _crs_from_geojson(data: Mapping[str, Any]) -> str:
    name = ((data.get("crs") or {}).get("properties") or {}).get("name")
    if not name or "CRS84" in name.upper():
        return "EPSG:4326"
    if "EPSG" in name.upper():
        return "EPSG:" + name.rstrip("/").split(":")[-1].split("/")[-1]
    return name


# ---------------------------------------------------------------------------------------------- readers


def _properties_to_tags(properties: Mapping[str, Any] | None, label_column: str) -> Any:
    if not properties:
        return None
    label = properties.get(label_column)
    if isinstance(label, str):
        return label
    return {str(k): str(v) for k, v in properties.items() if v is not None and not isinstance(v, dict | list)}


def read_geojson(path: str | Path, label_column: str = "label") -> tuple[list[Feature], str]:
    """Features and CRS of a GeoJSON file; tags are the ``label_column`` string when present, else the properties.

    Raises:
        MissingInputError: the file does not exist.
        DataError: the file is not a GeoJSON Feature or FeatureCollection.
    """
    from shapely.geometry import shape

    with open(require_file(path, "GeoJSON file", MAX_GEOJSON_BYTES), encoding="utf-8") as handle:
        try:
            data = json.load(handle)
        except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
            raise DataError(f"GeoJSON file {path} is not valid JSON ({error}): the file is truncated or not "
                            "GeoJSON") from None
    if isinstance(data, dict) and data.get("type") == "Feature":
        data = {"type": "FeatureCollection", "features": [data]}
    if not isinstance(data, dict) or data.get("type") != "FeatureCollection" or not isinstance(data.get("features"),
                                                                                                 list):
        raise DataError(f"GeoJSON file {path} is not a GeoJSON Feature or FeatureCollection (a JSON object with "
                        "\"type\" and \"features\")")
    features = []
    for number, feature in enumerate(data["features"]):
        try:
            if not feature.get("geometry"):
                continue
            features.append((shape(feature["geometry"]), _properties_to_tags(feature.get("properties"),
                                                                             label_column)))
        except Exception as error:  # shapely raises many types for bad coordinates (TypeError, ValueError, GEOS)
            raise DataError(f"GeoJSON file {path}: feature {number} has an invalid geometry or properties "
                            f"({type(error).__name__}: {error})") from None
    return features, _crs_from_geojson(data)


def frame_features(frame: Any, label_column: str = "label") -> tuple[list[Feature], str | None]:
    """Features of a (Geo)DataFrame-like object (a ``geometry`` column + tag columns) and its CRS (or None).

    Raises:
        InputError: the frame has no ``geometry`` column.
    """
    if frame is None:
        return [], None
    try:
        geometry = list(frame["geometry"])
    except (KeyError, TypeError):
        raise InputError("a frame needs a 'geometry' column of shapely geometries") from None
    columns = [c for c in frame.columns if c != "geometry"]
    if label_column in columns:
        tags = [v if isinstance(v, str) else None for v in frame[label_column]]
    else:
        values = {c: list(frame[c]) for c in columns}
        tags = [{c: str(values[c][i]) for c in columns
                 if values[c][i] is not None and values[c][i] == values[c][i]} for i in range(len(geometry))]
    crs = getattr(frame, "crs", None)
    if crs is not None and hasattr(crs, "to_string"):
        crs = crs.to_string()
    return list(zip(geometry, tags, strict=True)), (str(crs) if crs is not None else None)


_AREA_KEYS = frozenset({"building", "landuse", "leisure", "amenity", "shop", "tourism", "place", "water", "wetland",
                        "military", "aeroway", "historic", "boundary", "building:part", "parking", "craft", "office",
                        "public_transport", "healthcare", "club", "sport", "golf", "playground", "ruins",
                        "area:highway"})
_LINEAR_VALUES = {"natural": {"coastline", "cliff", "ridge", "arete", "tree_row", "valley"},
                  "man_made": {"pier", "breakwater", "groyne", "embankment", "dyke", "pipeline", "cutline"},
                  "aeroway": {"runway", "taxiway", "taxilane", "parking_position"},
                  "leisure": {"track", "slipway"}, "amenity": {"bench"}, "barrier": set(), "highway": set(),
                  "railway": set(), "waterway": set(), "power": {"line", "minor_line", "cable"}}


def is_area(tags: Mapping[str, str]) -> bool:
    """Whether a closed OSM way is an area (polygon) rather than a closed line, by the usual OSM conventions."""
    area = tags.get("area")
    if area == "yes":
        return True
    if area == "no":
        return False
    for key, value in tags.items():
        if key in ("natural", "man_made", "power", "waterway", "aeroway", "leisure", "amenity"):
            linear = _LINEAR_VALUES.get(key, set())
            if value not in linear and not (key == "waterway" and value not in ("riverbank", "dock", "boatyard")):
                return True
        elif key in _AREA_KEYS:
            return True
    return False


def read_osm(path: str | Path, bbox: Iterable[float] | None = None, tag_filter: TagFilter | None = None,
             key_frequency: str | Path | Mapping[str, float] | None = "official",
             progress: bool = False) -> Iterator[Feature]:
    """Stream features from an ``.osm.pbf`` / ``.osm`` / ``.osm.bz2`` file with pyosmium.

    Tagged nodes become points, open ways lines, closed ways polygons when :func:`is_area` (else lines), and
    multipolygon (and boundary) relations (multi)polygons. Tags are filtered in the reader: an object is yielded only if
    at least one key survives ``tag_filter`` (default: keys of the key-frequency table), with the surviving tags as
    a dict. Memory: pyosmium keeps node locations; features are yielded one by one.

    Args:
        path: the OSM file.
        bbox: (west, south, east, north) in degrees; objects whose envelope misses it are skipped.
        tag_filter: which keys to keep (default ``TagFilter()``: keys present in ``key_frequency``).
        key_frequency: the table ``tag_filter.known_only`` checks against.
        progress: show a progress bar (objects read).

    Raises:
        MissingInputError: the file does not exist.
    """
    osmium = require_module("osmium", "osm")
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise MissingInputError(f"OSM file {path} not found (pass an existing .osm.pbf or .osm file)")
    check_file(path, "OSM file", MAX_INPUT_BYTES)
    frequency = load_key_frequency(key_frequency)
    tag_filter = tag_filter or TagFilter()
    region = shapely.box(*bbox) if bbox is not None else None
    factory = osmium.geom.WKBFactory()
    keep_cache: dict[str, bool] = {}

    def kept(tags: Any) -> dict[str, str] | None:
        out = {}
        for tag in tags:
            ok = keep_cache.get(tag.k)
            if ok is None:
                ok = keep_cache[tag.k] = tag_filter.keeps(normalize_key(tag.k), frequency)
            if ok:
                out[tag.k] = tag.v
        return out or None

    from tqdm.auto import tqdm

    def objects() -> Iterator[Any]:
        """The file's objects; osmium's read errors (a truncated, empty or garbage file) name the file."""
        try:
            iterator = iter(osmium.FileProcessor(str(path)).with_locations().with_areas())
            while True:
                try:
                    yield next(iterator)
                except StopIteration:
                    return
        except RuntimeError as error:
            raise DataError(f"OSM file {path} cannot be read ({error}): it is truncated, empty or not an OSM "
                            "extract; download it again") from None

    for obj in tqdm(objects(), desc=f"reading {path.name}", unit=" objects", disable=not progress, mininterval=1):
        if not obj.tags:
            continue
        try:
            if obj.is_node():
                tags = kept(obj.tags)
                if tags is None:
                    continue
                geom = shapely.Point(obj.location.lon, obj.location.lat)
            elif obj.is_way():
                tags = kept(obj.tags)
                if tags is None or len(obj.nodes) < 2:
                    continue
                coords = [(n.lon, n.lat) for n in obj.nodes]
                closed = obj.nodes[0].ref == obj.nodes[-1].ref and len(coords) >= 4
                all_tags = {t.k: t.v for t in obj.tags}
                geom = shapely.Polygon(coords) if closed and is_area(all_tags) else shapely.LineString(coords)
            elif obj.is_area():
                if obj.from_way():  # closed ways are handled above, with the area/line rule
                    continue
                tags = kept(obj.tags)  # osmium assembles multipolygon and boundary relations, without 'type'
                if tags is None:
                    continue
                geom = shapely.from_wkb(factory.create_multipolygon(obj))
            else:
                continue
        except osmium.InvalidLocationError:
            continue  # an object referencing nodes outside the extract
        if region is not None and not region.intersects(shapely.envelope(geom)):
            continue
        yield geom, tags


def read_features(source: Any, label_column: str = "label", layer: str | None = None,
                  **osm_kwargs: Any) -> tuple[list[Feature], str | None]:
    """Features and CRS from a file (GeoJSON, ``.osm.pbf``, or anything geopandas reads), a (Geo)DataFrame, or a
    list of shapely geometries / ``(geometry, tags)`` pairs (bare geometries get no tags: pass tags).

    Returns:
        ``(features, crs)``; crs is None when unknown (lists).

    Raises:
        MissingInputError: the file does not exist.
        InputError: the file type is not one geolink reads.
    """
    if isinstance(source, str | Path):
        path = require_file(source, "vector file")
        name = path.name.lower()
        if name.endswith(OSM_SUFFIXES):
            return list(read_osm(path, **osm_kwargs)), "EPSG:4326"
        if name.endswith(GEOJSON_SUFFIXES):
            return read_geojson(path, label_column)
        if name.endswith(_GEOPANDAS_SUFFIXES):
            gpd = require_module("geopandas", "geo")
            frame = gpd.read_parquet(path) if name.endswith(".parquet") else gpd.read_file(path, layer=layer)
            return frame_features(frame, label_column)
        raise InputError(f"unknown vector file type {path.suffix!r} ({path}); use GeoJSON, .osm.pbf, or a format "
                         "geopandas reads (.gpkg, .shp, .fgb, .parquet) with `pip install geolink[geo]`")
    if hasattr(source, "columns"):
        return frame_features(source, label_column)
    features = []
    for item in source:
        features.append((item, None) if isinstance(item, shapely.Geometry) else tuple(item))
    return features, None


# ---------------------------------------------------------------------------------------------- key counts


class KeyCounter:
    """Counts, for each normalised key, the number of OSM objects carrying it (``geolink tag-stats``)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.objects = 0

    def add(self, tags: Tags | None) -> None:
        """Count one object's keys (each key once per object)."""
        self.objects += 1
        if not tags:
            return
        keys = ({tag_key(s) for s in parse_label(tags)} if isinstance(tags, str)
                else {normalize_key(k) for k in tags})
        self.counts.update(keys)

    def table(self, min_count: int = 1) -> dict[str, int]:
        """The frequency table, most frequent first (ties by key), keeping keys seen at least ``min_count`` times."""
        items = sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return {k: v for k, v in items if v >= min_count}

    def save(self, path: str | Path, min_count: int = 1) -> dict[str, int]:
        """Write the table as JSON (the format :func:`~geolink.graph.tags.load_key_frequency` reads); return it."""
        table = self.table(min_count)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(table, handle, indent=1, ensure_ascii=False)
        return table


def count_keys(inputs: Iterable[str | Path], progress: bool = False) -> KeyCounter:
    """Objects per key over ``.osm.pbf``/``.osm`` files (every tagged node, way and relation) and GeoJSON files
    (every feature).

    Raises:
        MissingInputError: an input does not exist.
        InputError: an input is neither an OSM nor a GeoJSON file.
    """
    counter = KeyCounter()
    for path in map(Path, inputs):
        if not path.is_file():
            raise MissingInputError(f"input {path} not found (pass existing .osm.pbf, .osm or GeoJSON files)")
        name = path.name.lower()
        if name.endswith(OSM_SUFFIXES):
            osmium = require_module("osmium", "osm")
            from tqdm.auto import tqdm

            for obj in tqdm(osmium.FileProcessor(str(path)), desc=f"counting {path.name}", unit=" objects",
                            disable=not progress, mininterval=1):
                if obj.tags:
                    counter.add({t.k: t.v for t in obj.tags})
        elif name.endswith(GEOJSON_SUFFIXES):
            for _, tags in read_geojson(path)[0]:
                counter.add(tags)
        else:
            raise InputError(f"tag-stats reads .osm.pbf/.osm and GeoJSON files, not {path.suffix!r} ({path})")
    return counter


@dataclass
class TagStatsConfig:
    """Count, for each tag key, the OSM objects carrying it, over .osm.pbf / GeoJSON inputs, and write the JSON
    table OSMGraphBuilder(tag_weights=...) reads (keys with ':' written with spaces)."""

    inputs: tuple[Path, ...] = field(metadata={"help": ".osm.pbf / .osm / GeoJSON files", "positional": True})
    out: Path = field(metadata={"help": "output JSON file"})
    min_count: int = field(default=1, metadata={"help": "drop keys seen fewer times"})
    quiet: bool = field(default=False, metadata={"help": "no progress bars"})

    def __post_init__(self) -> None:
        self.inputs = tuple(Path(p) for p in self.inputs)
        self.out = Path(self.out)
        if not self.inputs:
            raise ConfigError("inputs is empty: pass at least one .osm.pbf / .osm / GeoJSON file")
        if self.min_count < 1:
            raise ConfigError(f"min_count must be at least 1, got {self.min_count}")


def tag_stats(config: TagStatsConfig) -> dict[str, Any]:
    """The ``geolink tag-stats`` job: count the keys of ``config.inputs`` and write the table to ``config.out``.

    Returns:
        ``{"out", "keys", "objects"}``: the file written, the keys in it, the objects counted.
    """
    counter = count_keys(config.inputs, progress=not config.quiet)
    table = counter.save(config.out, config.min_count)
    return {"out": str(config.out), "keys": len(table), "objects": counter.objects}
