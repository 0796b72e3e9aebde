"""The offline demo and the embedded pretrained default (``geolink_tiny.demo``)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from PIL import Image
from torch_geometric.data import Batch

import geolink
from geolink.demo import DEFAULT_TILE, build_tile_graph, list_tiles, read_tile
from geolink.graph.schema import validate_graph


def test_embedded_default_is_registered_and_loads_strictly():
    tag = geolink.get_pretrained_tag("geolink_tiny.demo")
    assert tag.text_dim == 384 and "example tiles" in tag.origin
    fusion = geolink.create_model("geolink_tiny.demo", pretrained=True, component="fusion")
    assert isinstance(fusion, geolink.GeoLinkFusionEncoder) and not fusion.training
    card = (geolink.registry.ASSETS_DIR / "geolink_tiny_demo" / "README.md").read_text()
    assert "five official GeoLink example tiles" in card and "ODbL" in card


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


def test_demo_command_runs_offline_and_writes_the_png(tmp_path):
    out = tmp_path / "demo.png"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "geolink.cli", "demo", "--out", str(out)], capture_output=True,
                            text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert str(out.resolve()) in result.stdout
    with Image.open(out) as picture:
        width, height = picture.size
        assert width > 3 * height // 2 and height >= 300  # three panels side by side
