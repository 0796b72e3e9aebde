"""OpenStreetMap → tile graphs (DESIGN §3): public names of ``geolink.graph``, imported lazily.

Importing ``geolink.graph`` (or ``geolink.graph.schema``) loads neither shapely nor transformers; each name below
is imported from its module on first access (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "OSMGraphBuilder": "build", "BuildReport": "build", "PreparedTile": "build",
    "TagEncoder": "text",
    "TagFilter": "tags", "TagVocabulary": "tags", "KeyCounter": "tags", "load_key_frequency": "tags",
    "tags_to_strings": "tags", "count_keys": "tags",
    "all_relations": "relations",
    "read_features": "io", "read_geojson": "io", "read_osm": "io", "reproject": "io", "save_graph": "io",
    "load_graph": "io", "materialize_x": "io", "GraphFolder": "io", "save_vocabulary": "io",
    "Tile": "tiles", "grid_tiles": "tiles", "footprint_tiles": "tiles", "geotiff_bounds": "tiles",
    "RegionIndex": "tiles", "build_tiles": "tiles", "merge_shards": "tiles",
    "NODE_TYPES": "schema", "EDGE_TYPES": "schema", "NUM_ANCHORS": "schema", "RELATIONS": "schema",
    "empty_graph": "schema", "validate_graph": "schema",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'geolink.graph' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"geolink.graph.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
