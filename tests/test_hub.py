"""Hub formats: save/load round trips, strict loading, nested config.json, model cards, push_to_hub (the registry:
``test_registry.py``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch_geometric.data import Batch

import geolink
from geolink.errors import ConfigError, DataError, MissingInputError, MissingWeightsError
from geolink.models import GeoLinkFusionEncoder, GeoLinkImageEncoder, GeoLinkOSMEncoder


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
def test_save_load_round_trip_is_exact(component, tmp_path, synthetic_graphs):
    torch.manual_seed(0)
    model = geolink.create_model("geolink_tiny", component=component, image={"img_size": 64}).eval()
    images = torch.randn(2, 3, 64, 64)
    graph = Batch.from_data_list(synthetic_graphs[:2])
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "checksums.json", "config.json", "model.safetensors"]
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
    with pytest.raises(ConfigError, match=r"missing keys \(1\): type_attention.bias.*unexpected keys \(1\): surprise"):
        GeoLinkOSMEncoder.from_pretrained(tmp_path, verify_checksum=False)  # edited on purpose: past the checksum


def test_mismatched_config_is_refused(tmp_path):
    geolink.create_model("geolink_tiny", component="osm").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["osm_dim"] = 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match="config.json differs from the config saved with these weights"):
        GeoLinkOSMEncoder.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="shape mismatches"):  # unchecked: the weights disagree
        GeoLinkOSMEncoder.from_pretrained(tmp_path, verify_checksum=False)


def test_corrupt_weights_file_is_refused(tmp_path):
    geolink.create_model("geolink_tiny", component="osm").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(DataError, match=f"{weights}.*does not match its checksum.*verify_checksum=False"):
        GeoLinkOSMEncoder.from_pretrained(tmp_path)
    for content in (weights.read_bytes(), b""):  # truncated, then empty; without the checksum the reader names it
        weights.write_bytes(content)
        with pytest.raises(DataError, match=f"{weights} is not a readable safetensors file"):
            geolink.load_model(tmp_path, verify_checksum=False)


def test_a_folder_without_weights_gets_a_clear_error(tmp_path):
    with pytest.raises(MissingWeightsError, match="has no (model.safetensors|config.json): not a geolink model folder"):
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
    assert uploaded["files"] == ["README.md", "checksums.json", "config.json", "model.safetensors"]
    assert uploaded["config"]["architecture"] == "vit_tiny_patch16_224"


def test_saved_config_holds_complete_nested_sections(tmp_path):
    fusion = geolink.create_model("geolink_tiny", component="fusion", image={"img_size": 64})
    fusion.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    architecture = geolink.get_model_config("geolink_tiny")
    assert config == {"image": {**architecture["image"], "img_size": 64}, "osm": architecture["osm"],
                      **architecture["fusion"], "model_class": "GeoLinkFusionEncoder"}
    reloaded = GeoLinkFusionEncoder.from_pretrained(tmp_path)
    assert reloaded.init_kwargs() == fusion.init_kwargs()


def _first_float_tensor_offset(weights: Path) -> tuple[str, int]:
    """The name and file offset of the first float32 tensor's data in a safetensors file (after its JSON header)."""
    raw = weights.read_bytes()
    header_size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_size])
    name, entry = next((k, v) for k, v in sorted(header.items()) if k != "__metadata__" and v["dtype"] == "F32")
    return name, 8 + header_size + entry["data_offsets"][0]


def test_bit_flips_in_saved_weights_are_refused(tmp_path):
    geolink.create_model("geolink_tiny", component="osm").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    name, offset = _first_float_tensor_offset(weights)
    raw = bytearray(weights.read_bytes())
    raw[offset:offset + 4] = bytes.fromhex("0000c07f")  # a float32 NaN in place of the first value, header intact
    weights.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=f"{weights} does not match its checksum in checksums.json"):
        geolink.load_model(tmp_path)
    with pytest.raises(DataError, match=f"tensor {name!r} holds 1 NaN or infinite values.*check_finite=False"):
        geolink.load_model(tmp_path, verify_checksum=False)
    (tmp_path / "checksums.json").unlink()  # a folder from an older geolink: no checksum, the finite check remains
    with pytest.raises(DataError, match=f"tensor {name!r}"):
        GeoLinkOSMEncoder.from_pretrained(tmp_path)
    model = geolink.load_model(tmp_path, check_finite=False)  # the documented opt-out
    assert torch.isnan(model.state_dict()[name]).any()


def test_a_wrong_checksum_file_is_named(tmp_path):
    geolink.create_model("geolink_tiny", component="osm").save_pretrained(tmp_path)
    (tmp_path / "checksums.json").write_text("[]")
    with pytest.raises(DataError, match=r"checksums.json is not a checksum file of model.safetensors"):
        geolink.load_model(tmp_path)


@pytest.mark.parametrize(("content", "message"), [
    ("{bad", r"config.json is not valid JSON .*save_pretrained"),
    ("[1, 2]", r"config.json must hold a JSON object .* not a list"),
])
def test_a_broken_config_json_is_named(tmp_path, content, message):
    geolink.create_model("geolink_tiny", component="osm").save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(content)
    for load in (geolink.load_model, GeoLinkOSMEncoder.from_pretrained):
        with pytest.raises(ConfigError, match=f"{tmp_path}/{message}"):
            load(tmp_path)


def test_a_folder_without_config_json_is_named_by_from_pretrained(tmp_path):
    geolink.create_model("geolink_tiny", component="osm").save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(MissingWeightsError, match=f"{tmp_path} has no config.json"):
        GeoLinkOSMEncoder.from_pretrained(tmp_path)


def test_a_path_that_does_not_exist_is_named(tmp_path):
    with pytest.raises(MissingInputError, match=f"{tmp_path}/nope is neither a model folder nor a Hub repo id.*"
                                                 "list_pretrained"):
        geolink.load_model(tmp_path / "nope")


def test_the_bundled_demo_folder_without_checksum_still_loads():
    demo = Path(geolink.__file__).parent / "assets" / "geolink_tiny_demo"
    assert not (demo / "checksums.json").exists()
    assert geolink.load_model(demo).training is False
