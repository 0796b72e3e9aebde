"""``geolink demo``: the embedded tiny GeoLink on a bundled real tile, offline, rendered to one PNG.

Loads the embedded pretrained default (``geolink_tiny.demo``, shipped in the package), builds the OSM graph of a
bundled official example tile with the graph builder (tag embeddings come from the embedding table shipped with the
bundled pairs, so no text model is needed), runs the fusion encoder and writes three panels: the image, the OSM
geometries and graph drawn over it, and a PCA (3 components → RGB) of the fused feature map. The job is
:class:`DemoConfig` → :func:`run_demo`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import shapely
import torch
from PIL import Image, ImageDraw
from torch_geometric.data import Batch

from geolink.errors import InputError
from geolink.runtime import normalise

ASSETS = Path(__file__).parent / "assets"
TILES = ASSETS / "tiles"
DEFAULT_TILE = "a472140250_FI_21"
TYPE_COLOURS = {"polygon": (255, 196, 0), "line": (0, 200, 255), "point": (255, 60, 200)}
PANEL = 448


def list_tiles() -> list[str]:
    """Names of the bundled example tiles."""
    return sorted(p.name for p in TILES.iterdir() if (p / "meta.json").is_file())


def read_tile(name: str) -> tuple[Image.Image, list[tuple[shapely.Geometry, str]], tuple[float, ...]]:
    """The image, the ``(geometry, label)`` features and the bbox of a bundled tile."""
    from geolink.graph.readers import read_geojson

    folder = TILES / name
    if not (folder / "meta.json").is_file():
        raise InputError(f"no bundled tile {name!r}; bundled tiles: {', '.join(list_tiles())}")
    bbox = tuple(json.loads((folder / "meta.json").read_text())["bbox_west_south_east_north"])
    features = []
    for node_type in ("polygon", "line", "point"):
        path = folder / f"{name}_{node_type}.geojson"
        if path.is_file():
            features += read_geojson(path)[0]
    with Image.open(folder / f"{name}.jpg") as image:
        return image.convert("RGB"), features, bbox


def build_tile_graph(features, bbox):
    """The tile's graph with ``x`` from the shipped tag-embedding table (no text model)."""
    from geolink.data.shards import PairShardReader
    from geolink.graph import OSMGraphBuilder
    from geolink.graph.storage import materialize_x

    pairs = PairShardReader(ASSETS / "pairs")
    vocabulary, table = pairs.vocabulary(), pairs.table()
    known = len(vocabulary)
    graph = OSMGraphBuilder(tag_weights="official").build(features, bbox=bbox, vocabulary=vocabulary,
                                                           materialize=False)
    if len(vocabulary) != known:
        raise InputError(f"tags {vocabulary.strings[known:]} are not in the bundled embedding table")
    return materialize_x(graph, table, drop_compact=True)


def fused_pca_image(fused: torch.Tensor, size: tuple[int, int]) -> Image.Image:
    """``[C, h, w]`` features -> RGB image of their first three principal components, resized to ``size``."""
    channels, height, width = fused.shape
    flat = fused.reshape(channels, -1).t().double()
    flat = flat - flat.mean(0)
    _, _, right = torch.linalg.svd(flat, full_matrices=False)
    components = (flat @ right[:3].t()).numpy()
    low, high = np.percentile(components, 2, axis=0), np.percentile(components, 98, axis=0)
    rgb = np.clip((components - low) / np.maximum(high - low, 1e-9), 0, 1).reshape(height, width, 3)
    return Image.fromarray((rgb * 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)


def draw_graph(image: Image.Image, features, bbox, graph) -> Image.Image:
    """Geometries (thin) and the graph (nodes at their centroid anchor, non-self edges) over ``image``."""
    from geolink.graph.schema import EDGE_TYPES, NODE_TYPES

    canvas = image.copy()
    draw = ImageDraw.Draw(canvas, "RGBA")
    west, south, east, north = bbox
    width, height = canvas.size

    def to_pixels(coords: np.ndarray) -> list[tuple[float, float]]:
        return [((x - west) / (east - west) * width, (north - y) / (north - south) * height) for x, y in coords]

    for geometry, _ in features:
        for part in getattr(geometry, "geoms", [geometry]):
            if part.geom_type == "Polygon":
                draw.polygon(to_pixels(np.asarray(part.exterior.coords)), outline=(*TYPE_COLOURS["polygon"], 160))
            elif part.geom_type == "LineString":
                draw.line(to_pixels(np.asarray(part.coords)), fill=(*TYPE_COLOURS["line"], 160), width=1)
    centre_anchor = {"polygon": 3, "line": 0, "point": 0}
    centres = {t: graph[t].pos[:, centre_anchor[t]].numpy() * np.array([width, height]) for t in NODE_TYPES}
    for src, _, dst in EDGE_TYPES:
        for a, b in graph[src, "to", dst].edge_index.t().tolist():
            if (src, a) != (dst, b):
                draw.line([tuple(centres[src][a]), tuple(centres[dst][b])], fill=(255, 255, 255, 70), width=1)
    for node_type in NODE_TYPES:
        for x, y in centres[node_type]:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(*TYPE_COLOURS[node_type], 255), outline=(0, 0, 0, 255))
    return canvas


@dataclass
class DemoConfig:
    """Offline demo: loads the embedded pretrained geolink_tiny.demo, builds the OSM graph of a bundled official
    example tile, runs the fusion encoder and writes a PNG with the image, the OSM graph drawn over it and a PCA of
    the fused features."""

    out: Path = field(default=Path("geolink_demo.png"), metadata={"help": "output PNG"})
    tile: str = field(default=DEFAULT_TILE, metadata={"help": "bundled tile name (list_tiles lists them)"})
    list_tiles: bool = field(default=False, metadata={"help": "print the bundled tile names instead of running"})

    def __post_init__(self) -> None:
        if not self.list_tiles and self.tile not in list_tiles():
            raise InputError(f"no bundled tile {self.tile!r} (tile must be one of: {', '.join(list_tiles())})")


def run_demo(config: DemoConfig) -> Path:
    """Run the embedded model on a bundled tile and write the three-panel PNG.

    Returns:
        The PNG written; with ``list_tiles``, the folder of the bundled tiles (their names are printed).
    """
    import geolink

    if config.list_tiles:
        print("\n".join(list_tiles()))
        return TILES
    image, features, bbox = read_tile(config.tile)
    graph = build_tile_graph(features, bbox)
    fusion = geolink.create_model("geolink_tiny.demo", pretrained=True, component="fusion").eval()
    size = fusion.image_encoder.img_size
    pixels = np.array(image.resize((size, size), Image.Resampling.BICUBIC))  # uint8 [H, W, 3]
    tensor = normalise(torch.from_numpy(pixels).permute(2, 0, 1))
    with torch.no_grad():
        fused = fusion(tensor.unsqueeze(0), Batch.from_data_list([graph]))[-1][0]
    panel = (PANEL, round(PANEL * image.height / image.width))
    shown = image.resize(panel, Image.Resampling.BICUBIC)
    panels = [shown, draw_graph(shown, features, bbox, graph), fused_pca_image(fused, panel)]
    sheet = Image.new("RGB", (3 * panel[0] + 20, panel[1]), (255, 255, 255))
    for index, picture in enumerate(panels):
        sheet.paste(picture, (index * (panel[0] + 10), 0))
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    counts = ", ".join(f"{graph[t].num_nodes} {t}s" for t in ("polygon", "line", "point"))
    print(f"tile {config.tile}: {counts}; fused map {tuple(fused.shape)}\nwrote {out.resolve()}")
    return out
