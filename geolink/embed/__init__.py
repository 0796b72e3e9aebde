"""Wall-to-wall inference: GeoTIFFs + OpenStreetMap → GeoLink embeddings per window, as GeoParquet
(``geolink embed``).

Owns the window grid and raster reading (:mod:`~geolink.embed.windows`), the OSM sources and the per-window torch
Dataset (:mod:`~geolink.embed.dataset`), the GeoParquet output (:mod:`~geolink.embed.output`) and the job
(:mod:`~geolink.embed.job`: :class:`EmbedConfig` → :func:`embed`).
"""

from __future__ import annotations

from geolink.embed.dataset import EmbedDataset, OSMSources, collate_windows, osm_coverage
from geolink.embed.encoder import WindowEncoder, load_window_encoder
from geolink.embed.job import EmbedConfig, EmbedMode, Engine, embed
from geolink.embed.windows import RasterInfo, Window, grid_windows, inspect_raster, read_window, to_model_input

__all__ = ["EmbedConfig", "EmbedDataset", "EmbedMode", "Engine", "OSMSources", "RasterInfo", "Window",
           "WindowEncoder", "collate_windows", "embed", "grid_windows", "inspect_raster", "load_window_encoder",
           "osm_coverage", "read_window", "to_model_input"]
