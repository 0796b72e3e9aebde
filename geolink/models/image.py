"""The GeoLink image encoder: a stock timm ViT trunk with a fixed 2-D sin-cos position table.

The trunk is an unmodified ``timm`` ``VisionTransformer`` (``num_classes=0``, ``global_pool=''``); GeoLink's
fixed MAE sin-cos table lives in ``trunk.pos_embed`` (cls row zero) and its cls token and final norm in the timm
slots, so the saved folder is a plain timm folder: ``timm.create_model("local-dir:<dir>", pretrained=True)`` gives the
same ``forward_features`` without geolink installed. geolink adds inputs of any size that is a multiple of the patch
size (the sin-cos table is regenerated for the new grid, not interpolated), a timm-style ``forward_intermediates``,
the MAE encoder pass over a subset of patches (``forward_visible``) and timm's optimiser conventions
(``no_weight_decay``, ``set_grad_checkpointing``, ``group_matcher``), all delegated to the trunk.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import timm
import torch
from timm.models import checkpoint, checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from geolink.errors import ConfigError, InputError
from geolink.hub import GeoLinkHubMixin
from geolink.models.pos_embed import sincos_grid
from geolink.runtime import IMAGENET_MEAN, IMAGENET_STD

TRUNK_PREFIX = "trunk."


def validate_images(images: torch.Tensor, in_chans: int, check_finite: bool = True) -> None:
    """Check a model input batch; raise :class:`~geolink.errors.InputError` naming the problem and the fix.

    The shape and dtype checks read only metadata (free); ``check_finite`` adds one reduction over the pixels.

    Args:
        images: should be ``[B, C, H, W]``, B > 0, floating point (normalised), finite.
        in_chans: the model's band count ``C``.
        check_finite: also refuse NaN or infinite pixels.
    """
    if not isinstance(images, torch.Tensor):
        raise InputError(f"images must be a torch.Tensor [B, C, H, W], got {type(images).__name__}")
    if images.dim() == 3:
        raise InputError(f"images has shape {tuple(images.shape)}, one unbatched image; the model takes a batch "
                         "[B, C, H, W]: add a batch axis with images.unsqueeze(0)")
    if images.dim() != 4:
        raise InputError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise InputError(f"images is an empty batch {tuple(images.shape)}; pass at least one image")
    if images.shape[1] != in_chans:
        raise InputError(f"image encoder expects {in_chans} bands, got images of shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise InputError(f"images are {images.dtype}, the model takes normalised float images: apply "
                         "geolink.runtime.normalise(images) (uint8 is scaled by 1/255) or the model's Preprocess")
    if check_finite and not bool(torch.isfinite(images).all()):
        raise InputError("images have NaN or infinite pixels; fix or drop those images")


class GeoLinkImageEncoder(nn.Module, GeoLinkHubMixin):
    """GeoLink ViT image encoder (timm trunk, fixed sin-cos positions).

    Args:
        trunk: timm ViT architecture name, e.g. ``"vit_large_patch16_224"`` (the paper's) or ``"vit_tiny_patch16_224"``.
        img_size: the training input size; other multiples of the patch size work at inference.
        in_chans: input bands.
        drop_path_rate: stochastic depth for fine-tuning.
    """

    weights_description = "The image branch of a GeoLink model, stored as a timm ViT (cls token, sin-cos table, norm)."

    def __init__(self, trunk: str = "vit_large_patch16_224", img_size: int = 224, in_chans: int = 3,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if not timm.is_model(trunk):
            raise ConfigError(f"unknown timm architecture {trunk!r} for image.trunk; GeoLink needs a ViT such as "
                              "vit_large_patch16_224")
        not_a_vit = ConfigError(f"{trunk!r} is not a ViT with a class token and a pos_embed row for it; "
                               "GeoLink needs e.g. vit_large_patch16_224")
        try:
            self.trunk = timm.create_model(trunk, pretrained=False, num_classes=0, global_pool="", img_size=img_size,
                                           in_chans=in_chans, drop_path_rate=drop_path_rate)
        except TypeError:
            raise not_a_vit from None
        if not isinstance(self.trunk, VisionTransformer) or self.trunk.no_embed_class or self.trunk.cls_token is None:
            raise not_a_vit
        self.trunk_name = trunk
        self.embed_dim: int = self.trunk.embed_dim
        self.patch_size: int = self.trunk.patch_embed.patch_size[0]
        self.depth: int = len(self.trunk.blocks)
        self.grid_size: tuple[int, int] = tuple(self.trunk.patch_embed.grid_size)
        self.in_chans = in_chans
        self.img_size = img_size
        self.drop_path_rate = drop_path_rate
        table = sincos_grid(*self.grid_size, self.embed_dim, cls_token=True)
        self.trunk.pos_embed = nn.Parameter(table.unsqueeze(0), requires_grad=False)

    @property
    def default_out_indices(self) -> list[int]:
        """The four block indices GeoLink reads multi-level features from: ``[7, 11, 15, 23]`` for 24 blocks,
        ``[3, 5, 7, 11]`` for 12."""
        return [self.depth // 3 - 1, self.depth // 2 - 1, 2 * self.depth // 3 - 1, self.depth - 1]

    # ----------------------------------------------------------------------------------------------------------
    # stages
    def patch_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Embed patches and add their sin-cos positions (no cls token yet).

        Args:
            images: ``[B, C, H, W]``, H and W multiples of the patch size.

        Returns:
            ``([B, L, D], (H/p, W/p))`` with ``L = H/p · W/p`` in row-major order.
        """
        validate_images(images, self.in_chans, check_finite=False)
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise InputError(f"image size {height}×{width} is not a multiple of the patch size {self.patch_size}; "
                             "resize or crop the input")
        patch_embed = self.trunk.patch_embed
        tokens = patch_embed.norm(patch_embed.proj(images).flatten(2).transpose(1, 2))
        grid = (height // self.patch_size, width // self.patch_size)
        return tokens + self.pos_table(grid)[1:].unsqueeze(0), grid

    def pos_table(self, grid: tuple[int, int]) -> torch.Tensor:
        """The ``[1 + L, D]`` sin-cos table (cls row zero) for a patch grid; the stored one at the training size."""
        if tuple(grid) == self.grid_size:
            return self.trunk.pos_embed[0]
        return sincos_grid(*grid, self.embed_dim, cls_token=True).to(self.trunk.pos_embed)

    def prepend_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, N, D] -> [B, 1 + N, D]``: the cls token (plus its zero position row) in front."""
        cls = self.trunk.cls_token + self.trunk.pos_embed[:, :1]
        return torch.cat([cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)

    def embed(self, images: torch.Tensor, ids_keep: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Input tokens of the blocks: ``[B, 1 + L, D]`` (or ``[B, 1 + K, D]`` with ``ids_keep``) and the patch grid.

        Args:
            images: ``[B, C, H, W]``.
            ids_keep: ``[B, K]`` indices (row-major) of the patches to keep per sample; None keeps all.
        """
        tokens, grid = self.patch_tokens(images)
        if ids_keep is not None:
            tokens = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        return self.trunk.norm_pre(self.trunk.pos_drop(self.prepend_cls(tokens))), grid

    def run_blocks(self, tokens: torch.Tensor) -> torch.Tensor:
        """All blocks then the final norm (gradient-checkpointed when enabled): ``[B, N, D] -> [B, N, D]``."""
        if self.trunk.grad_checkpointing and torch.is_grad_enabled():
            return self.trunk.norm(checkpoint_seq(self.trunk.blocks, tokens))
        return self.trunk.norm(self.trunk.blocks(tokens))

    # ----------------------------------------------------------------------------------------------------------
    # timm forward interface
    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B, 1 + L, D]``: final-normed tokens, cls first."""
        tokens, _ = self.embed(images)
        return self.run_blocks(tokens)

    def forward_visible(self, images: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """The MAE encoder pass: only the kept patches (with their positions) enter the blocks.

        Args:
            images: ``[B, C, H, W]``.
            ids_keep: ``[B, K]`` row-major indices of the visible patches of each sample.

        Returns:
            ``[B, 1 + K, D]`` final-normed tokens, cls first, patches in ``ids_keep`` order.
        """
        tokens, _ = self.embed(images, ids_keep)
        return self.run_blocks(tokens)

    def forward(self, images: torch.Tensor, validate: bool = True) -> torch.Tensor:
        """Same as :meth:`forward_features`, after checking that the pixels are finite.

        Args:
            images: ``[B, C, H, W]`` normalised float images (shape and dtype are always checked).
            validate: refuse NaN or infinite pixels (:func:`validate_images`); False skips that one reduction.
        """
        if validate:
            validate_images(images, self.in_chans)
        return self.forward_features(images)

    def forward_intermediates(
        self,
        images: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        stop_early: bool = False,
        return_prefix_tokens: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Block outputs at chosen depths, timm semantics.

        Args:
            images: ``[B, C, H, W]``.
            indices: block indices (negative counts from the end), or an int ``n`` for the last ``n`` blocks;
                default all blocks.
            norm: apply the final norm to each intermediate.
            output_fmt: ``"NCHW"`` (``[B, D, H/p, W/p]``) or ``"NLC"`` (``[B, L, D]``) for the patch tokens.
            intermediates_only: return only the list.
            stop_early: do not run blocks after the last requested one (the final output is then not computed).
            return_prefix_tokens: return ``(patch_map, cls_token [B, 1, D])`` pairs.

        Returns:
            ``intermediates`` or ``(final_normed_tokens, intermediates)``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise InputError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take = self.resolve_indices(indices)
        tokens, (grid_h, grid_w) = self.embed(images)
        last = max(take) if (stop_early or intermediates_only) else self.depth - 1
        intermediates = []
        checkpointed = self.trunk.grad_checkpointing and torch.is_grad_enabled()
        for index, block in enumerate(self.trunk.blocks[: last + 1]):
            tokens = checkpoint(block, tokens) if checkpointed else block(tokens)
            if index in take:
                out = self.trunk.norm(tokens) if norm else tokens
                prefix, patches = out[:, :1], out[:, 1:]
                if output_fmt == "NCHW":
                    patches = patches.transpose(1, 2).reshape(patches.shape[0], -1, grid_h, grid_w)
                intermediates.append((patches, prefix) if return_prefix_tokens else patches)
        if intermediates_only:
            return intermediates
        final = self.trunk.norm(tokens) if last == self.depth - 1 else None
        return final, intermediates

    def resolve_indices(self, indices: int | Sequence[int] | None) -> list[int]:
        """Normalise block indices to sorted non-negative ints, refusing out-of-range ones."""
        if indices is None:
            resolved = list(range(self.depth))
        elif isinstance(indices, int):
            if not 0 < indices <= self.depth:
                raise InputError(f"cannot take the last {indices} blocks of a {self.depth}-block encoder")
            resolved = list(range(self.depth - indices, self.depth))
        else:
            resolved = [i + self.depth if i < 0 else i for i in indices]
            bad = [i for i, r in zip(indices, resolved) if not 0 <= r < self.depth]
            if bad or not resolved:
                raise InputError(f"block indices {list(indices)} out of range for a {self.depth}-block encoder")
        return sorted(set(resolved))

    def pooled_features(self, images: torch.Tensor, pool: str = "avg") -> torch.Tensor:
        """Global image features ``[B, D]``: mean of normed patch tokens (``"avg"``, the GeoLink contrastive
        pooling) or the cls token (``"token"``)."""
        tokens = self.forward_features(images)
        if pool == "avg":
            return tokens[:, 1:].mean(dim=1)
        if pool == "token":
            return tokens[:, 0]
        raise InputError(f"pool must be 'avg' or 'token', got {pool!r}")

    # ----------------------------------------------------------------------------------------------------------
    # timm optimiser conventions (names relative to this module)
    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay: the trunk's cls token and position table (of the tokens timm
        names, those this trunk has)."""
        present = dict(self.trunk.named_parameters())
        return {TRUNK_PREFIX + name for name in self.trunk.no_weight_decay() if name in present}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them (the trunk's flag)."""
        self.trunk.set_grad_checkpointing(enable)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's parameter groups for layer-wise learning-rate decay: the embedding stem, then one group per block
        (the final norm with the last)."""
        return prefixed_matcher(self.trunk.group_matcher(coarse), TRUNK_PREFIX)

    # ----------------------------------------------------------------------------------------------------------
    # Hub: the folder is a timm folder
    def weights_module(self) -> nn.Module:
        return self.trunk

    def hub_config(self) -> dict:
        """``config.json`` in timm's hub format, plus geolink's constructor kwargs and ``model_class`` at the top
        level (timm ignores them)."""
        channels = self.in_chans
        mean = (IMAGENET_MEAN * ((channels + 2) // 3))[:channels]
        std = (IMAGENET_STD * ((channels + 2) // 3))[:channels]
        return {
            "architecture": self.trunk_name,
            "num_classes": 0,
            "num_features": self.embed_dim,
            "global_pool": "",
            "model_args": {"img_size": self.img_size, "in_chans": channels, "num_classes": 0, "global_pool": ""},
            "pretrained_cfg": {
                "input_size": [channels, self.img_size, self.img_size],
                "fixed_input_size": True,
                "interpolation": "bicubic",
                "crop_pct": 1.0,
                "crop_mode": "center",
                "mean": list(mean),
                "std": list(std),
                "num_classes": 0,
                "pool_size": None,
                "first_conv": "patch_embed.proj",
                "classifier": "head",
                "license": "mit",
                "paper_ids": "arXiv:2509.26016",
            },
            # geolink constructor kwargs (ignored by timm)
            **self.init_kwargs(),
            "model_class": type(self).__name__,
        }



def prefixed_matcher(matcher: dict[str, Any], prefix: str) -> dict[str, Any]:
    """A timm ``group_matcher`` dict of a sub-module re-rooted at ``prefix`` (``"^blocks"`` -> ``"^trunk\\.blocks"``):
    every ``^`` anchor of its regular expressions is moved behind the escaped prefix."""
    escaped = re.escape(prefix)

    def anchor(pattern: str) -> str:
        alternatives = [p if p.startswith("^") else "^" + p for p in pattern.split("|")]
        return "|".join("^" + escaped + p[1:] for p in alternatives)

    out: dict[str, Any] = {}
    for group, rule in matcher.items():
        if isinstance(rule, str):
            out[group] = anchor(rule)
        else:
            out[group] = [(anchor(pattern), order) for pattern, order in rule]
    return out
