"""Downstream heads: UPerNet (with and without the ViT neck), task models on geolink and timm encoders."""

from __future__ import annotations

import pytest
import timm
import torch
from torch_geometric.data import Batch

import geolink
from geolink.graph.schema import empty_graph
from geolink.models.heads import (
    FusionSegmenter,
    ImageClassifier,
    ImageSegmenter,
    LinearClassifier,
    MultiScaleNeck,
    SiameseChangeDetector,
    UPerNetHead,
)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return geolink.create_model("geolink_tiny", component="image", image={"img_size": 32})


def test_neck_makes_a_pyramid():
    neck = MultiScaleNeck([8, 8, 8, 8])
    maps = neck([torch.randn(2, 8, 4, 4) for _ in range(4)])
    assert [tuple(m.shape[-2:]) for m in maps] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    with pytest.raises(ValueError, match="scales"):
        MultiScaleNeck([8, 8, 8])


def test_upernet_shapes_with_mixed_channels():
    head = UPerNetHead([16, 16, 16, 8], num_classes=5, channels=32).eval()
    logits = head([torch.randn(2, 16, 4, 4)] * 3 + [torch.randn(2, 8, 4, 4)])
    assert logits.shape == (2, 5, 16, 16)  # finest neck level is 4× the input maps
    assert head([torch.randn(2, 16, 4, 4)] * 3 + [torch.randn(2, 8, 4, 4)], output_size=(64, 48)).shape == \
        (2, 5, 64, 48)
    pyramid = UPerNetHead([4, 8, 16], num_classes=3, channels=16, neck=False, norm="gn").eval()
    assert pyramid([torch.randn(1, 4, 16, 16), torch.randn(1, 8, 8, 8), torch.randn(1, 16, 4, 4)]).shape == \
        (1, 3, 16, 16)
    with pytest.raises(ValueError, match="level 3"):
        head([torch.randn(2, 16, 4, 4)] * 4)
    with pytest.raises(ValueError, match="levels"):
        head([torch.randn(2, 16, 4, 4)] * 3)


def test_image_segmenter_trains_end_to_end(encoder):
    model = ImageSegmenter(encoder, num_classes=4, channels=32)
    images, masks = torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2, 32, 32))
    logits = model(images)
    assert logits.shape == (2, 4, 32, 32)
    torch.nn.functional.cross_entropy(logits, masks).backward()
    assert model.head.classifier.weight.grad is not None
    assert encoder.trunk.blocks[0].attn.qkv.weight.grad is not None
    assert model.out_indices == encoder.default_out_indices
    encoder.zero_grad(set_to_none=True)


def test_image_segmenter_on_a_timm_vit():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32)
    model = ImageSegmenter(vit, num_classes=3, channels=16).eval()
    assert model.out_indices == [3, 5, 7, 11]
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3, 32, 32)


def test_fusion_segmenter_uses_fusion_out_channels():
    fusion = geolink.create_model("geolink_tiny", component="fusion", image={"img_size": 32})
    model = FusionSegmenter(fusion, num_classes=6, channels=16).eval()
    assert model.head.in_channels == fusion.out_channels == [192, 192, 192, 128]
    graphs = Batch.from_data_list([empty_graph(384), empty_graph(384)])
    assert model(torch.randn(2, 3, 32, 32), graphs).shape == (2, 6, 32, 32)


def test_siamese_change_detector_is_symmetric(encoder):
    model = SiameseChangeDetector(encoder, channels=16).eval()
    a, b = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        forward, backward = model(a, b), model(b, a)
        same = model(a, a)
    assert forward.shape == (2, 2, 32, 32)
    torch.testing.assert_close(forward, backward)  # |f_a - f_b| does not depend on the order of the dates
    assert not torch.allclose(forward, same)
    concat = SiameseChangeDetector(encoder, fusion="concat", channels=16)
    assert concat.head.in_channels == [3 * 192] * 4
    with pytest.raises(ValueError, match="same shape"):
        model(a, b[:1])
    with pytest.raises(ValueError, match="fusion"):
        SiameseChangeDetector(encoder, fusion="sum")


def test_classifiers(encoder):
    head = LinearClassifier(8, 3, batch_norm=True)
    assert head(torch.randn(4, 8)).shape == (4, 3)
    model = ImageClassifier(encoder, 7).eval()
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(images), model.head(encoder.pooled_features(images)))
    with pytest.raises(ValueError, match="num_classes"):
        LinearClassifier(8, 0)
