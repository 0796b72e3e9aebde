"""Hub formats and the registry: save/load round trips, strict loading, model cards, offline cache, push_to_hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch_geometric.data import Batch

import geolink
from geolink.graph.schema import RELATIONS, empty_graph
from geolink.models import GeoLinkForPretraining, GeoLinkFusionEncoder, GeoLinkImageEncoder, GeoLinkOSMEncoder


def small_graph(text_dim: int = 384, seed: int = 0):
    """A random graph with a few nodes of every type and some edges (contract-valid)."""
    generator = torch.Generator().manual_seed(seed)
    graph = empty_graph(text_dim)
    counts = {"polygon": 3, "line": 2, "point": 4}
    for node_type, count in counts.items():
        graph[node_type].x = torch.randn(count, text_dim, generator=generator)
        graph[node_type].pos = torch.rand(count, graph[node_type].pos.shape[1], 2, generator=generator)
    for edge_type, relations in RELATIONS.items():
        src, _, dst = edge_type
        edges = torch.stack([torch.randint(counts[src], (5,), generator=generator),
                             torch.randint(counts[dst], (5,), generator=generator)])
        graph[edge_type].edge_index = edges
        graph[edge_type].edge_attr = torch.nn.functional.one_hot(torch.zeros(5, dtype=torch.long),
                                                                 len(relations)).float()
    return graph


def run_model(model: torch.nn.Module, images: torch.Tensor, graph) -> list[torch.Tensor]:
    torch.manual_seed(3)  # the pretraining model draws masks
    with torch.no_grad():
        if isinstance(model, GeoLinkImageEncoder):
            return [model.forward_features(images)]
        if isinstance(model, GeoLinkOSMEncoder):
            return [*model(graph).values(), model.region_embedding(graph)]
        if isinstance(model, GeoLinkFusionEncoder):
            return model(images, graph)
        out = model(images, graph)
        return [out["loss"], out["pred"]]


@pytest.mark.parametrize("component", ["image", "osm", "fusion", "pretraining"])
def test_save_load_round_trip_is_exact(component, tmp_path):
    torch.manual_seed(0)
    model = geolink.create_model("geolink_tiny", component=component, img_size=64).eval()
    images = torch.randn(2, 3, 64, 64)
    graph = Batch.from_data_list([small_graph(seed=1), small_graph(seed=2)])
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "config.json", "model.safetensors"]
    reloaded = type(model).from_pretrained(tmp_path)
    assert reloaded.state_dict().keys() == model.state_dict().keys()
    for a, b in zip(run_model(model, images, graph), run_model(reloaded, images, graph)):
        assert torch.equal(a, b)
    generic = geolink.load_model(tmp_path)
    assert type(generic) is type(model)


def test_loading_is_strict_and_names_the_keys(tmp_path):
    geolink.create_model("geolink_tiny", component="osm").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = safetensors.torch.load_file(str(weights))
    del tensors["type_attention.bias"]
    tensors["surprise.weight"] = torch.zeros(1)
    safetensors.torch.save_file(tensors, str(weights))
    with pytest.raises(ValueError, match=r"missing keys \(1\): type_attention.bias.*unexpected keys \(1\): surprise"):
        GeoLinkOSMEncoder.from_pretrained(tmp_path)


def test_mismatched_config_is_refused(tmp_path):
    geolink.create_model("geolink_tiny", component="osm").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["osm_dim"] = 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="shape mismatches"):
        GeoLinkOSMEncoder.from_pretrained(tmp_path)


def test_corrupt_weights_file_is_refused(tmp_path):
    geolink.create_model("geolink_tiny", component="osm").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(Exception, match="(?i)safetensor|header|incomplete|invalid"):
        GeoLinkOSMEncoder.from_pretrained(tmp_path)


def test_a_folder_without_weights_gets_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        GeoLinkOSMEncoder.from_pretrained(tmp_path)


def test_image_folder_is_a_timm_folder(tmp_path):
    encoder = geolink.create_model("geolink_tiny", component="image")
    encoder.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["model_args"]["global_pool"] == ""
    assert config["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406]
    weights = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))
    assert "pos_embed" in weights and not any(k.startswith("trunk.") for k in weights)


def test_model_card_carries_citation_licence_and_odbl(tmp_path):
    geolink.create_model("geolink_tiny", component="fusion").save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "library_name: geolink" in card and "license: mit" in card
    assert "@inproceedings{bai2025geolink" in card
    assert "© OpenStreetMap contributors" in card and "ODbL" in card
    assert "GeoLinkFusionEncoder.from_pretrained" in card


def test_push_to_hub_uploads_the_saved_folder(tmp_path, monkeypatch):
    import huggingface_hub.hub_mixin as hub_mixin

    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            return type("Repo", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploaded["repo_id"] = repo_id
            uploaded["files"] = sorted(os.listdir(folder_path))
            uploaded["config"] = json.loads((Path(folder_path) / "config.json").read_text())
            return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(hub_mixin, "HfApi", FakeApi)
    encoder = geolink.create_model("geolink_tiny", component="image")
    url = encoder.push_to_hub("someone/geolink-tiny-image")
    assert url.endswith("/commit/0")
    assert uploaded["files"] == ["README.md", "config.json", "model.safetensors"]
    assert uploaded["config"]["architecture"] == "vit_tiny_patch16_224"


# ----------------------------------------------------------------------------------------------------------------
# registry
def test_registry_lists_architectures_and_tags():
    assert {"geolink_vit_large_patch16_224", "geolink_tiny"} <= set(geolink.list_models())
    assert "geolink_vit_large_patch16_224.neurips2025" in geolink.list_pretrained()
    tag = geolink.get_pretrained_tag("geolink_vit_large_patch16_224.neurips2025")
    assert tag.input_size == (3, 224, 224) and tag.text_dim == 512 and tag.license
    config = geolink.get_model_config("geolink_vit_large_patch16_224")
    assert config["trunk"] == "vit_large_patch16_224" and config["out_indices"] == [7, 11, 15, 23]
    assert set(config) == set(GeoLinkForPretraining._hub_mixin_init_parameters) - {"self"}


def test_create_model_components_and_overrides():
    image = geolink.create_model("geolink_tiny", component="image", in_chans=4, img_size=64)
    assert isinstance(image, GeoLinkImageEncoder) and image.in_chans == 4
    osm = geolink.create_model("geolink_tiny", component="osm", text_dim=512)
    assert isinstance(osm, GeoLinkOSMEncoder) and osm.text_dim == 512
    with pytest.raises(TypeError, match="unknown config keys \\['txt_dim'\\]"):
        geolink.create_model("geolink_tiny", txt_dim=512)
    with pytest.raises(KeyError, match="unknown architecture 'geolink_huge'"):
        geolink.create_model("geolink_huge")
    with pytest.raises(ValueError, match="component must be one of"):
        geolink.create_model("geolink_tiny", component="decoder")


def test_create_model_from_a_config_json(tmp_path):
    config = geolink.get_model_config("geolink_tiny")
    config["fusion_dim"] = 64
    path = tmp_path / "my_arch.json"
    path.write_text(json.dumps(config))
    fusion = geolink.create_model(path, component="fusion")
    assert fusion.out_channels[-1] == 64


def test_pretrained_components_are_extracted_from_a_saved_pretraining_model(tmp_path):
    torch.manual_seed(0)
    full = geolink.create_model("geolink_tiny", img_size=64)
    full.save_pretrained(tmp_path)
    image = geolink.create_model("geolink_tiny", pretrained=tmp_path, component="image")
    assert isinstance(image, GeoLinkImageEncoder)
    assert torch.equal(image.trunk.blocks[0].attn.qkv.weight, full.image_encoder.trunk.blocks[0].attn.qkv.weight)
    image.save_pretrained(tmp_path / "image")
    with pytest.raises(ValueError, match="has no 'fusion' component"):
        geolink.load_model(tmp_path / "image", component="fusion")


def test_pretrained_tag_loads_from_the_offline_hf_cache(tmp_path):
    """A tag whose repo sits in the Hugging Face cache loads with HF_HUB_OFFLINE=1 and no network."""
    torch.manual_seed(0)
    encoder = geolink.create_model("geolink_tiny", component="osm")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--geolink-test--tiny-osm"
    snapshot = repo / "snapshots" / commit
    encoder.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    expected = encoder.type_attention.weight.detach().clone()
    script = (
        "import sys, torch, geolink\n"
        "geolink.register_pretrained('geolink_tiny.cachetest', geolink.PretrainedTag("
        "location='geolink-test/tiny-osm', holds='GeoLinkOSMEncoder'))\n"
        "m = geolink.create_model('geolink_tiny.cachetest', pretrained=True, component='osm')\n"
        "print(type(m).__name__, m.type_attention.weight.sum().item())\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    name, total = result.stdout.split()
    assert name == "GeoLinkOSMEncoder" and abs(float(total) - expected.sum().item()) < 1e-6


def test_a_tag_missing_from_the_offline_cache_explains_what_to_do(tmp_path):
    script = ("import geolink\n"
              "geolink.create_model('geolink_vit_large_patch16_224.neurips2025', pretrained=True)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "geolink convert" in result.stderr and "Hugging Face cache" in result.stderr
