"""The GeoParquet 1.1 table of a ``geolink embed`` job, written with pyarrow: its schema, the atomically written
parts a run commits as it goes (what ``resume`` continues from), and the final file assembled from them.

Columns: ``image`` (the raster's path), ``row``/``col`` (pixel offsets of the window's top-left corner), ``geometry``
(WKB window footprint), ``bbox`` (the GeoParquet 1.1 covering struct ``xmin/ymin/xmax/ymax``), ``mode``
(``fused``/``image``), ``num_nodes``, ``osm_coverage``, ``valid_fraction`` and ``embedding``
(``fixed_size_list<float32>[D]``). When one file holds both modes and their widths differ (every GeoLink model:
the fusion width is not the image encoder's), ``embedding`` holds the fused rows' ``[D_fusion]`` embeddings and
``image_embedding`` the image rows' ``[D_image]`` ones, each null on the other mode's rows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from geolink.runtime import require_module

GEO_VERSION = "1.1.0"
ODBL_ATTRIBUTION = ("Contains information from OpenStreetMap, © OpenStreetMap contributors, available under the "
                    "Open Database License (ODbL) 1.0: https://www.openstreetmap.org/copyright")
EMBEDDING_DEFINITIONS = {
    "fused": "spatial mean of the fusion encoder's last map: fusion(x, g)[-1].mean((2, 3))",
    "image": "mean of the image encoder's final normed patch tokens, cls excluded: "
             "image_encoder.forward_features(x)[:, 1:].mean(1)",
}
PART_PREFIX = "part-"


def embedding_columns(modes: Sequence[str], fused_dim: int, image_dim: int) -> dict[str, tuple[str, int]]:
    """``{column: (mode, width)}``: one ``embedding`` column when the modes a file may hold share a width, else
    ``embedding`` (fused) and ``image_embedding`` (image)."""
    dims = {"fused": fused_dim, "image": image_dim}
    if len({dims[m] for m in modes}) == 1:
        return {"embedding": (modes[0] if len(modes) == 1 else "*", dims[modes[0]])}
    return {"embedding": ("fused", fused_dim), "image_embedding": ("image", image_dim)}


def table_schema(columns: Mapping[str, tuple[str, int]]) -> Any:
    """The arrow schema of the rows (and of every part)."""
    pa = require_module("pyarrow", "embed", "GeoParquet")
    bbox = pa.struct([(name, pa.float64()) for name in ("xmin", "ymin", "xmax", "ymax")])
    fields = [("image", pa.string()), ("row", pa.int64()), ("col", pa.int64()), ("geometry", pa.binary()),
              ("bbox", bbox), ("mode", pa.string()), ("num_nodes", pa.int64()), ("osm_coverage", pa.float64()),
              ("valid_fraction", pa.float64())]
    fields += [(name, pa.list_(pa.float32(), width)) for name, (_, width) in columns.items()]
    return pa.schema(fields)


def rows_table(metas: Sequence[Mapping[str, Any]], geometries: Sequence[Any], embeddings: Sequence[np.ndarray],
               columns: Mapping[str, tuple[str, int]]) -> Any:
    """The arrow table of finished windows: their metadata, footprints (shapely, in the file CRS) and embeddings."""
    import shapely

    pa = require_module("pyarrow", "embed", "GeoParquet")
    schema = table_schema(columns)
    bounds = shapely.bounds(np.asarray(geometries, dtype=object)).reshape(-1, 4)
    data: dict[str, Any] = {name: [m[name] for m in metas] for name in ("image", "row", "col", "mode", "num_nodes",
                                                                        "osm_coverage", "valid_fraction")}
    data["geometry"] = list(shapely.to_wkb(np.asarray(geometries, dtype=object))) if len(metas) else []
    data["bbox"] = [dict(zip(("xmin", "ymin", "xmax", "ymax"), map(float, b), strict=True)) for b in bounds]
    for name, (mode, width) in columns.items():
        values = []
        for meta, embedding in zip(metas, embeddings, strict=True):
            fits = mode in ("*", meta["mode"])
            values.append(np.asarray(embedding, dtype=np.float32).tolist() if fits else None)
            if fits and len(values[-1]) != width:
                raise ValueError(f"embedding width {len(values[-1])} != column {name} width {width}")
        data[name] = values
    return pa.table({field.name: pa.array(data[field.name], type=field.type) for field in schema}, schema=schema)


def write_atomic(table: Any, path: Path, metadata: Mapping[bytes, bytes] | None = None) -> Path:
    """Write ``table`` as Parquet to ``path`` atomically: a temporary name in the same folder, then ``os.replace``
    (a killed run leaves the old file or the new one, never half a file)."""
    pq = require_module("pyarrow.parquet", "embed", "GeoParquet")

    if metadata is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, temporary, compression="zstd")
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return path


def part_paths(folder: Path) -> list[Path]:
    """The committed parts of a parts folder, in commit order."""
    return sorted(Path(folder).glob(f"{PART_PREFIX}*.parquet")) if Path(folder).is_dir() else []


def read_parts(folder: Path, columns: Mapping[str, tuple[str, int]]) -> Any:
    """All committed parts as one table (the empty table when there is none)."""
    pa = require_module("pyarrow", "embed", "GeoParquet")
    pq = require_module("pyarrow.parquet", "embed", "GeoParquet")

    schema = table_schema(columns)
    tables = [pq.read_table(path, schema=schema) for path in part_paths(folder)]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def geo_metadata(table: Any, crs: str) -> dict[str, Any]:
    """The GeoParquet 1.1 ``geo`` metadata of ``table``: WKB polygons, PROJJSON CRS, bbox, the covering column."""
    import pyproj

    bbox = [float("nan")] * 4
    if table.num_rows:
        columns = {name: table.column("bbox").combine_chunks().field(name).to_numpy() for name in
                   ("xmin", "ymin", "xmax", "ymax")}
        bbox = [float(columns["xmin"].min()), float(columns["ymin"].min()), float(columns["xmax"].max()),
                float(columns["ymax"].max())]
    return {"version": GEO_VERSION, "primary_column": "geometry", "columns": {"geometry": {
        "encoding": "WKB", "geometry_types": ["Polygon"], "crs": pyproj.CRS.from_user_input(crs).to_json_dict(),
        **({"bbox": bbox} if table.num_rows else {}),
        "covering": {"bbox": {key: ["bbox", key] for key in ("xmin", "ymin", "xmax", "ymax")}}}}}


def write_geoparquet(table: Any, path: Path, crs: str, info: Mapping[str, Any]) -> Path:
    """Write the final file: ``table`` with its ``geo`` metadata and ``geolink`` metadata ``info`` (model, text model,
    version, tile size, attribution, embedding definitions), atomically."""
    metadata = {b"geo": json.dumps(geo_metadata(table, crs)).encode(), b"geolink": json.dumps(dict(info)).encode()}
    return write_atomic(table, path, metadata)


def read_info(path: Path) -> dict[str, Any]:
    """The ``geolink`` metadata of a file :func:`write_geoparquet` wrote."""
    pq = require_module("pyarrow.parquet", "embed", "GeoParquet")

    return json.loads(pq.read_schema(path).metadata[b"geolink"])
