"""Exported encoders (ONNX through onnxruntime, torch.export) equal eager PyTorch on the real UFZ samples, for
batches of 1 and 3; the padded graph form equals the PyG form."""

from __future__ import annotations

import json

import pytest
import torch
from torch_geometric.data import Batch

from geolink.cli import main as cli_main
from geolink.data.folders import OfficialPairFolder
from geolink.export import FUSION_INPUTS, export_model, pad_graphs, read_metadata
from geolink.graph.schema import NODE_TYPES, empty_graph
from geolink.models.osm import graph_batch_vectors
from geolink.registry import create_model

TOLERANCE = 1e-4  # relative to the largest magnitude of each output


@pytest.fixture(scope="module")
def ufz(shared_data):
    folder = OfficialPairFolder(shared_data / "official_examples" / "ufz")
    items = [folder[i] for i in range(3)]
    return torch.stack([image for image, _ in items]), [graph for _, graph in items]


@pytest.fixture(scope="module")
def fusion():
    torch.manual_seed(0)
    return create_model("geolink_tiny", component="fusion", osm={"text_dim": 512}).eval()


@pytest.fixture(scope="module")
def exported(fusion, tmp_path_factory):
    """Each component in each format, exported once."""
    folder = tmp_path_factory.mktemp("exported")
    return {(component, fmt): export_model(fusion, folder, component, fmt, source="test")
            for component in ("image", "fusion") for fmt in ("onnx", "torch-export")}


def assert_close(actual, expected, name: str) -> None:
    expected = expected.detach().float()
    actual = torch.as_tensor(actual).float()
    assert actual.shape == expected.shape, name
    error = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert error <= TOLERANCE, f"{name}: relative error {error:.2e}"


def run_exported(path, inputs: tuple[torch.Tensor, ...]) -> list:
    if path.suffix == ".onnx":
        ort = pytest.importorskip("onnxruntime")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        return session.run(None, {name: tensor.numpy() for name, tensor in zip(names, inputs)})
    with torch.no_grad():
        out = torch.export.load(str(path)).module()(*inputs)
    return list(out) if isinstance(out, tuple | list) else [out]


def test_pad_graphs_keeps_every_node_anchor_and_edge(ufz):
    graphs = [ufz[1][0], empty_graph(512), ufz[1][2]]
    duplicate = graphs[2].clone()
    edge_type = ("line", "to", "polygon")
    duplicate[edge_type].edge_index = torch.cat([duplicate[edge_type].edge_index] * 2, dim=1)
    graphs[2] = duplicate
    batch = Batch.from_data_list(graphs)
    padded = pad_graphs(batch)
    counts = [sum(g[t].x.shape[0] for t in NODE_TYPES) for g in graphs]
    assert padded.nodes.shape == (3, max(counts), 512)
    assert padded.node_mask.sum(dim=1).tolist() == counts
    assert padded.adjacency.sum(dim=(1, 2)).tolist() == [float(sum(g[et].edge_index.shape[1] for et in g.edge_types))
                                                         for g in graphs]
    # sample 0 starts with its polygons, then lines, then points
    first = graphs[0]
    expected = torch.cat([first[t].x for t in NODE_TYPES])
    assert torch.equal(padded.nodes[0, : counts[0]], expected)
    assert padded.node_types[0, : counts[0]].tolist() == sum(
        ([i] * first[t].x.shape[0] for i, t in enumerate(NODE_TYPES)), [])
    assert torch.equal(padded.anchors[0, 0, :4], first["polygon"].pos[0])
    with pytest.raises(Exception, match="more than max_nodes=2"):
        pad_graphs(batch, max_nodes=2)
    assert pad_graphs(batch, max_nodes=200).nodes.shape[1] == 200


def test_dense_node_embeddings_equal_the_gat_on_edge_lists(ufz, fusion):
    graphs = [ufz[1][0], empty_graph(512), ufz[1][2]]
    edge_type = ("line", "to", "polygon")
    graphs[2] = graphs[2].clone()
    graphs[2][edge_type].edge_index = torch.cat([graphs[2][edge_type].edge_index] * 2, dim=1)  # multi-edges
    batch = Batch.from_data_list(graphs)
    osm = fusion.osm_encoder
    with torch.no_grad():
        reference = osm.node_embeddings(batch, *graph_batch_vectors(batch))
        padded = pad_graphs(batch)
        dense = osm.dense_node_embeddings(padded.nodes, padded.node_mask, padded.node_types, padded.adjacency)
    for sample in (0, 2):  # sample 1 has no nodes
        rows = torch.cat([reference[t][batch[t].batch == sample] for t in NODE_TYPES])
        assert_close(dense[sample, : rows.shape[0]], rows, f"sample {sample}")


@pytest.mark.parametrize("batch_size", [1, 3])
def test_the_padded_forward_equals_the_graph_forward(ufz, fusion, batch_size):
    images, graphs = ufz[0][:batch_size], Batch.from_data_list(ufz[1][:batch_size])
    with torch.no_grad():
        reference = fusion(images, graphs)
        padded = fusion.forward_padded(images, *pad_graphs(graphs).as_tuple())
    for index, (a, b) in enumerate(zip(padded, reference)):
        assert_close(a, b, f"map {index}")


@pytest.mark.parametrize("fmt", ["onnx", "torch-export"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_the_exported_image_encoder_equals_eager(ufz, fusion, exported, fmt, batch_size):
    images = ufz[0][:batch_size]
    with torch.no_grad():
        reference = fusion.image_encoder.forward_features(images)
    (tokens,) = run_exported(exported["image", fmt], (images,))
    assert_close(tokens, reference, f"{fmt} tokens")


@pytest.mark.parametrize("fmt", ["onnx", "torch-export"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_the_exported_fusion_encoder_equals_eager(ufz, fusion, exported, fmt, batch_size):
    images, graphs = ufz[0][:batch_size], Batch.from_data_list(ufz[1][:batch_size])
    with torch.no_grad():
        reference = fusion(images, graphs)
    maps = run_exported(exported["fusion", fmt], (images, *pad_graphs(graphs).as_tuple()))
    assert len(maps) == len(reference) == 4
    for index, (a, b) in enumerate(zip(maps, reference)):
        assert_close(a, b, f"{fmt} map {index}")


def test_exported_files_carry_their_input_size_and_metadata(exported):
    onnx = pytest.importorskip("onnx")
    path = exported["fusion", "onnx"]
    assert path.name == "geolink_fusion_224x224.onnx"
    info = read_metadata(path)
    assert info["image_size"] == [224, 224] and info["inputs"] == list(FUSION_INPUTS)
    assert info["out_channels"] == [192, 192, 192, 128] and info["text_dim"] == 512
    stored = {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}
    assert stored["geolink.image_size"] == [224, 224] and stored["geolink.component"] == "fusion"
    extra = {"geolink.json": ""}
    torch.export.load(str(exported["image", "torch-export"]), extra_files=extra)
    assert json.loads(extra["geolink.json"])["output_shape"] == ["B", 197, 192]


def test_geolink_export_writes_a_file_named_by_its_size(tmp_path, capsys):
    assert cli_main(["export", "--model", "geolink_tiny.demo", "--component", "image", "--format", "torch-export",
                     "--image-size", "64", "--out", str(tmp_path)]) == 0
    path = tmp_path / "geolink_image_64x64.pt2"
    assert f"exported image encoder: {path}" in capsys.readouterr().out
    with torch.no_grad():
        tokens = torch.export.load(str(path)).module()(torch.randn(2, 3, 64, 64))
    assert tokens.shape == (2, 17, 192)
