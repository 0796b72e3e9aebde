"""Reading OSM vectors and storing tile graphs.

Owns the readers (GeoJSON natively; GeoPackage/Shapefile/... through geopandas; ``.osm.pbf``/``.osm`` through
pyosmium, streaming, with tag filtering in the reader; (Geo)DataFrames; lists of shapely objects), reprojection
(pyproj), and the stored graph format: one safetensors file per tile holding the compact form (tag vocabulary
ids + weights, anchors, edges as relation codes) plus one vocabulary (+ optional embedding table) per output
folder; ``x`` is materialised at load time. Nothing is pickled.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import torch
import torch.nn.functional as F
from torch_geometric.data import HeteroData

from geolink.graph.schema import EDGE_TYPES, NODE_TYPES, NUM_ANCHORS, RELATIONS, edge_type_name
from geolink.graph.tags import TagFilter, TagVocabulary, load_key_frequency, normalize_key, tag_string

FORMAT_VERSION = "geolink-graph/1"
Feature = tuple[shapely.Geometry, Any]

# ---------------------------------------------------------------------------------------------- CRS


def _need(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{module} is needed for this; install it with `pip install geolink[{extra}]`") from err


def reproject(geoms: np.ndarray | Iterable[shapely.Geometry], src_crs: str, dst_crs: str) -> np.ndarray:
    """Reproject shapely geometries from ``src_crs`` to ``dst_crs`` (pyproj, x/y = lon/lat order)."""
    pyproj = _need("pyproj", "osm")
    geoms = np.asarray(list(geoms) if not isinstance(geoms, np.ndarray) else geoms, dtype=object)
    try:
        transformer = pyproj.Transformer.from_crs(src_crs, dst_crs, always_xy=True)
    except pyproj.exceptions.CRSError as err:
        raise ValueError(f"cannot reproject from {src_crs!r} to {dst_crs!r}: {err}") from err
    return shapely.transform(geoms, lambda xy: np.stack(transformer.transform(xy[:, 0], xy[:, 1]), axis=1))


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
    """Features and CRS of a GeoJSON file; tags are the ``label_column`` string when present, else the properties."""
    from shapely.geometry import shape

    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    if data.get("type") == "Feature":
        data = {"type": "FeatureCollection", "features": [data]}
    if data.get("type") != "FeatureCollection":
        raise ValueError(f"{path} is not a GeoJSON FeatureCollection")
    features = [(shape(f["geometry"]), _properties_to_tags(f.get("properties"), label_column))
                for f in data["features"] if f.get("geometry")]
    return features, _crs_from_geojson(data)


def frame_features(frame: Any, label_column: str = "label") -> tuple[list[Feature], str | None]:
    """Features of a (Geo)DataFrame-like object (a ``geometry`` column + tag columns) and its CRS (or None)."""
    if frame is None:
        return [], None
    try:
        geometry = list(frame["geometry"])
    except (KeyError, TypeError):
        raise ValueError("a frame needs a 'geometry' column of shapely geometries") from None
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
    """
    osmium = _need("osmium", "osm")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"OSM file {path} not found")
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

    processor = osmium.FileProcessor(str(path)).with_locations().with_areas()
    for obj in tqdm(processor, desc=f"reading {path.name}", unit=" objects", disable=not progress, mininterval=1):
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
    """
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"{path} not found")
        name = path.name.lower()
        if name.endswith((".osm.pbf", ".pbf", ".osm", ".osm.bz2", ".osm.gz")):
            return list(read_osm(path, **osm_kwargs)), "EPSG:4326"
        if name.endswith((".geojson", ".json")):
            return read_geojson(path, label_column)
        if name.endswith((".gpkg", ".shp", ".fgb", ".parquet", ".gml", ".kml", ".gdb", ".zip")):
            gpd = _need("geopandas", "geo")
            frame = gpd.read_parquet(path) if name.endswith(".parquet") else gpd.read_file(path, layer=layer)
            return frame_features(frame, label_column)
        raise ValueError(f"unknown vector file type {path.suffix!r} ({path}); use GeoJSON, .osm.pbf, or a format "
                         "geopandas reads (.gpkg, .shp, .fgb, .parquet) with `pip install geolink[geo]`")
    if hasattr(source, "columns"):
        return frame_features(source, label_column)
    features = []
    for item in source:
        features.append((item, None) if isinstance(item, shapely.Geometry) else tuple(item))
    return features, None


def osm_tag_dict_to_label(tags: Mapping[str, str]) -> str:
    """An OSM tag dict as an official ``"k:v;k:v"`` label (for writing official-style GeoJSON)."""
    return ";".join(tag_string(k, v) for k, v in tags.items())


# ---------------------------------------------------------------------------------------------- stored graphs


REVERSE_EDGE_TYPE = {("polygon", "to", "line"): ("line", "to", "polygon"),
                     ("line", "to", "point"): ("point", "to", "line"),
                     ("polygon", "to", "point"): ("point", "to", "polygon")}
"""Edge types stored as the transpose of another (same relation codes, see DESIGN §3) when they are exactly that."""


def _index_dtype(limit: int) -> torch.dtype:
    return torch.int16 if limit < 2**15 else torch.int32


def _sorted_transpose(edge_index: torch.Tensor, relation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flipped = edge_index.flip(0)
    order = np.lexsort((flipped[1].numpy(), flipped[0].numpy()))
    return flipped[:, order], relation[order]


def _relation_codes(edge_attr: torch.Tensor) -> torch.Tensor:
    return edge_attr.argmax(1).to(torch.uint8) if edge_attr.numel() else torch.zeros(0, dtype=torch.uint8)


def graph_tensors(graph: HeteroData) -> dict[str, torch.Tensor]:
    """The flat tensors of a graph's stored form.

    Per node type: ``pos`` float32; either the compact tags (``tag_ids`` flat vocabulary ids, ``tag_count`` tags per
    node, ``tag_weight`` flat float32 weights; padding removed) or ``x`` float32. Per edge type: ``edge_index``
    (int16 when the node counts allow) and ``relation`` (uint8 codes of the one-hot). polygon→line, line→point and
    polygon→point are omitted when they are the sorted transpose of their reverse (always, for builder output).
    """
    counts = {t: int(graph[t].pos.shape[0]) for t in NODE_TYPES}
    tensors: dict[str, torch.Tensor] = {"bbox": graph.bbox.to(torch.float64).reshape(1, 4)}
    for t in NODE_TYPES:
        store = graph[t]
        tensors[f"{t}.pos"] = store.pos.to(torch.float32).contiguous()
        if "tags" in store:
            ids = store.tags.long()
            valid = ids >= 0
            tensors[f"{t}.tag_ids"] = ids[valid].to(torch.int32).contiguous()
            tensors[f"{t}.tag_count"] = valid.sum(1).to(torch.int16).contiguous()
            tensors[f"{t}.tag_weight"] = store.tag_weight.float()[valid].contiguous()
        else:
            tensors[f"{t}.x"] = store.x.to(torch.float32).contiguous()
    for edge_type in EDGE_TYPES:
        store = graph[edge_type]
        relation = _relation_codes(store.edge_attr)
        reverse = REVERSE_EDGE_TYPE.get(edge_type)
        if reverse is not None:
            flipped, flipped_rel = _sorted_transpose(graph[reverse].edge_index.cpu(),
                                                     _relation_codes(graph[reverse].edge_attr))
            if torch.equal(flipped, store.edge_index.cpu()) and torch.equal(flipped_rel, relation):
                continue
        src, _, dst = edge_type
        name = edge_type_name(edge_type)
        tensors[f"{name}.edge_index"] = store.edge_index.to(_index_dtype(max(counts[src], counts[dst]))).contiguous()
        tensors[f"{name}.relation"] = relation.contiguous()
    return tensors


def save_graph(graph: HeteroData, path: str | Path, **metadata: str) -> Path:
    """Write a tile graph as one safetensors file (atomically); see :func:`graph_tensors` for the layout.

    Args:
        graph: a DESIGN §3 graph, compact (``tags``/``tag_weight``) or materialised (``x``).
        path: output file (``.safetensors``).
        metadata: extra string metadata (e.g. ``vocab`` naming the vocabulary file of the folder).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(graph_tensors(graph), str(tmp), metadata={"format": FORMAT_VERSION, "crs": str(graph.crs),
                                                        **{k: str(v) for k, v in metadata.items()}})
    tmp.chmod(0o644)
    tmp.replace(path)
    return path


def materialize_x(graph: HeteroData, table: torch.Tensor, drop_compact: bool = False) -> HeteroData:
    """Set ``g[t].x = sum_k tag_weight[:, k] * table[tags[:, k]]`` for each node type (in place; returns graph).

    Args:
        graph: a graph in compact form (``tags``/``tag_weight``).
        table: the ``[V, D]`` embedding table of its vocabulary.
        drop_compact: remove ``tags``/``tag_weight`` afterwards (their width K differs between graphs, so graphs
            must drop them before ``Batch.from_data_list``).
    """
    for t in NODE_TYPES:
        store = graph[t]
        ids, weight = store.tags.long(), store.tag_weight.float()
        if ids.numel() and int(ids.max()) >= table.shape[0]:
            raise ValueError(f"graph[{t!r}].tags refers to tag id {int(ids.max())} but the table has "
                             f"{table.shape[0]} rows: load the vocabulary the graph was written with")
        gathered = table[ids.clamp(min=0)] * (weight * (ids >= 0)).unsqueeze(-1)
        store.x = gathered.sum(1) if ids.shape[1] else torch.zeros(ids.shape[0], table.shape[1])
        if drop_compact:
            del store.tags, store.tag_weight
    return graph


def load_graph(path: str | Path, table: torch.Tensor | None = None) -> HeteroData:
    """Read a graph written by :func:`save_graph`.

    Args:
        path: the ``.safetensors`` file.
        table: the folder's ``[V, D]`` embedding table; when given, ``x`` is materialised from the compact form.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path} is not a geolink graph file (format {metadata.get('format')!r})")
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    graph = graph_from_tensors(tensors, metadata.get("crs", "EPSG:4326"))
    if table is not None and f"{NODE_TYPES[0]}.tag_ids" in tensors:
        materialize_x(graph, table)
    return graph


def graph_from_tensors(tensors: Mapping[str, torch.Tensor | np.ndarray], crs: str,
                       table: torch.Tensor | None = None) -> HeteroData:
    """Rebuild a graph from the (flattened) tensors of :func:`geolink.graph.io.graph_tensors`.

    With ``table`` (the dataset's ``[V, D]`` embedding table) the stored tags become ``x`` directly (one
    ``embedding_bag`` per node type on the stored CSR form) instead of the padded compact form.

    The one decoder of the stored graph format, for tile files (:func:`load_graph`) and pair shards alike:
    ``pos`` → ``[N, A, 2]``; ``tag_ids``/``tag_count``/``tag_weight`` → ``tags`` int64 ``[N, K]`` (-1 padded) and
    ``tag_weight`` float32 ``[N, K]``; relation codes → one-hot ``edge_attr``; omitted transposed edge types are
    rebuilt from their reverse. In numpy because these tensors are tiny and per-op overhead dominates.
    """
    arrays = {k: v.numpy() if torch.is_tensor(v) else v for k, v in tensors.items()}
    graph = HeteroData()
    for t in NODE_TYPES:
        pos = arrays[f"{t}.pos"].reshape(-1, NUM_ANCHORS[t], 2)
        n = pos.shape[0]
        store = graph[t]
        store.pos = torch.from_numpy(pos)
        if f"{t}.tag_ids" in arrays and table is not None:
            count = torch.from_numpy(arrays[f"{t}.tag_count"].astype(np.int64))
            ids = torch.from_numpy(arrays[f"{t}.tag_ids"].astype(np.int64))
            store.x = F.embedding_bag(ids, table, torch.cumsum(count, 0) - count, mode="sum",
                                      per_sample_weights=torch.from_numpy(arrays[f"{t}.tag_weight"]))
        elif f"{t}.tag_ids" in arrays:
            count = arrays[f"{t}.tag_count"].astype(np.int64)
            width = int(count.max()) if n else 0
            rows = np.repeat(np.arange(n), count)
            slot = np.arange(rows.size) - np.repeat(np.cumsum(count) - count, count)
            ids = np.full((n, width), -1, dtype=np.int64)
            weight = np.zeros((n, width), dtype=np.float32)
            ids[rows, slot] = arrays[f"{t}.tag_ids"]
            weight[rows, slot] = arrays[f"{t}.tag_weight"]
            store.tags, store.tag_weight = torch.from_numpy(ids), torch.from_numpy(weight)
        else:
            store.x = torch.from_numpy(arrays[f"{t}.x"].astype(np.float32).reshape(n, -1))
        store.num_nodes = n
    for edge_type in EDGE_TYPES:
        name = edge_type_name(edge_type)
        if f"{name}.edge_index" in arrays:
            edge_index = arrays[f"{name}.edge_index"].astype(np.int64).reshape(2, -1)
            relation = arrays[f"{name}.relation"].astype(np.int64)
        else:
            # the transpose of the reverse type, sorted by (src, dst), as _sorted_transpose writes it
            reverse = edge_type_name(REVERSE_EDGE_TYPE[edge_type])
            flipped = arrays[f"{reverse}.edge_index"].astype(np.int64).reshape(2, -1)[::-1]
            order = np.lexsort((flipped[1], flipped[0]))
            edge_index = np.ascontiguousarray(flipped[:, order])
            relation = arrays[f"{reverse}.relation"].astype(np.int64)[order]
        store = graph[edge_type]
        store.edge_index = torch.from_numpy(edge_index)
        store.edge_attr = torch.from_numpy(_eye(len(RELATIONS[edge_type]))[relation])
    graph.bbox = torch.from_numpy(arrays["bbox"].astype(np.float64).reshape(1, 4))
    graph.crs = crs
    return graph


_EYES: dict[int, np.ndarray] = {}


def _eye(k: int) -> np.ndarray:
    if k not in _EYES:
        _EYES[k] = np.eye(k, dtype=np.float32)
    return _EYES[k]


def save_vocabulary(folder: str | Path, vocabulary: TagVocabulary, name: str = "vocab",
                    table: torch.Tensor | None = None, **info: Any) -> None:
    """Write ``<name>.json`` (the tag strings) and, when given, ``<name>.safetensors`` (the ``[V, D]`` table)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if table is not None:
        if table.shape[0] != len(vocabulary):
            raise ValueError(f"embedding table has {table.shape[0]} rows for {len(vocabulary)} tag strings")
        tmp = folder / f"{name}.safetensors.tmp"
        save_file({"embeddings": table.float().contiguous()}, str(tmp),
                  metadata={k: str(v) for k, v in info.items()})
        tmp.replace(folder / f"{name}.safetensors")
    vocabulary.save(folder / f"{name}.json", **info)


def load_table(folder: str | Path, name: str = "vocab") -> torch.Tensor:
    """The ``[V, D]`` embedding table ``<name>.safetensors`` of a graph folder."""
    from safetensors.torch import load_file

    path = Path(folder) / f"{name}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: build the folder with --text-model, or pass tag_encoder= to "
                                "GraphFolder to embed the vocabulary now")
    return load_file(str(path))["embeddings"]


class GraphFolder:
    """The tiles written by ``geolink build-graphs`` (or :func:`geolink.graph.tiles.build_tiles`), with ``x``
    materialised on access.

    Args:
        folder: the output folder (``index*.jsonl``, ``vocab*.json``, ``vocab*.safetensors``, ``tiles/``).
        tag_encoder: embeds the vocabulary now instead of reading the stored tables (e.g. another text model).
    """

    def __init__(self, folder: str | Path, tag_encoder: Any = None) -> None:
        self.folder = Path(folder)
        entries: dict[str, dict[str, Any]] = {}
        for index in sorted(self.folder.glob("index*.jsonl")):
            with open(index, encoding="utf-8") as handle:
                for line in handle:
                    if line.strip():
                        entry = json.loads(line)
                        entries[entry["name"]] = entry
        if not entries:
            raise FileNotFoundError(f"no tiles indexed in {self.folder} (expected index*.jsonl)")
        self.entries = [entries[k] for k in sorted(entries)]
        self._names = {e["name"]: i for i, e in enumerate(self.entries)}
        self.tag_encoder = tag_encoder
        self._tables: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def table(self, vocab: str) -> torch.Tensor:
        """Embedding table of the vocabulary ``vocab`` (cached)."""
        if vocab not in self._tables:
            if self.tag_encoder is not None:
                strings = TagVocabulary.load(self.folder / f"{vocab}.json").strings
                self._tables[vocab] = self.tag_encoder.encode(strings)
            else:
                self._tables[vocab] = load_table(self.folder, vocab)
        return self._tables[vocab]

    def __getitem__(self, key: int | str) -> HeteroData:
        entry = self.entries[self._names[key] if isinstance(key, str) else key]
        graph = load_graph(self.folder / entry["file"])
        materialize_x(graph, self.table(entry["vocab"]))
        graph.name = entry["name"]
        return graph
