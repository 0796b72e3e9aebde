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
    "TagFilter": "tags", "TagVocabulary": "tags", "load_key_frequency": "tags", "tags_to_strings": "tags",
    "all_relations": "relations",
    "read_features": "readers", "read_geojson": "readers", "read_osm": "readers", "reproject": "readers",
    "is_geographic": "readers", "KeyCounter": "readers", "count_keys": "readers", "TagStatsConfig": "readers",
    "tag_stats": "readers",
    "save_graph": "storage", "load_graph": "storage", "materialize_x": "storage", "save_vocabulary": "storage",
    "load_table": "storage", "mix_tags": "storage",
    "graph_from_official": "official", "load_official_graph": "official",
    "Tile": "tiles", "TileSize": "tiles", "TileShard": "tiles", "grid_tiles": "tiles", "footprint_tiles": "tiles",
    "geotiff_bounds": "tiles", "RegionIndex": "tiles", "read_region": "tiles", "build_tiles": "tiles",
    "merge_shards": "tiles", "BuildGraphsConfig": "tiles", "build_graphs": "tiles",
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
