"""Behaviour of the encoders and the pretraining model beyond parity: shapes, sizes, batching, masking, losses."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from torch_geometric.data import Batch

import geolink
from geolink.convert import graph_from_official, official_graph_from_tensors
from geolink.graph.schema import EDGE_TYPES, NODE_TYPES, empty_graph
from geolink.models import GeoLinkImageEncoder, GeoLinkOSMEncoder
from geolink.models.pos_embed import sincos_grid


@pytest.fixture(scope="module")
def ufz():
    """The three official-layout UFZ graphs and images of the parity fixture (512-wide CLIP features)."""
    from conftest import shared_path

    inputs = safetensors.torch.load_file(str(shared_path("parity", "official_tiny", "inputs.safetensors")))
    graphs = [graph_from_official(official_graph_from_tensors(inputs, f"graph{i}.")) for i in range(3)]
    return inputs["images"], graphs


@pytest.fixture(scope="module")
def fusion():
    torch.manual_seed(0)
    return geolink.create_model("geolink_tiny", component="fusion", text_dim=512).eval()


def assert_graphs_equal(a, b):
    for node_type in NODE_TYPES:
        assert torch.equal(a[node_type].x, b[node_type].x)
        assert torch.equal(a[node_type].pos, b[node_type].pos)
    for edge_type in EDGE_TYPES:
        assert torch.equal(a[edge_type].edge_index, b[edge_type].edge_index)


# ----------------------------------------------------------------------------------------------------------------
# image encoder
def test_image_encoder_matches_its_timm_trunk_and_holds_the_sincos_table():
    encoder = GeoLinkImageEncoder("vit_tiny_patch16_224").eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(encoder.forward_features(images), encoder.trunk.forward_features(images))
    assert torch.equal(encoder.trunk.pos_embed[0], sincos_grid(14, 14, 192, cls_token=True))
    assert not encoder.trunk.pos_embed.requires_grad
    assert encoder.default_out_indices == [3, 5, 7, 11]


@pytest.mark.parametrize("size", [(96, 160), (32, 32), (448, 448)])
def test_image_encoder_accepts_any_multiple_of_the_patch_size(size):
    encoder = GeoLinkImageEncoder("vit_tiny_patch16_224").eval()
    with torch.no_grad():
        tokens = encoder.forward_features(torch.randn(1, 3, *size))
        maps = encoder.forward_intermediates(torch.randn(1, 3, *size), indices=2, intermediates_only=True)
    assert tokens.shape == (1, 1 + size[0] // 16 * size[1] // 16, 192)
    assert [m.shape for m in maps] == [(1, 192, size[0] // 16, size[1] // 16)] * 2


def test_image_encoder_regenerates_positions_rather_than_interpolating():
    encoder = GeoLinkImageEncoder("vit_tiny_patch16_224")
    table = encoder.pos_table((8, 20))
    assert torch.equal(table, sincos_grid(8, 20, 192, cls_token=True))
    # a token's position does not depend on the grid it sits in
    assert torch.equal(table[1 + 3 * 20 + 5], encoder.pos_table((14, 14))[1 + 3 * 14 + 5])


def test_image_encoder_with_four_bands():
    encoder = GeoLinkImageEncoder("vit_tiny_patch16_224", in_chans=4, img_size=64)
    assert encoder.forward_features(torch.randn(2, 4, 64, 64)).shape == (2, 17, 192)
    with pytest.raises(ValueError, match="expects 4 bands"):
        encoder.forward_features(torch.randn(2, 3, 64, 64))


def test_image_encoder_rejects_bad_sizes_and_indices():
    encoder = GeoLinkImageEncoder("vit_tiny_patch16_224", img_size=64)
    with pytest.raises(ValueError, match="not a multiple of the patch size 16"):
        encoder.forward_features(torch.randn(1, 3, 60, 64))
    with pytest.raises(ValueError, match="out of range"):
        encoder.forward_intermediates(torch.randn(1, 3, 64, 64), indices=[12])
    with pytest.raises(ValueError, match="not a ViT"):
        GeoLinkImageEncoder("resnet18")


def test_forward_intermediates_follows_timm_semantics():
    encoder = GeoLinkImageEncoder("vit_tiny_patch16_224", img_size=64).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, maps = encoder.forward_intermediates(images, indices=[-1, 3], norm=True)
        theirs = encoder.trunk.forward_intermediates(images, indices=[3, 11], norm=True, intermediates_only=True)
        tokens = encoder.forward_intermediates(images, indices=[5], output_fmt="NLC", intermediates_only=True)
    assert torch.equal(final, encoder.forward_features(images))
    for mine, timm_map in zip(maps, theirs):
        assert torch.allclose(mine, timm_map, atol=1e-6)
    assert tokens[0].shape == (2, 16, 192)
    assert encoder.pooled_features(images).shape == (2, 192)


# ----------------------------------------------------------------------------------------------------------------
# OSM encoder
def test_osm_outputs_do_not_depend_on_the_batch(ufz):
    _, graphs = ufz
    torch.manual_seed(0)
    osm = GeoLinkOSMEncoder(type_weighting="softmax").eval()
    with torch.no_grad():
        together = osm(Batch.from_data_list(graphs))
        region = osm.region_embedding(Batch.from_data_list(graphs))
        alone = [osm(Batch.from_data_list([g])) for g in graphs]
        region_alone = torch.cat([osm.region_embedding(Batch.from_data_list([g])) for g in graphs])
    for node_type in NODE_TYPES:
        stacked = torch.cat([a[node_type] for a in alone])
        assert torch.allclose(together[node_type], stacked, atol=1e-5)
    assert torch.allclose(region, region_alone, atol=1e-5)


def test_osm_encoder_never_modifies_its_input(ufz):
    _, graphs = ufz
    batch = Batch.from_data_list(graphs)
    before = batch.clone()
    GeoLinkOSMEncoder()(batch)
    assert_graphs_equal(batch, before)


def test_region_embedding_weighting(ufz):
    _, graphs = ufz
    torch.manual_seed(0)
    summed = GeoLinkOSMEncoder(type_weighting="sum").eval()
    softmax = GeoLinkOSMEncoder(type_weighting="softmax").eval()
    softmax.load_state_dict(summed.state_dict())
    polygons_only = graphs[2]  # the third graph has polygons only
    assert polygons_only["line"].num_nodes == 0 and polygons_only["point"].num_nodes == 0
    batch = Batch.from_data_list([polygons_only])
    with torch.no_grad():
        nodes = summed(batch)
        per_type = summed.readout_proj["polygon"](summed.readout["polygon"](
            nodes["polygon"], batch["polygon"].batch, dim_size=1))
        # one present type: the sum and the softmax both give exactly that type's embedding
        assert torch.allclose(summed.region_embedding(batch), per_type, atol=1e-6)
        assert torch.allclose(softmax.region_embedding(batch), per_type, atol=1e-6)
        # several present types: softmax weights sum to one, so it differs from the plain sum
        full = Batch.from_data_list([graphs[0]])
        assert not torch.allclose(summed.region_embedding(full), softmax.region_embedding(full))
    with pytest.raises(ValueError, match="type_weighting"):
        GeoLinkOSMEncoder(type_weighting="mean")


def test_osm_encoder_handles_an_empty_graph_and_names_a_width_mismatch():
    osm = GeoLinkOSMEncoder(text_dim=384).eval()
    batch = Batch.from_data_list([empty_graph(384), empty_graph(384)])
    with torch.no_grad():
        nodes = osm(batch)
        region = osm.region_embedding(batch)
    assert all(nodes[t].shape == (0, 128) for t in NODE_TYPES)
    assert torch.equal(region, torch.zeros(2, 128))
    with pytest.raises(ValueError, match="width 512, this encoder expects 384"):
        osm(Batch.from_data_list([empty_graph(512)]))


# ----------------------------------------------------------------------------------------------------------------
# fusion encoder
def test_fusion_maps_shapes_and_defaults(fusion, ufz):
    images, graphs = ufz
    with torch.no_grad():
        maps = fusion(images, Batch.from_data_list(graphs))
    assert fusion.out_indices == [3, 5, 7, 11]
    assert [tuple(m.shape) for m in maps] == [(3, c, 14, 14) for c in fusion.out_channels]
    assert fusion.out_channels == [192, 192, 192, 128]


def test_fusion_is_batch_independent_and_pure(fusion, ufz):
    images, graphs = ufz
    batch = Batch.from_data_list(graphs)
    before = batch.clone()
    with torch.no_grad():
        together = fusion(images, batch)[-1]
        alone = torch.cat([fusion(images[i:i + 1], Batch.from_data_list([g]))[-1] for i, g in enumerate(graphs)])
    assert torch.allclose(together, alone, atol=1e-5)
    assert_graphs_equal(batch, before)


def test_fusion_gives_finite_output_for_samples_without_nodes(fusion, ufz):
    images, graphs = ufz
    mixed = Batch.from_data_list([empty_graph(512), graphs[0]])
    none = Batch.from_data_list([empty_graph(512), empty_graph(512)])
    with torch.no_grad():
        mixed_maps = fusion(images[:2], mixed)
        none_maps = fusion(images[:2], none)
        reference = fusion(images[1:2], Batch.from_data_list([graphs[0]]))[-1]
    assert all(torch.isfinite(m).all() for m in mixed_maps + none_maps)
    assert torch.allclose(mixed_maps[-1][1:], reference, atol=1e-5)
    assert torch.allclose(mixed_maps[-1][:1], none_maps[-1][:1], atol=1e-5)


def test_fusion_rejects_a_graph_count_mismatch(fusion, ufz):
    images, graphs = ufz
    with pytest.raises(ValueError, match="3 images but 2 graphs"):
        fusion(images, Batch.from_data_list(graphs[:2]))


# ----------------------------------------------------------------------------------------------------------------
# pretraining
@pytest.fixture
def pretraining():
    torch.manual_seed(0)
    return geolink.create_model("geolink_tiny", text_dim=512)


def test_pretraining_forward_returns_losses_and_masks(pretraining, ufz):
    images, graphs = ufz
    batch = Batch.from_data_list(graphs)
    before = batch.clone()
    out = pretraining(images, batch)
    for key in ("loss", "loss_mae", "loss_contrastive", "loss_consistency"):
        assert out[key].dim() == 0 and torch.isfinite(out[key])
    expected = out["loss_mae"] + 0.01 * out["loss_contrastive"] + 0.01 * out["loss_consistency"]
    assert torch.allclose(out["loss"], expected)
    assert out["mask"].shape == (3, 196) and torch.all(out["mask"].sum(1) == 196 - 49)
    # 20 % of each graph's nodes of each type, at least one: graph sizes (polygon, line, point)
    sizes = [(11, 21, 16), (3, 6, 0), (2, 0, 0)]
    expected_masked = {t: sum(max(1, round(0.2 * s[i])) if s[i] else 0 for s in sizes)
                       for i, t in enumerate(NODE_TYPES)}
    assert {t: int(m.sum()) for t, m in out["node_mask"].items()} == expected_masked
    assert out["node_pred"].shape == out["node_target"].shape == (sum(expected_masked.values()), 512)
    assert_graphs_equal(batch, before)


def test_masked_nodes_per_graph_are_capped(pretraining, ufz):
    images, graphs = ufz
    pretraining.node_mask_ratio = 1.0
    out = pretraining(images, Batch.from_data_list(graphs))
    # every node is masked, but at most max_masked_nodes (10) per graph reach the fusion block
    assert out["node_pred"].shape[0] == min(48, 10) + min(9, 10) + min(2, 10)


def test_one_optimisation_step_lowers_the_loss(pretraining, ufz):
    images, graphs = ufz
    batch = Batch.from_data_list(graphs)
    optimizer = torch.optim.AdamW(pretraining.parameters(), lr=1e-3)
    torch.manual_seed(1)
    first = pretraining(images, batch)["loss"]
    first.backward()
    optimizer.step()
    torch.manual_seed(1)  # same image and node masks
    with torch.no_grad():
        second = pretraining(images, batch)["loss"]
    assert second < first


def test_pretraining_survives_a_batch_without_nodes(pretraining, ufz):
    images, _ = ufz
    out = pretraining(images[:2], Batch.from_data_list([empty_graph(512), empty_graph(512)]))
    assert torch.isfinite(out["loss"]) and out["loss_consistency"] == 0
    out["loss"].backward()


def test_patchify_round_trip(pretraining):
    images = torch.randn(2, 3, 64, 96)
    patches = pretraining.patchify(images)
    assert patches.shape == (2, 24, 768)
    assert torch.equal(pretraining.unpatchify(patches, (4, 6)), images)


def test_seeded_masks_depend_on_the_sample_alone(ufz):
    images, graphs = ufz
    model = geolink.create_model("geolink_tiny", text_dim=512, fusion_dropout=0.0)
    seeds = torch.tensor([11, 22, 33])
    with torch.no_grad():
        full = model(images, Batch.from_data_list(graphs), sample_seeds=seeds)
        again = model(images, Batch.from_data_list(graphs), sample_seeds=seeds)
        tail = model(images[1:], Batch.from_data_list(graphs[1:]), sample_seeds=seeds[1:])
        other = model(images, Batch.from_data_list(graphs), sample_seeds=seeds + 1)
    assert torch.equal(full["mask"], again["mask"]) and torch.equal(full["loss"], again["loss"])
    assert torch.equal(full["mask"][1:], tail["mask"])  # the same sample is masked the same way in another batch
    polygons_of_graph0 = graphs[0]["polygon"].num_nodes
    assert torch.equal(full["node_mask"]["polygon"][polygons_of_graph0:], tail["node_mask"]["polygon"])
    assert not torch.equal(full["mask"], other["mask"])
