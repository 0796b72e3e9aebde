"""Make the figures of the tools page (``docs/tools/*.png``) with the embedded demo model, offline.

    python docs/make_tools_figures.py               # every figure
    python docs/make_tools_figures.py retrieval.png # some of them

Each figure is the output of a ``geolink`` job (or of the library call behind it) on the bundled tile
``a472140250_FI_21``; ``docs/tools.md`` shows them. Saved as small palette PNGs like the gallery's.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from make_gallery import make_figures, save_small
from PIL import Image, ImageDraw, ImageFont

TOOLS = Path(__file__).resolve().parent / "tools"
TILE = "a472140250_FI_21"
MODEL = "geolink_tiny.demo"


def _tile() -> tuple[Path, Path]:
    from geolink.demo import TILES

    return TILES / TILE / f"{TILE}.jpg", TILES / TILE


def attention_figure(out: Path) -> Path:
    """``geolink explain``: where each object looks, all objects together."""
    from geolink.explain import ExplainConfig, explain

    image, osm = _tile()
    with tempfile.TemporaryDirectory() as tmp:
        written = explain(ExplainConfig(image=image, osm=osm, model=MODEL, out=Path(tmp) / "attention.png"))
        with Image.open(written) as fig:
            return save_small(fig, out, width=1100)


def osm_qa_figure(out: Path) -> Path:
    """``geolink osm-qa``: the disagreement map (the GeoJSON goes with it)."""
    from geolink.suggest import OsmQaConfig, osm_qa

    image, osm = _tile()
    with tempfile.TemporaryDirectory() as tmp:
        written = osm_qa(OsmQaConfig(image=image, osm=osm, model=MODEL, out=Path(tmp) / "qa.geojson"))
        with Image.open(written["png"]) as fig:
            return save_small(fig, out)


def suggest_figure(out: Path) -> Path:
    """``suggest_tags`` for one object: its outline over the image, its real tags and the model's top 8."""
    from geolink.explain import draw_anchors, load_tool_model, node_labels, read_image, read_osm_input
    from geolink.registry import tag_encoder_for
    from geolink.suggest import suggest_tags

    image, osm = _tile()
    model = load_tool_model(MODEL, "pretraining")
    picture, pixels = read_image(image, model)
    graph, vocabulary = read_osm_input(osm, MODEL)
    node = ("polygon", 7)
    ranked = suggest_tags(model, pixels[0], graph, node, top_k=8, tag_encoder=tag_encoder_for(MODEL),
                          vocabulary=vocabulary)
    size = 320
    sheet = Image.new("RGB", (size + 380, size + 40), "white")
    shown = picture.resize((size, size), Image.Resampling.BICUBIC)
    draw_anchors(ImageDraw.Draw(shown, "RGBA"), node[0], graph[node[0]].pos[node[1]].numpy(), shown.size)
    sheet.paste(shown, (20, 20))
    draw = ImageDraw.Draw(sheet)
    font, bold = ImageFont.load_default(size=14), ImageFont.load_default(size=16)
    truth = node_labels(graph, vocabulary)[node[0]][node[1]]
    draw.text((size + 40, 24), f"{node[0]} {node[1]}, masked; its tags: {truth}", fill=(20, 20, 20), font=bold)
    draw.text((size + 40, 50), "suggested (cosine with the masked prediction):", fill=(90, 90, 90), font=font)
    for row, (tag, score) in enumerate(ranked):
        colour = (0, 120, 40) if tag in truth.split("; ") else (20, 20, 20)
        draw.text((size + 40, 76 + 22 * row), f"{row + 1}. {tag}  {score:.3f}", fill=colour, font=font)
    return save_small(sheet, out)


def retrieval_figure(out: Path) -> Path:
    """``geolink retrieve``: an image query against the OSM graphs of the bundled pairs."""
    from geolink.retrieval import RetrieveConfig, retrieve

    with tempfile.TemporaryDirectory() as tmp:
        written = retrieve(RetrieveConfig(model=MODEL, query=1, k=5, out=Path(tmp) / "hits.json"))
        with Image.open(written["png"]) as fig:
            return save_small(fig, out)


FIGURES: dict[str, Callable[[Path], Path]] = {
    "attention.png": attention_figure,
    "suggest.png": suggest_figure,
    "osm_qa.png": osm_qa_figure,
    "retrieval.png": retrieval_figure,
}


def main(argv: list[str] | None = None) -> None:
    make_figures(FIGURES, TOOLS, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
