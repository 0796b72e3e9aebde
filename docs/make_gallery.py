"""Make the figures of the documentation gallery (``docs/gallery/*.png``), offline, in about a minute on a CPU.

    python docs/make_gallery.py                 # every figure
    python docs/make_gallery.py osm_graphs.png  # some of them

Each figure is one function of :data:`FIGURES`; ``docs/gallery.md`` shows them with the function that made each.
Images are written as palette PNGs (256 colours, optimised) so that the committed files stay small.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch_geometric.data import Batch

GALLERY = Path(__file__).resolve().parent / "gallery"
CELL = 256  # width of one tile in the grids, pixels
LABEL = 24  # height of a tile's name above it


def save_small(image: Image.Image, out: Path, width: int | None = None) -> Path:
    """Save ``image`` as an optimised 256-colour PNG, downscaled to ``width`` pixels when it is wider."""
    if width is not None and image.width > width:
        image = image.resize((width, round(image.height * width / image.width)), Image.Resampling.LANCZOS)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    return out


def labelled_grid(rows: list[list[Image.Image]], labels: list[str], row_names: list[str]) -> Image.Image:
    """Images in a grid of ``CELL``-wide cells, one column per label (written above it), one row per row name."""
    font = ImageFont.load_default(size=15)
    name_width = 110 if any(row_names) else 0
    heights = [max(round(CELL * im.height / im.width) for im in row) for row in rows]
    sheet = Image.new("RGB", (name_width + len(labels) * (CELL + 6), LABEL + sum(h + 6 for h in heights)), "white")
    draw = ImageDraw.Draw(sheet)
    for column, label in enumerate(labels):
        draw.text((name_width + column * (CELL + 6), LABEL // 2), label, fill=(30, 30, 30), font=font, anchor="lm")
    top = LABEL
    for row, name, height in zip(rows, row_names, heights, strict=True):
        draw.text((4, top + height // 2), name, fill=(30, 30, 30), font=font, anchor="lm")
        for column, image in enumerate(row):
            cell = image.resize((CELL, round(CELL * image.height / image.width)), Image.Resampling.LANCZOS)
            sheet.paste(cell, (name_width + column * (CELL + 6), top))
        top += height + 6
    return sheet


def demo_figure(out: Path) -> Path:
    """``geolink demo``'s figure: the embedded model on the default bundled tile."""
    from geolink.demo import DemoConfig, run_demo

    with Image.open(run_demo(DemoConfig(out=out))) as image:
        image.load()  # the file is then rewritten in place, smaller
        return save_small(image, out, width=1200)


def osm_graphs_figure(out: Path) -> Path:
    """The OSM graph of every bundled tile, drawn over its image (nodes at their centre anchor, non-self edges)."""
    from geolink.demo import build_tile_graph, draw_graph, list_tiles, read_tile

    cells = []
    for name in list_tiles():
        image, features, bbox = read_tile(name)
        shown = image.resize((2 * CELL, round(2 * CELL * image.height / image.width)), Image.Resampling.BICUBIC)
        cells.append(draw_graph(shown, features, bbox, build_tile_graph(features, bbox)))
    return save_small(labelled_grid([cells], list_tiles(), [""]), out)


def fused_pca_figure(out: Path) -> Path:
    """Each bundled tile and the PCA (3 components → RGB) of its last fused map from ``geolink_tiny.demo``."""
    import geolink
    from geolink.demo import build_tile_graph, fused_pca_image, list_tiles, read_tile
    from geolink.runtime import normalise

    fusion = geolink.create_model("geolink_tiny.demo", pretrained=True, component="fusion").eval()
    size = fusion.image_encoder.img_size
    images, pcas = [], []
    for name in list_tiles():
        image, features, bbox = read_tile(name)
        pixels = torch.from_numpy(np.array(image.resize((size, size), Image.Resampling.BICUBIC))).permute(2, 0, 1)
        with torch.no_grad():
            fused = fusion(normalise(pixels).unsqueeze(0), Batch.from_data_list([build_tile_graph(features, bbox)]))
        images.append(image)
        pcas.append(fused_pca_image(fused[-1][0], image.size))
    return save_small(labelled_grid([images, pcas], list_tiles(), ["image", "fused PCA"]), out)


def training_curve_figure(out: Path) -> Path:
    """``geolink plot-metrics`` on a short pretraining run of ``geolink_tiny`` on the bundled pairs (CPU)."""
    from geolink.plots import PlotMetricsConfig, plot_metrics
    from geolink.runtime import Precision
    from geolink.train import TrainConfig, run

    with tempfile.TemporaryDirectory() as tmp:
        run(TrainConfig(data="bundled", out=Path(tmp) / "run", max_steps=60, batch_size=8, warmup_steps=6,
                        base_lr=1e-2, save_every=60, seed=0, device="cpu", precision=Precision.FP32))
        plotted = plot_metrics(PlotMetricsConfig(Path(tmp) / "run" / "metrics.jsonl", out=out))
    with Image.open(plotted) as image:
        image.load()
        return save_small(image, out, width=1200)


#: gallery file name -> the function that writes it
FIGURES: dict[str, Callable[[Path], Path]] = {
    "demo.png": demo_figure,
    "osm_graphs.png": osm_graphs_figure,
    "fused_pca.png": fused_pca_figure,
    "training_curve.png": training_curve_figure,
}


def make_figures(figures: dict[str, Callable[[Path], Path]], default_out: Path, description: str,
                 argv: list[str] | None = None) -> None:
    """The command line of a figure script: make the named figures (default: all) into ``--out``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("names", nargs="*", help=f"figures to make, of {', '.join(figures)} (default: all)")
    parser.add_argument("--out", type=Path, default=default_out, help=f"output folder (default: {default_out})")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(figures))
    if unknown:
        parser.error(f"unknown figures {', '.join(unknown)}; choose from {', '.join(figures)}")
    for name in args.names or figures:
        path = figures[name](args.out / name)
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} kB)")


def main(argv: list[str] | None = None) -> None:
    make_figures(FIGURES, GALLERY, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
