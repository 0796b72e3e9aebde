"""The offline demo and the embedded pretrained default (``geolink_tiny.demo``): registered, loadable, trained."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch_geometric.data import Batch

import geolink
from geolink.data.pairs import PairShards, collate_pairs
from geolink.demo import (
    CAPTION,
    DEFAULT_TILE,
    GAP,
    HEADER,
    LEGEND,
    MARGIN,
    PANEL,
    TILES,
    TITLE,
    DemoConfig,
    build_tile_graph,
    compose_figure,
    list_tiles,
    read_tile,
    run_demo,
)
from geolink.errors import InputError
from geolink.graph.schema import validate_graph
from geolink.registry import ASSETS_DIR

DEMO = ASSETS_DIR / "geolink_tiny_demo"


def test_embedded_default_is_registered_and_loads_strictly():
    tag = geolink.get_pretrained_tag("geolink_tiny.demo")
    assert tag.text_dim == 384 and "example tiles" in tag.origin and tag.holds == "GeoLinkForPretraining"
    model = geolink.create_model("geolink_tiny.demo", pretrained=True)
    assert isinstance(model, geolink.GeoLinkForPretraining) and not model.training  # heads included
    fusion = geolink.create_model("geolink_tiny.demo", pretrained=True, component="fusion")
    assert isinstance(fusion, geolink.GeoLinkFusionEncoder) and not fusion.training
    assert isinstance(geolink.load_model(DEMO, component="fusion"), geolink.GeoLinkFusionEncoder)
    config = json.loads((DEMO / "config.json").read_text())
    assert config["model_class"] == "GeoLinkForPretraining"
    assert config["image"] == geolink.get_model_config("geolink_tiny")["image"] and config["osm"]["text_dim"] == 384


def test_the_model_card_gives_the_commands_that_made_the_file():
    card = (DEMO / "README.md").read_text()
    assert "five official GeoLink example tiles" in card and "ODbL" in card
    assert "python examples/make_demo_model.py" in card and "GeoLinkForPretraining" in card
    assert "data='bundled'" in card and "max_steps=300" in card and "seed=0" in card


def test_the_embedded_weights_are_trained():
    """On the bundled pairs (eval transform, fixed masks) the embedded model's pretraining losses are far below those
    of a fresh initialisation of the same architecture: reconstruction, image-OSM contrast and node consistency."""
    pairs = PairShards(ASSETS_DIR / "pairs", transform="eval", seed=0)
    images, graphs = collate_pairs([pairs[i] for i in range(len(pairs))])
    seeds = torch.arange(len(pairs))
    torch.manual_seed(0)
    fresh = geolink.create_model("geolink_tiny").eval()
    trained = geolink.create_model("geolink_tiny.demo", pretrained=True)
    with torch.no_grad():
        ours, theirs = trained(images, graphs, sample_seeds=seeds), fresh(images, graphs, sample_seeds=seeds)
    for term in ("loss_mae", "loss_contrastive", "loss_consistency"):
        assert ours[term] < 0.8 * theirs[term], f"{term}: trained {ours[term]:.3f} vs fresh {theirs[term]:.3f}"


def test_bundled_tiles_build_into_contract_graphs_without_a_text_model():
    assert DEFAULT_TILE in list_tiles() and len(list_tiles()) == 5
    for name in list_tiles():
        image, features, bbox = read_tile(name)
        graph = build_tile_graph(features, bbox)
        validate_graph(graph, feature_dim=384)
        assert image.size[0] > 100 and sum(graph[t].num_nodes for t in ("polygon", "line", "point")) > 0


def test_embedded_model_gives_distinct_finite_fused_maps_for_different_tiles():
    fusion = geolink.create_model("geolink_tiny.demo", pretrained=True, component="fusion")
    images = torch.randn(2, 3, 224, 224)
    graphs = []
    for name in list_tiles()[:2]:
        _, features, bbox = read_tile(name)
        graphs.append(build_tile_graph(features, bbox))
    with torch.no_grad():
        maps = fusion(images, Batch.from_data_list(graphs))
    assert all(torch.isfinite(m).all() for m in maps)
    assert not torch.allclose(maps[-1][0], maps[-1][1])


def test_demo_config_names_the_bundled_tiles(capsys):
    with pytest.raises(InputError, match=f"no bundled tile 'nowhere' \\(tile must be one of: .*{DEFAULT_TILE}"):
        DemoConfig(tile="nowhere")
    assert run_demo(DemoConfig(list_tiles=True)) == TILES
    assert capsys.readouterr().out.split() == list_tiles()


def test_demo_command_runs_offline_without_matplotlib_and_writes_the_figure(tmp_path):
    out = tmp_path / "demo.png"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    without_matplotlib = ("import sys; sys.modules['matplotlib'] = None; from geolink.cli import main; "
                          "sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", without_matplotlib, "demo", "--out", str(out)],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert str(out.resolve()) in result.stdout
    image, _, _ = read_tile(DEFAULT_TILE)
    panel_height = round(PANEL * image.height / image.width)
    with Image.open(out) as picture:
        sheet = np.asarray(picture.convert("L"), dtype=float)
    assert sheet.shape == (HEADER + TITLE + panel_height + LEGEND + CAPTION, 2 * MARGIN + 3 * PANEL + 2 * GAP)
    # the text bands hold text: the header (tile name), the panel titles, the colour key, the caption
    legend = HEADER + TITLE + panel_height
    bands = {"header": sheet[:HEADER], "titles": sheet[HEADER:HEADER + TITLE],
             "legend": sheet[legend:legend + LEGEND, MARGIN + PANEL + GAP:MARGIN + 2 * PANEL + GAP],
             "caption": sheet[legend + LEGEND:]}
    for name, band in bands.items():
        assert band.std() > 10 and band.min() < 100, f"the {name} band is blank"
    assert bands["header"][:, MARGIN + PANEL:].std() > 10  # the header runs on past the first panel (tile name)
    assert sheet[legend:legend + LEGEND, :MARGIN + PANEL].std() == 0  # the key stands under the graph panel only


def test_the_figure_layout_puts_each_part_in_its_band():
    panels = [Image.new("RGB", (PANEL, 100), colour) for colour in ("red", "green", "blue")]
    sheet = compose_figure(panels, ["a", "b", "c"], "header", "caption " * 200, {"polygon": 1, "line": 2, "point": 3})
    assert sheet.size == (2 * MARGIN + 3 * PANEL + 2 * GAP, HEADER + TITLE + 100 + LEGEND + CAPTION)
    for index, colour in enumerate([(255, 0, 0), (0, 128, 0), (0, 0, 255)]):
        left = MARGIN + index * (PANEL + GAP)
        top, bottom = HEADER + TITLE, HEADER + TITLE + 99
        assert sheet.getpixel((left, top)) == sheet.getpixel((left + PANEL - 1, bottom)) == colour
    pixels = np.asarray(sheet.convert("L"), dtype=float)
    assert pixels[-4:].std() == 0  # a long caption is cut to three lines, within its band
    assert pixels[HEADER + TITLE + 100:HEADER + TITLE + 100 + LEGEND].std() > 10  # the colour key
