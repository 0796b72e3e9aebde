"""The GeoLink fusion encoder: image + OSM → multi-level feature maps.

Image tokens of the last requested ViT block (final-normed, projected to ``fusion_dim``) are the queries Q; every OSM
node of the sample (projected per type to ``fusion_dim``) is a key K. A two-way transformer block exchanges
information both ways, with fixed sin-cos positions for both (patch centres for Q, the mean embedding of a node's
anchors for K)::

    K = LN(K + SelfAttn(K + PK, K + PK, K))        # nodes talk to each other
    Q = LN(Q + Attn(Q + PQ, K + PK, K))            # image tokens read the nodes
    K = LN(K + Attn(K + PK, Q + PQ, Q))            # nodes read the image
    K = LN(Linear(K))

The fused Q replaces the last map. Samples are packed into a padded ``[B, N_max, C]`` node tensor with a key mask
(vectorised, no loop over samples); a sample without nodes gets a finite output (its image tokens attend to nothing
and keep only the attention bias). The constructor takes the image and OSM encoders' kwargs as two dicts (the
``image`` and ``osm`` sections of an architecture JSON) next to its own fusion-level kwargs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.data import HeteroData

from geolink.errors import ConfigError, InputError
from geolink.graph.schema import NODE_TYPES, NUM_ANCHORS, validate_graph
from geolink.hub import GeoLinkHubMixin
from geolink.models.image import GeoLinkImageEncoder, prefixed_matcher, validate_images
from geolink.models.osm import GeoLinkOSMEncoder, graph_batch_vectors
from geolink.models.pos_embed import anchor_embedding, sincos_2d, sincos_grid


class Attention(nn.Module):
    """Multi-head attention with a key padding mask, on ``scaled_dot_product_attention``.

    Parameters are laid out as in ``nn.MultiheadAttention`` (packed ``in_proj_weight``/``in_proj_bias``,
    ``out_proj``). A query whose keys are all masked attends to nothing: its output is ``out_proj.bias``.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``query [B, T, C]``, ``key``/``value [B, S, C]``, ``key_padding_mask [B, S]`` (True = ignore)
        -> ``[B, T, C]``; with ``need_weights`` also the attention weights averaged over heads ``[B, T, S]``
        (computed explicitly instead of by the fused kernel; same output)."""
        batch, length, dim = query.shape
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        heads = self.num_heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, x.shape[1], heads, dim // heads).transpose(1, 2)

        q, k, v = split(F.linear(query, w_q, b_q)), split(F.linear(key, w_k, b_k)), split(F.linear(value, w_v, b_v))
        attn_mask = has_keys = None
        if key_padding_mask is not None:
            has_keys = ~key_padding_mask.all(dim=1)  # [B]
            # rows without any valid key attend over the padding (finite) and are zeroed below
            attend = ~key_padding_mask | ~has_keys.unsqueeze(1)
            attn_mask = attend[:, None, None, :]
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) * (dim // heads) ** -0.5
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            weights = scores.softmax(dim=-1)
            out = F.dropout(weights, dropout_p) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        out = out.transpose(1, 2).reshape(batch, length, dim)
        if has_keys is not None:
            out = out * has_keys[:, None, None].to(out.dtype)
        return (self.out_proj(out), weights.mean(dim=1)) if need_weights else self.out_proj(out)


class TwoWayFusionBlock(nn.Module):
    """Two-way attention between image tokens (queries) and OSM node tokens (keys); see the module docstring."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.node_self_attn = Attention(dim, num_heads, dropout)
        self.node_self_norm = nn.LayerNorm(dim)
        self.image_attn = Attention(dim, num_heads, dropout)
        self.image_norm = nn.LayerNorm(dim)
        self.node_attn = Attention(dim, num_heads, dropout)
        self.node_attn_norm = nn.LayerNorm(dim)
        self.node_mlp = nn.Linear(dim, dim)
        self.node_mlp_norm = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor, nodes: torch.Tensor, image_pos: torch.Tensor, node_pos: torch.Tensor,
                node_padding_mask: torch.Tensor, return_attention: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``image [B, L, C]``, ``nodes [B, N, C]``, positions of the same shapes, ``node_padding_mask [B, N]``
        (True = padding) -> updated ``(image, nodes)``; with ``return_attention`` also each node's attention over
        the image tokens in ``node_attn`` (the official ``cross_attn_image_to_token``), heads averaged,
        ``[B, N, L]`` (rows of padding nodes are meaningless)."""
        keyed = nodes + node_pos
        nodes = self.node_self_norm(nodes + self.node_self_attn(keyed, keyed, nodes, node_padding_mask))
        image = self.image_norm(image + self.image_attn(image + image_pos, nodes + node_pos, nodes, node_padding_mask))
        read = self.node_attn(nodes + node_pos, image + image_pos, image, need_weights=return_attention)
        read, attention = read if return_attention else (read, None)
        nodes = self.node_attn_norm(nodes + read)
        nodes = self.node_mlp_norm(self.node_mlp(nodes))
        return (image, nodes, attention) if return_attention else (image, nodes)


def check_image_graph_batch(images: torch.Tensor, graph: HeteroData, image_encoder: GeoLinkImageEncoder,
                            osm_encoder: GeoLinkOSMEncoder, validate: bool = True
                            ) -> tuple[dict[str, torch.Tensor], int]:
    """Check a batch of images ``[B, C, H, W]`` with one graph each (shapes always; values too with ``validate``)
    and return the graph's per-type batch vectors and graph count (:func:`graph_batch_vectors`).

    Raises:
        InputError: bad images or graphs (see :func:`validate_images`, ``validate_graph``), or not one graph per image.
    """
    validate_images(images, image_encoder.in_chans, check_finite=validate)
    if validate:
        validate_graph(graph, osm_encoder.text_dim)
    batch_dict, num_graphs = graph_batch_vectors(graph)
    if num_graphs != images.shape[0]:
        raise InputError(f"got {images.shape[0]} images but {num_graphs} graphs; pass one graph per image")
    return batch_dict, num_graphs


def pack_nodes(tokens: torch.Tensor, pos: torch.Tensor, batch: torch.Tensor, num_graphs: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scatter nodes of all graphs into padded per-graph tensors (order within a graph is kept).

    Args:
        tokens: ``[N, C]`` node tokens.
        pos: ``[N, C]`` their position embeddings.
        batch: ``[N]`` graph index of each node.
        num_graphs: B.

    Returns:
        ``tokens [B, N_max, C]``, ``pos [B, N_max, C]``, ``padding_mask [B, N_max]`` (True = padding);
        ``N_max >= 1`` so a batch without nodes still has a (fully masked) key.
    """
    order = torch.sort(batch, stable=True).indices
    tokens, pos, batch = tokens[order], pos[order], batch[order]
    counts = torch.bincount(batch, minlength=num_graphs)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(batch.numel(), device=batch.device) - starts[batch]
    max_nodes = max(1, int(counts.max())) if num_graphs else 1
    packed = tokens.new_zeros(num_graphs, max_nodes, tokens.shape[1])
    packed_pos = pos.new_zeros(num_graphs, max_nodes, pos.shape[1])
    packed[batch, slot] = tokens
    packed_pos[batch, slot] = pos
    padding_mask = torch.arange(max_nodes, device=batch.device).unsqueeze(0) >= counts.unsqueeze(1)
    return packed, packed_pos, padding_mask


class GeoLinkFusionEncoder(nn.Module, GeoLinkHubMixin):
    """GeoLink fusion encoder: multi-level feature maps of an image fused with its OSM graph.

    ``forward(images, graphs)`` returns the raw block outputs at ``out_indices`` as ``[B, D, H/p, W/p]`` maps, the
    last one replaced by the fused ``[B, dim, H/p, W/p]`` map — ready for a UPerNet-style decoder.

    Args:
        image: kwargs of the image encoder (:class:`GeoLinkImageEncoder`); None = its defaults.
        osm: kwargs of the OSM encoder (:class:`GeoLinkOSMEncoder`); None = its defaults.
        dim: width of the two-way blocks and of the fused map.
        depth: number of two-way blocks.
        num_heads: attention heads of the two-way blocks.
        dropout: attention dropout of the two-way blocks (training only).
        out_indices: default output blocks; ``None`` = ``[7, 11, 15, 23]`` for 24 blocks (``[3, 5, 7, 11]`` for 12).

    Attributes:
        fusion_dim: ``dim``, the width of the fused map.
    """

    weights_description = "A GeoLink fusion encoder (image encoder + OSM encoder + two-way fusion block)."

    def __init__(
        self,
        image: dict[str, Any] | None = None,
        osm: dict[str, Any] | None = None,
        dim: int = 256,
        depth: int = 1,
        num_heads: int = 16,
        dropout: float = 0.1,
        out_indices: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.image_encoder = GeoLinkImageEncoder(**(image or {}))
        self.osm_encoder = GeoLinkOSMEncoder(**(osm or {}))
        self.fusion_dim = dim
        self.out_indices = self.image_encoder.resolve_indices(
            list(out_indices) if out_indices is not None else self.image_encoder.default_out_indices)
        self.image_proj = nn.Linear(self.image_encoder.embed_dim, dim)
        self.node_proj = nn.ModuleDict({t: nn.Linear(self.osm_encoder.osm_dim, dim) for t in NODE_TYPES})
        self.blocks = nn.ModuleList([TwoWayFusionBlock(dim, num_heads, dropout) for _ in range(depth)])
        grid = self.image_encoder.grid_size
        self.register_buffer("image_pos", sincos_grid(*grid, dim), persistent=False)

    def init_kwargs(self) -> dict[str, Any]:
        """Constructor kwargs with the complete ``image`` and ``osm`` sections of the encoders."""
        return {**super().init_kwargs(), "image": self.image_encoder.init_kwargs(),
                "osm": self.osm_encoder.init_kwargs()}

    # ----------------------------------------------------------------------------------------------------------
    # timm optimiser conventions (names relative to this module)
    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay: the image encoder's cls token and position table."""
        return {f"image_encoder.{name}" for name in self.image_encoder.no_weight_decay()} | {
            f"osm_encoder.{name}" for name in self.osm_encoder.no_weight_decay()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing of the image encoder's blocks (the OSM encoder and the fusion blocks are small)."""
        self.image_encoder.set_grad_checkpointing(enable)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's parameter groups for layer-wise learning-rate decay: the image encoder's stem and blocks; the OSM
        encoder and the fusion blocks, which read the last block, fall in the last group with the heads."""
        return prefixed_matcher(self.image_encoder.group_matcher(coarse), "image_encoder.")

    @property
    def out_channels(self) -> list[int]:
        """Channels of each output map."""
        return [self.image_encoder.embed_dim] * (len(self.out_indices) - 1) + [self.fusion_dim]

    def image_pos_table(self, grid: tuple[int, int]) -> torch.Tensor:
        """``[L, fusion_dim]`` sin-cos positions of the image tokens of a patch grid."""
        if tuple(grid) == self.image_encoder.grid_size:
            return self.image_pos
        return sincos_grid(*grid, self.fusion_dim).to(self.image_pos)

    def node_tokens(self, node_embeddings: dict[str, torch.Tensor], graph: HeteroData, grid: tuple[int, int],
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Per type: fusion-width node tokens ``[N_t, fusion_dim]`` and their anchor position embeddings."""
        tokens = {t: self.node_proj[t](node_embeddings[t]) for t in NODE_TYPES}
        pos = {t: anchor_embedding(graph[t].pos, grid[0], grid[1], self.fusion_dim).to(tokens[t].dtype)
               for t in NODE_TYPES}
        return tokens, pos

    def fuse(self, image_tokens: torch.Tensor, image_pos: torch.Tensor, nodes: torch.Tensor, node_pos: torch.Tensor,
             node_padding_mask: torch.Tensor, return_attention: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Run the two-way blocks.

        Args:
            image_tokens: ``[B, L, D]`` final-normed image tokens (patches only).
            image_pos: ``[B or 1, L, fusion_dim]``.
            nodes: ``[B, N, fusion_dim]`` packed node tokens; ``node_pos`` the same shape.
            node_padding_mask: ``[B, N]``, True = padding.
            return_attention: also return, per block, each node's attention over the image tokens ``[B, N, L]``
                (heads averaged; see :meth:`TwoWayFusionBlock.forward`).

        Returns:
            fused image tokens ``[B, L, fusion_dim]`` and node tokens ``[B, N, fusion_dim]`` (and the attention list).
        """
        image = self.image_proj(image_tokens)
        image_pos = image_pos.expand(image.shape[0], -1, -1)
        attention = []
        for block in self.blocks:
            image, nodes, *weights = block(image, nodes, image_pos, node_pos, node_padding_mask, return_attention)
            attention += weights
        return (image, nodes, attention) if return_attention else (image, nodes)

    def forward(self, images: torch.Tensor, graph: HeteroData, layers: Sequence[int] | None = None,
                validate: bool = True) -> list[torch.Tensor]:
        """Multi-level maps of images fused with their OSM graphs.

        Args:
            images: ``[B, C, H, W]`` normalised float images (shape and dtype are always checked).
            graph: a ``Batch`` of B graphs (``Batch.from_data_list``), or one ``HeteroData`` when B = 1.
            layers: block indices to return (default ``out_indices``); the last one is fused.
            validate: also refuse non-finite pixels and check ``graph`` with
                :func:`~geolink.graph.schema.validate_graph`; False (e.g. in a training loop over checked data)
                skips these reductions.

        Returns:
            ``len(layers)`` maps ``[B, D, H/p, W/p]``, the last ``[B, fusion_dim, H/p, W/p]``.

        Raises:
            InputError: naming the bad input (unbatched or integer images, an empty batch, a graph missing a node
                type, wrong anchors, ``pos`` outside [0, 1], NaN pixels, ``x`` or ``pos``).
        """
        batch_dict, num_graphs = check_image_graph_batch(images, graph, self.image_encoder, self.osm_encoder, validate)
        indices = self.image_encoder.resolve_indices(layers) if layers is not None else self.out_indices
        grid = (images.shape[-2] // self.image_encoder.patch_size, images.shape[-1] // self.image_encoder.patch_size)
        maps = self.image_encoder.forward_intermediates(images, indices=indices, output_fmt="NLC",
                                                        intermediates_only=True)
        node_embeddings = self.osm_encoder.node_embeddings(graph, batch_dict, num_graphs)
        tokens, pos = self.node_tokens(node_embeddings, graph, grid)
        nodes, node_pos, padding_mask = pack_nodes(torch.cat([tokens[t] for t in NODE_TYPES]),
                                                   torch.cat([pos[t] for t in NODE_TYPES]),
                                                   torch.cat([batch_dict[t] for t in NODE_TYPES]), num_graphs)
        fused, _ = self.fuse(self.image_encoder.trunk.norm(maps[-1]), self.image_pos_table(grid).unsqueeze(0),
                             nodes, node_pos, padding_mask)
        maps[-1] = fused
        return [m.transpose(1, 2).reshape(m.shape[0], m.shape[2], *grid) for m in maps]

    def forward_padded(self, images: torch.Tensor, nodes: torch.Tensor, node_mask: torch.Tensor,
                       node_types: torch.Tensor, anchors: torch.Tensor, adjacency: torch.Tensor,
                       layers: Sequence[int] | None = None) -> list[torch.Tensor]:
        """:meth:`forward` on a padded graph batch (:func:`~geolink.models.osm.pad_graphs`): dense tensor ops only,
        no PyG and no data-dependent shapes, so it exports (see :mod:`geolink.export`). Equal to :meth:`forward`
        (within float rounding) on the graphs ``pad_graphs`` was given.

        Args:
            images: ``[B, C, H, W]`` normalised float images (shape and dtype are checked).
            nodes, node_mask, node_types, anchors, adjacency: the fields of
                :class:`~geolink.models.osm.PaddedGraphs` (B samples, N node slots).
            layers: block indices to return (default ``out_indices``); the last one is fused.

        Returns:
            the same maps as :meth:`forward`.
        """
        validate_images(images, self.image_encoder.in_chans, check_finite=False)
        indices = self.image_encoder.resolve_indices(layers) if layers is not None else self.out_indices
        grid = (images.shape[-2] // self.image_encoder.patch_size, images.shape[-1] // self.image_encoder.patch_size)
        maps = self.image_encoder.forward_intermediates(images, indices=indices, output_fmt="NLC",
                                                        intermediates_only=True)
        embeddings = self.osm_encoder.dense_node_embeddings(nodes, node_mask, node_types, adjacency)
        tokens = torch.stack([self.node_proj[t](embeddings) for t in NODE_TYPES])  # [T, B, N, C]
        tokens = torch.gather(tokens, 0, node_types.clamp(0, len(NODE_TYPES) - 1)[None, ..., None].expand(
            1, -1, -1, tokens.shape[-1]))[0]
        anchor_counts = torch.tensor([NUM_ANCHORS[t] for t in NODE_TYPES], device=anchors.device)[node_types]
        anchor_valid = (torch.arange(anchors.shape[2], device=anchors.device) < anchor_counts.unsqueeze(-1))
        scale = torch.tensor([grid[1], grid[0]], dtype=torch.float32, device=anchors.device)
        per_anchor = sincos_2d(anchors.to(torch.float32) * scale, self.fusion_dim)  # [B, N, A, C]
        weight = anchor_valid.unsqueeze(-1).to(per_anchor.dtype)
        node_pos = ((per_anchor * weight).sum(dim=2) / weight.sum(dim=2)).to(tokens.dtype)
        keep = node_mask.unsqueeze(-1)
        tokens, node_pos = tokens * keep.to(tokens.dtype), node_pos * keep.to(node_pos.dtype)
        fused, _ = self.fuse(self.image_encoder.trunk.norm(maps[-1]), self.image_pos_table(grid).unsqueeze(0),
                             tokens, node_pos, ~node_mask)
        maps[-1] = fused
        return [m.transpose(1, 2).reshape(m.shape[0], m.shape[2], *grid) for m in maps]
