"""The registry: nested architecture configs, section overrides and their errors, pretrained tags, load_model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import geolink
from geolink.errors import ConfigError, InputError, MissingInputError, MissingWeightsError
from geolink.models import GeoLinkForPretraining, GeoLinkFusionEncoder, GeoLinkImageEncoder, GeoLinkOSMEncoder
from geolink.registry import SECTIONS, PretrainedTag, nest_overrides, section_defaults


def test_registry_lists_architectures_and_tags():
    assert {"geolink_vit_large_patch16_224", "geolink_tiny"} <= set(geolink.list_models())
    assert "geolink_vit_large_patch16_224.neurips2025" in geolink.list_pretrained()
    tag = geolink.get_pretrained_tag("geolink_vit_large_patch16_224.neurips2025")
    assert tag.input_size == (3, 224, 224) and tag.text_dim == 512 and tag.license
    config = geolink.get_model_config("geolink_vit_large_patch16_224")
    assert config["image"]["trunk"] == "vit_large_patch16_224" and config["fusion"]["out_indices"] == [7, 11, 15, 23]
    with pytest.raises(ConfigError, match="unknown pretrained model 'geolink_tiny.nope'"):
        geolink.get_pretrained_tag("geolink_tiny.nope")


@pytest.mark.parametrize("name", ["geolink_tiny", "geolink_vit_large_patch16_224"])
def test_architecture_jsons_declare_every_parameter_once_in_its_section(name):
    config = geolink.get_model_config(name)
    assert tuple(config) == SECTIONS
    for section in SECTIONS:
        assert set(config[section]) == set(section_defaults(section)), section
    keys = [key for section in SECTIONS for key in config[section]]
    assert len(keys) == len(set(keys))  # no parameter is declared in two sections


def test_each_component_is_built_from_its_sections():
    image = geolink.create_model("geolink_tiny", component="image", image={"in_chans": 4, "img_size": 64})
    assert isinstance(image, GeoLinkImageEncoder) and image.in_chans == 4 and image.img_size == 64
    osm = geolink.create_model("geolink_tiny", component="osm", osm={"text_dim": 512})
    assert isinstance(osm, GeoLinkOSMEncoder) and osm.text_dim == 512 and osm.type_weighting == "softmax"
    fusion = geolink.create_model("geolink_tiny", component="fusion", fusion={"dim": 64})
    assert isinstance(fusion, GeoLinkFusionEncoder) and fusion.out_channels == [192, 192, 192, 64]
    full = geolink.create_model("geolink_tiny", osm={"text_dim": 512}, pretraining={"decoder_dim": 64})
    assert isinstance(full, GeoLinkForPretraining) and full.decoder_embed.out_features == 64
    assert full.osm_encoder.text_dim == 512 and full.node_pred.out_features == 512
    # an override changes one key and keeps the rest of its section
    assert full.init_kwargs()["osm"] == {**geolink.get_model_config("geolink_tiny")["osm"], "text_dim": 512}


def test_unknown_sections_keys_and_types_are_config_errors_naming_them():
    with pytest.raises(ConfigError, match=r"unknown config section 'text_dim'.*osm=\{'text_dim': \.\.\.\}"):
        geolink.create_model("geolink_tiny", text_dim=512)  # the flat spelling names the section to use
    with pytest.raises(ConfigError, match="unknown key 'txt_dim' in section 'osm'; valid keys: text_dim, osm_dim"):
        geolink.create_model("geolink_tiny", osm={"txt_dim": 512})
    with pytest.raises(ConfigError, match=r"unknown key 'text_dim' in section 'image' \('text_dim' belongs to the osm"):
        geolink.create_model("geolink_tiny", image={"text_dim": 512})
    with pytest.raises(ConfigError, match="osm.text_dim must be of type int .* got '384'"):
        geolink.create_model("geolink_tiny", osm={"text_dim": "384"})
    with pytest.raises(ConfigError, match="pretraining.norm_pix_loss must be of type bool"):
        geolink.create_model("geolink_tiny", pretraining={"norm_pix_loss": 1})
    with pytest.raises(ConfigError, match="section 'fusion' must be a dict"):
        geolink.create_model("geolink_tiny", fusion=128)
    assert geolink.create_model("geolink_tiny", pretraining={"temperature": 1}).temperature == 1  # an int is a float
    with pytest.raises(ConfigError, match="unknown architecture 'geolink_huge'"):
        geolink.create_model("geolink_huge")
    with pytest.raises(ConfigError, match="component must be one of"):
        geolink.create_model("geolink_tiny", component="decoder")


def test_nest_overrides_turns_dotted_keys_into_sections():
    assert nest_overrides({"osm.text_dim": 384, "image.img_size": 64, "osm.osm_dim": 32}) == {
        "osm": {"text_dim": 384, "osm_dim": 32}, "image": {"img_size": 64}}
    assert nest_overrides({}) == {}
    with pytest.raises(ConfigError, match=r"'text_dim' is not '<section>.<key>'.*did you mean osm.text_dim\?"):
        nest_overrides({"text_dim": 384})
    with pytest.raises(ConfigError, match="is not '<section>.<key>'"):
        nest_overrides({"osm.text_dim.x": 384})
    with pytest.raises(ConfigError, match="unknown config section 'decoder'"):
        geolink.create_model("geolink_tiny", **nest_overrides({"decoder.dim": 64}))


def test_create_model_from_a_config_json(tmp_path):
    config = geolink.get_model_config("geolink_tiny")
    config["fusion"]["dim"] = 64
    path = tmp_path / "my_arch.json"
    path.write_text(json.dumps(config))
    assert geolink.create_model(path, component="fusion").out_channels[-1] == 64
    partial = tmp_path / "partial.json"  # sections and keys left out take the constructors' defaults
    partial.write_text(json.dumps({"image": {"trunk": "vit_tiny_patch16_224", "img_size": 32}}))
    assert geolink.create_model(partial, component="osm").text_dim == 512
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"trunk": "vit_tiny_patch16_224"}))
    with pytest.raises(ConfigError, match=r"flat.json: unknown config section 'trunk'.*image=\{'trunk'"):
        geolink.create_model(flat)
    with pytest.raises(MissingInputError, match="no architecture JSON"):
        geolink.create_model(tmp_path / "absent.json")


def test_a_saved_folder_is_not_an_architecture(tmp_path):
    geolink.create_model("geolink_tiny", component="osm").save_pretrained(tmp_path / "osm")
    with pytest.raises(ConfigError, match=r"is a folder, not an architecture: .*load_model\(.*pretrained="):
        geolink.create_model(tmp_path / "osm")
    assert isinstance(geolink.create_model("geolink_tiny", pretrained=tmp_path / "osm", component="osm"),
                      GeoLinkOSMEncoder)


@pytest.mark.parametrize(("section", "key", "value", "message"), [
    ("fusion", "dim", "128", r"fusion.dim must be of type int .*got '128'"),
    ("fusion", "depth", 1.0, r"fusion.depth must be of type int .*got 1.0"),
    ("fusion", "widht", 128, r"unknown key 'widht' in section 'fusion'; valid keys: dim, depth"),
    ("fusion", "dim", -8, r"fusion.dim must be finite and >= 0; got -8"),
    ("fusion", "dropout", 1.5, r"fusion.dropout must be in \[0, 1\]; got 1.5"),
    ("image", "drop_path_rate", float("nan"), r"image.drop_path_rate must be in \[0, 1\]; got nan"),
])
def test_edited_values_in_a_saved_config_json_are_named(tmp_path, section, key, value, message):
    geolink.create_model("geolink_tiny", component="fusion").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (config if section == "fusion" else config[section])[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))  # NaN is written as the (accepted) literal NaN
    with pytest.raises(ConfigError, match=f"{tmp_path}/config.json: {message}"):
        geolink.load_model(tmp_path)


def test_pretrained_components_are_extracted_from_a_saved_pretraining_model(tmp_path):
    torch.manual_seed(0)
    full = geolink.create_model("geolink_tiny", image={"img_size": 64})
    full.save_pretrained(tmp_path)
    image = geolink.create_model("geolink_tiny", pretrained=tmp_path, component="image")
    assert isinstance(image, GeoLinkImageEncoder) and image.img_size == 64
    assert torch.equal(image.trunk.blocks[0].attn.qkv.weight, full.image_encoder.trunk.blocks[0].attn.qkv.weight)
    image.save_pretrained(tmp_path / "image")
    with pytest.raises(InputError, match="has no 'fusion' component"):
        geolink.load_model(tmp_path / "image", component="fusion")


def test_load_model_merges_section_overrides_into_the_saved_config(tmp_path):
    geolink.create_model("geolink_tiny", component="fusion").save_pretrained(tmp_path)
    fusion = geolink.load_model(tmp_path, image={"drop_path_rate": 0.1}, fusion={"out_indices": [5, 11]})
    assert fusion.image_encoder.drop_path_rate == 0.1 and fusion.out_indices == [5, 11]
    assert fusion.image_encoder.trunk_name == "vit_tiny_patch16_224"  # the rest of the section is kept
    with pytest.raises(ConfigError, match="the model has no 'pretraining' section"):
        geolink.load_model(tmp_path, pretraining={"temperature": 0.1})
    config = json.loads((tmp_path / "config.json").read_text())
    flat = {"trunk": "vit_tiny_patch16_224", "model_class": "GeoLinkFusionEncoder"}
    (tmp_path / "config.json").write_text(json.dumps(flat))
    with pytest.raises(ConfigError, match="unknown key 'trunk' in section 'fusion'.*before the nested config format"):
        geolink.load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(MissingWeightsError, match="has no model.safetensors"):
        geolink.load_model(tmp_path)


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


def test_a_published_tag_missing_from_the_offline_cache_says_to_download_it_once(tmp_path):
    script = ("import geolink\n"
              "from geolink.errors import MissingWeightsError\n"
              "tag = geolink.PretrainedTag(location='geolink-test/absent')\n"
              "geolink.register_pretrained('geolink_tiny.absent', tag)\n"
              "print(geolink.list_pretrained(available=True)['geolink_tiny.absent'])\n"
              "try:\n"
              "    geolink.create_model('geolink_tiny.absent', pretrained=True)\n"
              "except MissingWeightsError as error:\n"
              "    print(error)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    availability, message = result.stdout.splitlines()
    assert availability == "published"
    assert message == ("pretrained model geolink_tiny.absent (geolink-test/absent) is not in the Hugging Face cache "
                       "and HF_HUB_OFFLINE is set: download it once with network access (it is cached then), or pass "
                       "a local folder")


def test_an_uncached_tag_without_network_fails_at_once_naming_the_tag(tmp_path, monkeypatch):
    """No network (a refused connection, HF_HUB_OFFLINE unset): one request without retries, one error naming the
    tag and the fix; the Hub client's download (and its retries) is never started."""
    import huggingface_hub

    from geolink import registry

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("the download was started"))
    monkeypatch.setitem(registry._PRETRAINED, "geolink_tiny.mine", PretrainedTag(location="someone/geolink-mine"))
    with pytest.raises(MissingWeightsError) as caught:
        geolink.load_model("geolink_tiny.mine")
    message = str(caught.value)
    assert message.startswith("pretrained model geolink_tiny.mine (someone/geolink-mine) is not in the Hugging Face "
                              "cache and the Hub cannot be reached (")
    assert message.endswith("download it once with network access (it is cached then), or pass a local folder")


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache for this process, offline (HF_HUB_OFFLINE)."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


def test_the_official_tags_are_convert_only_and_say_where_to_get_the_file(empty_hub_cache):
    official = ["geolink_vit_large_patch16_224.neurips2025", "geolink_vit_large_patch16_224.neurips2025_unimodal"]
    assert geolink.list_pretrained() == ["geolink_tiny.demo", *official]  # the plain listing keeps its meaning
    assert geolink.list_pretrained(available=True) == {"geolink_tiny.demo": "bundled", official[0]: "convert-only",
                                                       official[1]: "convert-only"}
    for name in official:
        assert not geolink.get_pretrained_tag(name).published
        with pytest.raises(MissingWeightsError) as caught:
            geolink.create_model(name, pretrained=True, component="image")
        message = str(caught.value)
        assert f"{name} is convert-only" in message and "github.com/bailubin/GeoLink_NeurIPS2025" in message
        assert "pretrained='<file.pth>'" in message and "geolink convert" in message
        assert "network access" not in message
        with pytest.raises(MissingWeightsError, match="is convert-only"):
            geolink.load_model(name)


def test_availability_of_cached_published_local_and_missing_tags(empty_hub_cache, tmp_path, monkeypatch):
    from geolink import registry

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_hub_cache / "models--geolink-test--tiny-osm"
    geolink.create_model("geolink_tiny", component="osm").save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    geolink.create_model("geolink_tiny", component="osm").save_pretrained(tmp_path / "mine")
    tags = {"cached": PretrainedTag(location="geolink-test/tiny-osm"),
            "published": PretrainedTag(location="geolink-test/not-downloaded"),
            "convert-only": PretrainedTag(location="geolink-test/not-downloaded", published=False),
            "local": PretrainedTag(location=str(tmp_path / "mine")),
            "missing": PretrainedTag(location=str(tmp_path / "gone"))}
    for availability, tag in tags.items():
        monkeypatch.setitem(registry._PRETRAINED, f"geolink_tiny.{availability}", tag)
    for availability in tags:
        assert geolink.list_pretrained(available=True)[f"geolink_tiny.{availability}"] == availability
        assert availability in registry.AVAILABILITY
    # an unpublished tag whose repo is in the cache anyway loads from there
    monkeypatch.setitem(registry._PRETRAINED, "geolink_tiny.x", PretrainedTag("geolink-test/tiny-osm", published=False))
    assert registry.pretrained_availability("geolink_tiny.x") == "cached"
    assert isinstance(geolink.create_model("geolink_tiny.x", pretrained=True, component="osm"), GeoLinkOSMEncoder)


def test_a_tag_name_means_the_registry_tag_never_a_folder_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    geolink.create_model("geolink_tiny", component="osm").save_pretrained(tmp_path / "geolink_tiny.demo")
    assert isinstance(geolink.load_model("geolink_tiny.demo"), GeoLinkForPretraining)  # the bundled demo
    assert isinstance(geolink.create_model("geolink_tiny.demo", pretrained=True), GeoLinkForPretraining)
    assert isinstance(geolink.load_model("./geolink_tiny.demo"), GeoLinkOSMEncoder)  # a path is a path
    assert isinstance(geolink.create_model("geolink_tiny", pretrained=tmp_path / "geolink_tiny.demo", component="osm"),
                      GeoLinkOSMEncoder)


def test_tag_encoder_for_resolves_the_text_model_of_a_tag(minilm_encoder, monkeypatch):
    from geolink import registry

    assert geolink.get_pretrained_tag("geolink_tiny.demo").text_model == "minilm"
    assert geolink.get_pretrained_tag("geolink_vit_large_patch16_224.neurips2025").text_model == "clip"
    encoder = geolink.tag_encoder_for("geolink_tiny.demo", batch_size=8)
    assert encoder.info() == minilm_encoder.info() and encoder.batch_size == 8
    assert encoder.dim == geolink.get_pretrained_tag("geolink_tiny.demo").text_dim
    with pytest.raises(ConfigError, match="GeoLinkImageEncoder that reads no OSM tags"):
        geolink.tag_encoder_for("geolink_vit_large_patch16_224.neurips2025_unimodal")
    monkeypatch.setitem(registry._PRETRAINED, "geolink_tiny.wide", PretrainedTag(location="x/y", text_model="minilm"))
    with pytest.raises(ConfigError, match="embeds 384-wide tag features, but the model reads 512-wide ones"):
        geolink.tag_encoder_for("geolink_tiny.wide")
    with pytest.raises(ConfigError, match="unknown pretrained model"):
        geolink.tag_encoder_for("geolink_tiny")


def test_info_prints_a_table_of_tag_availability(empty_hub_cache, capsys):
    from geolink.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("  ")}
    assert rows["tag"] == ["tag", "availability", "holds", "text", "model", "licence"]
    assert rows["geolink_tiny.demo"] == ["geolink_tiny.demo", "bundled", "GeoLinkForPretraining", "minilm", "mit"]
    assert rows["geolink_vit_large_patch16_224.neurips2025_unimodal"][1:4] == ["convert-only", "GeoLinkImageEncoder",
                                                                               "-"]
    assert "\nconvert-only: the official release" in out and "github.com/bailubin/GeoLink_NeurIPS2025" in out


def test_the_models_page_lists_every_tag_and_availability():
    from pathlib import Path

    from geolink.registry import AVAILABILITY

    page = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    listing = page[page.index("geolink.list_pretrained()  #"):page.index("geolink.list_pretrained(available=True)")]
    assert all(f"'{name}'" in listing for name in geolink.list_pretrained())
    weights = page[page.index("## Get the weights"):]
    assert all(f"`{availability}`" in weights for availability in AVAILABILITY)


def test_importing_geolink_shows_no_pyg_deprecation_notice():
    """torch_geometric's import-time ``torch.jit.script`` FutureWarning is filtered by geolink (which PyG runs
    through when a geolink module imports it first)."""
    result = subprocess.run([sys.executable, "-W", "default", "-c", "import geolink.registry, geolink.graph.tiles"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == ""
