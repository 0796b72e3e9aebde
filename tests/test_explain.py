"""Tools on the pretrained heads: shared-space embeddings and object→patch attention, against the official outputs.

The official-format tiny checkpoint is converted with ``geolink.convert`` (the fixture of ``test_parity``);
``expected_heads.safetensors`` holds what the official code computed one sample at a time.
"""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from torch_geometric.data import Batch

from geolink.explain import node_attention
from geolink.graph.schema import NODE_TYPES
from tests.test_parity import assert_parity, official  # noqa: F401  (the converted official fixture)


@pytest.fixture
def expected_heads(official):  # noqa: F811
    return safetensors.torch.load_file(str(official["folder"] / "expected_heads.safetensors"))


@torch.no_grad()
def test_encode_image_and_osm_match_the_official_heads(official, expected_heads):  # noqa: F811
    model = official["model"].eval()
    batch = Batch.from_data_list(official["graphs"])
    assert_parity(model.encode_image(official["images"]), expected_heads["contrastive.image"], "contrastive.image")
    assert_parity(model.encode_osm(batch), expected_heads["contrastive.osm"], "contrastive.osm")
    unit = model.encode_image(official["images"], normalize=True)
    assert torch.allclose(unit.norm(dim=-1), torch.ones(3))
    assert torch.allclose(unit, torch.nn.functional.normalize(model.encode_image(official["images"]), dim=-1))
    assert torch.allclose(model.encode_osm(batch, normalize=True).norm(dim=-1), torch.ones(3))


@torch.no_grad()
def test_isolated_node_attention_matches_the_official_helper(official, expected_heads, monkeypatch):  # noqa: F811
    import geolink.explain

    model = official["model"].eval()
    for chunk in (64, 4):  # all nodes of a type at once, and in chunks
        monkeypatch.setattr(geolink.explain, "ISOLATED_CHUNK", chunk)
        maps = node_attention(model, official["images"], official["graphs"], isolated=True)
        compared = 0
        for index, sample in enumerate(maps):
            for node_type in NODE_TYPES:
                key = f"attention.{index}.{node_type}"
                if key not in expected_heads:
                    assert sample[node_type].shape[0] == 0, key
                    continue
                expected = expected_heads[key]
                assert sample[node_type].shape == (expected.shape[0], 14, 14)
                assert_parity(sample[node_type].reshape(expected.shape[0], -1), expected, f"{key} (chunk {chunk})")
                compared += 1
        assert compared == 6


@torch.no_grad()
def test_attention_hook_changes_no_output(synthetic_images, synthetic_graphs):
    import geolink

    torch.manual_seed(0)
    fusion = geolink.create_model("geolink_tiny", component="fusion").eval()
    batch = Batch.from_data_list(synthetic_graphs)
    before = fusion(synthetic_images, batch)[-1]
    maps = node_attention(fusion, synthetic_images, batch)
    assert torch.equal(fusion(synthetic_images, batch)[-1], before)
    for sample, graph in zip(maps, synthetic_graphs):
        for node_type in NODE_TYPES:
            assert sample[node_type].shape == (graph[node_type].num_nodes, 14, 14)
            sums = sample[node_type].sum(dim=(1, 2))
            assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
    block = fusion.blocks[0]
    image, nodes = torch.randn(2, 196, 128), torch.randn(2, 5, 128)
    image_pos, node_pos = torch.randn(1, 196, 128).expand(2, -1, -1), torch.randn(2, 5, 128)
    padding = torch.tensor([[False] * 5, [False, False, True, True, True]])
    plain = block(image, nodes, image_pos, node_pos, padding)
    hooked = block(image, nodes, image_pos, node_pos, padding, return_attention=True)
    assert torch.allclose(plain[0], hooked[0], atol=1e-5) and torch.allclose(plain[1], hooked[1], atol=1e-5)
    assert hooked[2].shape == (2, 5, 196)


@torch.no_grad()
def test_isolated_equals_fused_for_a_lone_node_and_differs_with_company(synthetic_images, synthetic_graphs):
    import geolink
    from geolink.graph.schema import empty_graph

    torch.manual_seed(0)
    model = geolink.create_model("geolink_tiny").eval()
    many = synthetic_graphs[0]
    lone = empty_graph(many["polygon"].x.shape[1], bbox=(0.0, 0.0, 1.0, 1.0))
    lone["point"].x, lone["point"].pos = many["point"].x[:1], many["point"].pos[:1]
    lone["point", "to", "point"].edge_index = torch.zeros(2, 1, dtype=torch.long)
    lone["point", "to", "point"].edge_attr = torch.tensor([[1.0, 0.0]])
    images = synthetic_images[:2]
    fused = node_attention(model, images, [many, lone])
    alone = node_attention(model, images, [many, lone], isolated=True)
    assert torch.allclose(fused[1]["point"], alone[1]["point"], atol=1e-6)
    assert not torch.allclose(fused[0]["polygon"], alone[0]["polygon"], atol=1e-4)


def test_node_attention_refuses_models_without_a_fusion_block_and_bad_layers(synthetic_images, synthetic_graphs):
    import geolink

    image_encoder = geolink.create_model("geolink_tiny", component="image")
    with pytest.raises(ValueError, match="no fusion block"):
        node_attention(image_encoder, synthetic_images, synthetic_graphs)
    fusion = geolink.create_model("geolink_tiny", component="fusion").eval()
    with pytest.raises(ValueError, match="layer=1 is out of range"):
        node_attention(fusion, synthetic_images, synthetic_graphs, layer=1)
    with pytest.raises(ValueError, match="2 images but 3 graphs"):
        node_attention(fusion, synthetic_images[:2], synthetic_graphs)


def test_explain_job_writes_the_attention_grid_of_a_bundled_tile(tmp_path, minilm_path, capsys):
    from PIL import Image

    from geolink.cli import main
    from geolink.demo import TILES

    tile = TILES / "a472140250_FI_21"
    out = tmp_path / "attention.png"
    assert main(["explain", "--image", str(tile / "a472140250_FI_21.jpg"), "--osm", str(tile), "--out", str(out),
                 "--nodes", "3", "--isolated"]) == 0
    assert "18 objects" in capsys.readouterr().out
    with Image.open(out) as figure:
        assert figure.width > 3 * 256 and figure.height > 256


def test_plot_names_missing_nodes_and_empty_graphs(synthetic_graphs):
    from PIL import Image

    from geolink.explain import plot_node_attention

    graph = synthetic_graphs[1]  # 3 polygons, 6 lines, no points
    maps = {t: torch.rand(graph[t].num_nodes, 14, 14) for t in NODE_TYPES}
    image = Image.new("RGB", (224, 224))
    figure = plot_node_attention(image, graph, maps, nodes=[("polygon", 0), ("line", 5)], columns=2, panel=64)
    assert figure.width == 2 * 20 + 2 * 64 + 12
    with pytest.raises(ValueError, match=r"\('point', 0\) does not exist: the graph has 3 polygons, 6 lines, 0 points"):
        plot_node_attention(image, graph, maps, nodes=[("point", 0)])
    empty = {t: torch.zeros(0, 14, 14) for t in NODE_TYPES}
    with pytest.raises(ValueError, match="no nodes"):
        plot_node_attention(image, graph, empty)


@torch.no_grad()
def test_a_fusion_only_folder_gives_the_same_maps_as_the_full_demo_model(tmp_path, synthetic_images,
                                                                         synthetic_graphs):
    import geolink
    from geolink.explain import load_tool_model

    full = load_tool_model("geolink_tiny.demo", "fusion")
    geolink.create_model("geolink_tiny.demo", pretrained=True, component="fusion").save_pretrained(tmp_path / "f")
    fusion_only = load_tool_model(str(tmp_path / "f"), "fusion")
    for a, b in zip(node_attention(full, synthetic_images, synthetic_graphs),
                    node_attention(fusion_only, synthetic_images, synthetic_graphs)):
        for node_type in NODE_TYPES:
            assert torch.equal(a[node_type], b[node_type])


def test_stored_and_official_graph_files_are_read_with_their_tags(tmp_path, minilm_path, shared):
    from geolink.cli import main
    from geolink.demo import TILES
    from geolink.explain import node_labels, read_osm_input

    polygons = TILES / "a472140250_FI_21" / "a472140250_FI_21_polygon.geojson"
    assert main(["build-graphs", "--vector", str(polygons), "--grid", "1", "1", "--text-model", str(minilm_path),
                 "--out", str(tmp_path / "graphs"), "--quiet"]) == 0
    (tile,) = sorted((tmp_path / "graphs" / "tiles").glob("*.safetensors"))
    graph, vocabulary = read_osm_input(tile, "geolink_tiny.demo")
    assert graph["polygon"].x.shape == (8, 384)
    assert "place:island" in node_labels(graph, vocabulary)["polygon"]
    ufz = sorted(shared("official_examples", "ufz", "graph").glob("*.safetensors"))[0]
    ufz_graph, strings = read_osm_input(ufz, "geolink_tiny.demo")
    assert ufz_graph["polygon"].x.shape[1] == 512 and strings is None
    alone = tmp_path / "alone.safetensors"
    alone.write_bytes(tile.read_bytes())
    with pytest.raises(FileNotFoundError, match="outside its build-graphs folder"):
        read_osm_input(alone, "geolink_tiny.demo")


def test_tools_page_shows_every_figure_its_script_makes(monkeypatch):
    import importlib.util
    import re
    from pathlib import Path

    docs = Path(__file__).resolve().parents[1] / "docs"
    monkeypatch.syspath_prepend(str(docs))  # the script imports make_gallery from its own folder
    spec = importlib.util.spec_from_file_location("docs_make_tools_figures", docs / "make_tools_figures.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    shown = re.findall(r"!\[[^\]]*\]\(tools/([^)]+)\)", (docs / "tools.md").read_text())
    assert sorted(shown) == sorted(script.FIGURES)
    for name in shown:
        assert (docs / "tools" / name).is_file(), f"run python docs/make_tools_figures.py {name}"
