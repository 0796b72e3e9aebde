"""Fixed 2-D sine-cosine position embeddings (the MAE formula) for image patches and OSM anchors.

One formula serves both: a position ``(u, v)`` in patch units is encoded as
``[sin(u·ω), cos(u·ω), sin(v·ω), cos(v·ω)]`` with ``ω_k = 10000^(-k / (D/4))``, i.e. the first half of the
channels comes from the horizontal coordinate and the second half from the vertical one. Patch ``(row, col)`` sits
at ``(u, v) = (col, row)``; an OSM anchor at normalised image coordinates ``(u, v)`` sits at ``(u·W_p, v·H_p)``.
"""

from __future__ import annotations

import torch

from geolink.errors import ConfigError


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Encode scalar positions.

    Args:
        positions: any shape ``[...]``.
        dim: even output width.

    Returns:
        ``[..., dim]``: sines of all frequencies, then cosines.
    """
    if dim % 2:
        raise ConfigError(f"sin-cos embedding width must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float32, device=positions.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.to(torch.float32).unsqueeze(-1) * omega
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def sincos_2d(coords: torch.Tensor, dim: int) -> torch.Tensor:
    """Encode 2-D positions given in patch units.

    Args:
        coords: ``[..., 2]`` as ``(u, v)`` = (horizontal, vertical).
        dim: output width, a multiple of 4.

    Returns:
        ``[..., dim]``: the first half encodes ``u``, the second half ``v``.
    """
    if dim % 4:
        raise ConfigError(f"2-D sin-cos embedding width must be a multiple of 4, got {dim}")
    return torch.cat([sincos_1d(coords[..., 0], dim // 2), sincos_1d(coords[..., 1], dim // 2)], dim=-1)


def sincos_grid(grid_h: int, grid_w: int, dim: int, cls_token: bool = False) -> torch.Tensor:
    """The position table of a ``grid_h × grid_w`` patch grid in row-major (timm) token order.

    Returns:
        ``[grid_h·grid_w (+1), dim]``; with ``cls_token`` a zero row comes first.
    """
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float32), torch.arange(grid_w, dtype=torch.float32),
                                indexing="ij")
    table = sincos_2d(torch.stack([cols, rows], dim=-1).reshape(-1, 2), dim)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim), table], dim=0)
    return table


def anchor_embedding(anchors: torch.Tensor, grid_h: int, grid_w: int, dim: int) -> torch.Tensor:
    """Position embedding of OSM nodes: the mean over a node's anchors of their 2-D sin-cos embedding.

    Args:
        anchors: ``[N, A, 2]`` normalised image coordinates ``(u, v)`` in [0, 1] (u left→right, v top→bottom).
        grid_h: patches per image column (image height / patch size).
        grid_w: patches per image row (image width / patch size).
        dim: output width.

    Returns:
        ``[N, dim]``.
    """
    scale = torch.tensor([grid_w, grid_h], dtype=torch.float32, device=anchors.device)
    return sincos_2d(anchors.to(torch.float32) * scale, dim).mean(dim=1)
