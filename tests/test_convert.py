"""Official checkpoint and graph conversion: safety, clear errors, the command line, on-the-fly conversion into the
cache (``pretrained=<official .pth>``)."""

from __future__ import annotations

import hashlib
import json
import logging
import os

import pytest
import torch
from torch_geometric.data import HeteroData

import geolink
from geolink import convert as convert_module
from geolink.cli import main
from geolink.convert import (
    ConvertConfig,
    OfficialCheckpointError,
    convert,
    converted_folder,
    load_official_checkpoint,
    read_official_checkpoint,
)
from geolink.errors import DataError, InputError, MissingInputError
from geolink.graph.official import graph_from_official
from geolink.graph.schema import EDGE_TYPES, validate_graph
from geolink.models import Component, GeoLinkFusionEncoder, GeoLinkImageEncoder, GeoLinkOSMEncoder


class CodeOnLoad:
    """An object whose unpickling would call a function: what a malicious .pth carries."""

    def __reduce__(self):
        return (os.getcwd, ())


@pytest.fixture
def official_state(parity_dir):
    path = parity_dir / "geolink_multimodal_official_format.pth"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return checkpoint["model_config"], checkpoint["model_state_dict"]


def test_a_pickle_with_code_is_refused_not_run(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model_config": {}, "model_state_dict": {}, "payload": CodeOnLoad()}, path)
    with pytest.raises(OfficialCheckpointError, match="refuses to unpickle"):
        load_official_checkpoint(path)


def test_a_truncated_file_is_refused(parity_dir, tmp_path):
    path = tmp_path / "truncated.pth"
    path.write_bytes((parity_dir / "geolink_vit_official_format.pth").read_bytes()[:5000])
    with pytest.raises(OfficialCheckpointError, match="not a readable PyTorch checkpoint"):
        load_official_checkpoint(path)


def test_a_bit_flip_in_an_official_file_is_caught_by_its_crc(parity_dir, tmp_path):
    """A .pth is a zip archive with a CRC-32 per tensor record, which torch does not check: a flipped bit in a weight
    that stays finite would otherwise load silently. The damaged record is named; the intact file still loads."""
    path = tmp_path / "official.pth"
    path.write_bytes((parity_dir / "geolink_multimodal_official_format.pth").read_bytes())
    read_official_checkpoint(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"official\.pth is damaged \(record .*/data/\d+\).*re-download"):
        read_official_checkpoint(path)


def test_a_missing_tensor_is_named(official_state, tmp_path):
    config, state = official_state
    del state["osm_cross_modal_encoder.0.norm4.bias"]
    path = tmp_path / "missing.pth"
    torch.save({"model_config": config, "model_state_dict": state}, path)
    with pytest.raises(OfficialCheckpointError, match=r"missing keys \(1\): fusion_encoder.blocks.0.node_mlp_norm"):
        load_official_checkpoint(path)


def test_non_finite_official_weights_are_named(official_state, tmp_path):
    config, state = official_state
    state = dict(state)
    name = next(key for key, tensor in state.items() if tensor.is_floating_point())
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("nan")  # what a flipped exponent bit does to a float
    path = tmp_path / "nan.pth"
    torch.save({"model_config": config, "model_state_dict": state}, path)
    with pytest.raises(DataError, match=f"{path}: tensor {name!r} holds 1 NaN or infinite values"):
        load_official_checkpoint(path)


def test_a_text_file_given_to_convert_is_one_error_line(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("these are not weights\n")
    assert main(["convert", str(text), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith(f"error: {text} is not a readable PyTorch checkpoint (truncated, corrupt or not a .pth file")
    assert "official GeoLink .pth" in err and not (tmp_path / "out").exists()


def test_an_unknown_tensor_is_named(official_state, tmp_path):
    config, state = official_state
    state["some_new_head.weight"] = torch.zeros(3)
    path = tmp_path / "unexpected.pth"
    torch.save({"model_config": config, "model_state_dict": state}, path)
    with pytest.raises(OfficialCheckpointError, match=r"unexpected keys \(1\): some_new_head.weight"):
        load_official_checkpoint(path)


def test_an_architecture_that_does_not_match_the_tensors_is_refused(official_state, tmp_path):
    config, state = official_state
    path = tmp_path / "wrong_arch.pth"
    torch.save({"model_config": {**config, "architecture": "vit_small_patch16_224"}, "model_state_dict": state}, path)
    with pytest.raises(OfficialCheckpointError, match=r"names vit_small_patch16_224 \(width 384.* have width 192"):
        load_official_checkpoint(path)


def test_something_that_is_not_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(OfficialCheckpointError, match="neither an official GeoLink checkpoint"):
        load_official_checkpoint(path)
    with pytest.raises(MissingInputError, match="no checkpoint at"):
        load_official_checkpoint(tmp_path / "absent.pth")
    assert issubclass(OfficialCheckpointError, InputError)  # one line `error: ...` from the geolink command


def test_the_alias_patch_embedding_is_what_the_official_model_ran_with(official_state, parity_dir):
    _, state = official_state
    # the fixture deliberately stores two different copies; the official model loads the alias last
    assert not torch.equal(state["patch_embed.proj.weight"], state["img_encoder.patch_embed.proj.weight"])
    model = load_official_checkpoint(parity_dir / "geolink_multimodal_official_format.pth")
    assert torch.equal(model.image_encoder.trunk.patch_embed.proj.weight, state["patch_embed.proj.weight"])


def test_graph_from_official_splits_features_and_anchors():
    official = HeteroData()
    official["polygon"].x = torch.cat([torch.randn(2, 512), torch.rand(2, 8)], dim=1)
    official["line"].x = torch.cat([torch.randn(1, 512), torch.rand(1, 6)], dim=1)
    official["point"].x = torch.zeros(0, 514)
    official["polygon", "to", "polygon"].edge_index = torch.tensor([[0, 1], [1, 0]])
    official["polygon", "to", "polygon"].edge_attr = torch.eye(6)[[1, 1]]
    before = official["polygon"].x.clone()
    graph = graph_from_official(official)
    validate_graph(graph, feature_dim=512)
    assert torch.equal(graph["polygon"].x, before[:, :512])
    assert torch.equal(graph["polygon"].pos, before[:, 512:].reshape(2, 4, 2))
    assert torch.equal(official["polygon"].x, before)  # input untouched
    assert all(et in graph.edge_types for et in EDGE_TYPES)  # absent edge types become empty ones
    assert graph["line", "to", "point"].edge_index.shape == (2, 0)
    official["line"].x = torch.randn(1, 515)
    with pytest.raises(ValueError, match="line features have width 515"):
        graph_from_official(official, text_dim=512)


def test_cli_converts_both_files_into_loadable_folders(parity_dir, tmp_path, capsys):
    assert main(["convert", str(parity_dir / "geolink_multimodal_official_format.pth"), str(tmp_path / "fusion"),
                 "--component", "fusion"]) == 0
    assert "GeoLinkFusionEncoder" in capsys.readouterr().out
    assert isinstance(GeoLinkFusionEncoder.from_pretrained(tmp_path / "fusion"), GeoLinkFusionEncoder)
    assert main(["convert", str(parity_dir / "geolink_vit_official_format.pth"), str(tmp_path / "vit")]) == 0
    assert isinstance(GeoLinkImageEncoder.from_pretrained(tmp_path / "vit"), GeoLinkImageEncoder)
    assert isinstance(geolink.load_model(tmp_path / "vit"), GeoLinkImageEncoder)
    assert main(["convert", str(parity_dir / "geolink_vit_official_format.pth"), str(tmp_path / "x"),
                 "--component", "osm"]) == 2


def test_convert_job_saves_the_requested_component_with_a_nested_config(parity_dir, tmp_path, capsys):
    multimodal = parity_dir / "geolink_multimodal_official_format.pth"
    out = convert(ConvertConfig(multimodal, tmp_path / "full"))
    assert out == tmp_path / "full" and "GeoLinkForPretraining" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["image"]["trunk"] == "vit_tiny_patch16_224" and config["osm"]["type_weighting"] == "sum"
    assert config["fusion"]["dim"] == 256 and config["decoder_dim"] == 128 and "text_dim" not in config
    card = (out / "README.md").read_text()  # the card says where the weights come from and whose terms apply
    assert f"from {multimodal.name}, a file of the official GeoLink NeurIPS 2025 release" in card
    assert "Weights licence: the GeoLink authors' terms" in card and "check the terms given with the release" in card
    osm = convert(ConvertConfig(multimodal, tmp_path / "osm", component=Component.OSM))
    assert isinstance(geolink.load_model(osm), GeoLinkOSMEncoder)
    with pytest.raises(InputError, match="holds a GeoLinkImageEncoder, which has no 'osm' component"):
        convert(ConvertConfig(parity_dir / "geolink_vit_official_format.pth", tmp_path / "x", component=Component.OSM))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """geolink's cache in ``tmp_path/cache`` (GEOLINK_CACHE)."""
    monkeypatch.setenv("GEOLINK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_pretrained_official_pth_is_converted_once_then_loaded_from_the_cache(parity_dir, cache, monkeypatch, capsys,
                                                                            caplog):
    caplog.set_level(logging.INFO, logger="geolink.convert")
    multimodal = parity_dir / "geolink_multimodal_official_format.pth"
    fusion = geolink.create_model("geolink_tiny", pretrained=multimodal, component="fusion")
    assert isinstance(fusion, GeoLinkFusionEncoder)
    expected = load_official_checkpoint(multimodal).fusion_encoder.state_dict()
    assert fusion.state_dict().keys() == expected.keys()
    assert all(torch.equal(fusion.state_dict()[key], tensor) for key, tensor in expected.items())
    digest = hashlib.sha256(multimodal.read_bytes()).hexdigest()
    assert [p.name for p in (cache / "converted").iterdir()] == [digest]  # no staging folder left behind
    assert f"into {cache / 'converted' / digest}" in caplog.text  # the one conversion is logged
    image_file = parity_dir / "geolink_vit_official_format.pth"
    from geolink.eval.encoders import load_encoder  # what `--model <file.pth>` of eval / finetune / examples uses

    assert isinstance(load_encoder(str(image_file)).model, GeoLinkImageEncoder)
    capsys.readouterr()
    caplog.clear()
    monkeypatch.setattr(convert_module, "load_official_checkpoint", lambda path: pytest.fail("converted again"))
    again = geolink.load_model(str(multimodal), component="fusion")
    assert all(torch.equal(again.state_dict()[key], tensor) for key, tensor in expected.items())
    assert isinstance(geolink.load_model(image_file), GeoLinkImageEncoder)
    assert capsys.readouterr().err == "" and "converted" not in caplog.text  # loaded from the cache, silently
    assert len(list((cache / "converted").iterdir())) == 2


def test_a_cached_conversion_is_never_overwritten(parity_dir, cache, tmp_path):
    checkpoint = parity_dir / "geolink_vit_official_format.pth"
    folder = cache / "converted" / hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="cached conversion .* is incomplete; delete that folder"):
        converted_folder(checkpoint)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    with pytest.raises(MissingInputError, match="no checkpoint at .*github.com/bailubin/GeoLink_NeurIPS2025"):
        geolink.create_model("geolink_tiny", pretrained=tmp_path / "absent.pth")
    assert not (cache / "converted" / "absent").exists()
