"""The model side of a ``geolink embed`` job: :class:`WindowEncoder` turns batches of windows into embeddings (the
two definitions of :data:`geolink.embed.output.EMBEDDING_DEFINITIONS`), shared by the local and the Ray engines."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from geolink.errors import ConfigError, DataError, InputError
from geolink.runtime import Precision, autocast, resolve_device, resolve_precision


class WindowEncoder:
    """A fusion encoder (and its image encoder) on a device, turning batches of windows into embeddings.

    ``fused`` windows: ``fusion(x, g)[-1].mean((2, 3))``; ``image`` windows: the image encoder's final normed patch
    tokens averaged, cls excluded (:data:`geolink.embed.output.EMBEDDING_DEFINITIONS`).

    Args:
        fusion: a :class:`~geolink.models.GeoLinkFusionEncoder` (``load_model(..., component="fusion")``).
        device, precision: where and how it runs.
    """

    def __init__(self, fusion: torch.nn.Module, device: str | torch.device = "auto",
                 precision: Precision | str = Precision.AUTO) -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_precision(precision, self.device)
        self.fusion = fusion.eval().to(self.device)
        self.image_encoder = self.fusion.image_encoder

    @property
    def dims(self) -> dict[str, int]:
        """Embedding width per mode."""
        return {"fused": self.fusion.fusion_dim, "image": self.image_encoder.embed_dim}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, graphs: Sequence[Any], modes: Sequence[str], patch_maps: bool = False
                 ) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        """Embeddings (float32 numpy, one per window) of ``images [B, C, S, S]``; ``graphs[i]`` is used for the
        fused windows. With ``patch_maps`` also every window's image-encoder patch tokens on the patch grid
        ``[D_image, S/p, S/p]`` (the same features for either mode: what ``maps`` draws)."""
        from torch_geometric.data import Batch

        images = images.to(self.device, non_blocking=True)
        out: list[np.ndarray | None] = [None] * len(modes)
        fused = [i for i, m in enumerate(modes) if m == "fused"]
        plain = [i for i, m in enumerate(modes) if m != "fused"]
        grids = None
        with autocast(self.device, self.dtype):
            if fused:
                batch = Batch.from_data_list([graphs[i] for i in fused]).to(self.device)
                last = self.fusion(images[fused], batch, validate=False)[-1].float()
                for i, vector in zip(fused, last.mean((2, 3)).cpu().numpy(), strict=True):
                    out[i] = vector
            wanted = list(range(len(modes))) if patch_maps else plain
            if wanted:
                tokens = self.image_encoder.forward_features(images[wanted])[:, 1:].float()
                for i, vector in zip(wanted, tokens.mean(1).cpu().numpy(), strict=True):
                    if i in plain:
                        out[i] = vector
                if patch_maps:
                    patch = self.image_encoder.patch_size
                    grid = (images.shape[-2] // patch, images.shape[-1] // patch)
                    grids = list(tokens.transpose(1, 2).reshape(len(wanted), -1, *grid).cpu().numpy())
        return out, grids


@functools.lru_cache(maxsize=2)
def _fusion_model(model: str) -> torch.nn.Module:
    """The fusion encoder of ``model``, loaded once per process (repeated jobs in one session reuse it)."""
    from geolink.registry import load_model

    return load_model(model, component="fusion").eval().requires_grad_(False)


def load_window_encoder(model: str, device: str = "auto", precision: Precision | str = Precision.AUTO
                        ) -> tuple[WindowEncoder, dict[str, Any]]:
    """The :class:`WindowEncoder` of ``model`` and its data config (``mean``, ``std``, ``input_size``)."""
    from geolink.registry import resolve_data_config

    fusion = _fusion_model(model)
    try:
        data = resolve_data_config(model)  # a tag: its own mean / std
    except (ConfigError, InputError):
        data = resolve_data_config(fusion)
    return WindowEncoder(fusion, device, precision), data


def window_errors(metas: Sequence[dict[str, Any]], keep_going: bool) -> int:
    """The number of windows that could not be read (each warned about); the first one raised without
    ``keep_going``.

    Raises:
        DataError: a window could not be read and ``keep_going`` is off.
    """
    errors = [m["error"] for m in metas if m.get("error")]
    if errors and not keep_going:
        raise DataError(errors[0])
    for message in errors:
        warnings.warn(f"{message}; skipped (keep_going)", UserWarning, stacklevel=3)
    return len(errors)
