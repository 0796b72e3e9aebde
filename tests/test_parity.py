"""Numerical parity with the official GeoLink implementation (DESIGN §6–§7).

The official-format checkpoints in ``../shared/data/parity`` are converted with ``geolink.convert`` and fed the
shared inputs; every output must match what the official code computed, within
``2e-4 × max(1, max |expected|)`` per tensor.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import safetensors.torch
import timm
import torch
from torch_geometric.data import Batch

from geolink.convert import (
    infer_official_config,
    load_official_checkpoint,
    official_to_geolink,
)
from geolink.graph.official import graph_from_official, load_official_graph, official_graph_from_tensors
from geolink.graph.schema import EDGE_TYPES, NODE_TYPES, validate_graph
from geolink.models import GeoLinkForPretraining, GeoLinkImageEncoder

TOLERANCE = 2e-4

# Parity fixtures, one per official-format configuration available in ../shared/data/parity.
PARITY_CONFIGS = ["official_tiny"]


def assert_parity(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = (actual - expected).abs().max().item()
    bound = TOLERANCE * max(1.0, expected.abs().max().item())
    assert error <= bound, f"{name}: max abs error {error:.3g} > {bound:.3g}"


@pytest.fixture(params=PARITY_CONFIGS)
def official(request, shared):
    folder = shared("parity", request.param)
    fixture = json.loads((folder / "fixture.json").read_text())
    inputs = safetensors.torch.load_file(str(folder / "inputs.safetensors"))
    graphs = [graph_from_official(official_graph_from_tensors(inputs, f"graph{i}."))
              for i in range(len(fixture["graph_names"]))]
    return {
        "folder": folder,
        "fixture": fixture,
        "images": inputs["images"],
        "graphs": graphs,
        "expected": safetensors.torch.load_file(str(folder / "expected.safetensors")),
        "model": load_official_checkpoint(folder / "geolink_multimodal_official_format.pth"),
        "vit": load_official_checkpoint(folder / "geolink_vit_official_format.pth"),
    }


def test_conversion_returns_the_documented_types(official):
    assert isinstance(official["model"], GeoLinkForPretraining)
    assert isinstance(official["vit"], GeoLinkImageEncoder)
    assert official["model"].osm_encoder.type_weighting == "sum"
    assert official["model"].fusion_encoder.image_encoder.trunk_name == "vit_tiny_patch16_224"


@torch.no_grad()
def test_image_tokens_match_from_both_files(official):
    expected = official["expected"]["image_tokens"]
    assert_parity(official["model"].fusion_encoder.image_encoder.forward_features(official["images"]), expected,
                  "multimodal image tokens")
    assert_parity(official["vit"].forward_features(official["images"]), expected, "unimodal image tokens")


@torch.no_grad()
def test_image_tokens_match_through_a_timm_folder_without_geolink(official, tmp_path):
    folder = tmp_path / "vit"
    official["vit"].save_pretrained(folder)
    images_file = tmp_path / "images.safetensors"
    safetensors.torch.save_file({"images": official["images"]}, str(images_file))
    out_file = tmp_path / "tokens.safetensors"
    script = (
        "import sys, timm, torch, safetensors.torch as st\n"
        f"m = timm.create_model('local-dir:{folder}', pretrained=True).eval()\n"
        f"x = st.load_file('{images_file}')['images']\n"
        "with torch.no_grad(): y = m.forward_features(x)\n"
        f"st.save_file({{'tokens': y.contiguous()}}, '{out_file}')\n"
        "assert not any(name.startswith('geolink') for name in sys.modules), 'geolink was imported'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    tokens = safetensors.torch.load_file(str(out_file))["tokens"]
    assert_parity(tokens, official["expected"]["image_tokens"], "timm local-dir image tokens")


@torch.no_grad()
def test_osm_node_and_region_embeddings_match(official):
    osm = official["model"].fusion_encoder.osm_encoder
    batch = Batch.from_data_list(official["graphs"])
    nodes = osm(batch)
    for node_type in NODE_TYPES:
        assert_parity(nodes[node_type], official["expected"][f"osm_nodes.{node_type}"], f"{node_type} nodes")
    assert_parity(osm.region_embedding(batch), official["expected"]["region_embedding"], "region embedding")


@torch.no_grad()
def test_fusion_maps_match(official):
    fusion = official["model"].fusion_encoder
    layers = official["fixture"]["output_layers"]
    maps = fusion(official["images"], Batch.from_data_list(official["graphs"]), layers=layers)
    assert len(maps) == len(layers)
    for index, fusion_map in enumerate(maps):
        assert_parity(fusion_map, official["expected"][f"fusion.{index}"], f"fusion map {index}")


@torch.no_grad()
def test_converted_folder_reproduces_parity(official, tmp_path):
    from geolink.models import GeoLinkFusionEncoder

    official["model"].fusion_encoder.save_pretrained(tmp_path / "fusion")
    fusion = GeoLinkFusionEncoder.from_pretrained(tmp_path / "fusion")
    layers = official["fixture"]["output_layers"]
    maps = fusion(official["images"], Batch.from_data_list(official["graphs"]), layers=layers)
    assert_parity(maps[-1], official["expected"][f"fusion.{len(layers) - 1}"], "reloaded fused map")


UFZ_SAMPLES = 6  # urban-functional-zone samples in ../shared/data/official_examples/ufz (DESIGN §7)


def test_ufz_graphs_convert_to_the_schema(shared):
    paths = sorted(shared("official_examples", "ufz", "graph").glob("*.safetensors"))
    images = sorted(shared("official_examples", "ufz", "img").glob("*.png"))
    assert len(paths) == UFZ_SAMPLES and [p.stem for p in paths] == [p.stem for p in images]
    for path in paths:
        graph = load_official_graph(path)
        validate_graph(graph, feature_dim=512)
        for node_type in NODE_TYPES:
            pos = graph[node_type].pos
            assert torch.all((pos >= -1e-6) & (pos <= 1 + 1e-6)), f"{path.name}: {node_type} anchors outside [0, 1]"


# --------------------------------------------------------------------------------------------------------------
# The official checkpoint layout, written down independently of geolink's converter, so the ViT-L release can be
# checked without the (multi-GB) file: first proven equal to the real tiny file, then built at ViT-L size.
def official_layout(architecture: str, decoder_dim: int = 512, text_dim: int = 512, osm_dim: int = 128,
                    fusion_dim: int = 256, projection_dim: int = 64) -> dict[str, torch.Size]:
    """Key -> shape of an official multimodal GeoLink state dict (DESIGN §6)."""
    vit = timm.create_model(architecture, pretrained=False, num_classes=0, global_pool="")
    dim, patch = vit.embed_dim, vit.patch_embed.patch_size[0]
    tokens = vit.patch_embed.num_patches + 1
    layout = {f"img_encoder.{k}": v.shape for k, v in vit.state_dict().items()}
    layout.update({k: v.shape for k, v in vit.patch_embed.state_dict(prefix="patch_embed.").items()})
    layout.update({"cls_token": (1, 1, dim), "img_pos_embed": (1, tokens, dim), "img_norm.weight": (dim,),
                   "img_norm.bias": (dim,), "rec_img_pos_embed": (1, tokens, decoder_dim),
                   "img_mask_token": (1, 1, decoder_dim), "fusion_img_pos_embed": (1, tokens, fusion_dim)})
    for src, _, dst in EDGE_TYPES:
        base = f"osm_encoder.convs.0.convs.<{src}___to___{dst}>"  # torch_geometric >= 2.5 key format
        layout.update({f"{base}.att_src": (1, 1, osm_dim), f"{base}.att_dst": (1, 1, osm_dim),
                       f"{base}.bias": (osm_dim,), f"{base}.lin.weight": (osm_dim, text_dim)})
    for t in NODE_TYPES:
        layout.update({f"osm_norm.{t}.weight": (osm_dim,), f"osm_norm.{t}.bias": (osm_dim,),
                       f"osm_read_out.{t}.lstm.weight_ih_l0": (4 * osm_dim, 2 * osm_dim),
                       f"osm_read_out.{t}.lstm.weight_hh_l0": (4 * osm_dim, osm_dim),
                       f"osm_read_out.{t}.lstm.bias_ih_l0": (4 * osm_dim,),
                       f"osm_read_out.{t}.lstm.bias_hh_l0": (4 * osm_dim,),
                       f"osm_aggr_mlp.{t}.weight": (osm_dim, 2 * osm_dim), f"osm_aggr_mlp.{t}.bias": (osm_dim,),
                       f"osm_node_fusion_mlp.{t}.weight": (fusion_dim, osm_dim),
                       f"osm_node_fusion_mlp.{t}.bias": (fusion_dim,), f"osm_mask_token.{t}": (1, text_dim)})
    block = timm.models.vision_transformer.Block(decoder_dim, 16, 4.0, qkv_bias=True)
    for i in range(2):
        layout.update({f"img_cross_modal_decoder.{i}.{k}": v.shape for k, v in block.state_dict().items()})
    layout.update({"img_decoder_mlp.weight": (decoder_dim, dim), "img_decoder_mlp.bias": (decoder_dim,),
                   "img_decoder_norm.weight": (decoder_dim,), "img_decoder_norm.bias": (decoder_dim,),
                   "img_decoder_pred.weight": (patch * patch * 3, decoder_dim),
                   "img_decoder_pred.bias": (patch * patch * 3,),
                   "type_attention.weight": (1, osm_dim), "type_attention.bias": (1,),
                   "osm_graph_consistency_prj.weight": (projection_dim, osm_dim),
                   "osm_graph_consistency_prj.bias": (projection_dim,),
                   "img_consistency_prj.weight": (projection_dim, dim), "img_consistency_prj.bias": (projection_dim,),
                   "img_fusion_mlp.weight": (fusion_dim, dim), "img_fusion_mlp.bias": (fusion_dim,),
                   "osm_node_pred.weight": (text_dim, fusion_dim), "osm_node_pred.bias": (text_dim,)})
    for name in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token"):
        base = f"osm_cross_modal_encoder.0.{name}"
        layout.update({f"{base}.in_proj_weight": (3 * fusion_dim, fusion_dim),
                       f"{base}.in_proj_bias": (3 * fusion_dim,),
                       f"{base}.out_proj.weight": (fusion_dim, fusion_dim), f"{base}.out_proj.bias": (fusion_dim,)})
    for name in ("norm1", "norm2", "norm3", "norm4", "mlp"):
        layout[f"osm_cross_modal_encoder.0.{name}.bias"] = (fusion_dim,)
        weight_shape = (fusion_dim, fusion_dim) if name == "mlp" else (fusion_dim,)
        layout[f"osm_cross_modal_encoder.0.{name}.weight"] = weight_shape
    return {k: torch.Size(v) for k, v in layout.items()}


def test_official_layout_description_matches_the_real_file(parity_dir):
    path = parity_dir / "geolink_multimodal_official_format.pth"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    real = {k: v.shape for k, v in checkpoint["model_state_dict"].items()}
    assert official_layout("vit_tiny_patch16_224", decoder_dim=128) == real


@pytest.mark.slow
def test_vit_large_official_layout_converts_with_every_key():
    layout = official_layout("vit_large_patch16_224")
    generator = torch.Generator().manual_seed(0)
    state_dict = {k: torch.randn(shape, generator=generator) * 0.02 for k, shape in layout.items()}
    config = infer_official_config({"architecture": "vit_large_patch16_224"}, state_dict)
    assert config["decoder_dim"] == 512 and config["fusion"]["dim"] == 256 and config["osm"]["text_dim"] == 512
    model = GeoLinkForPretraining(**config)
    converted = official_to_geolink(state_dict)
    result = model.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # every official tensor that is not a recomputed table or an unused copy reached the model
    dropped = {k for k in layout if re.match(r"(img_encoder\.(cls_token|pos_embed|norm\.)|rec_img_pos_embed|"
                                             r"fusion_img_pos_embed|patch_embed\.)", k)}
    assert len(converted) == len(layout) - len(dropped)
    assert model.fusion_encoder.out_indices == [7, 11, 15, 23]
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens = model.fusion_encoder.image_encoder.forward_features(images)
    assert tokens.shape == (1, 197, 1024) and torch.isfinite(tokens).all()
