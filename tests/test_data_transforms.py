"""The augmentation stack: image, graph and mask stay aligned, graphs stay valid, inputs are never modified, and the
image-only transforms of the evaluation datasets stay equivalent to the torchvision stacks they replace."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geolink.data.transforms import (
    REPRESENTATIVE_ANCHOR,
    CenterCrop,
    ColorJitter,
    Compose,
    ImageTransform,
    RandomCrop,
    RandomDihedral,
    RandomFlip,
    RandomResizedCrop,
    RandomRot90,
    Resize,
    ResizeShortSide,
    crop_graph,
    default_train_transform,
    hflip,
    rot90,
    vflip,
)
from geolink.graph.schema import EDGE_TYPES, NODE_TYPES, RELATIONS
from geolink.graph.tags import TagVocabulary
from tests.data_helpers import build_graph


@pytest.fixture(scope="module")
def graph():
    g = build_graph(11, TagVocabulary(), n=60)
    assert all(g[t].num_nodes > 3 for t in NODE_TYPES)
    assert all(g[e].edge_index.shape[1] > 0 for e in (("polygon", "to", "polygon"), ("point", "to", "point")))
    return g


def snapshot(g):
    return {(t, k): v.clone() for t in NODE_TYPES for k, v in g[t].items() if torch.is_tensor(v)} | {
        (e, k): v.clone() for e in EDGE_TYPES for k, v in g[e].items()} | {"bbox": g.bbox.clone()}


def assert_unchanged(g, before):
    now = snapshot(g)
    assert now.keys() == before.keys()
    assert all(torch.equal(now[k], before[k]) for k in before)


def assert_valid(g):
    for t in NODE_TYPES:
        n = g[t].num_nodes
        assert g[t].pos.shape[0] == g[t].tags.shape[0] == g[t].tag_weight.shape[0] == n
        assert ((g[t].pos >= 0) & (g[t].pos <= 1)).all(), t
    for edge_type in EDGE_TYPES:
        src, _, dst = edge_type
        edge_index, edge_attr = g[edge_type].edge_index, g[edge_type].edge_attr
        assert edge_index.shape[0] == 2 and edge_attr.shape == (edge_index.shape[1], len(RELATIONS[edge_type]))
        if edge_index.numel():
            assert int(edge_index[0].max()) < g[src].num_nodes and int(edge_index[1].max()) < g[dst].num_nodes
            assert int(edge_index.min()) >= 0
        assert torch.equal(edge_attr.sum(1), torch.ones(edge_attr.shape[0]))  # still one-hot rows


def test_crop_keeps_anchors_in_unit_square_and_edges_between_survivors(graph):
    before = snapshot(graph)
    crop = RandomResizedCrop(32, scale=(0.1, 0.6))
    image = torch.rand(3, 120, 90)
    dropped = 0
    for seed in range(40):
        out_image, out = crop(image, graph, torch.Generator().manual_seed(seed))
        assert out_image.shape == (3, 32, 32)
        assert_valid(out)
        top, left, h, w = crop.sample_box(120, 90, torch.Generator().manual_seed(seed))
        for t in NODE_TYPES:
            rep = graph[t].pos[:, REPRESENTATIVE_ANCHOR[t]]
            u, v = (rep[:, 0] - left / 90) / (w / 90), (rep[:, 1] - top / 120) / (h / 120)
            inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
            assert out[t].num_nodes == int(inside.sum())  # e.g. the polygon count follows the centroids
            assert torch.equal(out[t].tags, graph[t].tags[inside])
            dropped += int((~inside).sum())
        # surviving edges are exactly the old edges between surviving nodes (re-indexed)
        for edge_type in EDGE_TYPES:
            src, _, dst = edge_type
            keep = {t: ((graph[t].pos[:, REPRESENTATIVE_ANCHOR[t]] - torch.tensor([left / 90, top / 120]))
                        / torch.tensor([w / 90, h / 120])) for t in (src, dst)}
            keep = {t: ((p >= 0) & (p <= 1)).all(1) for t, p in keep.items()}
            old = graph[edge_type].edge_index
            alive = keep[src][old[0]] & keep[dst][old[1]]
            assert out[edge_type].edge_index.shape[1] == int(alive.sum())
            assert torch.equal(out[edge_type].edge_attr, graph[edge_type].edge_attr[alive])
    assert dropped > 0
    assert_unchanged(graph, before)


def test_crop_renormalises_anchors_and_bbox(graph):
    out = crop_graph(graph, (0.25, 0.5, 0.5, 0.5))
    west, south, east, north = graph.bbox[0].tolist()
    assert torch.allclose(out.bbox[0], torch.tensor([west + 0.25 * (east - west), south, west + 0.75 * (east - west),
                                                     south + 0.5 * (north - south)], dtype=torch.float64))
    for t in NODE_TYPES:
        rep = graph[t].pos[:, REPRESENTATIVE_ANCHOR[t]]
        inside = (rep[:, 0] >= 0.25) & (rep[:, 0] <= 0.75) & (rep[:, 1] >= 0.5)
        expected = ((graph[t].pos[inside] - torch.tensor([0.25, 0.5])) / 0.5).clamp(0, 1)
        assert torch.allclose(out[t].pos, expected)


def test_flips_and_rotations_are_involutions(graph):
    image = torch.rand(3, 20, 30)
    for flip in (hflip, vflip):
        image2, g2 = flip(*flip(image, graph))
        assert torch.equal(image2, image)
        for t in NODE_TYPES:
            assert torch.allclose(g2[t].pos, graph[t].pos, atol=1e-6)
    image4, g4 = image, graph
    for _ in range(4):
        image4, g4 = rot90(image4, g4)
    assert torch.equal(image4, image)
    for t in NODE_TYPES:
        assert torch.allclose(g4[t].pos, graph[t].pos, atol=1e-6)
    assert torch.equal(rot90(image, graph, 3)[0], torch.rot90(image, 3, dims=(1, 2)))


@pytest.mark.parametrize("op", ["hflip", "vflip", "rot1", "rot2", "rot3", "dihedral"])
def test_geometric_transforms_move_pixels_and_anchors_together(graph, op):
    height, width = 40, 60
    point = graph["point"].pos[:, 0]  # put one bright pixel under every point anchor
    image = torch.zeros(1, height, width)
    rows = (point[:, 1] * height).clamp(max=height - 1).long()
    cols = (point[:, 0] * width).clamp(max=width - 1).long()
    image[0, rows, cols] = 1.0
    fn = {"hflip": hflip, "vflip": vflip, "rot1": lambda i, g: rot90(i, g, 1), "rot2": lambda i, g: rot90(i, g, 2),
          "rot3": lambda i, g: rot90(i, g, 3),
          "dihedral": lambda i, g: RandomDihedral()(i, g, torch.Generator().manual_seed(5))}[op]
    out_image, out = fn(image, graph)
    h, w = out_image.shape[-2:]
    moved = out["point"].pos[:, 0]
    # pixel centres: the anchor inside pixel (r, c) maps into the transformed pixel
    r = (moved[:, 1] * h).clamp(max=h - 1).long()
    c = (moved[:, 0] * w).clamp(max=w - 1).long()
    near = torch.stack([out_image[0, max(0, int(a) - 1):int(a) + 2, max(0, int(b) - 1):int(b) + 2].max()
                        for a, b in zip(r, c)])
    assert (near == 1.0).all()


def test_dihedral_covers_the_eight_symmetries_like_flip_then_rot90(graph):
    image = torch.arange(12.0).reshape(1, 3, 4)
    seen = {tuple(RandomDihedral()(image, graph, torch.Generator().manual_seed(s))[0].flatten().tolist())
            for s in range(64)}
    expected = set()
    for k in range(4):
        for flip in (False, True):
            turned = torch.rot90(image, k, dims=(1, 2))
            expected.add(tuple((turned.flip(-1) if flip else turned).flatten().tolist()))
    assert seen == expected and len(expected) == 8


def test_random_transforms_are_deterministic_and_leave_inputs_alone(graph):
    image = torch.rand(3, 64, 48)
    image_before, before = image.clone(), snapshot(graph)
    transform = default_train_transform(32)
    a_image, a = transform(image, graph, torch.Generator().manual_seed(7))
    b_image, b = transform(image, graph, torch.Generator().manual_seed(7))
    assert torch.equal(a_image, b_image)
    for t in NODE_TYPES:
        assert torch.equal(a[t].pos, b[t].pos)
    outputs = {transform(image, graph, torch.Generator().manual_seed(s))[0].sum().item() for s in range(8)}
    assert len(outputs) > 1
    assert torch.equal(image, image_before)
    assert_unchanged(graph, before)
    assert_valid(a)


def test_uint8_images_work_like_float(graph):
    image = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    transform = Compose([RandomResizedCrop(24), RandomFlip(), RandomRot90()])
    out_u8, g_u8 = transform(image, graph, torch.Generator().manual_seed(1))
    out_f, g_f = transform(image.float() / 255, graph, torch.Generator().manual_seed(1))
    assert out_u8.dtype == torch.uint8 and out_u8.shape == out_f.shape == (3, 24, 24)
    assert (out_u8.float() / 255 - out_f).abs().max() < 0.05
    for t in NODE_TYPES:
        assert torch.equal(g_u8[t].pos, g_f[t].pos)


def test_color_jitter_changes_only_the_image(graph):
    image = torch.rand(3, 16, 16)
    jitter = ColorJitter(0.5, 0.5, 0.5, p=1.0)
    out, g = jitter(image, graph, torch.Generator().manual_seed(0))
    assert g is graph and not torch.equal(out, image)
    assert out.min() >= 0 and out.max() <= 1
    same, _ = ColorJitter(0.0, 0.0, 0.0, p=1.0)(image, graph)
    assert torch.allclose(same, image, atol=1e-6)
    gray = image.mean(0, keepdim=True).expand(3, -1, -1).contiguous()
    desaturated, _ = ColorJitter(0.0, 0.0, 0.0, p=1.0)(gray, graph)
    assert torch.allclose(desaturated, gray, atol=1e-6)


def test_crop_of_graph_with_empty_types():
    import shapely

    from geolink.graph.build import OSMGraphBuilder
    from tests.data_helpers import BBOX

    g = OSMGraphBuilder(None).build([(shapely.box(10.002, 50.002, 10.003, 50.003), {"building": "yes"})], BBOX,
                                    vocabulary=TagVocabulary(), materialize=False)
    out_image, out = RandomResizedCrop(16)(torch.rand(3, 20, 20), g, torch.Generator().manual_seed(0))
    assert out["line"].pos.shape == (0, 3, 2) and out["point"].pos.shape == (0, 1, 2)
    assert set(out.edge_types) == set(EDGE_TYPES)
    assert_valid(out)


# ---------------------------------------------------------------------------------------------- image-only and masks
GEOMETRIC = {
    "hflip": lambda i, t, g: hflip(i, t), "vflip": lambda i, t, g: vflip(i, t), "rot3": lambda i, t, g: rot90(i, t, 3),
    "flip": RandomFlip(1.0, 1.0), "rot90": RandomRot90(), "dihedral": RandomDihedral(), "crop": RandomCrop(12),
    "pad_crop": RandomCrop(40, fill=7), "center": CenterCrop((10, 14)),
}


@pytest.mark.parametrize("name", sorted(GEOMETRIC))
def test_masks_move_with_the_image_pixel_for_pixel(name):
    mask = torch.randint(0, 5, (20, 30))
    image = torch.stack([mask.float(), -mask.float()])  # the image carries the mask in its bands
    for seed in range(4):
        out_image, out_mask = GEOMETRIC[name](image, mask, torch.Generator().manual_seed(seed))
        assert out_mask.dtype == mask.dtype and out_mask.shape == out_image.shape[-2:]
        if name == "pad_crop":  # 20 × 30 padded at the bottom / right: masks with the fill, images with 0
            assert out_mask.shape == (40, 40) and (out_mask[20:] == 7).all() and (out_mask[:, 30:] == 7).all()
        real = out_mask != 7  # mask values are 0-4
        assert torch.equal(out_mask[real], out_image[0].long()[real]) and (out_image[:, ~real] == 0).all()


def test_image_only_calls_draw_the_same_boxes_as_joint_ones(graph):
    image = torch.rand(3, 48, 64)
    for transform in (RandomResizedCrop(24), default_train_transform(24), RandomCrop(16), RandomDihedral()):
        alone, target = transform(image, None, torch.Generator().manual_seed(3))
        joint, _ = transform(image, graph, torch.Generator().manual_seed(3))
        assert target is None and torch.equal(alone, joint)


def test_resized_crop_resizes_masks_nearest_and_tuples_carry_mask_and_graph(graph):
    mask = torch.randint(0, 4, (48, 64))
    image = torch.rand(3, 48, 64)
    out_image, (out_mask, out_graph) = Compose([RandomResizedCrop(24), RandomFlip()])(
        image, (mask, graph), torch.Generator().manual_seed(0))
    alone_image, alone_graph = Compose([RandomResizedCrop(24), RandomFlip()])(image, graph,
                                                                             torch.Generator().manual_seed(0))
    assert out_mask.shape == (24, 24) and set(out_mask.unique().tolist()) <= set(mask.unique().tolist())
    assert torch.equal(out_image, alone_image)
    for t in NODE_TYPES:
        assert torch.equal(out_graph[t].pos, alone_graph[t].pos)
    resized_image, resized_mask = Resize((24, 32))(image, mask)
    assert resized_image.shape == (3, 24, 32) and torch.equal(resized_mask, mask[::2, ::2])  # nearest: every 2nd


def test_center_crop_and_short_side_resize_match_torchvision():
    from torchvision.transforms import functional as tvf

    image = torch.rand(3, 50, 81)
    resized, _ = ResizeShortSide(32, interpolation="bicubic")(image)
    expected = tvf.resize(image, 32, interpolation=tvf.InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
    assert resized.shape == expected.shape == (3, 32, 51)
    torch.testing.assert_close(resized, expected)
    cropped, _ = CenterCrop(32)(resized)
    assert torch.equal(cropped, tvf.center_crop(resized, [32, 32]))


def test_eval_and_train_transforms_of_pil_images_stay_close_to_the_torchvision_stacks():
    from PIL import Image
    from torchvision import transforms as tv

    from geolink.eval.data import eval_transform, train_transform

    pixels = (np.add.outer(np.arange(60), np.arange(90))[..., None] * np.array([1, 2, 3]) % 256).astype(np.uint8)
    picture = Image.fromarray(pixels)
    ours = eval_transform(32)(picture)
    theirs = tv.Compose([tv.Resize(32, interpolation=tv.InterpolationMode.BICUBIC, antialias=True), tv.CenterCrop(32),
                         tv.ToTensor()])(picture)
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape == (3, 32, 32)
    assert (ours - theirs).abs().mean() < 0.02  # PIL's and torch's bicubic kernels differ by rounding only
    augmented = train_transform(32)(picture)
    levels = augmented * 255
    # bicubic on 8-bit input is rounded back to 8 bits (its overshoot clamped), as PIL does
    assert augmented.shape == (3, 32, 32) and (levels - levels.round()).abs().max() < 1e-4
    assert torch.equal(ImageTransform(Compose([]))(torch.from_numpy(pixels).permute(2, 0, 1)),
                       torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
