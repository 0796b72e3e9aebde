"""The one augmentation stack: image transforms that carry aligned targets (OSM graphs, masks) along.

Owns :class:`JointTransform` and its implementations. A transform maps ``(image, target, generator)`` to a new
``(image, target)``: ``image`` is a float ``[C, H, W]`` tensor in ``[0, 1]`` or uint8 in ``[0, 255]`` (the first
transform that computes on pixels converts it to float; normalisation comes after augmentation, with
:func:`geolink.runtime.normalise`). The target follows every geometric step of the image:

- ``None``: image-only augmentation (scene classification, :class:`ImageTransform` for torchvision-style datasets);
- a DESIGN §3 ``HeteroData`` graph (compact ``tags``/``tag_weight`` or ``x``, all nine edge types): anchors are
  normalised image coordinates (``u`` left→right, ``v`` top→bottom), so geometric transforms of the image are
  mirrored exactly on ``g[t].pos``;
- a mask tensor ``[H, W]`` (class ids): cropped, flipped and turned with the image, resized nearest-neighbour,
  padded with the transform's ``fill``;
- a tuple or list of those (e.g. ``(mask, graph)``), each moved the same way.

Several co-registered images (the two dates of change detection) are stacked along the band axis and move as one.
Randomness comes only from the ``torch.Generator`` argument (the global RNG when None), so a seeded generator
reproduces a sample exactly. Inputs are never modified: graph outputs are shallow copies with new tensors where
something changed.

Crop semantics for graphs: a node survives a crop when its **representative anchor** lies inside the crop (closed
box): the centroid for polygons (last anchor) and lines (first anchor), the point itself for points. Its anchors are
then renormalised to the crop and clamped to ``[0, 1]``; edges survive when both ends survive and are re-indexed
with a vectorised lookup; ``edge_attr`` rows are kept. Delaunay point edges are not recomputed (the survivors keep
their original triangulation edges).

Inference preprocessing lives here too: :class:`Preprocess` turns one image (PIL, numpy ``[H, W, C]``, tensor
``[C, H, W]``) into the normalised tensor a model expects, with timm's evaluation resize policy, and
:func:`model_data_config` reads a model's data config (input size, mean, std, resize policy; timm's keys) from its
image encoder. ``geolink.resolve_data_config`` and ``geolink.create_model_and_transforms`` (in the registry) build on
them.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch_geometric.data import HeteroData

from geolink.errors import ConfigError, InputError
from geolink.graph.schema import NODE_TYPES
from geolink.runtime import IMAGENET_MEAN, IMAGENET_STD, normalise

REPRESENTATIVE_ANCHOR: dict[str, int] = {"polygon": 3, "line": 0, "point": 0}
"""Index in ``g[t].pos[:, :, :]`` of the anchor that decides whether a node survives a crop (the centroid)."""

Target = HeteroData | torch.Tensor | tuple | list | None
"""What a transform carries along with the image (see the module docstring)."""


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


def map_target(target: Target, graph_fn: Callable[[HeteroData], HeteroData],
               mask_fn: Callable[[torch.Tensor], torch.Tensor]) -> Target:
    """Apply ``graph_fn`` to graphs and ``mask_fn`` to masks in ``target`` (None, one of them, or a tuple/list)."""
    if target is None:
        return None
    if isinstance(target, HeteroData):
        return graph_fn(target)
    if isinstance(target, torch.Tensor):
        return mask_fn(target)
    if isinstance(target, (tuple, list)):
        return type(target)(map_target(t, graph_fn, mask_fn) for t in target)
    raise TypeError(f"a transform target is None, a HeteroData graph, a mask tensor or a tuple of them; got "
                    f"{type(target).__name__}")


class JointTransform(ABC):
    """Base class: ``transform(image [C, H, W], target, generator) -> (image, target)``."""

    @abstractmethod
    def __call__(self, image: torch.Tensor, target: Target = None, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, Target]:
        """Return the transformed ``(image, target)``; draw randomness only from ``generator``."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class Compose(JointTransform):
    """Apply ``transforms`` in order with the same generator."""

    def __init__(self, transforms: Sequence[JointTransform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, target: Target = None, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, Target]:
        for transform in self.transforms:
            image, target = transform(image, target, generator)
        return image, target


class ImageTransform:
    """A joint transform as a one-argument image transform, for torchvision-style datasets (``ImageFolder``).

    Takes a PIL image or a ``[C, H, W]`` tensor (uint8 or float in ``[0, 1]``) and returns float ``[C, H, W]`` in
    ``[0, 1]``; randomness comes from the global torch RNG, as with torchvision's transforms.
    """

    def __init__(self, transform: JointTransform) -> None:
        self.transform = transform

    def __call__(self, image: Any) -> torch.Tensor:
        if not isinstance(image, torch.Tensor):
            image = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
        return as_float(self.transform(image)[0])

    def __repr__(self) -> str:
        return f"ImageTransform({self.transform!r})"


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
    """Crop a random area/aspect box (torchvision's sampling) and resize it to ``size``; targets follow the crop.

    Args:
        size: output ``(H, W)`` or one int for a square.
        scale: range of the crop area as a fraction of the image area.
        ratio: range of the crop aspect ratio (width / height), sampled log-uniformly.
        antialias: antialias when downsampling.
        interpolation: ``"bilinear"`` or ``"bicubic"`` (images; masks are always resized nearest-neighbour).
    """

    def __init__(self, size: int | tuple[int, int], scale: tuple[float, float] = (0.4, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), antialias: bool = True,
                 interpolation: str = "bilinear") -> None:
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < low <= high, got {ratio}")
        self.scale, self.ratio, self.antialias = tuple(scale), tuple(ratio), antialias
        self.interpolation = _check_interpolation(interpolation)

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

    def __call__(self, image: torch.Tensor, target: Target = None, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, Target]:
        height, width = image.shape[-2:]
        top, left, h, w = self.sample_box(height, width, generator)
        patch = resize_image(image[..., top:top + h, left:left + w], self.size, self.antialias, self.interpolation)
        return patch, map_target(target, lambda g: crop_graph(g, (left / width, top / height, w / width, h / height)),
                                 lambda m: resize_mask(m[..., top:top + h, left:left + w], self.size))


def _check_interpolation(interpolation: str) -> str:
    if interpolation not in ("bilinear", "bicubic"):
        raise ValueError(f"interpolation must be 'bilinear' or 'bicubic', got {interpolation!r}")
    return interpolation


def resize_image(image: torch.Tensor, size: tuple[int, int], antialias: bool = True,
                 interpolation: str = "bilinear") -> torch.Tensor:
    """Resize ``[C, H, W]`` to ``[C, *size]`` (bilinear or bicubic), keeping the dtype.

    Bilinear uint8 images are resized as uint8 (PyTorch's fused CPU kernel, about 3× faster than float); everything
    else as float (bicubic results are clamped to the input range, ``[0, 1]``, or rounded back to uint8). A no-op
    when the image already has that size.
    """
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    shrink = image.shape[-2] > size[0] or image.shape[-1] > size[1]
    if image.dtype == torch.uint8 and interpolation == "bilinear":
        # the uint8 kernel is the antialiased one; antialias changes nothing when growing
        return F.interpolate(image.unsqueeze(0), size=tuple(size), mode="bilinear", align_corners=False,
                             antialias=True)[0]
    out = F.interpolate(image.float().unsqueeze(0), size=tuple(size), mode=interpolation, align_corners=False,
                        antialias=antialias and shrink)[0]
    if interpolation == "bicubic":  # cubic weights overshoot
        out = out.round_().clamp_(0, 255).to(torch.uint8) if image.dtype == torch.uint8 else out.clamp_(0.0, 1.0)
    return out


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a class-id mask ``[..., H, W]`` to ``size`` (a no-op at that size)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    flat = mask.reshape(1, -1, *mask.shape[-2:]).float()
    return F.interpolate(flat, size=tuple(size), mode="nearest")[0].reshape(*mask.shape[:-2], *size).to(mask.dtype)


class Resize(JointTransform):
    """Resize the image to ``size`` (no randomness); masks nearest-neighbour, graph anchors unchanged (they are
    normalised coordinates)."""

    def __init__(self, size: int | tuple[int, int], antialias: bool = True, interpolation: str = "bilinear") -> None:
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.antialias, self.interpolation = antialias, _check_interpolation(interpolation)

    def __call__(self, image: torch.Tensor, target: Target = None, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, Target]:
        return (resize_image(image, self.size, self.antialias, self.interpolation),
                map_target(target, lambda g: g, lambda m: resize_mask(m, self.size)))


class ResizeShortSide(JointTransform):
    """Resize so the shorter side is ``size``, keeping the aspect ratio (torchvision's ``Resize(int)``: the longer
    side becomes ``int(size × long / short)``); masks nearest-neighbour, graph anchors unchanged."""

    def __init__(self, size: int, antialias: bool = True, interpolation: str = "bilinear") -> None:
        self.size, self.antialias, self.interpolation = size, antialias, _check_interpolation(interpolation)

    def __call__(self, image: torch.Tensor, target: Target = None, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, Target]:
        height, width = image.shape[-2:]
        size = ((self.size, int(self.size * width / height)) if height <= width
                else (int(self.size * height / width), self.size))
        return Resize(size, self.antialias, self.interpolation)(image, target)


def crop(image: torch.Tensor, target: Target, top: int, left: int, height: int, width: int, fill: int = 0
         ) -> tuple[torch.Tensor, Target]:
    """The pixel box ``(top, left, height, width)`` of image and target; a box reaching past the bottom / right
    edge is padded there (image with 0, masks with ``fill``; graphs need nothing: no node lies outside)."""
    full_h, full_w = image.shape[-2:]
    pad_h, pad_w = max(0, top + height - full_h), max(0, left + width - full_w)

    def cut(tensor: torch.Tensor, value: int) -> torch.Tensor:
        if pad_h or pad_w:
            tensor = pad_bottom_right(tensor, pad_h, pad_w, value)
        return tensor[..., top:top + height, left:left + width]

    box = (left / full_w, top / full_h, width / full_w, height / full_h)
    return cut(image, 0), map_target(target, lambda g: crop_graph(g, box), lambda m: cut(m, fill))


def pad_bottom_right(tensor: torch.Tensor, pad_h: int, pad_w: int, value: float = 0) -> torch.Tensor:
    """Pad the last two axes of ``tensor`` (image ``[C, H, W]`` or mask ``[H, W]``) by ``pad_h`` rows and ``pad_w``
    columns of ``value`` at the bottom / right."""
    return F.pad(tensor, (0, pad_w, 0, pad_h), value=value) if pad_h or pad_w else tensor


class _Crop(JointTransform):
    """A ``size`` crop at the position :meth:`origin` picks; images smaller than ``size`` are padded at the bottom /
    right first (image with 0, masks with ``fill``, e.g. the ignore index), so every output is ``size``."""

    def __init__(self, size: int | tuple[int, int], fill: int = 255) -> None:
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.fill = fill

    @abstractmethod
    def origin(self, height: int, width: int, generator: torch.Generator | None) -> tuple[int, int]:
        """``(top, left)`` of the crop in an image of ``height × width``."""

    def __call__(self, image: torch.Tensor, target: Target = None, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, Target]:
        top, left = self.origin(*image.shape[-2:], generator)
        return crop(image, target, top, left, *self.size, fill=self.fill)


class RandomCrop(_Crop):
    """A ``size`` crop at a uniformly drawn position (see :class:`_Crop` for padding)."""

    def origin(self, height: int, width: int, generator: torch.Generator | None) -> tuple[int, int]:
        top = int(torch.randint(0, max(0, height - self.size[0]) + 1, (), generator=generator))
        left = int(torch.randint(0, max(0, width - self.size[1]) + 1, (), generator=generator))
        return top, left


class CenterCrop(_Crop):
    """The central ``size`` box (torchvision's rounding: ``top = round((H - h) / 2)``; see :class:`_Crop` for
    padding)."""

    def origin(self, height: int, width: int, generator: torch.Generator | None) -> tuple[int, int]:
        return max(0, int(round((height - self.size[0]) / 2.0))), max(0, int(round((width - self.size[1]) / 2.0)))


# ---------------------------------------------------------------------------------------------- flips, rotations


def _flip_graph(graph: HeteroData, flip_u: bool, flip_v: bool) -> HeteroData:
    scale = torch.tensor([-1.0 if flip_u else 1.0, -1.0 if flip_v else 1.0])
    shift = torch.tensor([1.0 if flip_u else 0.0, 1.0 if flip_v else 0.0])
    return _map_pos(graph, lambda pos: pos * scale + shift)  # both flips in one pass


def hflip(image: torch.Tensor, target: Target = None) -> tuple[torch.Tensor, Target]:
    """Mirror left↔right: image (and mask) columns reversed, ``u → 1 - u``."""
    return image.flip(-1), map_target(target, lambda g: _flip_graph(g, True, False), lambda m: m.flip(-1))


def vflip(image: torch.Tensor, target: Target = None) -> tuple[torch.Tensor, Target]:
    """Mirror top↔bottom: image (and mask) rows reversed, ``v → 1 - v``."""
    return image.flip(-2), map_target(target, lambda g: _flip_graph(g, False, True), lambda m: m.flip(-2))


def _turn(pos: torch.Tensor, k: int, mirror: bool = False) -> torch.Tensor:
    u, v = pos[..., 0], pos[..., 1]
    for _ in range(k):
        u, v = v, 1.0 - u
    return torch.stack([1.0 - u if mirror else u, v], dim=-1)


def rot90(image: torch.Tensor, target: Target = None, k: int = 1) -> tuple[torch.Tensor, Target]:
    """Rotate by ``k × 90°`` counter-clockwise (``torch.rot90`` over (H, W)); one quarter turn maps an anchor
    ``(u, v) → (v, 1 - u)``."""
    k %= 4
    if k == 0:
        return image, target
    return torch.rot90(image, k, dims=(-2, -1)), map_target(target, lambda g: _map_pos(g, lambda p: _turn(p, k)),
                                                            lambda m: torch.rot90(m, k, dims=(-2, -1)))


class RandomFlip(JointTransform):
    """Horizontal flip with probability ``horizontal``, then vertical flip with probability ``vertical``."""

    def __init__(self, horizontal: float = 0.5, vertical: float = 0.5) -> None:
        self.horizontal, self.vertical = float(horizontal), float(vertical)

    def __call__(self, image: torch.Tensor, target: Target = None, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, Target]:
        draws = torch.rand(2, generator=generator)
        flip_u, flip_v = bool(draws[0] < self.horizontal), bool(draws[1] < self.vertical)
        if not (flip_u or flip_v):
            return image, target
        dims = [d for d, flip in ((-1, flip_u), (-2, flip_v)) if flip]
        return image.flip(dims), map_target(target, lambda g: _flip_graph(g, flip_u, flip_v), lambda m: m.flip(dims))


class RandomRot90(JointTransform):
    """Rotate by a uniformly drawn multiple of 90° (``ks`` are the allowed quarter turns)."""

    def __init__(self, ks: Sequence[int] = (0, 1, 2, 3)) -> None:
        self.ks = tuple(int(k) for k in ks)

    def __call__(self, image: torch.Tensor, target: Target = None, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, Target]:
        k = self.ks[int(torch.randint(0, len(self.ks), (), generator=generator))]
        return rot90(image, target, k)


class RandomDihedral(JointTransform):
    """One of the 8 symmetries of the square, uniformly: ``k`` quarter turns, then a left↔right mirror with
    probability 1/2.

    The same distribution as ``RandomFlip(0.5, 0.5)`` followed by ``RandomRot90()`` (a double flip is a half
    turn), applied as one image operation and one anchor map instead of up to three.
    """

    def __call__(self, image: torch.Tensor, target: Target = None, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, Target]:
        code = int(torch.randint(0, 8, (), generator=generator))
        k, mirror = code % 4, code >= 4
        if k == 0 and not mirror:
            return image, target

        def move(raster: torch.Tensor) -> torch.Tensor:
            if k:
                raster = torch.rot90(raster, k, dims=(-2, -1))
            return raster.flip(-1) if mirror else raster

        return move(image), map_target(target, lambda g: _map_pos(g, lambda p: _turn(p, k, mirror)), move)


# ---------------------------------------------------------------------------------------------- colour


class ColorJitter(JointTransform):
    """Random brightness, contrast and saturation (in that order) on the image only, with probability ``p``.

    Each factor is drawn uniformly from ``[1 - amount, 1 + amount]``; the image (``[3, H, W]`` in ``[0, 1]``) is
    clamped to ``[0, 1]`` once, at the end (the three steps are fused into one affine map). The target is returned
    unchanged (the same object).
    """

    _luma = torch.tensor([[0.299, 0.587, 0.114]])

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4, p: float = 0.8) -> None:
        self.brightness, self.contrast, self.saturation, self.p = brightness, contrast, saturation, p

    def __call__(self, image: torch.Tensor, target: Target = None, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, Target]:
        draws = torch.rand(4, generator=generator)
        if draws[0] >= self.p:
            return image, target
        b, c, s = (1 + amount * (2 * float(d) - 1) for amount, d in
                   zip((self.brightness, self.contrast, self.saturation), draws[1:]))
        image = as_float(image)
        if image.shape[0] != 3:
            mean = float(image.mean())
            return image.mul(b * c).add_(mean * b * (1 - c)).clamp_(0.0, 1.0), target
        # brightness (x·b), contrast ((x - m)·c + m, m = mean grey) and saturation ((x - grey)·s + grey) compose
        # into one affine map of the image and its grey level: s·b·c·x + (1 - s)·b·c·grey + b·(1 - c)·m.
        gray = torch.matmul(self._luma, image.reshape(3, -1)).reshape(1, *image.shape[1:])
        shift = b * (1 - c) * float(gray.mean())
        out = image.mul(s * b * c).add_(gray, alpha=(1 - s) * b * c).add_(shift)
        return out.clamp_(0.0, 1.0), target


def default_train_transform(size: int = 224) -> Compose:
    """The pretraining augmentation: ``RandomResizedCrop(size, scale=(0.4, 1))``, random flips and quarter turns
    (:class:`RandomDihedral`, i.e. ``RandomFlip()`` + ``RandomRot90()`` in one step), colour jitter (0.4
    brightness/contrast/saturation, p = 0.8)."""
    return Compose([RandomResizedCrop(size), RandomDihedral(), ColorJitter()])


def default_eval_transform(size: int = 224) -> Compose:
    """Deterministic: resize to ``size × size`` (anchors are resolution-independent)."""
    return Compose([Resize(size)])


# ---------------------------------------------------------------------------------------------- preprocessing


def model_data_config(model: Any) -> dict[str, Any]:
    """The data config of a model that takes images, read from its image encoder's timm ``pretrained_cfg``.

    Duck-typed (this layer does not know the model classes): the first of ``model``, its ``image_encoder`` (fusion
    and pretraining models), its ``encoder`` (task models) and so on down, that has a ``pretrained_cfg`` — in its
    ``hub_config()`` (a geolink image encoder, whose saved folder is a timm folder) or as an attribute (a timm
    model) — gives the config.

    Returns:
        ``{"input_size": (bands, H, W), "interpolation", "mean", "std", "crop_pct", "crop_mode"}`` (see
        :class:`Preprocess`); missing entries of a timm config take timm's defaults (bicubic, crop 0.875, centre).

    Raises:
        InputError: nothing in ``model`` takes images (e.g. an OSM encoder).
    """
    module = model
    while module is not None:
        cfg = module.hub_config().get("pretrained_cfg") if callable(getattr(module, "hub_config", None)) else None
        cfg = cfg or getattr(module, "pretrained_cfg", None)
        if cfg:
            bands = int(cfg["input_size"][0])
            return {"input_size": tuple(int(v) for v in cfg["input_size"]),
                    "interpolation": cfg.get("interpolation") or "bicubic",
                    "mean": tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN[:bands])),
                    "std": tuple(float(v) for v in cfg.get("std", IMAGENET_STD[:bands])),
                    "crop_pct": float(cfg.get("crop_pct") or 0.875), "crop_mode": cfg.get("crop_mode") or "center"}
        module = getattr(module, "image_encoder", None) or getattr(module, "encoder", None)
    raise InputError(f"{type(model).__name__} takes no images (no image encoder with a pretrained_cfg), so it has no "
                     "data config; pass a model that reads images (an image, fusion or pretraining model), or its "
                     "name")


def _chw_tensor(image: Any) -> torch.Tensor:
    """A PIL image, an ``[H, W(, C)]`` numpy array or a ``[(C, )H, W]`` tensor as a ``[C, H, W]`` tensor (uint8 or
    float, never sharing memory with a numpy input)."""
    if hasattr(image, "getbands"):  # PIL: palette and bilevel pixels are not band values
        image = np.array(image.convert("RGB") if image.mode in ("1", "P") else image)
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3):
            raise InputError(f"a numpy image is [H, W] or [H, W, C] (HWC, as PIL and OpenCV give); got shape "
                             f"{image.shape}")
        if image.dtype != np.uint8 and not np.issubdtype(image.dtype, np.floating):
            raise InputError(f"images are uint8 (0-255) or floats in [0, 1]; got a {image.dtype} array: scale it to "
                             "[0, 1] first (e.g. array / 65535 for 16-bit data, or by your sensor's range)")
        array = np.array(image, dtype=np.uint8 if image.dtype == np.uint8 else np.float32)
        return torch.from_numpy(array.reshape(*array.shape[:2], -1)).permute(2, 0, 1)
    if isinstance(image, torch.Tensor):
        if image.dim() == 4:
            raise InputError(f"preprocess takes one image [C, H, W]; got a batch of shape {tuple(image.shape)}: "
                             "use torch.stack([preprocess(image) for image in images])")
        if image.dim() not in (2, 3):
            raise InputError(f"an image tensor is [C, H, W] or [H, W]; got shape {tuple(image.shape)}")
        if image.dtype != torch.uint8 and not image.is_floating_point():
            raise InputError(f"images are uint8 (0-255) or floats in [0, 1]; got a {image.dtype} tensor: scale it to "
                             "[0, 1] first")
        return image if image.dim() == 3 else image.unsqueeze(0)
    raise InputError(f"preprocess takes a PIL image, a numpy array [H, W, C] or a tensor [C, H, W]; got "
                     f"{type(image).__name__}")


class Preprocess:
    """Turn one image into the normalised float tensor ``[C, H, W]`` a model expects (timm's evaluation transform).

    Build it from a data config: ``Preprocess(**geolink.resolve_data_config(model))``, or take the one
    ``geolink.create_model_and_transforms`` returns. The resize policy is timm's evaluation one: with
    ``crop_mode="center"`` the shorter side is resized to ``floor(size / crop_pct)`` (aspect kept; a non-square
    ``input_size`` resizes both sides to ``floor(H / crop_pct) × floor(W / crop_pct)``), then the central ``H × W``
    box is cut; ``crop_mode="squash"`` resizes both sides (aspect not kept) before that crop. The geolink models'
    default, ``crop_pct=1.0``, keeps the whole shorter side. Pixels are resized as floats in ``[0, 1]`` (antialiased
    when shrinking), whatever the input type, so a uint8 image and the same image as floats give the same output;
    :func:`geolink.runtime.normalise` then applies ``mean`` / ``std``.

    Accepted images: a PIL image (palette and bilevel images as RGB; an RGBA image has four bands), a numpy array
    ``[H, W, C]`` or ``[H, W]`` (uint8, or floats in ``[0, 1]``), a tensor ``[C, H, W]`` or ``[H, W]`` (uint8, or
    floats in ``[0, 1]``), with as many bands as ``mean`` has values. Batches:
    ``torch.stack([preprocess(image) for image in images])``. Inputs are never modified.

    Args:
        input_size: ``(bands, H, W)``, ``(H, W)`` or one int for a square output.
        mean, std: per-band normalisation, one value per band.
        interpolation: ``"bicubic"`` or ``"bilinear"``.
        crop_pct: fraction of the resized image kept by the centre crop, in ``(0, 1]``.
        crop_mode: ``"center"`` or ``"squash"`` (see above).

    Raises:
        ConfigError: ``mean``, ``std`` and the bands of ``input_size`` disagree, or an invalid ``crop_pct`` /
            ``crop_mode``.
    """

    def __init__(self, input_size: int | Sequence[int], mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, interpolation: str = "bicubic", crop_pct: float = 1.0,
                 crop_mode: str = "center") -> None:
        size = (input_size, input_size) if isinstance(input_size, int) else tuple(int(v) for v in input_size)
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        shape_ok = len(size) == 2 or (len(size) == 3 and size[0] == len(self.mean))
        if not shape_ok or len(self.mean) != len(self.std):
            raise ConfigError(f"input_size {input_size}, mean ({len(self.mean)} values) and std ({len(self.std)} "
                              "values) must agree: (bands, H, W) or (H, W), and one mean and std value per band")
        if not 0 < crop_pct <= 1:
            raise ConfigError(f"crop_pct is the kept fraction of the resized image, in (0, 1]; got {crop_pct}")
        if crop_mode not in ("center", "squash"):
            raise ConfigError(f"crop_mode must be 'center' or 'squash'; got {crop_mode!r}")
        self.size: tuple[int, int] = size[-2:]
        self.interpolation, self.crop_pct, self.crop_mode = interpolation, float(crop_pct), crop_mode
        scaled = tuple(math.floor(side / self.crop_pct) for side in self.size)
        resize = (ResizeShortSide(scaled[0], interpolation=interpolation)
                  if crop_mode == "center" and scaled[0] == scaled[1] else Resize(scaled, interpolation=interpolation))
        self.transform = Compose([resize, CenterCrop(self.size)])

    def __call__(self, image: Any) -> torch.Tensor:
        """The normalised float32 ``[C, H, W]`` tensor of ``image`` (see the class docstring for what it accepts).

        Raises:
            InputError: an unsupported type, shape or dtype, or a band count other than the normalisation's.
        """
        pixels = _chw_tensor(image)
        bands, expected = pixels.shape[0], len(self.mean)
        if bands != expected:
            hint = ""
            if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[0] == expected:
                hint = "; numpy arrays are read as [H, W, C]: pass a [C, H, W] array as torch.from_numpy(array)"
            elif isinstance(image, torch.Tensor) and image.dim() == 3 and image.shape[-1] == expected:
                hint = "; tensors are read as [C, H, W]: pass an [H, W, C] tensor as tensor.permute(2, 0, 1)"
            elif hasattr(image, "getbands") and bands == 4 and expected == 3:
                hint = "; for an RGBA image pass image.convert('RGB')"
            raise InputError(f"the image has {bands} bands but the preprocessing normalises {expected} (mean and std "
                             f"have {expected} values): pass {expected}-band images, or build the preprocessing with "
                             f"{bands} mean and std values{hint}")
        return normalise(self.transform(as_float(pixels))[0], self.mean, self.std)

    def __repr__(self) -> str:
        return (f"Preprocess(input_size={(len(self.mean), *self.size)}, mean={self.mean}, std={self.std}, "
                f"interpolation={self.interpolation!r}, crop_pct={self.crop_pct}, crop_mode={self.crop_mode!r})")
