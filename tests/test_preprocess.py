"""Preprocessing with the model (``resolve_data_config``, ``Preprocess``, ``create_model_and_transforms``) on the real
tiles bundled with geolink: every input type gives the same tensor, the tensor is the documented resize, crop and
normalisation, and the demo model runs on what it returns."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch_geometric.data import Batch

import geolink
from geolink import registry
from geolink.data.transforms import Preprocess
from geolink.demo import DEFAULT_TILE, TILES, build_tile_graph, list_tiles, read_tile
from geolink.errors import ConfigError, InputError
from geolink.runtime import IMAGENET_MEAN, IMAGENET_STD

MEAN4, STD4 = (0.3, 0.35, 0.4, 0.45), (0.2, 0.21, 0.22, 0.23)


def tile_image(name: str) -> Image.Image:
    with Image.open(TILES / name / f"{name}.jpg") as image:
        return image.convert("RGB")


@pytest.fixture(scope="module")
def demo():
    """The embedded demo fusion encoder and its preprocessing."""
    return geolink.create_model_and_transforms("geolink_tiny.demo", pretrained=True, component="fusion")


@pytest.mark.parametrize("name", list_tiles())
def test_pil_numpy_uint8_tensor_and_float_tensor_give_the_same_tensor(name):
    preprocess = Preprocess(224)
    image = tile_image(name)
    array = np.asarray(image)
    assert array.shape[0] != array.shape[1]  # the bundled tiles are not square
    before = array.copy()
    chw = torch.from_numpy(array.copy()).permute(2, 0, 1)
    unit = chw.float() / 255
    outputs = [preprocess(image), preprocess(array), preprocess(chw), preprocess(unit)]
    for out in outputs:
        assert out.shape == (3, 224, 224) and out.dtype == torch.float32
        torch.testing.assert_close(out, outputs[0], rtol=0, atol=1e-6)
    assert np.array_equal(array, before) and torch.equal(unit, chw.float() / 255)  # inputs untouched


# the tiles are W×H 335×423 (shrinks: antialiased) and 217×350 (grows); the short side (width) becomes 224
@pytest.mark.parametrize(("name", "resized", "top", "antialias"), [
    ("a702502933_US_21", (282, 224), 29, True),   # 423·224/335 = 282.8; (282 - 224) / 2 = 29
    ("a1085095888_S2_20", (361, 224), 68, False),  # 350·224/217 = 361.3; round(68.5) = 68 (round half to even)
])
def test_output_is_the_short_side_resize_centre_crop_and_normalisation(name, resized, top, antialias):
    image = tile_image(name)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).double() / 255
    resized_pixels = F.interpolate(pixels[None], size=resized, mode="bicubic", align_corners=False,
                                   antialias=antialias)[0].clamp(0, 1)
    crop = resized_pixels[:, top:top + 224, :224]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    reference = ((crop - mean) / std).float()
    torch.testing.assert_close(Preprocess(224)(image), reference, rtol=0, atol=1e-4)  # float32 kernels


def test_timm_models_get_timms_own_eval_preprocessing():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    config = geolink.resolve_data_config(vit)
    assert config == {key: timm.data.resolve_data_config(model=vit)[key] for key in config}
    assert config["crop_pct"] == 0.9 and config["mean"] == (0.5, 0.5, 0.5)  # not geolink's defaults
    ours, theirs = Preprocess(**config), timm.data.create_transform(**config)
    for name in list_tiles():  # PIL's and torch's bicubic kernels differ slightly; a crop off by a pixel does not
        image = tile_image(name)
        assert (ours(image) - theirs(image)).abs().mean() < 0.01


def test_non_square_sizes_crop_pct_and_squash():
    image = tile_image("a472140250_FI_21")  # 192×282, portrait
    assert Preprocess((3, 96, 128))(image).shape == (3, 96, 128)
    assert Preprocess(160, crop_pct=0.875)(image).shape == (3, 160, 160)
    squashed = Preprocess(224, crop_mode="squash")(image)  # the whole tile, aspect not kept
    whole = F.interpolate(torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].double() / 255, size=(224, 224),
                          mode="bicubic", align_corners=False, antialias=True)[0].clamp(0, 1)  # 282 -> 224 shrinks
    expected = (whole - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(squashed, expected.float(), rtol=0, atol=1e-4)
    assert not torch.allclose(squashed, Preprocess(224)(image), atol=0.1)


def test_four_bands_with_four_band_statistics():
    rgb = np.asarray(tile_image(DEFAULT_TILE))
    nir = rgb.mean(axis=2).astype(np.uint8)  # a fourth band from the same tile
    four = np.concatenate([rgb, nir[..., None]], axis=2)
    out = Preprocess((4, 224, 224), MEAN4, STD4)(four)
    assert out.shape == (4, 224, 224)
    torch.testing.assert_close(out[:3], Preprocess(224, MEAN4[:3], STD4[:3])(rgb), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[3:], Preprocess(224, MEAN4[3:], STD4[3:])(nir), rtol=0, atol=1e-6)
    torch.testing.assert_close(out, Preprocess((4, 224, 224), MEAN4, STD4)(torch.from_numpy(four).permute(2, 0, 1)),
                               rtol=0, atol=1e-6)


def test_a_four_band_model_gets_a_four_band_preprocessing():
    image, preprocess = geolink.create_model_and_transforms("geolink_tiny", component="image",
                                                            image={"in_chans": 4, "img_size": 128})
    assert preprocess.mean == IMAGENET_MEAN + IMAGENET_MEAN[:1] and preprocess.size == (128, 128)
    rgb = np.asarray(tile_image(DEFAULT_TILE))
    four = np.concatenate([rgb, rgb[..., :1]], axis=2)
    with torch.no_grad():
        tokens = image.eval()(preprocess(four)[None])
    assert tokens.shape == (1, 1 + 8 * 8, 192) and torch.isfinite(tokens).all()


def test_a_band_count_mismatch_names_both_counts_and_the_fix():
    preprocess = Preprocess(224)
    rgb = np.asarray(tile_image(DEFAULT_TILE))
    with pytest.raises(InputError, match=r"4 bands .* normalises 3 \(mean and std have 3 values\)"):
        preprocess(np.concatenate([rgb, rgb[..., :1]], axis=2))
    with pytest.raises(InputError, match=r"1 bands .* normalises 3"):
        preprocess(tile_image(DEFAULT_TILE).convert("L"))
    with pytest.raises(InputError, match=r"convert\('RGB'\)"):
        preprocess(tile_image(DEFAULT_TILE).convert("RGBA"))
    with pytest.raises(InputError, match=r"torch.from_numpy\(array\)"):
        preprocess(np.ascontiguousarray(rgb.transpose(2, 0, 1)))  # CHW numpy (rasterio's layout)
    with pytest.raises(InputError, match=r"torch.stack"):
        preprocess(torch.zeros(2, 3, 32, 32))
    with pytest.raises(InputError, match="uint16"):
        preprocess(rgb.astype(np.uint16))
    with pytest.raises(ConfigError, match="one mean and std value per band"):
        Preprocess((4, 224, 224))


def test_demo_fusion_runs_on_preprocessed_real_tiles_and_their_graphs(demo):
    fusion, preprocess = demo
    names = [DEFAULT_TILE, "a702502933_US_21"]
    images, graphs = [], []
    for name in names:
        image, features, bbox = read_tile(name)
        images.append(preprocess(image))
        graphs.append(build_tile_graph(features, bbox))
    with torch.no_grad():
        maps = fusion(torch.stack(images), Batch.from_data_list(graphs))
    assert [tuple(m.shape) for m in maps] == [(2, 192, 14, 14)] * 3 + [(2, 128, 14, 14)]
    assert all(torch.isfinite(m).all() for m in maps)
    assert not torch.allclose(maps[-1][0], maps[-1][1])


def test_resolve_data_config_agrees_for_tag_architecture_and_model(demo):
    fusion, preprocess = demo
    config = geolink.resolve_data_config("geolink_tiny.demo")
    assert config == geolink.resolve_data_config("geolink_tiny") == geolink.resolve_data_config(fusion)
    assert config == {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": IMAGENET_MEAN,
                      "std": IMAGENET_STD, "crop_pct": 1.0, "crop_mode": "center"}
    assert (preprocess.size, preprocess.mean, preprocess.std) == ((224, 224), IMAGENET_MEAN, IMAGENET_STD)
    classifier = geolink.models.ImageClassifier(fusion.image_encoder, num_classes=2)  # a task model holding one
    assert geolink.resolve_data_config(classifier) == config


def test_a_tags_statistics_win_over_the_architecture_defaults(monkeypatch):
    tag = registry.PretrainedTag(location="nowhere", mean=MEAN4, std=STD4, input_size=(4, 224, 224))
    monkeypatch.setitem(registry._PRETRAINED, "geolink_tiny.four_bands", tag)
    config = geolink.resolve_data_config("geolink_tiny.four_bands")
    assert (config["input_size"], config["mean"], config["std"]) == ((4, 224, 224), MEAN4, STD4)
    with pytest.raises(ConfigError, match="unknown pretrained model 'geolink_tiny.nope'"):
        geolink.resolve_data_config("geolink_tiny.nope")


def test_models_without_images_have_no_preprocessing(demo):
    with pytest.raises(InputError, match="GeoLinkOSMEncoder takes no images"):
        geolink.resolve_data_config(demo[0].osm_encoder)
    with pytest.raises(ConfigError, match="component 'osm' takes graphs"):
        geolink.create_model_and_transforms("geolink_tiny", component="osm")
