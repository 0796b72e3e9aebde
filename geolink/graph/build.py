"""OSM features → the heterogeneous tile graph of DESIGN §3: :class:`OSMGraphBuilder`.

Owns the geometry pipeline (reprojection, bbox clipping, multi-part splitting, ``make_valid`` repair, dropping
empty and degenerate parts, with a :class:`BuildReport` of what happened), the deterministic anchors, and the
assembly of tag features (materialised ``x`` or the compact vocabulary-id form) and edges into a ``HeteroData``.
Topology lives in :mod:`geolink.graph.relations`, tag handling in :mod:`geolink.graph.tags`, text in
:mod:`geolink.graph.text`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import torch
from torch_geometric.data import HeteroData

from geolink.errors import InputError
from geolink.graph.readers import BBox, frame_features, is_geographic, reproject
from geolink.graph.relations import all_relations
from geolink.graph.schema import EDGE_TYPES, NODE_TYPES, NUM_ANCHORS, RELATIONS
from geolink.graph.storage import mix_tags, pad_tags
from geolink.graph.tags import (
    KEEP_ALL,
    TagFilter,
    Tags,
    TagVocabulary,
    load_key_frequency,
    node_weights,
    tag_key,
    tags_to_strings,
)

_TYPE_OF_DIM = {2: "polygon", 1: "line", 0: "point"}
MEMO_PAIRS = 200_000  # most entries of each OSMGraphBuilder memo ((key, value) -> tag string, tag string -> weight),
# checked when a tile starts
_KNOWN_KEYS = TagFilter()  # what tag_filter="auto" keeps of OSM tag dicts: the keys of the frequency table
_ANGLES = np.radians(360 / 3 * np.arange(3))
_RADII_STEPS = 10


@dataclass
class BuildReport:
    """What the geometry pipeline did with a tile's features (counts).

    Attributes:
        features: features given.
        nodes: nodes per type in the graph.
        outside_bbox: features not intersecting the bbox (dropped).
        clipped: features crossing the bbox edge (clipped to it).
        repaired: invalid polygons repaired (:func:`repair_polygons`; one that cannot be is dropped as degenerate).
        split_parts: extra nodes created by splitting multi-part geometries (and repaired/clipped results).
        dropped_empty: empty geometries.
        dropped_nonfinite: geometries with a NaN or infinite coordinate (before or after reprojection).
        dropped_degenerate: parts dropped for zero area/length or for a lower dimension than their feature
            (e.g. the line left when a polygon only touches the bbox).
        dropped_no_tags: features without any kept tag.
        unknown_keys: kept tags whose key is missing from the frequency table (weight 0).
    """

    features: int = 0
    nodes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(NODE_TYPES, 0))
    outside_bbox: int = 0
    clipped: int = 0
    repaired: int = 0
    split_parts: int = 0
    dropped_empty: int = 0
    dropped_nonfinite: int = 0
    dropped_degenerate: int = 0
    dropped_no_tags: int = 0
    unknown_keys: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-serialisable)."""
        return asdict(self)


@dataclass
class PreparedTile:
    """A tile after the geometry and tag pipeline, before text embedding (cheap to send between processes).

    Attributes:
        bbox: (west, south, east, north) in ``crs``.
        crs: the tile CRS.
        pos: per node type, float32 ``[N, A, 2]`` anchors in normalised image coordinates.
        tags: per node type, each node's tag strings.
        weights: per node type, the averaging weights of every node's tags, back to back in ``tags`` order (float64;
            each node's sum to 1).
        edges: per edge type, ``(edge_index [2, E], relation [E])``.
        report: the :class:`BuildReport`.
        geoms: per node type, the node geometries (tile CRS), or None once dropped (:meth:`strip`).
    """

    bbox: BBox
    crs: str
    pos: dict[str, np.ndarray]
    tags: dict[str, list[list[str]]]
    weights: dict[str, np.ndarray]
    edges: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]]
    report: BuildReport
    geoms: dict[str, np.ndarray] | None = None

    def strip(self) -> PreparedTile:
        """Drop the geometries (they are not needed to assemble the graph); returns self."""
        self.geoms = None
        return self

    def unique_tags(self) -> list[str]:
        """The tile's distinct tag strings, in first-seen order."""
        return list(dict.fromkeys(s for t in NODE_TYPES for node in self.tags[t] for s in node))


def check_bbox(bbox: Iterable[float], crs: str = "EPSG:4326") -> BBox:
    """Validate ``(west, south, east, north)``; raise :class:`~geolink.errors.InputError` saying what is wrong and
    how to fix it."""
    try:
        west, south, east, north = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise InputError(f"bbox must be four numbers (west, south, east, north), got {bbox!r}") from None
    if not all(np.isfinite([west, south, east, north])):
        raise InputError(f"bbox {bbox!r} has a non-finite value")
    if not (east > west and north > south):
        raise InputError(f"empty bbox {bbox!r}: it must be (west, south, east, north) with east > west and "
                         "north > south")
    if is_geographic(crs) and not _in_degrees((west, south, east, north)):
        raise InputError(f"bbox {bbox!r} is not in degrees but crs={crs!r} is geographic: pass the tile's CRS, "
                         "e.g. crs='EPSG:32635' for UTM coordinates")
    return west, south, east, north


def _finite(geoms: np.ndarray) -> np.ndarray:
    """Per geometry: whether all its x, y coordinates are finite (z is not used and not checked)."""
    coords, owner = shapely.get_coordinates(geoms, return_index=True)
    bad = np.zeros(len(geoms), dtype=bool)
    bad[owner[~np.isfinite(coords).all(axis=1)]] = True
    return ~bad


def _in_degrees(bounds: Iterable[float]) -> bool:
    """Whether a (west, south, east, north) extent lies within lon/lat degree ranges (half a degree of slack)."""
    west, south, east, north = bounds
    return bool(west >= -180.5 and east <= 180.5 and south >= -90.5 and north <= 90.5)


def _overlap(a: np.ndarray | BBox, b: np.ndarray | BBox) -> bool:
    """Whether two (west, south, east, north) extents intersect."""
    return bool(a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3])


def no_intersection_message(feature_bounds: np.ndarray, feature_crs: str | None, bbox: BBox, crs: str) -> str:
    """Why a tile got no node although it had features: both CRSs and extents, and the likely fix.

    Args:
        feature_bounds: (west, south, east, north) of the features as given, in ``feature_crs``.
        feature_crs: the features' CRS; None when not given (they are then taken to be in ``crs``).
        bbox: the tile, in ``crs``.
        crs: the tile CRS.
    """
    def rounded(values: Iterable[float]) -> list[float]:
        return [float(f"{v:.6g}") for v in values]

    features = f"crs {feature_crs}" if feature_crs else f"taken to be in crs {crs}, no feature_crs given"
    message = (f"no feature intersects the bbox, so the graph is empty: the features ({features}) span "
               f"{rounded(feature_bounds)} but the bbox (crs {crs}) is {rounded(bbox)}. ")
    if _overlap(feature_bounds[[1, 0, 3, 2]], bbox):
        return message + ("The features look like (lat, lon): shapely geometries are (x=lon, y=lat) and bbox is "
                          "(west, south, east, north); swap the coordinates of the features or of the bbox")
    if feature_crs is None and _in_degrees(feature_bounds) and not is_geographic(crs):
        return message + "The features look like lon/lat degrees: pass feature_crs='EPSG:4326' to reproject them"
    return message + ("Pass the features' CRS as feature_crs= (they are reprojected to crs) or the bbox in their "
                      "CRS with crs=")


def _flatten_parts(geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Single-part geometries of ``geoms`` (nested collections included) and the index of their source."""
    index = np.arange(len(geoms))
    while True:
        multi = shapely.get_type_id(geoms) >= 4
        if not multi.any():
            return geoms, index
        parts, part_of = shapely.get_parts(geoms[multi], return_index=True)  # single parts stay as they are
        source = np.concatenate([np.flatnonzero(~multi), np.flatnonzero(multi)[part_of]])
        order = np.argsort(source, kind="stable")  # each feature's parts where the feature was
        geoms, index = np.concatenate([geoms[~multi], parts])[order], index[source[order]]


def repair_polygons(polygons: np.ndarray) -> np.ndarray:
    """Valid versions of invalid polygons: ``shapely.make_valid``; where its result is itself invalid (GEOS does
    this for some self-intersecting rings with near-zero coordinates, and clipping it then raises), the
    ``"structure"`` method (shapely >= 2.1), then ``buffer(0)``; a polygon none of them repairs becomes an empty
    polygon, dropped and counted as degenerate."""
    repaired = shapely.make_valid(polygons)
    broken = ~shapely.is_valid(repaired)
    if broken.any():
        with contextlib.suppress(TypeError):  # shapely 2.0 has one method only
            repaired[broken] = shapely.make_valid(polygons[broken], method="structure")
        broken = ~shapely.is_valid(repaired)
    if broken.any():
        repaired[broken] = shapely.buffer(polygons[broken], 0)
        broken = ~shapely.is_valid(repaired)
    repaired[broken] = shapely.Polygon()
    return repaired


def polygon_anchors(polygons: np.ndarray) -> np.ndarray:
    """``[N, 4, 2]`` anchors (tile CRS): three interior points, then the centroid.

    Deterministic version of the official sampler: from the centroid, along the directions 0°, 120° and 240°, at the
    radius ``(d_min + d_max) / 4`` (the mean of the official random radius, uniform in ``[d_min/2, d_max/2]``, with
    ``d`` the centroid-to-exterior-vertex distances), stepping back to the centroid in 10 equal steps until the
    point lies inside the polygon; if none does, ``shapely.point_on_surface`` (always inside) is used.
    """
    n = len(polygons)
    out = np.zeros((n, 4, 2))
    if n == 0:
        return out
    centroid = shapely.get_coordinates(shapely.centroid(polygons))
    coords, owner = shapely.get_coordinates(shapely.get_exterior_ring(polygons), return_index=True)
    dist = np.hypot(*(coords - centroid[owner]).T)
    starts = np.searchsorted(owner, np.arange(n))
    radius = (np.minimum.reduceat(dist, starts) + np.maximum.reduceat(dist, starts)) / 4
    steps = np.linspace(1.0, 0.0, _RADII_STEPS)  # the official linspace(radius, 0, 10), as fractions of radius
    direction = np.stack([np.cos(_ANGLES), np.sin(_ANGLES)], axis=1)  # [3, 2]
    shapely.prepare(polygons)
    chosen = np.full((n, 3), -1)
    pending = np.ones((n, 3), dtype=bool)
    for s, frac in enumerate(steps):  # 10 vectorised rounds, only over anchors not yet placed
        rows, cols = np.nonzero(pending)
        if len(rows) == 0:
            break
        r = radius[rows] * frac if s else radius[rows]
        x = centroid[rows, 0] + r * direction[cols, 0]
        y = centroid[rows, 1] + r * direction[cols, 1]
        inside = shapely.contains_xy(polygons[rows], x, y)
        chosen[rows[inside], cols[inside]] = s
        pending[rows[inside], cols[inside]] = False
        out[rows[inside], cols[inside]] = np.stack([x[inside], y[inside]], axis=1)
    rows, cols = np.nonzero(pending)
    if len(rows):
        out[rows, cols] = shapely.get_coordinates(shapely.point_on_surface(polygons[rows]))
    out[:, 3] = centroid
    return out


def line_anchors(lines: np.ndarray) -> np.ndarray:
    """``[N, 3, 2]`` anchors (tile CRS): centroid, first vertex, last vertex."""
    if len(lines) == 0:
        return np.zeros((0, 3, 2))
    return np.stack([shapely.get_coordinates(shapely.centroid(lines)),
                     shapely.get_coordinates(shapely.get_point(lines, 0)),
                     shapely.get_coordinates(shapely.get_point(lines, -1))], axis=1)


def normalize_positions(xy: np.ndarray, bbox: BBox) -> np.ndarray:
    """Tile-CRS coordinates → normalised image coordinates ``(u, v)`` (float32), DESIGN §3."""
    west, south, east, north = bbox
    u = (xy[..., 0] - west) / (east - west)
    v = 1 - (xy[..., 1] - south) / (north - south)
    return np.stack([u, v], axis=-1).astype(np.float32)


class OSMGraphBuilder:
    """Builds DESIGN §3 tile graphs from OSM features, deterministically.

    Args:
        tag_encoder: a :class:`~geolink.graph.text.TagEncoder` (or anything with ``encode(strings) -> [n, D]``
            and ``dim``); needed for materialised ``x``, not for the compact form.
        tag_weights: key-frequency table for the ``log(frequency)`` weights: ``"official"`` (shipped), a JSON path,
            a dict, or None (plain means).
        tag_filter: which keys become tags. ``"auto"`` (default): tag dicts (raw OSM) keep only keys present in the
            frequency table; official label strings are kept whole (their unknown keys get weight 0, as in the
            official builder). A :class:`~geolink.graph.tags.TagFilter` applies to both; None keeps everything.
        delaunay_min_points: smallest point count that is triangulated (3; the official builder uses 4).
        clip: clip features to the bbox (features already inside are never modified).
        strict: when a tile has features but none intersects its bbox (typically a CRS mix-up), raise an
            :class:`~geolink.errors.InputError` instead of warning and returning the empty graph.

    Example:
        >>> builder = OSMGraphBuilder(TagEncoder(model_dir), tag_weights="official")
        >>> graph = builder.build([(shapely.box(0.1, 0.1, 0.2, 0.2), "building:building")], bbox=(0, 0, 1, 1))
    """

    def __init__(self, tag_encoder: Any = None, tag_weights: str | Path | Mapping[str, float] | None = "official",
                 tag_filter: TagFilter | str | None = "auto", delaunay_min_points: int = 3, clip: bool = True,
                 strict: bool = False) -> None:
        self.tag_encoder = tag_encoder
        self.frequency = load_key_frequency(tag_weights)
        if isinstance(tag_filter, str) and tag_filter != "auto":
            raise InputError(f"tag_filter must be 'auto', a TagFilter or None, got {tag_filter!r}")
        self.tag_filter = tag_filter
        self.delaunay_min_points = int(delaunay_min_points)
        self.clip = clip
        self.strict = strict
        self.last_report: BuildReport | None = None
        self._memo: dict[tuple[Any, Any], str] = {}  # (key, value) -> tag string, for this frequency and filter
        self._weight_memo: dict[str, float] = {}  # tag string -> log-frequency weight, for this frequency
        self._memo_key: tuple[int, int] | None = None

    # ------------------------------------------------------------------ geometry + tags (no text model)
    def tag_strings(self, tags: Tags | None) -> list[str]:
        """The tag strings a feature with ``tags`` gets (this builder's key filter and frequency table)."""
        self._check_memos()
        return tags_to_strings(tags, self.frequency, self._filter_for(tags), self._memo)

    def _filter_for(self, tags: Tags | None) -> TagFilter | None:
        """The key filter for ``tags``: with ``tag_filter="auto"``, every key of an official label, the frequency
        table's keys of an OSM dict."""
        if self.tag_filter == "auto":
            return KEEP_ALL if isinstance(tags, str) else _KNOWN_KEYS
        return self.tag_filter

    def _check_memos(self) -> None:
        """Forget the remembered tag strings and weights when the frequency table or the filter changed, or when
        they hold more than :data:`MEMO_PAIRS` entries."""
        memo_key = (id(self.frequency), id(self.tag_filter))
        if self._memo_key != memo_key or max(len(self._memo), len(self._weight_memo)) > MEMO_PAIRS:
            self._memo, self._weight_memo, self._memo_key = {}, {}, memo_key

    def prepare(self, features: Iterable[tuple[Any, Tags | None]], bbox: Iterable[float], crs: str = "EPSG:4326",
                feature_crs: str | None = None) -> PreparedTile:
        """Geometry, anchors, tags and edges of a tile, without the text model.

        Args:
            features: ``(shapely geometry, tags)`` pairs; tags are an OSM dict or an official label string.
            bbox: the tile (west, south, east, north) in ``crs``.
            crs: the tile CRS (``g.crs``).
            feature_crs: CRS of the features when it differs from ``crs`` (reprojected with pyproj).

        Features with a NaN or infinite coordinate are dropped and counted (``report.dropped_nonfinite``). When there
        are features but none intersects the bbox, a warning names both CRSs and extents (an
        :class:`~geolink.errors.InputError` with ``strict=True``).
        """
        bbox = check_bbox(bbox, crs)
        report = BuildReport()
        geoms, strings = [], []
        self._check_memos()
        frequency, memo, k = self.frequency, self._memo, -1
        for k, item in enumerate(features):
            try:
                geom, tags = item
            except (TypeError, ValueError):
                raise TypeError(f"feature {k} must be a (shapely geometry, tags) pair, got {item!r:.80}") from None
            if not isinstance(geom, shapely.Geometry):
                raise TypeError(f"feature {k}: geometry must be a shapely geometry, got {type(geom).__name__}; "
                                "convert GeoJSON dicts with shapely.geometry.shape")
            tag_filter = self._filter_for(tags)
            kept = tags_to_strings(tags, frequency, tag_filter, memo)
            if frequency is not None and (tag_filter is None or not tag_filter.known_only):
                report.unknown_keys += sum(tag_key(s) not in frequency for s in kept)
            if kept:
                geoms.append(geom)
                strings.append(kept)
        report.features = k + 1
        report.dropped_no_tags = report.features - len(strings)
        geoms = np.asarray(geoms, dtype=object) if geoms else np.zeros(0, dtype=object)
        empty = shapely.is_empty(geoms)
        report.dropped_empty += int(empty.sum())
        keep = ~empty
        geoms, strings = geoms[keep], [s for s, k in zip(strings, keep, strict=True) if k]
        geoms, strings = self._drop_nonfinite(geoms, strings, report)
        given_bounds = shapely.total_bounds(geoms) if len(geoms) else np.full(4, np.nan)
        if feature_crs is not None and str(feature_crs) != str(crs) and len(geoms):
            geoms = reproject(geoms, feature_crs, crs)
            geoms, strings = self._drop_nonfinite(geoms, strings, report)
        dims = shapely.get_dimensions(geoms)
        invalid = dims == 2  # only areas are checked and repaired
        invalid[invalid] = ~shapely.is_valid(geoms[invalid])
        if invalid.any():
            geoms[invalid] = repair_polygons(geoms[invalid])
            report.repaired += int(invalid.sum())
        if self.clip and len(geoms):
            tile = shapely.box(*bbox)
            shapely.prepare(tile)
            inside = shapely.covers(tile, geoms)
            touching = ~inside & shapely.intersects(tile, geoms)
            outside = ~inside & ~touching
            report.outside_bbox += int(outside.sum())
            report.clipped += int(touching.sum())
            if touching.any():
                geoms[touching] = shapely.intersection(geoms[touching], tile)
            if outside.all() and len(geoms):
                bounds = shapely.total_bounds(geoms)
                if is_geographic(crs) and not _in_degrees(bounds):
                    raise InputError(f"the features are not in degrees (bounds {bounds.round(1).tolist()}) but the "
                                     f"tile crs is {crs!r}: pass feature_crs= (e.g. 'EPSG:3857') to reproject them")
                message = no_intersection_message(given_bounds, feature_crs and str(feature_crs), bbox, str(crs))
                if self.strict:
                    raise InputError(message)
                warnings.warn(message, UserWarning, stacklevel=3)
            geoms, dims, strings = geoms[~outside], dims[~outside], [s for s, o in zip(strings, outside, strict=True)
                                                                     if not o]
        parts, owner = _flatten_parts(geoms)
        part_dims = shapely.get_dimensions(parts)
        report.split_parts += max(0, int(len(parts) - len(np.unique(owner))))
        good = (part_dims == dims[owner]) & ~shapely.is_empty(parts)
        good &= np.where(part_dims == 2, shapely.area(parts) > 0, True)
        good &= np.where(part_dims == 1, shapely.length(parts) > 0, True)
        report.dropped_degenerate += int((~good).sum())
        parts, owner, part_dims = parts[good], owner[good], part_dims[good]

        by_type = {t: parts[part_dims == d] for d, t in _TYPE_OF_DIM.items()}
        owners = {t: owner[part_dims == d] for d, t in _TYPE_OF_DIM.items()}
        if len(by_type["line"]):  # LinearRing parts become LineStrings (same vertices, same order)
            rings = shapely.get_type_id(by_type["line"]) == 2
            if rings.any():
                by_type["line"][rings] = [shapely.LineString(ring.coords) for ring in by_type["line"][rings]]
        point_xy = shapely.get_coordinates(by_type["point"]) if len(by_type["point"]) else np.zeros((0, 2))
        raw_pos = {"polygon": polygon_anchors(by_type["polygon"]), "line": line_anchors(by_type["line"]),
                   "point": point_xy.reshape(-1, 1, 2)}
        pos = {t: normalize_positions(raw_pos[t], bbox) for t in NODE_TYPES}
        tags = {t: [strings[k] for k in owners[t]] for t in NODE_TYPES}
        weights = {t: node_weights(tags[t], self.frequency, self._weight_memo) for t in NODE_TYPES}
        report.nodes.update({t: len(tags[t]) for t in NODE_TYPES})
        edges = all_relations(by_type["polygon"], by_type["line"], by_type["point"], point_xy,
                              self.delaunay_min_points)
        return PreparedTile(bbox=bbox, crs=str(crs), pos=pos, tags=tags, weights=weights, edges=edges, report=report,
                            geoms=by_type)

    @staticmethod
    def _drop_nonfinite(geoms: np.ndarray, strings: list[list[str]], report: BuildReport
                        ) -> tuple[np.ndarray, list[list[str]]]:
        """Drop (and count) the geometries with a NaN or infinite coordinate, with their tags."""
        finite = _finite(geoms)
        if finite.all():
            return geoms, strings
        report.dropped_nonfinite += int((~finite).sum())
        return geoms[finite], [s for s, k in zip(strings, finite, strict=True) if k]

    # ------------------------------------------------------------------ assembly
    def to_graph(self, prepared: PreparedTile, vocabulary: TagVocabulary | None = None,
                 materialize: bool | None = None) -> HeteroData:
        """Turn a :class:`PreparedTile` into a ``HeteroData``.

        Args:
            prepared: output of :meth:`prepare`.
            vocabulary: when given, each node type also gets the compact form ``tags`` (int64 ``[N, K]`` ids into
                ``vocabulary``, new strings appended, -1 padded) and ``tag_weight`` (float32 ``[N, K]``, rows sum
                to 1, so ``x = sum_k tag_weight[:, k] * table[tags[:, k]]``).
            materialize: compute ``x`` with the tag encoder (default: True without a vocabulary, False with one).
        """
        if materialize is None:
            materialize = vocabulary is None
        if materialize and self.tag_encoder is None:
            raise InputError("OSMGraphBuilder needs a tag_encoder to compute node features x; pass "
                             "tag_encoder=TagEncoder(...) or build the compact form with vocabulary=TagVocabulary()")
        graph = HeteroData()
        if materialize:  # each node's tags as rows of a table of the tile's distinct strings (first-seen order)
            row_of: dict[str, int] = {}
            rows = {t: np.fromiter((row_of.setdefault(s, len(row_of)) for node in prepared.tags[t] for s in node),
                                   dtype=np.int64, count=len(prepared.weights[t])) for t in NODE_TYPES}
            table = self.tag_encoder.encode(list(row_of)).float()
        for t in NODE_TYPES:
            nodes = prepared.tags[t]
            n = len(nodes)
            counts = np.fromiter(map(len, nodes), dtype=np.int64, count=n)
            if materialize:
                graph[t].x = mix_tags(table, rows[t], prepared.weights[t], counts)
            graph[t].pos = torch.from_numpy(prepared.pos[t]).reshape(n, NUM_ANCHORS[t], 2)
            if vocabulary is not None:
                ids = vocabulary.add([s for node in nodes for s in node])
                graph[t].tags, graph[t].tag_weight = pad_tags(ids, prepared.weights[t], counts)
        for edge_type in EDGE_TYPES:
            edge_index, relation = prepared.edges[edge_type]
            graph[edge_type].edge_index = torch.from_numpy(np.ascontiguousarray(edge_index, dtype=np.int64))
            one_hot = np.zeros((len(relation), len(RELATIONS[edge_type])), dtype=np.float32)
            one_hot[np.arange(len(relation)), relation] = 1.0
            graph[edge_type].edge_attr = torch.from_numpy(one_hot)
        graph.bbox = torch.tensor([prepared.bbox], dtype=torch.float64)
        graph.crs = prepared.crs
        return graph

    def build(self, features: Iterable[tuple[Any, Tags | None]], bbox: Iterable[float], crs: str = "EPSG:4326", *,
              feature_crs: str | None = None, vocabulary: TagVocabulary | None = None,
              materialize: bool | None = None, return_report: bool = False) -> HeteroData | tuple[HeteroData,
                                                                                                 BuildReport]:
        """Build one tile graph.

        Args:
            features: ``(shapely geometry, tags)`` pairs, tags an OSM dict or an official label ``"k:v;k:v"``.
                Node order per type follows this order (multi-part geometries split in place).
            bbox: (west, south, east, north) in ``crs``; features are clipped to it, features already inside are
                used exactly as given.
            crs: the tile CRS, stored as ``g.crs``.
            feature_crs: CRS of the features when different from ``crs``.
            vocabulary: also return the compact form (see :meth:`to_graph`).
            materialize: compute ``x`` (default: True unless ``vocabulary`` is given).
            return_report: also return the :class:`BuildReport` (it is always kept as ``self.last_report``).
        """
        prepared = self.prepare(features, bbox, crs, feature_crs)
        graph = self.to_graph(prepared, vocabulary, materialize)
        self.last_report = prepared.report
        return (graph, prepared.report) if return_report else graph

    def build_from_frames(self, polygons: Any = None, lines: Any = None, points: Any = None, *,
                          bbox: Iterable[float], crs: str = "EPSG:4326", label_column: str = "label",
                          **kwargs: Any) -> HeteroData | tuple[HeteroData, BuildReport]:
        """Build from (Geo)DataFrames, e.g. the official ``<tile>_{polygon,line,point}.geojson`` files.

        Each frame needs a ``geometry`` column; tags come from ``label_column`` when present, otherwise from
        every other non-null column. A frame's ``.crs``, when set and different from ``crs``, is reprojected.
        Rows are used in frame order: polygons first, then lines, then points.
        """
        features, frame_crs = [], None
        for frame in (polygons, lines, points):
            if frame is None:
                continue
            rows, this_crs = frame_features(frame, label_column)
            if frame_crs is not None and this_crs is not None and str(this_crs) != str(frame_crs):
                raise InputError(f"the frames have different CRSs ({frame_crs} and {this_crs}); reproject them first")
            frame_crs = frame_crs or this_crs
            features.extend(rows)
        if frame_crs is not None and is_geographic(str(frame_crs)) and is_geographic(crs):
            frame_crs = None
        return self.build(features, bbox, crs, feature_crs=kwargs.pop("feature_crs", frame_crs), **kwargs)
