"""Make the figure of ``docs/embed.md`` (``docs/gallery/embed_quicklook.png``), offline, in about a minute on a CPU.

    python docs/make_embed_figure.py

The scene is a bundled example tile (``a472140250_FI_21``) enlarged 3 × 3 and written as a GeoTIFF in EPSG:4326
over its bbox; its bundled GeoJSON files are the OSM source; the model is the bundled ``geolink_tiny.demo``. Left:
the scene with its windows (green: fused, orange: image, with ``min_nodes=5``; the number of OSM nodes in each).
Right: the ``--maps`` quick-look (PCA of the patch features), on the scene's grid.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

OUT = Path(__file__).resolve().parent / "gallery" / "embed_quicklook.png"
TILE = "a472140250_FI_21"
FACTOR = 3


def write_scene(folder: Path) -> Path:
    """The tile's image enlarged ``FACTOR`` × as a GeoTIFF over its bbox (EPSG:4326)."""
    import rasterio
    from rasterio.transform import from_bounds

    from geolink.demo import read_tile

    image, _, (west, south, east, north) = read_tile(TILE)
    image = image.resize((image.width * FACTOR, image.height * FACTOR), Image.Resampling.BICUBIC)
    pixels = np.asarray(image).transpose(2, 0, 1)
    path = folder / "scene.tif"
    with rasterio.open(path, "w", driver="GTiff", width=image.width, height=image.height, count=3, dtype="uint8",
                       crs="EPSG:4326", transform=from_bounds(west, south, east, north, image.width,
                                                              image.height)) as dataset:
        dataset.write(pixels)
    return path


def make(out: Path = OUT) -> Path:
    import geopandas
    import rasterio

    from geolink.demo import TILES
    from geolink.embed import EmbedConfig, embed

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scene = write_scene(tmp)
        sources = tuple(str(p) for p in sorted((TILES / TILE).glob("*.geojson")))
        summary = embed(EmbedConfig(images=(scene,), osm=sources, out=tmp / "scene.parquet", maps=tmp / "maps",
                                    min_nodes=5, workers=0, quiet=True))
        table = geopandas.read_parquet(tmp / "scene.parquet")
        with rasterio.open(summary["maps"][0]) as dataset:
            quicklook = Image.fromarray(dataset.read().transpose(1, 2, 0))
        picture = Image.open(scene).convert("RGB")
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=18)
    for row in table.itertuples():
        colour = (40, 200, 60) if row.mode == "fused" else (255, 150, 0)
        box = (row.col + 2, row.row + 2, row.col + 221, row.row + 221)
        draw.rectangle(box, outline=colour, width=3)
        draw.text((row.col + 10, row.row + 8), f"{row.num_nodes} nodes", fill=colour, font=font)
    quicklook = quicklook.resize(picture.size, Image.Resampling.NEAREST)
    sheet = Image.new("RGB", (picture.width * 2 + 12, picture.height), "white")
    sheet.paste(picture, (0, 0))
    sheet.paste(quicklook, (picture.width + 12, 0))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    print(json.dumps({"out": str(out), "windows": len(table), "fused": int((table["mode"] == "fused").sum())}))
    return out


if __name__ == "__main__":
    make()
