"""Behaviour of the encoders and the pretraining model beyond parity: shapes, sizes, batching, masking, losses, the
MAE and OSM stages, and timm's optimiser conventions. Runs on synthetic graphs (no ``../shared``)."""

from __future__ import annotations

import time

import pytest
import torch
from timm.models import group_parameters
from torch_geometric.data import Batch, HeteroData

import geolink
from geolink.errors import ConfigError, InputError
from geolink.graph.schema import EDGE_TYPES, NODE_TYPES, empty_graph, validate_graph
from geolink.models import GeoLinkImageEncoder, GeoLinkOSMEncoder
from geolink.models.image import validate_images
from geolink.models.pos_embed import sincos_grid
from geolink.runtime import param_groups


@pytest.fixture(scope="module")
def fusion():
    torch.manual_seed(0)
    return geolink.create_model("geolink_tiny", component="fusion").eval()


@pytest.fixture
def pretraining():
    torch.manual_seed(0)
    return geolink.create_model("geolink_tiny")


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
    with pytest.raises(InputError, match="expects 4 bands"):
        encoder.forward_features(torch.randn(2, 3, 64, 64))


def test_image_encoder_rejects_bad_sizes_and_indices():
    encoder = GeoLinkImageEncoder("vit_tiny_patch16_224", img_size=64)
    with pytest.raises(InputError, match="not a multiple of the patch size 16"):
        encoder.forward_features(torch.randn(1, 3, 60, 64))
    with pytest.raises(InputError, match="out of range"):
        encoder.forward_intermediates(torch.randn(1, 3, 64, 64), indices=[12])
    with pytest.raises(ConfigError, match="not a ViT"):
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


def test_forward_visible_is_the_trunk_on_the_gathered_tokens():
    torch.manual_seed(0)
    encoder = GeoLinkImageEncoder("vit_tiny_patch16_224", img_size=64).eval()
    images = torch.randn(2, 3, 64, 64)
    ids_keep = torch.tensor([[3, 0, 9, 15], [7, 1, 2, 12]])
    with torch.no_grad():
        visible = encoder.forward_visible(images, ids_keep)
        tokens, _ = encoder.patch_tokens(images)
        gathered = torch.stack([tokens[b, ids_keep[b]] for b in range(2)])
        trunk = encoder.trunk
        reference = trunk.norm(trunk.blocks(trunk.norm_pre(trunk.pos_drop(encoder.prepend_cls(gathered)))))
        every_patch = encoder.forward_visible(images, torch.arange(16).expand(2, -1))
    assert visible.shape == (2, 5, 192)
    assert torch.equal(visible, reference)
    assert torch.equal(every_patch, encoder.forward_features(images))  # keeping all patches in order: no masking


# ----------------------------------------------------------------------------------------------------------------
# OSM encoder
def test_osm_outputs_do_not_depend_on_the_batch(synthetic_graphs):
    torch.manual_seed(0)
    osm = GeoLinkOSMEncoder(text_dim=384, type_weighting="softmax").eval()
    with torch.no_grad():
        together, region = osm.encode(Batch.from_data_list(synthetic_graphs))
        alone = [osm.encode(Batch.from_data_list([g])) for g in synthetic_graphs]
    for node_type in NODE_TYPES:
        stacked = torch.cat([nodes[node_type] for nodes, _ in alone])
        assert torch.allclose(together[node_type], stacked, atol=1e-5)
    assert torch.allclose(region, torch.cat([r for _, r in alone]), atol=1e-5)


def test_encode_gives_the_nodes_of_forward_and_the_region_embedding(synthetic_graphs):
    torch.manual_seed(0)
    osm = GeoLinkOSMEncoder(text_dim=384, type_weighting="softmax").eval()
    batch = Batch.from_data_list(synthetic_graphs)
    with torch.no_grad():
        nodes, region = osm.encode(batch)
        forward = osm(batch)
        separate = osm.region_embedding(batch)
        from_nodes = osm.region_embedding(batch, forward)
    assert all(torch.equal(nodes[t], forward[t]) for t in NODE_TYPES)
    assert [tuple(nodes[t].shape) for t in NODE_TYPES] == [(16, 128), (27, 128), (16, 128)]
    assert region.shape == (3, 128) and torch.equal(region, separate) and torch.equal(region, from_nodes)


def test_osm_encoder_never_modifies_its_input(synthetic_graphs):
    batch = Batch.from_data_list(synthetic_graphs)
    before = batch.clone()
    GeoLinkOSMEncoder(text_dim=384).encode(batch)
    assert_graphs_equal(batch, before)


def test_region_embedding_weighting(synthetic_graphs):
    torch.manual_seed(0)
    summed = GeoLinkOSMEncoder(text_dim=384, type_weighting="sum").eval()
    softmax = GeoLinkOSMEncoder(text_dim=384, type_weighting="softmax").eval()
    softmax.load_state_dict(summed.state_dict())
    polygons_only = synthetic_graphs[2]
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
        full = Batch.from_data_list([synthetic_graphs[0]])
        assert not torch.allclose(summed.region_embedding(full), softmax.region_embedding(full))
    with pytest.raises(ConfigError, match="type_weighting"):
        GeoLinkOSMEncoder(type_weighting="mean")


def test_osm_encoder_handles_an_empty_graph_and_names_a_width_mismatch():
    osm = GeoLinkOSMEncoder(text_dim=384).eval()
    batch = Batch.from_data_list([empty_graph(384), empty_graph(384)])
    with torch.no_grad():
        nodes, region = osm.encode(batch)
    assert all(nodes[t].shape == (0, 128) for t in NODE_TYPES)
    assert torch.equal(region, torch.zeros(2, 128))
    with pytest.raises(InputError, match="width 512, this encoder expects 384"):
        osm(Batch.from_data_list([empty_graph(512)]))


# ----------------------------------------------------------------------------------------------------------------
# fusion encoder
def test_fusion_maps_shapes_and_defaults(fusion, synthetic_images, synthetic_graphs):
    with torch.no_grad():
        maps = fusion(synthetic_images, Batch.from_data_list(synthetic_graphs))
    assert fusion.out_indices == [3, 5, 7, 11]
    assert [tuple(m.shape) for m in maps] == [(3, c, 14, 14) for c in fusion.out_channels]
    assert fusion.out_channels == [192, 192, 192, 128]


def test_fusion_is_batch_independent_and_pure(fusion, synthetic_images, synthetic_graphs):
    batch = Batch.from_data_list(synthetic_graphs)
    before = batch.clone()
    with torch.no_grad():
        together = fusion(synthetic_images, batch)[-1]
        alone = torch.cat([fusion(synthetic_images[i:i + 1], Batch.from_data_list([g]))[-1]
                           for i, g in enumerate(synthetic_graphs)])
    assert torch.allclose(together, alone, atol=1e-5)
    assert_graphs_equal(batch, before)


def test_fusion_gives_finite_output_for_samples_without_nodes(fusion, synthetic_images, synthetic_graphs):
    images = synthetic_images
    mixed = Batch.from_data_list([empty_graph(384), synthetic_graphs[0]])
    none = Batch.from_data_list([empty_graph(384), empty_graph(384)])
    with torch.no_grad():
        mixed_maps = fusion(images[:2], mixed)
        none_maps = fusion(images[:2], none)
        reference = fusion(images[1:2], Batch.from_data_list([synthetic_graphs[0]]))[-1]
    assert all(torch.isfinite(m).all() for m in mixed_maps + none_maps)
    assert torch.allclose(mixed_maps[-1][1:], reference, atol=1e-5)
    assert torch.allclose(mixed_maps[-1][:1], none_maps[-1][:1], atol=1e-5)


def test_fusion_rejects_a_graph_count_mismatch(fusion, synthetic_images, synthetic_graphs):
    with pytest.raises(InputError, match="3 images but 2 graphs"):
        fusion(synthetic_images, Batch.from_data_list(synthetic_graphs[:2]))


# ----------------------------------------------------------------------------------------------------------------
# input validation (issue 9, item 6): each bad input of the report is named, not a torch/PyG traceback
def without_points(graph):
    """``graph`` with the ``point`` node type (and its edges) left out, as a hand-made graph might be."""
    out = HeteroData()
    for node_type in ("polygon", "line"):
        out[node_type].x, out[node_type].pos = graph[node_type].x, graph[node_type].pos
    for edge_type in EDGE_TYPES:
        if "point" not in edge_type:
            out[edge_type].edge_index = graph[edge_type].edge_index
            out[edge_type].edge_attr = graph[edge_type].edge_attr
    return out


def with_node_field(graph, node_type, name, value):
    graph = graph.clone()
    graph[node_type][name] = value
    return graph


def test_fusion_names_a_missing_node_type(fusion, synthetic_images, synthetic_graphs):
    with pytest.raises(InputError, match="no node type 'point'.*empty_graph"):
        fusion(synthetic_images[:1], without_points(synthetic_graphs[0]))
    with pytest.raises(InputError, match="no node type 'point'"):
        GeoLinkOSMEncoder(text_dim=384)(without_points(synthetic_graphs[0]))


def test_fusion_names_unbatched_integer_empty_and_nan_images(fusion, synthetic_images, synthetic_graphs):
    graph = synthetic_graphs[0]
    with pytest.raises(InputError, match=r"\(3, 224, 224\), one unbatched image.*images.unsqueeze\(0\)"):
        fusion(synthetic_images[0], graph)
    uint8 = (synthetic_images[:1].clamp(0, 1) * 255).to(torch.uint8)
    with pytest.raises(InputError, match=r"torch.uint8.*geolink.runtime.normalise"):
        fusion(uint8, graph)
    with pytest.raises(InputError, match="empty batch"):
        fusion(synthetic_images[:0], graph)
    nan = synthetic_images[:1].clone()
    nan[0, 1, 5, 7] = float("nan")
    with pytest.raises(InputError, match="NaN or infinite pixels"):
        fusion(nan, graph)
    encoder = fusion.image_encoder
    with pytest.raises(InputError, match="NaN or infinite pixels"):
        encoder(nan)
    with pytest.raises(InputError, match="one unbatched image"):
        encoder.forward_features(synthetic_images[0])


@pytest.mark.parametrize(("node_type", "name", "value", "message"), [
    ("polygon", "pos", torch.rand(11, 3, 2), r"graph\['polygon'\].pos must be \[11, 4, 2\] \(4 anchors"),
    ("line", "pos", torch.rand(21, 3, 2) * 3 - 1, r"graph\['line'\].pos spans .* outside \[0, 1\]"),
    ("point", "pos", torch.full((16, 1, 2), float("nan")), r"graph\['point'\].pos has NaN"),
    ("polygon", "x", torch.full((11, 384), float("nan")), r"graph\['polygon'\].x has NaN"),
])
def test_fusion_names_bad_anchors_ranges_and_nan_features(fusion, synthetic_images, synthetic_graphs, node_type,
                                                          name, value, message):
    bad = with_node_field(synthetic_graphs[0], node_type, name, value)
    with pytest.raises(InputError, match=message):
        fusion(synthetic_images[:1], bad)
    with pytest.raises(InputError, match=message):
        GeoLinkOSMEncoder(text_dim=384).encode(bad)


def test_pretraining_forward_validates_its_inputs(pretraining, synthetic_images, synthetic_graphs):
    batch = Batch.from_data_list(synthetic_graphs[:1])
    with pytest.raises(InputError, match="one unbatched image"):
        pretraining(synthetic_images[0], batch)
    bad = Batch.from_data_list([with_node_field(synthetic_graphs[0], "point", "pos", torch.rand(16, 1, 2) + 2)])
    with pytest.raises(InputError, match=r"graph\['point'\].pos spans"):
        pretraining(synthetic_images[:1], bad)


def test_validation_is_cheap_and_can_be_skipped(fusion, synthetic_images, synthetic_graphs):
    """validate=False runs the unchecked path (same output); the checks cost little next to a forward pass."""
    images, graph = synthetic_images[:1], synthetic_graphs[0]

    def best_of(runs, call):
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return min(times)

    with torch.no_grad():
        checked = fusion(images, graph)
        unchecked = fusion(images, graph, validate=False)
        assert all(torch.equal(a, b) for a, b in zip(checked, unchecked, strict=True))
        forward_on = best_of(3, lambda: fusion(images, graph))
        forward_off = best_of(3, lambda: fusion(images, graph, validate=False))
    checks = best_of(5, lambda: (validate_images(images, 3), validate_graph(graph, 384)))
    print(f"\ntiny fusion forward, 1 image: {forward_on * 1e3:.1f} ms validated, {forward_off * 1e3:.1f} ms with "
          f"validate=False; the checks alone {checks * 1e3:.2f} ms")
    assert checks < 0.1 * forward_off


# ----------------------------------------------------------------------------------------------------------------
# pretraining
def test_pretraining_forward_returns_losses_and_masks(pretraining, synthetic_images, synthetic_graphs):
    batch = Batch.from_data_list(synthetic_graphs)
    before = batch.clone()
    out = pretraining(synthetic_images, batch)
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
    assert out["node_pred"].shape == out["node_target"].shape == (sum(expected_masked.values()), 384)
    assert_graphs_equal(batch, before)


def test_forward_encoder_runs_the_image_encoders_own_visible_pass(pretraining, synthetic_images):
    seeds = torch.tensor([5, 6, 7])
    with torch.no_grad():
        latent, mask, ids_keep, ids_restore, grid = pretraining.forward_encoder(synthetic_images, 0.75, seeds)
        direct = pretraining.image_encoder.forward_visible(synthetic_images, ids_keep)
    assert grid == (14, 14) and ids_keep.shape == (3, 49) and latent.shape == (3, 50, 192)
    assert torch.equal(latent, direct)
    # ids_keep are exactly the unmasked patches, and ids_restore undoes the shuffle
    assert torch.equal(torch.zeros(3, 49), torch.gather(mask, 1, ids_keep))
    assert torch.equal(mask.sum(1), torch.full((3,), 147.0))
    assert torch.equal(torch.sort(ids_restore, dim=1).values, torch.arange(196).expand(3, -1))


def test_masked_nodes_per_graph_are_capped(pretraining, synthetic_images, synthetic_graphs):
    pretraining.node_mask_ratio = 1.0
    out = pretraining(synthetic_images, Batch.from_data_list(synthetic_graphs))
    # every node is masked, but at most max_masked_nodes (10) per graph reach the fusion block
    assert out["node_pred"].shape[0] == min(48, 10) + min(9, 10) + min(2, 10)


def test_one_optimisation_step_lowers_the_loss(pretraining, synthetic_images, synthetic_graphs):
    batch = Batch.from_data_list(synthetic_graphs)
    optimizer = torch.optim.AdamW(pretraining.parameters(), lr=1e-3)
    torch.manual_seed(1)
    first = pretraining(synthetic_images, batch)["loss"]
    first.backward()
    optimizer.step()
    torch.manual_seed(1)  # same image and node masks
    with torch.no_grad():
        second = pretraining(synthetic_images, batch)["loss"]
    assert second < first


def test_pretraining_survives_a_batch_without_nodes(pretraining, synthetic_images):
    out = pretraining(synthetic_images[:2], Batch.from_data_list([empty_graph(384), empty_graph(384)]))
    assert torch.isfinite(out["loss"]) and out["loss_consistency"] == 0
    out["loss"].backward()


def test_patchify_round_trip(pretraining):
    images = torch.randn(2, 3, 64, 96)
    patches = pretraining.patchify(images)
    assert patches.shape == (2, 24, 768)
    assert torch.equal(pretraining.unpatchify(patches, (4, 6)), images)


def test_seeded_masks_depend_on_the_sample_alone(synthetic_images, synthetic_graphs):
    images, graphs = synthetic_images, synthetic_graphs
    model = geolink.create_model("geolink_tiny", fusion={"dropout": 0.0})
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


def test_pretraining_reads_text_dim_from_the_osm_section():
    model = geolink.create_model("geolink_tiny", osm={"text_dim": 512})
    assert model.osm_encoder.text_dim == 512
    assert model.node_mask_token["point"].shape == (1, 512) and model.node_pred.out_features == 512


# ----------------------------------------------------------------------------------------------------------------
# timm optimiser conventions
def test_no_weight_decay_groups_are_the_previous_name_rule(pretraining):
    """``runtime.param_groups`` (1-D tensors + ``no_weight_decay()``) exempts exactly what the trainer's former
    rule did: ``ndim <= 1 or name.endswith("token") or "token." in name``."""
    names = {id(p): n for n, p in pretraining.named_parameters()}
    groups = param_groups(pretraining, weight_decay=0.05)
    exempt = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    trainable = {n for n, p in pretraining.named_parameters() if p.requires_grad}
    old_rule = {n for n, p in pretraining.named_parameters()
                if p.requires_grad and (p.ndim <= 1 or n.endswith("token") or "token." in n)}
    assert exempt == old_rule and decayed == trainable - old_rule
    multi_dim_exempt = {n for n in exempt if dict(pretraining.named_parameters())[n].ndim > 1}
    assert multi_dim_exempt == {"fusion_encoder.image_encoder.trunk.cls_token", "mask_token",
                                *(f"node_mask_token.{t}" for t in NODE_TYPES)}
    parameters = dict(pretraining.named_parameters())
    for model, prefix in ((pretraining.fusion_encoder, "fusion_encoder."),
                          (pretraining.image_encoder, "fusion_encoder.image_encoder.")):
        assert all(prefix + name in parameters for name in model.no_weight_decay())  # names relative to the module


@pytest.mark.parametrize("component", ["image", "pretraining"])
def test_grad_checkpointing_gives_the_same_outputs_and_gradients(component, synthetic_images, synthetic_graphs):
    torch.manual_seed(0)
    model = geolink.create_model("geolink_tiny", component=component, fusion={"dropout": 0.0}).train()
    images, batch, seeds = synthetic_images[:2], Batch.from_data_list(synthetic_graphs[:2]), torch.tensor([3, 4])

    def run() -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        if component == "image":
            outputs = [model.forward_features(images),
                       *model.forward_intermediates(images, indices=[2, 5], intermediates_only=True)]
        else:
            out = model(images, batch, sample_seeds=seeds)
            outputs = [out["loss"], out["pred"]]
        sum(o.sum() for o in outputs).backward()
        return [o.detach() for o in outputs], {n: p.grad.clone() for n, p in model.named_parameters()
                                               if p.grad is not None}

    plain_out, plain_grads = run()
    model.set_grad_checkpointing(True)
    assert model.image_encoder.trunk.grad_checkpointing if component != "image" else model.trunk.grad_checkpointing
    checkpointed_out, checkpointed_grads = run()
    for a, b in zip(plain_out, checkpointed_out):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert plain_grads.keys() == checkpointed_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grad, checkpointed_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_group_matcher_orders_the_image_stem_blocks_and_heads(pretraining):
    for model, prefix in ((pretraining.image_encoder, "trunk."),
                          (pretraining.fusion_encoder, "image_encoder.trunk."),
                          (pretraining, "fusion_encoder.image_encoder.trunk.")):
        groups = group_parameters(model, model.group_matcher())
        layer_of = {name: layer for layer, names in groups.items() for name in names}
        assert set(layer_of) == {n for n, _ in model.named_parameters()}
        assert layer_of[prefix + "cls_token"] == layer_of[prefix + "patch_embed.proj.weight"] == 0
        assert [layer_of[f"{prefix}blocks.{i}.attn.qkv.weight"] for i in range(12)] == list(range(1, 13))
        assert layer_of[prefix + "norm.weight"] == 12  # the final norm joins the last block (timm)
        if model is pretraining:  # OSM encoder, fusion block, decoder and heads come after the image blocks
            assert layer_of["decoder_pred.weight"] == layer_of["fusion_encoder.osm_encoder.type_attention.weight"] == 13
    osm = pretraining.osm_encoder
    groups = group_parameters(osm, osm.group_matcher())
    assert set(groups) == {0, 1} and "convs.point__to__point.lin.weight" in groups[0]
    assert "readout_proj.point.weight" in groups[1]
