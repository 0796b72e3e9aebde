"""Downstream heads and task models: linear classifier, multi-scale neck, UPerNet, siamese change detection.

Heads take plain tensors, so they work on any encoder:

- :class:`LinearClassifier`: ``[B, D] -> [B, K]`` (optionally the MAE linear-probe BatchNorm without affine first).
- :class:`MultiScaleNeck`: turns four same-resolution ViT maps (all at 1/16) into a 1/4, 1/8, 1/16, 1/32 pyramid
  (deconv ×4, deconv ×2, identity, max-pool ×½), as mmseg's ViT-UPerNet and the ViT-adapter recipes do.
- :class:`UPerNetHead`: PPM on the last map + FPN (lateral 1×1, top-down sum, 3×3 smoothing) + fusion of all levels
  → per-pixel logits. ``in_channels`` is a list, e.g. ``[D] * 4`` for image intermediates or
  ``GeoLinkFusionEncoder.out_channels`` for fusion maps.

Task models wrap an encoder and a head and return logits at the input resolution:

- :class:`ImageClassifier` (global features → linear), :class:`ImageSegmenter` (``forward_intermediates`` →
  UPerNet), :class:`FusionSegmenter` (fusion maps → UPerNet), :class:`SiameseChangeDetector` (one shared encoder on
  both dates, ``|f_a - f_b|`` per level → UPerNet).

Image encoders are anything with timm's ``forward_intermediates(x, indices, output_fmt="NCHW",
intermediates_only=True)`` — ``GeoLinkImageEncoder`` and timm ViTs alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.data import HeteroData

from geolink.errors import ConfigError, InputError
from geolink.models.image import GeoLinkImageEncoder

NORMS = ("bn", "gn", "none")
POOLS = ("avg", "token", "default")


def global_features(model: nn.Module, images: torch.Tensor, pool: str = "avg") -> torch.Tensor:
    """Global features ``[B, D]`` of normalised images ``[B, C, H, W]``, the same rule for every encoder.

    - ``GeoLinkImageEncoder``: ``pooled_features`` (``"avg"``/``"default"`` = mean of final-normed patch tokens,
      ``"token"`` = cls token);
    - timm ViTs (``num_prefix_tokens``): the same poolings on ``forward_features``; ``"default"`` = the model's
      own ``forward_head(pre_logits=True)``;
    - other timm models (CNNs): ``forward_head(pre_logits=True)``;
    - anything else: ``model(images)``, which must be ``[B, D]``.
    """
    if pool not in POOLS:
        raise ConfigError(f"pool must be one of {POOLS}, got {pool!r}")
    if isinstance(model, GeoLinkImageEncoder):
        return model.pooled_features(images, pool="avg" if pool == "default" else pool)
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        features = model.forward_features(images)
        prefix = getattr(model, "num_prefix_tokens", None)
        if pool == "token" and not prefix:
            raise ConfigError(f"{type(model).__name__} has no class token; use pool='avg' or 'default'")
        if pool == "default" or prefix is None or features.dim() != 3:
            return model.forward_head(features, pre_logits=True)
        return features[:, 0] if pool == "token" else features[:, prefix:].mean(dim=1)
    out = model(images)
    if out.dim() != 2:
        raise ConfigError(f"{type(model).__name__}(images) returned shape {tuple(out.shape)}; a global encoder must "
                         "return [B, D]")
    return out


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        # at most 32 groups of at least two channels, so a 1×1 PPM map still has statistics
        groups = next((g for g in (32, 16, 8, 4, 2) if channels % g == 0 and channels // g >= 2), 1)
        return nn.GroupNorm(groups, channels)
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"norm must be one of {NORMS}, got {kind!r}")


class ConvNormAct(nn.Sequential):
    """Conv (no bias when normalised) → norm → ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, norm: str = "bn") -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=norm == "none"),
            _norm(norm, out_channels),
            nn.ReLU(inplace=True),
        )


class LinearClassifier(nn.Module):
    """Linear classification head ``[B, D] -> [B, K]``.

    Args:
        in_dim: feature width D.
        num_classes: K.
        batch_norm: put a ``BatchNorm1d(D, affine=False)`` in front (the MAE linear-probe recipe: it standardises
            frozen features and is folded into the linear layer at inference).
        dropout: dropout on the features (training only).
    """

    def __init__(self, in_dim: int, num_classes: int, batch_norm: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"num_classes must be positive, got {num_classes}")
        self.norm = nn.BatchNorm1d(in_dim, affine=False, eps=1e-6) if batch_norm else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, D] -> [B, K]`` logits."""
        return self.fc(self.dropout(self.norm(features)))


class MultiScaleNeck(nn.Module):
    """Rescale same-resolution maps into a feature pyramid (ViT → FPN input).

    Args:
        in_channels: channels of each input map (length = number of levels).
        scales: resize factor per level; each of ``4`` (two stride-2 deconvs with norm + GELU between), ``2`` (one
            deconv), ``1`` (identity), ``0.5`` (2×2 max-pool) or ``0.25`` (4×4 max-pool). Default for four levels:
            ``(4, 2, 1, 0.5)``.
        norm: norm between the two ×4 deconvs (``"bn"``, ``"gn"`` or ``"none"``).
    """

    def __init__(self, in_channels: Sequence[int], scales: Sequence[float] | None = None, norm: str = "bn") -> None:
        super().__init__()
        in_channels = list(in_channels)
        if scales is None:
            if len(in_channels) != 4:
                raise ConfigError(f"pass scales for {len(in_channels)} levels (the default (4, 2, 1, 0.5) is for 4)")
            scales = (4, 2, 1, 0.5)
        if len(scales) != len(in_channels):
            raise ConfigError(f"{len(scales)} scales for {len(in_channels)} input maps")
        self.scales = tuple(scales)
        ops = []
        for channels, scale in zip(in_channels, self.scales):
            if scale == 4:
                ops.append(nn.Sequential(nn.ConvTranspose2d(channels, channels, 2, stride=2), _norm(norm, channels),
                                         nn.GELU(), nn.ConvTranspose2d(channels, channels, 2, stride=2)))
            elif scale == 2:
                ops.append(nn.ConvTranspose2d(channels, channels, 2, stride=2))
            elif scale == 1:
                ops.append(nn.Identity())
            elif scale in (0.5, 0.25):
                size = int(round(1 / scale))
                ops.append(nn.MaxPool2d(size, stride=size, ceil_mode=True))
            else:
                raise ConfigError(f"unsupported neck scale {scale}; use 4, 2, 1, 0.5 or 0.25")
        self.ops = nn.ModuleList(ops)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``[B, C_i, h, w]`` each -> level i at ``scale_i · (h, w)`` (max-pooling rounds up)."""
        if len(features) != len(self.ops):
            raise InputError(f"neck built for {len(self.ops)} maps, got {len(features)}")
        return [op(x) for op, x in zip(self.ops, features)]


class PyramidPooling(nn.Module):
    """PSPNet pyramid pooling: adaptive average pools at ``pool_scales``, 1×1 conv, upsampled and concatenated with
    the input, then a 3×3 bottleneck: ``[B, C_in, h, w] -> [B, channels, h, w]``."""

    def __init__(self, in_channels: int, channels: int, pool_scales: Sequence[int] = (1, 2, 3, 6),
                 norm: str = "bn") -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            [nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvNormAct(in_channels, channels, 1, norm)) for s in pool_scales])
        self.bottleneck = ConvNormAct(in_channels + len(pool_scales) * channels, channels, 3, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(stage(x), size=size, mode="bilinear", align_corners=False) for stage in self.stages]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class UPerNetHead(nn.Module):
    """UPerNet decoder (Xiao et al. 2018) over multi-level maps.

    The last map goes through :class:`PyramidPooling`; the others get a 1×1 lateral conv; a top-down pass adds each
    coarser level (bilinearly resized) to the finer one; every level but the PPM one gets a 3×3 conv; all levels are
    resized to the finest, concatenated and fused by a 3×3 conv; dropout + 1×1 conv give the logits.

    Args:
        in_channels: channels of each input map, finest first (e.g. ``[192, 192, 192, 128]`` for a tiny fusion
            encoder).
        num_classes: K.
        channels: decoder width (512 in mmseg's ViT-UPerNet, 256 is plenty for fine-tuning).
        pool_scales: PPM scales.
        neck: prepend :class:`MultiScaleNeck` (for ViT maps that all share one resolution). ``True`` = default
            scales ``(4, 2, 1, 0.5)``; a sequence = those scales; ``False`` = maps are already a pyramid.
        norm: ``"bn"`` (the UPerNet default; train with batches ≥ 2), ``"gn"`` (batch-size independent) or
            ``"none"``.
        dropout: ``Dropout2d`` before the classifier.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 256,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), neck: bool | Sequence[float] = True, norm: str = "bn",
                 dropout: float = 0.1) -> None:
        super().__init__()
        in_channels = list(in_channels)
        if len(in_channels) < 2:
            raise ConfigError(f"UPerNet needs at least two input levels, got in_channels={in_channels}")
        if num_classes < 1:
            raise ConfigError(f"num_classes must be positive, got {num_classes}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        if neck is False or neck is None:
            self.neck: nn.Module | None = None
        else:
            self.neck = MultiScaleNeck(in_channels, None if neck is True else list(neck), norm=norm)
        self.ppm = PyramidPooling(in_channels[-1], channels, pool_scales, norm)
        self.lateral = nn.ModuleList([ConvNormAct(c, channels, 1, norm) for c in in_channels[:-1]])
        self.smooth = nn.ModuleList([ConvNormAct(channels, channels, 3, norm) for _ in in_channels[:-1]])
        self.fuse = ConvNormAct(len(in_channels) * channels, channels, 3, norm)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward_features(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Multi-level maps (finest first) -> fused decoder map ``[B, channels, h_0, w_0]`` at the finest level
        (after the neck, if any)."""
        if len(features) != len(self.in_channels):
            raise InputError(f"UPerNet built for {len(self.in_channels)} levels, got {len(features)} maps")
        for i, (x, c) in enumerate(zip(features, self.in_channels)):
            if x.dim() != 4 or x.shape[1] != c:
                raise InputError(f"level {i}: expected [B, {c}, h, w], got {tuple(x.shape)}")
        if self.neck is not None:
            features = self.neck(features)
        levels = [conv(x) for conv, x in zip(self.lateral, features[:-1])] + [self.ppm(features[-1])]
        for i in range(len(levels) - 1, 0, -1):  # top-down
            levels[i - 1] = levels[i - 1] + F.interpolate(levels[i], size=levels[i - 1].shape[-2:], mode="bilinear",
                                                          align_corners=False)
        outs = [conv(x) for conv, x in zip(self.smooth, levels[:-1])] + [levels[-1]]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in outs[1:]]
        return self.fuse(torch.cat(outs, dim=1))

    def forward(self, features: Sequence[torch.Tensor], output_size: Sequence[int] | None = None) -> torch.Tensor:
        """Multi-level maps -> logits ``[B, K, h_0, w_0]``, or ``[B, K, *output_size]`` (bilinear) when given."""
        logits = self.classifier(self.dropout(self.forward_features(features)))
        if output_size is not None:
            logits = F.interpolate(logits, size=tuple(output_size), mode="bilinear", align_corners=False)
        return logits


def _encoder_out_indices(encoder: nn.Module, out_indices: Sequence[int] | None) -> list[int]:
    if out_indices is not None:
        return list(out_indices)
    if hasattr(encoder, "default_out_indices"):
        return list(encoder.default_out_indices)
    depth = len(getattr(encoder, "blocks", []))
    if not depth:
        raise ConfigError(f"cannot infer output blocks of {type(encoder).__name__}; pass out_indices")
    return [depth // 3 - 1, depth // 2 - 1, 2 * depth // 3 - 1, depth - 1]


def _embed_dim(encoder: nn.Module) -> int:
    dim = getattr(encoder, "embed_dim", None) or getattr(encoder, "num_features", None)
    if dim is None:
        raise ConfigError(f"cannot infer the width of {type(encoder).__name__}; it needs embed_dim or num_features")
    return int(dim)


class ImageClassifier(nn.Module):
    """Image encoder + :class:`LinearClassifier` on its global features: ``[B, C, H, W] -> [B, K]``.

    Args:
        encoder: a ``GeoLinkImageEncoder`` or timm model (see :func:`geolink.eval.encoders.encode_images`).
        num_classes: K.
        pool: ``"avg"`` (mean of patch tokens), ``"token"`` (cls token) or ``"default"`` (the model's own pooling).
        batch_norm, dropout: see :class:`LinearClassifier`.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, pool: str = "avg", batch_norm: bool = False,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.encoder = encoder
        self.pool = pool
        self.head = LinearClassifier(_embed_dim(encoder), num_classes, batch_norm=batch_norm, dropout=dropout)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(global_features(self.encoder, images, self.pool))


class ImageSegmenter(nn.Module):
    """Image encoder intermediates + :class:`UPerNetHead`: ``[B, C, H, W] -> [B, K, H, W]`` logits.

    Args:
        encoder: anything with timm's ``forward_intermediates`` (``GeoLinkImageEncoder``, timm ViTs).
        num_classes: K.
        out_indices: blocks to read (default the encoder's ``default_out_indices``, ``[3, 5, 7, 11]`` for 12 blocks).
        **head_kwargs: :class:`UPerNetHead` options (``channels``, ``neck``, ``norm``, ``dropout``, ...).
    """

    def __init__(self, encoder: nn.Module, num_classes: int, out_indices: Sequence[int] | None = None,
                 **head_kwargs) -> None:
        super().__init__()
        self.encoder = encoder
        self.out_indices = _encoder_out_indices(encoder, out_indices)
        self.head = UPerNetHead([_embed_dim(encoder)] * len(self.out_indices), num_classes, **head_kwargs)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The encoder maps ``[B, D, H/p, W/p]`` at ``out_indices``."""
        return list(self.encoder.forward_intermediates(images, indices=self.out_indices, output_fmt="NCHW",
                                                       intermediates_only=True))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images), output_size=images.shape[-2:])


class FusionSegmenter(nn.Module):
    """``GeoLinkFusionEncoder`` maps + :class:`UPerNetHead`: ``(images [B, C, H, W], graphs) -> [B, K, H, W]``.

    Args:
        encoder: a ``GeoLinkFusionEncoder`` (its ``out_channels`` size the head).
        num_classes: K.
        **head_kwargs: :class:`UPerNetHead` options.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, **head_kwargs) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = UPerNetHead(list(encoder.out_channels), num_classes, **head_kwargs)

    def forward(self, images: torch.Tensor, graphs: HeteroData) -> torch.Tensor:
        """``graphs``: a ``Batch`` of B graphs (``Batch.from_data_list``) or one ``HeteroData`` when B = 1."""
        return self.head(self.encoder(images, graphs), output_size=images.shape[-2:])


class SiameseChangeDetector(nn.Module):
    """Siamese change detection: one shared image encoder on both dates, per-level feature differences, UPerNet.

    Both dates run through the encoder in one batch; level ``i`` of the decoder input is ``|f_a - f_b|``
    (``fusion="absdiff"``, symmetric in the dates) or ``[f_a, f_b, |f_a - f_b|]`` concatenated (``"concat"``).

    Args:
        encoder: anything with timm's ``forward_intermediates`` (``GeoLinkImageEncoder``, timm ViTs).
        num_classes: 2 for change / no change (more for semantic change).
        out_indices: blocks to read (default the encoder's ``default_out_indices``).
        fusion: ``"absdiff"`` or ``"concat"``.
        **head_kwargs: :class:`UPerNetHead` options.
    """

    FUSIONS = ("absdiff", "concat")

    def __init__(self, encoder: nn.Module, num_classes: int = 2, out_indices: Sequence[int] | None = None,
                 fusion: str = "absdiff", **head_kwargs) -> None:
        super().__init__()
        if fusion not in self.FUSIONS:
            raise ConfigError(f"fusion must be one of {self.FUSIONS}, got {fusion!r}")
        self.encoder = encoder
        self.fusion = fusion
        self.out_indices = _encoder_out_indices(encoder, out_indices)
        width = _embed_dim(encoder) * (3 if fusion == "concat" else 1)
        self.head = UPerNetHead([width] * len(self.out_indices), num_classes, **head_kwargs)

    def forward(self, images_a: torch.Tensor, images_b: torch.Tensor) -> torch.Tensor:
        """``images_a``, ``images_b``: ``[B, C, H, W]`` (same size) -> ``[B, K, H, W]`` logits."""
        if images_a.shape != images_b.shape:
            raise InputError(f"the two dates must have the same shape, got {tuple(images_a.shape)} and "
                             f"{tuple(images_b.shape)}")
        maps = self.encoder.forward_intermediates(torch.cat([images_a, images_b]), indices=self.out_indices,
                                                  output_fmt="NCHW", intermediates_only=True)
        batch = images_a.shape[0]
        levels = []
        for m in maps:
            a, b = m[:batch], m[batch:]
            levels.append((a - b).abs() if self.fusion == "absdiff" else torch.cat([a, b, (a - b).abs()], dim=1))
        return self.head(levels, output_size=images_a.shape[-2:])
