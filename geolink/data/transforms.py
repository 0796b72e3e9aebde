"""Joint image + OSM-graph augmentations that keep the two aligned.

Owns :class:`JointTransform` and its implementations. A transform maps ``(image, graph, generator)`` to a new
``(image, graph)``: ``image`` is a float ``[C, H, W]`` tensor in ``[0, 1]`` or uint8 in ``[0, 255]`` (the first
transform that computes on pixels converts it to float; normalisation comes after augmentation, in the dataset),
``graph`` a DESIGN §3 ``HeteroData`` (compact ``tags``/``tag_weight`` or ``x``, all nine edge types). Anchors are
normalised image coordinates (``u`` left→right, ``v`` top→bottom), so geometric transforms of the image are
mirrored exactly on ``g[t].pos``. Randomness comes only from the ``torch.Generator`` argument (the global RNG when
None), so a seeded generator reproduces a sample exactly. The input graph is never modified: outputs are shallow
copies with new tensors where something changed.

Crop semantics: a node survives a crop when its **representative anchor** lies inside the crop (closed box):
the centroid for polygons (last anchor) and lines (first anchor), the point itself for points. Its anchors are then
renormalised to the crop and clamped to ``[0, 1]``; edges survive when both ends survive and are re-indexed with a
vectorised lookup; ``edge_attr`` rows are kept. Delaunay point edges are not recomputed (the survivors keep their
original triangulation edges).
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch_geometric.data import HeteroData

from geolink.graph.schema import NODE_TYPES

REPRESENTATIVE_ANCHOR: dict[str, int] = {"polygon": 3, "line": 0, "point": 0}
"""Index in ``g[t].pos[:, :, :]`` of the anchor that decides whether a node survives a crop (the centroid)."""


def as_float(image: torch.Tensor) -> torch.Tensor:
    """``image`` as float32 in ``[0, 1]`` (uint8 ``[0, 255]`` is scaled; float is returned as is)."""
    return image.float().div_(255.0) if image.dtype == torch.uint8 else image.float()


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _shallow(graph: HeteroData) -> HeteroData:
    """A copy whose stores are new (attributes can be replaced) but whose tensors are shared."""
    return copy.copy(graph)


def _map_pos(graph: HeteroData, fn) -> HeteroData:
    out = _shallow(graph)
    for _, store in out.node_items():
        if "pos" in store:
            store.pos = fn(store.pos)
    return out


class JointTransform(ABC):
    """Base class: ``transform(image [C, H, W], graph, generator) -> (image, graph)``."""

    @abstractmethod
    def __call__(self, image: torch.Tensor, graph: HeteroData, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, HeteroData]:
        """Return the transformed ``(image, graph)``; draw randomness only from ``generator``."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class Compose(JointTransform):
    """Apply ``transforms`` in order with the same generator."""

    def __init__(self, transforms: Sequence[JointTransform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, graph: HeteroData, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, HeteroData]:
        for transform in self.transforms:
            image, graph = transform(image, graph, generator)
        return image, graph


# ---------------------------------------------------------------------------------------------- crop


def crop_graph(graph: HeteroData, box: tuple[float, float, float, float]) -> HeteroData:
    """The graph seen through the normalised crop ``box = (u0, v0, width, height)`` (see the module docstring).

    Node attributes with one row per node (``pos``, ``x``, ``tags``, ``tag_weight``, ...) are indexed by the kept
    mask; ``pos`` becomes ``clamp((pos - (u0, v0)) / (width, height), 0, 1)``; edges are filtered to surviving
    endpoints and re-indexed (a lookup table ``old id -> new id``); ``edge_attr`` rows follow their edges;
    ``g.bbox`` (west, south, east, north) shrinks to the crop (north-up tiles). Vectorised (numpy on the CPU
    tensors: these graphs are small, so per-op overhead dominates).
    """
    u0, v0, width, height = box
    origin = np.array([u0, v0], dtype=np.float32)
    scale = np.array([width, height], dtype=np.float32)
    out = _shallow(graph)
    sources, targets = dict(graph.node_items()), dict(out.node_items())  # one lookup per store (PyG is slow)
    keep: dict[str, np.ndarray] = {}
    remap: dict[str, np.ndarray] = {}
    for t in NODE_TYPES:
        store = sources[t]
        pos = (store.pos.numpy() - origin) / scale
        n = pos.shape[0]
        rep = pos[:, REPRESENTATIVE_ANCHOR[t]]
        mask = (rep >= 0).all(-1) & (rep <= 1).all(-1)
        kept = int(mask.sum())
        keep[t] = mask
        ids = np.full(n + 1, -1, dtype=np.int64)  # the extra slot keeps the lookup valid for empty types
        ids[:n][mask] = np.arange(kept)
        remap[t] = ids
        new = targets[t]
        if kept < n:
            for key, value in store.items():
                if key != "pos" and torch.is_tensor(value) and value.dim() and value.shape[0] == n:
                    new[key] = torch.from_numpy(value.numpy()[mask])
            new.num_nodes = kept
        new.pos = torch.from_numpy(np.clip(pos[mask], 0.0, 1.0))
    if any(not mask.all() for mask in keep.values()):  # otherwise every edge survives with the same indices
        edge_targets = dict(out.edge_items())
        for edge_type, store in graph.edge_items():
            src, _, dst = edge_type
            edge_index = store.edge_index.numpy()
            if not edge_index.size:
                continue
            alive = keep[src][edge_index[0]] & keep[dst][edge_index[1]]
            new = edge_targets[edge_type]
            new.edge_index = torch.from_numpy(np.stack([remap[src][edge_index[0, alive]],
                                                        remap[dst][edge_index[1, alive]]]))
            for key, value in store.items():
                if key != "edge_index" and torch.is_tensor(value) and value.dim() and value.shape[0] == alive.shape[0]:
                    new[key] = torch.from_numpy(value.numpy()[alive])
    bbox = getattr(graph, "bbox", None)
    if torch.is_tensor(bbox) and bbox.numel() == 4:
        west, south, east, north = bbox.reshape(4).tolist()
        dx, dy = east - west, north - south
        out.bbox = torch.tensor([[west + u0 * dx, north - (v0 + height) * dy, west + (u0 + width) * dx,
                                  north - v0 * dy]], dtype=bbox.dtype)
    return out


class RandomResizedCrop(JointTransform):
    """Crop a random area/aspect box (torchvision's sampling) and resize it to ``size``; nodes follow the crop.

    Args:
        size: output ``(H, W)`` or one int for a square.
        scale: range of the crop area as a fraction of the image area.
        ratio: range of the crop aspect ratio (width / height), sampled log-uniformly.
        antialias: antialias when downsampling (bilinear).
    """

    def __init__(self, size: int | tuple[int, int], scale: tuple[float, float] = (0.4, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), antialias: bool = True) -> None:
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < low <= high, got {ratio}")
        self.scale, self.ratio, self.antialias = tuple(scale), tuple(ratio), antialias

    def sample_box(self, height: int, width: int, generator: torch.Generator | None = None
                   ) -> tuple[int, int, int, int]:
        """Pixel crop ``(top, left, h, w)`` for an image of ``height × width`` (10 tries, then a centre crop)."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * _uniform(*self.scale, generator)
            aspect = math.exp(_uniform(*log_ratio, generator))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (), generator=generator))
                left = int(torch.randint(0, width - w + 1, (), generator=generator))
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: torch.Tensor, graph: HeteroData, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, HeteroData]:
        height, width = image.shape[-2:]
        top, left, h, w = self.sample_box(height, width, generator)
        patch = image[..., top:top + h, left:left + w]
        patch = resize_image(patch, self.size, self.antialias)
        return patch, crop_graph(graph, (left / width, top / height, w / width, h / height))


def resize_image(image: torch.Tensor, size: tuple[int, int], antialias: bool = True) -> torch.Tensor:
    """Bilinear resize of ``[C, H, W]`` to ``[C, *size]``, keeping the dtype.

    uint8 images are resized as uint8 (PyTorch's fused CPU kernel, about 3× faster than float); float images as
    float. A no-op when the image already has that size.
    """
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    shrink = image.shape[-2] > size[0] or image.shape[-1] > size[1]
    if image.dtype == torch.uint8:  # the uint8 kernel is the antialiased one; antialias changes nothing when growing
        return F.interpolate(image.unsqueeze(0), size=tuple(size), mode="bilinear", align_corners=False,
                             antialias=True)[0]
    return F.interpolate(image.float().unsqueeze(0), size=tuple(size), mode="bilinear", align_corners=False,
                         antialias=antialias and shrink)[0]


class Resize(JointTransform):
    """Resize the image to ``size`` (no randomness). Normalised anchors are unchanged by a resize."""

    def __init__(self, size: int | tuple[int, int], antialias: bool = True) -> None:
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.antialias = antialias

    def __call__(self, image: torch.Tensor, graph: HeteroData, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, HeteroData]:
        return resize_image(image, self.size, self.antialias), graph


# ---------------------------------------------------------------------------------------------- flips, rotations


def hflip(image: torch.Tensor, graph: HeteroData) -> tuple[torch.Tensor, HeteroData]:
    """Mirror left↔right: image columns reversed, ``u → 1 - u``."""
    scale, shift = torch.tensor([-1.0, 1.0]), torch.tensor([1.0, 0.0])
    return image.flip(-1), _map_pos(graph, lambda pos: pos * scale + shift)


def vflip(image: torch.Tensor, graph: HeteroData) -> tuple[torch.Tensor, HeteroData]:
    """Mirror top↔bottom: image rows reversed, ``v → 1 - v``."""
    scale, shift = torch.tensor([1.0, -1.0]), torch.tensor([0.0, 1.0])
    return image.flip(-2), _map_pos(graph, lambda pos: pos * scale + shift)


def rot90(image: torch.Tensor, graph: HeteroData, k: int = 1) -> tuple[torch.Tensor, HeteroData]:
    """Rotate by ``k × 90°`` counter-clockwise (``torch.rot90`` over (H, W)); one quarter turn maps an anchor
    ``(u, v) → (v, 1 - u)``."""
    k %= 4
    if k == 0:
        return image, graph

    def turn(pos: torch.Tensor) -> torch.Tensor:
        u, v = pos[..., 0], pos[..., 1]
        for _ in range(k):
            u, v = v, 1.0 - u
        return torch.stack([u, v], dim=-1)

    return torch.rot90(image, k, dims=(-2, -1)), _map_pos(graph, turn)


class RandomFlip(JointTransform):
    """Horizontal flip with probability ``horizontal``, then vertical flip with probability ``vertical``."""

    def __init__(self, horizontal: float = 0.5, vertical: float = 0.5) -> None:
        self.horizontal, self.vertical = float(horizontal), float(vertical)

    def __call__(self, image: torch.Tensor, graph: HeteroData, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, HeteroData]:
        draws = torch.rand(2, generator=generator)
        flip_u, flip_v = bool(draws[0] < self.horizontal), bool(draws[1] < self.vertical)
        if not (flip_u or flip_v):
            return image, graph
        dims = [d for d, flip in ((-1, flip_u), (-2, flip_v)) if flip]
        scale = torch.tensor([-1.0 if flip_u else 1.0, -1.0 if flip_v else 1.0])
        shift = torch.tensor([1.0 if flip_u else 0.0, 1.0 if flip_v else 0.0])
        return image.flip(dims), _map_pos(graph, lambda pos: pos * scale + shift)  # both flips in one pass


class RandomRot90(JointTransform):
    """Rotate by a uniformly drawn multiple of 90° (``ks`` are the allowed quarter turns)."""

    def __init__(self, ks: Sequence[int] = (0, 1, 2, 3)) -> None:
        self.ks = tuple(int(k) for k in ks)

    def __call__(self, image: torch.Tensor, graph: HeteroData, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, HeteroData]:
        k = self.ks[int(torch.randint(0, len(self.ks), (), generator=generator))]
        return rot90(image, graph, k)


class RandomDihedral(JointTransform):
    """One of the 8 symmetries of the square, uniformly: ``k`` quarter turns, then a left↔right mirror with
    probability 1/2.

    The same distribution as ``RandomFlip(0.5, 0.5)`` followed by ``RandomRot90()`` (a double flip is a half
    turn), applied as one image operation and one anchor map instead of up to three.
    """

    def __call__(self, image: torch.Tensor, graph: HeteroData, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, HeteroData]:
        code = int(torch.randint(0, 8, (), generator=generator))
        k, mirror = code % 4, code >= 4
        if k == 0 and not mirror:
            return image, graph
        if k:
            image = torch.rot90(image, k, dims=(-2, -1))
        if mirror:
            image = image.flip(-1)

        def move(pos: torch.Tensor) -> torch.Tensor:
            u, v = pos[..., 0], pos[..., 1]
            for _ in range(k):
                u, v = v, 1.0 - u
            return torch.stack([1.0 - u if mirror else u, v], dim=-1)

        return image, _map_pos(graph, move)


# ---------------------------------------------------------------------------------------------- colour


class ColorJitter(JointTransform):
    """Random brightness, contrast and saturation (in that order) on the image only, with probability ``p``.

    Each factor is drawn uniformly from ``[1 - amount, 1 + amount]``; the image (``[3, H, W]`` in ``[0, 1]``) is
    clamped to ``[0, 1]`` once, at the end (the three steps are fused into one affine map). The graph is returned
    unchanged (the same object).
    """

    _luma = torch.tensor([[0.299, 0.587, 0.114]])

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4, p: float = 0.8) -> None:
        self.brightness, self.contrast, self.saturation, self.p = brightness, contrast, saturation, p

    def __call__(self, image: torch.Tensor, graph: HeteroData, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, HeteroData]:
        draws = torch.rand(4, generator=generator)
        if draws[0] >= self.p:
            return image, graph
        b, c, s = (1 + amount * (2 * float(d) - 1) for amount, d in
                   zip((self.brightness, self.contrast, self.saturation), draws[1:]))
        image = as_float(image)
        if image.shape[0] != 3:
            mean = float(image.mean())
            return image.mul(b * c).add_(mean * b * (1 - c)).clamp_(0.0, 1.0), graph
        # brightness (x·b), contrast ((x - m)·c + m, m = mean grey) and saturation ((x - grey)·s + grey) compose
        # into one affine map of the image and its grey level: s·b·c·x + (1 - s)·b·c·grey + b·(1 - c)·m.
        gray = torch.matmul(self._luma, image.reshape(3, -1)).reshape(1, *image.shape[1:])
        shift = b * (1 - c) * float(gray.mean())
        out = image.mul(s * b * c).add_(gray, alpha=(1 - s) * b * c).add_(shift)
        return out.clamp_(0.0, 1.0), graph


def default_train_transform(size: int = 224) -> Compose:
    """The pretraining augmentation: ``RandomResizedCrop(size, scale=(0.4, 1))``, random flips and quarter turns
    (:class:`RandomDihedral`, i.e. ``RandomFlip()`` + ``RandomRot90()`` in one step), colour jitter (0.4
    brightness/contrast/saturation, p = 0.8)."""
    return Compose([RandomResizedCrop(size), RandomDihedral(), ColorJitter()])


def default_eval_transform(size: int = 224) -> Compose:
    """Deterministic: resize to ``size × size`` (anchors are resolution-independent)."""
    return Compose([Resize(size)])
