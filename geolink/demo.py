"""``geolink demo``: the embedded tiny GeoLink on a bundled real tile, offline, rendered to one PNG.

Loads the embedded pretrained default (``geolink_tiny.demo``, shipped in the package), builds the OSM graph of a
bundled official example tile with the graph builder (tag embeddings come from the embedding table shipped with the
bundled pairs, so no text model is needed), runs the fusion encoder and writes three panels: the image, the OSM
geometries and graph drawn over it, and a PCA (3 components → RGB) of the fused feature map, laid out as a figure
reads in a paper: a header naming the tile, a title over each panel, a colour key for the graph and a caption saying
what the model is and what the PCA colours mean. Drawn with Pillow only (matplotlib is not needed). The job is
:class:`DemoConfig` → :func:`run_demo`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import shapely
import torch
from PIL import Image, ImageDraw, ImageFont
from torch_geometric.data import Batch

from geolink.errors import InputError
from geolink.runtime import normalise

ASSETS = Path(__file__).parent / "assets"
TILES = ASSETS / "tiles"
DEFAULT_TILE = "a472140250_FI_21"
TYPE_COLOURS = {"polygon": (255, 196, 0), "line": (0, 200, 255), "point": (255, 60, 200)}
EDGE_COLOUR = (255, 255, 255, 70)
# figure layout in pixels: panel width, gaps, and the heights of the bands above and below the panels
PANEL, GAP, MARGIN = 448, 16, 24
HEADER, TITLE, LEGEND, CAPTION = 44, 34, 40, 70
INK, GREY = (20, 20, 20), (90, 90, 90)


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
                draw.line([tuple(centres[src][a]), tuple(centres[dst][b])], fill=EDGE_COLOUR, width=1)
    for node_type in NODE_TYPES:
        for x, y in centres[node_type]:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(*TYPE_COLOURS[node_type], 255), outline=(0, 0, 0, 255))
    return canvas


def _degrees(value: float, hemispheres: str) -> str:
    """``-116.68`` with ``"EW"`` -> ``"116.6800°W"``."""
    return f"{abs(value):.4f}°{hemispheres[value < 0]}"


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> list[str]:
    """``text`` broken into lines no wider than ``width`` pixels."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def _legend(draw: ImageDraw.ImageDraw, left: int, top: int, counts: dict[str, int]) -> None:
    """The colour key of the graph panel: one swatch per node type (geometry outline + node) and one for edges."""
    font, x, y = ImageFont.load_default(size=15), left, top + 10
    for node_type, colour in TYPE_COLOURS.items():
        if node_type == "polygon":
            draw.rectangle([x, y + 1, x + 18, y + 15], outline=colour, width=2)
        elif node_type == "line":
            draw.line([x, y + 13, x + 18, y + 3], fill=colour, width=3)
        draw.ellipse([x + 5, y + 4, x + 13, y + 12], fill=colour, outline=(0, 0, 0))
        label = f"{node_type}s ({counts[node_type]})"
        draw.text((x + 24, y + 8), label, fill=INK, font=font, anchor="lm")
        x += 24 + int(draw.textlength(label, font=font)) + 18
    draw.rectangle([x, y, x + 18, y + 16], fill=(60, 60, 60))  # a dark swatch: edges are drawn light, over the image
    draw.line([x + 2, y + 13, x + 16, y + 3], fill=EDGE_COLOUR[:3], width=2)
    draw.text((x + 24, y + 8), "graph edges (relations)", fill=INK, font=font, anchor="lm")


def compose_figure(panels: list[Image.Image], titles: list[str], header: str, caption: str,
                   counts: dict[str, int]) -> Image.Image:
    """The three panels on one white sheet: ``header`` over all, a title over each panel, the graph colour key under
    the middle panel and ``caption`` (wrapped) under the figure. Panels are ``PANEL`` pixels wide."""
    height = panels[0].height
    sheet = Image.new("RGB", (2 * MARGIN + 3 * PANEL + 2 * GAP, HEADER + TITLE + height + LEGEND + CAPTION),
                      (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((MARGIN, HEADER // 2 + 4), header, fill=INK, font=ImageFont.load_default(size=22), anchor="lm")
    top = HEADER + TITLE
    for index, (panel, title) in enumerate(zip(panels, titles, strict=True)):
        left = MARGIN + index * (PANEL + GAP)
        draw.text((left, top - 8), title, fill=INK, font=ImageFont.load_default(size=17), anchor="ls")
        sheet.paste(panel, (left, top))
    _legend(draw, MARGIN + PANEL + GAP, top + height, counts)
    font = ImageFont.load_default(size=15)
    for row, line in enumerate(_wrap(draw, caption, font, sheet.width - 2 * MARGIN)[:3]):
        draw.text((MARGIN, top + height + LEGEND + 6 + 20 * row), line, fill=GREY, font=font)
    return sheet


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
    counts = {t: graph[t].num_nodes for t in ("polygon", "line", "point")}
    channels, rows, cols = fused.shape  # the default font has no multiplication sign or en dash: plain x and "to"
    west, south, east, north = bbox
    titles = [f"(a) image, {image.width} x {image.height} px", "(b) OSM objects and their graph over the image",
              f"(c) PCA of the fused features ({rows} x {cols}, {channels} channels)"]
    header = (f"GeoLink demo: tile {config.tile}  ·  {_degrees(west, 'EW')} to {_degrees(east, 'EW')}, "
              f"{_degrees(south, 'NS')} to {_degrees(north, 'NS')}")
    caption = ("Model: geolink_tiny.demo, a tiny GeoLink trained on the 5 bundled tiles only: a demonstration, not "
               "the paper's weights. (b) each OSM object is a node at its centre, linked to the objects it touches, "
               "crosses or contains. (c) the first three principal components of the last fused feature map, "
               "shown as red, green and blue: places of similar colour have similar image + OSM features.")
    sheet = compose_figure(panels, titles, header, caption, counts)
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    listed = ", ".join(f"{n} {t}s" for t, n in counts.items())
    print(f"tile {config.tile}: {listed}; fused map {tuple(fused.shape)}\nwrote {out.resolve()}")
    return out
