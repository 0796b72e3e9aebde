"""Masked-tag suggestion and disagreement: the pretraining consistency path, each node masked alone, and bad input."""

from __future__ import annotations

import json

import pytest
import torch

import geolink
from geolink.graph.schema import NODE_TYPES
from geolink.suggest import default_candidates, disagreement, masked_predictions, rank_candidates, suggest_tags
from tests.conftest import synthetic_graph


class FixedEncoder:
    """A stand-in text model of a chosen width: each string a fixed random vector."""

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def encode(self, strings):
        return torch.stack([torch.randn(self.dim, generator=torch.Generator().manual_seed(sum(map(ord, s))))
                            for s in strings])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return geolink.create_model("geolink_tiny").eval()


@torch.no_grad()
def test_masked_prediction_is_the_pretraining_consistency_path(model, synthetic_images):
    graph = synthetic_graph((3, 0, 0), seed=4)  # one type, 3 nodes: pretraining masks exactly one
    model.mask_ratio = 0.0  # every patch visible, as the tool sees the image
    try:
        out = model(synthetic_images[:1], graph, sample_seeds=torch.tensor([5]))
    finally:
        model.mask_ratio = 0.75
    masked = out["node_mask"]["polygon"].nonzero().flatten().tolist()
    assert len(masked) == 1 and out["node_pred"].shape[0] == 1
    prediction = masked_predictions(model, synthetic_images[0], graph, [("polygon", masked[0])])[0]
    torch.testing.assert_close(prediction, out["node_pred"][0], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_disagreement_is_the_cosine_distance_per_node_and_chunks_agree(model, synthetic_images, monkeypatch):
    graph = synthetic_graph((11, 21, 16), seed=0)
    scores = disagreement(model, synthetic_images[0], graph)
    assert {t: s.shape[0] for t, s in scores.items()} == {"polygon": 11, "line": 21, "point": 16}
    assert all(((s >= 0) & (s <= 2)).all() for s in scores.values())
    prediction = masked_predictions(model, synthetic_images[0], graph, [("line", 7)])[0]
    expected = 1 - torch.nn.functional.cosine_similarity(prediction, graph["line"].x[7], dim=0)
    torch.testing.assert_close(scores["line"][7], expected)
    import geolink.suggest

    monkeypatch.setattr(geolink.suggest, "MASK_CHUNK", 5)  # chunking changes nothing
    again = disagreement(model, synthetic_images[0], graph)
    for node_type in NODE_TYPES:
        torch.testing.assert_close(again[node_type], scores[node_type], atol=1e-5, rtol=1e-4)


def test_suggest_tags_ranks_candidates_by_cosine_with_the_prediction(model, synthetic_images):
    graph = synthetic_graph((3, 6, 0), seed=1)
    encoder = FixedEncoder(384)
    candidates = ["building:building", "landuse:grass", "highway:residential", "natural:water"]
    ranked = suggest_tags(model, synthetic_images[0], graph, ("line", 2), candidates, top_k=3, tag_encoder=encoder)
    assert len(ranked) == 3 and [s for _, s in ranked] == sorted((s for _, s in ranked), reverse=True)
    prediction = masked_predictions(model, synthetic_images[0], graph, [("line", 2)])[0]
    assert ranked == rank_candidates(prediction, candidates, encoder, top_k=3)
    best = max(candidates, key=lambda c: float(torch.nn.functional.cosine_similarity(
        encoder.encode([c])[0], prediction, dim=0)))
    assert ranked[0][0] == best


def test_default_candidates_are_the_region_vocabulary_then_common_keys():
    graph = synthetic_graph((2, 0, 1), seed=0)
    graph["polygon"].tags = torch.tensor([[2, -1], [0, 2]])
    graph["line"].tags = torch.zeros(0, 2, dtype=torch.long)
    graph["point"].tags = torch.tensor([[2, -1]])
    candidates = default_candidates(graph, ["a:b", "unused:x", "c:d"], common_keys=5)
    assert candidates[:2] == ["a:b", "c:d"] and "unused:x" not in candidates
    table = json.loads((geolink.graph.tags.OFFICIAL_KEY_FREQUENCY).read_text())
    commonest = max(table, key=table.get)
    assert candidates[2] == f"{commonest}:{commonest}" and len(candidates) == 7


def test_bad_input_names_what_is_wrong(model, synthetic_images):
    graph = synthetic_graph((3, 6, 0), seed=1)
    fusion = model.fusion_encoder
    with pytest.raises(ValueError, match="GeoLinkFusionEncoder, without the node mask tokens.*GeoLinkForPretraining"):
        suggest_tags(fusion, synthetic_images[0], graph, ("line", 0), ["a:b"], tag_encoder=FixedEncoder(384))
    with pytest.raises(ValueError, match=r"\('point', 0\) is out of range: the graph has 3 polygons, 6 lines, 0"):
        suggest_tags(model, synthetic_images[0], graph, ("point", 0), ["a:b"], tag_encoder=FixedEncoder(384))
    with pytest.raises(ValueError, match="graph has no nodes"):
        disagreement(model, synthetic_images[0], synthetic_graph((0, 0, 0)))
    with pytest.raises(ValueError, match="512-wide tag features but the model reads 384-wide"):
        suggest_tags(model, synthetic_images[0], graph, ("line", 0), ["a:b"], tag_encoder=FixedEncoder(512))


def test_osm_qa_job_writes_scored_geojson_and_png_and_refuses_a_fusion_folder(tmp_path, minilm_path, capsys):
    from PIL import Image

    from geolink.cli import main
    from geolink.demo import TILES

    tile = TILES / "a472140250_FI_21"
    out = tmp_path / "qa.geojson"
    arguments = ["osm-qa", "--image", str(tile / "a472140250_FI_21.jpg"), "--osm", str(tile)]
    assert main([*arguments, "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    collection = json.loads(out.read_text())
    scores = [f["properties"]["disagreement"] for f in collection["features"]]
    assert summary["objects"] == len(scores) == 18 and scores == sorted(scores, reverse=True)
    first = collection["features"][0]["properties"]
    assert first["tags"] and len(first["suggested"]) == 3
    west, south, east, north = json.loads((tile / "meta.json").read_text())["bbox_west_south_east_north"]
    lon, lat = collection["features"][0]["geometry"]["coordinates"]
    assert west <= lon <= east and south <= lat <= north
    with Image.open(out.with_suffix(".png")) as png:
        assert png.width > 500
    fusion = tmp_path / "fusion"
    geolink.create_model("geolink_tiny.demo", pretrained=True, component="fusion").save_pretrained(fusion)
    assert main([*arguments, "--model", str(fusion), "--out", str(tmp_path / "x.geojson")]) == 2
    err = capsys.readouterr().err
    assert "GeoLinkFusionEncoder" in err and "pass a GeoLinkForPretraining folder" in err


def test_osm_qa_on_an_official_graph_needs_the_text_model_only_for_suggestions(tmp_path, shared, capsys):
    from geolink.cli import main

    ufz = shared("official_examples", "ufz")
    name = sorted(p.stem for p in (ufz / "graph").glob("*.safetensors"))[0]
    checkpoint = shared("parity", "official_tiny") / "geolink_multimodal_official_format.pth"
    arguments = ["osm-qa", "--image", str(ufz / "img" / f"{name}.png"), "--osm",
                 str(ufz / "graph" / f"{name}.safetensors"), "--model", str(checkpoint),
                 "--out", str(tmp_path / "qa.geojson")]
    assert main(arguments) == 2
    assert "its text model is unknown: pass --text-model" in capsys.readouterr().err
    assert main([*arguments, "--top-k", "0"]) == 0
    features = json.loads((tmp_path / "qa.geojson").read_text())["features"]
    assert len(features) == json.loads(capsys.readouterr().out)["objects"] > 0
    assert "suggested" not in features[0]["properties"]
