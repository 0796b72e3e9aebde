"""GeoLink pretraining: the fusion encoder plus MAE decoder, projection heads, node mask tokens and the three losses.

One forward pass (DESIGN §6):

1. ``forward_encoder``: MAE random masking, then the image encoder's own ``forward_visible`` runs once on the
   visible 25 % of patches.
2. ``forward_decoder`` + ``forward_loss``: the MAE decoder reconstructs all patches; normalised-pixel MSE on the
   masked ones (``loss_mae``).
3. ``mask_nodes``: 20 % of each graph's nodes of each type (at least one) get a learned per-type mask token as input;
   the OSM encoder's ``encode`` runs once on this masked graph (node and region embeddings).
4. ``forward_contrastive_loss``: symmetric InfoNCE between the mean visible patch token and the region embedding of
   the masked graph (``loss_contrastive``).
5. ``forward_consistency``: the fusion block takes the visible image tokens as Q and only the masked nodes (≤ 10
   per graph) as K; ``node_pred`` regresses the original features of those nodes from the fused K
   (``loss_consistency``).

``loss = loss_mae + contrastive_weight · loss_contrastive + consistency_weight · loss_consistency``.

Randomness (which patches and nodes are masked) comes from ``torch.rand`` by default. Given per-sample seeds it comes
from a hash of (seed, element), so a sample is masked the same way whatever its batch, process or device — which is
what makes a multi-process run reproduce a single-process one. Under data parallelism a :class:`CrossRank` gathers
the contrastive negatives from the global batch and normalises the node loss by the global node count.
"""

from __future__ import annotations

import copy
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn
from torch_geometric.data import HeteroData

from geolink.errors import ConfigError, InputError
from geolink.graph.schema import NODE_TYPES
from geolink.hub import GeoLinkHubMixin
from geolink.models.fusion import GeoLinkFusionEncoder, check_image_graph_batch, pack_nodes
from geolink.models.image import GeoLinkImageEncoder, prefixed_matcher, validate_images
from geolink.models.osm import GeoLinkOSMEncoder
from geolink.models.pos_embed import sincos_grid

_MASK32 = 0xFFFFFFFF


def hashed_uniform(seeds: torch.Tensor, index: torch.Tensor, salt: int) -> torch.Tensor:
    """Deterministic uniform numbers in [0, 1) from integer (seed, index) pairs: the murmur3 finaliser applied to a
    mix of both; identical on every device and process. ``seeds``, ``index``: int64 ``[N]`` -> float ``[N]``."""
    x = (seeds * 0x9E3779B1 + index * 0x85EBCA77 + salt * 0x27D4EB2F) & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    x = x ^ (x >> 16)
    return x.to(torch.float64).div(2.0**32).to(torch.float32)


class CrossRank(Protocol):
    """Collectives the losses need under data parallelism (implemented in ``geolink.train.distributed``)."""

    rank: int
    world_size: int

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate ``tensor`` of every rank along dim 0, keeping the gradient of the local slice."""

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks (no gradient)."""


def positions_within_groups(group: torch.Tensor) -> torch.Tensor:
    """Index of each element among the elements of its group, in input order (``group`` sorted); ``[N] -> [N]``."""
    counts = torch.bincount(group, minlength=int(group.max()) + 1 if group.numel() else 0)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(group.numel(), device=group.device) - starts[group]


def rank_within_groups(group: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Rank (0 = lowest score) of every element among the elements of its group; ``[N] -> [N]``."""
    by_score = torch.argsort(score)
    order = by_score[torch.sort(group[by_score], stable=True).indices]  # by group, then by score
    ranks = torch.empty_like(group)
    ranks[order] = positions_within_groups(group[order])
    return ranks


def with_node_features(graph: HeteroData, x_dict: dict[str, torch.Tensor]) -> HeteroData:
    """A shallow copy of ``graph`` whose nodes carry the features ``x_dict`` (other tensors shared, ``graph``
    untouched)."""
    copied = copy.copy(graph)
    for node_type, x in x_dict.items():
        copied[node_type].x = x
    return copied


class GeoLinkForPretraining(nn.Module, GeoLinkHubMixin):
    """GeoLink pretraining model: ``forward(images, graphs)`` returns the weighted loss, its terms and the masks.

    Args:
        image: kwargs of the image encoder (:class:`GeoLinkImageEncoder`); None = its defaults.
        osm: kwargs of the OSM encoder (:class:`GeoLinkOSMEncoder`); its ``text_dim`` is also the width of the node
            mask tokens and of the node prediction.
        fusion: the fusion-level kwargs of :class:`GeoLinkFusionEncoder` (``dim``, ``depth``, ``num_heads``,
            ``dropout``, ``out_indices``).
        decoder_dim, decoder_depth, decoder_num_heads: the MAE decoder (timm blocks, MLP ratio 4).
        projection_dim: width of the contrastive projection heads.
        mask_ratio: fraction of image patches masked.
        node_mask_ratio: fraction of each graph's nodes of each type masked (at least one per present type).
        max_masked_nodes: at most this many masked nodes per graph enter the fusion block (sampled when more).
        temperature: InfoNCE temperature.
        norm_pix_loss: reconstruct per-patch normalised pixels.
        contrastive_weight, consistency_weight: loss weights relative to the MAE loss.
    """

    weights_description = "A complete GeoLink pretraining model (fusion encoder + MAE decoder + heads)."

    def __init__(
        self,
        image: dict[str, Any] | None = None,
        osm: dict[str, Any] | None = None,
        fusion: dict[str, Any] | None = None,
        decoder_dim: int = 512,
        decoder_depth: int = 2,
        decoder_num_heads: int = 16,
        projection_dim: int = 64,
        mask_ratio: float = 0.75,
        node_mask_ratio: float = 0.2,
        max_masked_nodes: int = 10,
        temperature: float = 0.2,
        norm_pix_loss: bool = True,
        contrastive_weight: float = 0.01,
        consistency_weight: float = 0.01,
    ) -> None:
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.fusion_encoder = GeoLinkFusionEncoder(image=image, osm=osm, **(fusion or {}))
        encoder = self.image_encoder
        text_dim = self.osm_encoder.text_dim
        self.mask_ratio = mask_ratio
        self.node_mask_ratio = node_mask_ratio
        self.max_masked_nodes = max_masked_nodes
        self.temperature = temperature
        self.norm_pix_loss = norm_pix_loss
        self.contrastive_weight = contrastive_weight
        self.consistency_weight = consistency_weight

        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_blocks = nn.ModuleList([Block(decoder_dim, decoder_num_heads, mlp_ratio=4.0, qkv_bias=True,
                                                   norm_layer=nn.LayerNorm) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, encoder.patch_size**2 * encoder.in_chans)
        self.register_buffer("decoder_pos", sincos_grid(*encoder.grid_size, decoder_dim, cls_token=True),
                             persistent=False)

        self.image_projection = nn.Linear(encoder.embed_dim, projection_dim)
        self.region_projection = nn.Linear(self.osm_encoder.osm_dim, projection_dim)
        self.node_mask_token = nn.ParameterDict({t: nn.Parameter(torch.zeros(1, text_dim)) for t in NODE_TYPES})
        self.node_pred = nn.Linear(self.fusion_encoder.fusion_dim, text_dim)
        self._init_heads()

    def _init_heads(self) -> None:
        """MAE-style init of everything outside the timm trunk (which timm initialised)."""
        def init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

        fusion = self.fusion_encoder
        for module in (fusion.image_proj, fusion.node_proj, fusion.blocks, self.decoder_embed, self.decoder_blocks,
                       self.decoder_norm, self.decoder_pred, self.image_projection, self.region_projection,
                       self.node_pred):
            module.apply(init)
        nn.init.normal_(self.mask_token, std=0.02)
        for token in self.node_mask_token.values():
            nn.init.normal_(token, std=0.02)

    def init_kwargs(self) -> dict[str, Any]:
        """Constructor kwargs with the complete ``image``, ``osm`` and ``fusion`` sections of the encoders."""
        fusion = self.fusion_encoder.init_kwargs()
        return {**super().init_kwargs(), "image": fusion.pop("image"), "osm": fusion.pop("osm"), "fusion": fusion}

    @property
    def image_encoder(self) -> GeoLinkImageEncoder:
        return self.fusion_encoder.image_encoder

    @property
    def osm_encoder(self) -> GeoLinkOSMEncoder:
        return self.fusion_encoder.osm_encoder

    # ----------------------------------------------------------------------------------------------------------
    # timm optimiser conventions (names relative to this module)
    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay: the encoders' tokens and tables, the MAE mask token and the node
        mask tokens."""
        return ({f"fusion_encoder.{name}" for name in self.fusion_encoder.no_weight_decay()} | {"mask_token"}
                | {f"node_mask_token.{t}" for t in NODE_TYPES})

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing of the image encoder's blocks (in the MAE pass and the fusion pass)."""
        self.fusion_encoder.set_grad_checkpointing(enable)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's parameter groups: the image encoder's stem and blocks; everything else (OSM encoder, fusion,
        decoder, heads) in the last group."""
        return prefixed_matcher(self.fusion_encoder.group_matcher(coarse), "fusion_encoder.")

    # ----------------------------------------------------------------------------------------------------------
    # image branch (MAE)
    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B, L, p·p·C]`` (row-major patches, pixels in (row, col, channel) order)."""
        p = self.image_encoder.patch_size
        batch, channels, height, width = images.shape
        x = images.reshape(batch, channels, height // p, p, width // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(batch, (height // p) * (width // p), p * p * channels)

    def unpatchify(self, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Inverse of :meth:`patchify`: ``[B, L, p·p·C] -> [B, C, H, W]``."""
        p = self.image_encoder.patch_size
        batch = patches.shape[0]
        channels = patches.shape[-1] // (p * p)
        x = patches.reshape(batch, grid[0], grid[1], p, p, channels)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(batch, channels, grid[0] * p, grid[1] * p)

    @staticmethod
    def random_masking(noise: torch.Tensor, mask_ratio: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Choose the patches each sample keeps (MAE): the ``K`` with the lowest noise.

        Args:
            noise: ``[B, L]`` uniform noise, one value per patch.
            mask_ratio: fraction removed.

        Returns:
            ``mask [B, L]`` (1 = removed), ``ids_keep [B, K]``, ``ids_restore [B, L]`` with
            ``K = int(L · (1 - mask_ratio))``.
        """
        batch, length = noise.shape
        keep = int(length * (1 - mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        mask = torch.ones(batch, length, device=noise.device)
        mask[:, :keep] = 0
        return torch.gather(mask, 1, ids_restore), ids_shuffle[:, :keep], ids_restore

    def forward_encoder(self, images: torch.Tensor, mask_ratio: float, sample_seeds: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Encode the visible patches: ``latent [B, 1 + K, D]`` (normed, cls first), ``mask``, ``ids_keep``,
        ``ids_restore`` (see :meth:`random_masking`) and the patch grid. ``sample_seeds [B]`` makes the masks a
        function of the seeds alone; otherwise the noise comes from ``torch.rand``."""
        patch = self.image_encoder.patch_size
        grid = (images.shape[-2] // patch, images.shape[-1] // patch)
        batch, length, device = images.shape[0], grid[0] * grid[1], images.device
        if sample_seeds is None:
            noise = torch.rand(batch, length, device=device)
        else:
            rows = torch.arange(batch, device=device).repeat_interleave(length)
            noise = hashed_uniform(sample_seeds.to(device)[rows], torch.arange(length, device=device).repeat(batch),
                                   salt=0).view(batch, length)
        mask, ids_keep, ids_restore = self.random_masking(noise, mask_ratio)
        return self.image_encoder.forward_visible(images, ids_keep), mask, ids_keep, ids_restore, grid

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Predict every patch: ``latent [B, 1 + K, D]``, ``ids_restore [B, L]`` -> ``[B, L, p·p·C]``."""
        x = self.decoder_embed(latent)
        batch, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(batch, length + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        pos = self.decoder_pos if tuple(grid) == self.image_encoder.grid_size else sincos_grid(
            *grid, x.shape[2], cls_token=True).to(x)
        x = torch.cat([x[:, :1], patches], dim=1) + pos
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE on removed patches: ``images [B, C, H, W]``, ``pred [B, L, p·p·C]``, ``mask [B, L]`` -> scalar."""
        target = self.patchify(images)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = (pred - target).square().mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum().clamp(min=1)

    # ----------------------------------------------------------------------------------------------------------
    # OSM branch
    def _node_noise(self, batch: torch.Tensor, element: torch.Tensor, salt: int,
                    sample_seeds: torch.Tensor | None) -> torch.Tensor:
        """Uniform noise per node: ``torch.rand``, or hashed from its graph's seed and ``element`` index."""
        if sample_seeds is None:
            return torch.rand(batch.numel(), device=batch.device)
        return hashed_uniform(sample_seeds.to(batch.device)[batch], element, salt)

    def mask_nodes(self, graph: HeteroData, batch_dict: dict[str, torch.Tensor],
                   sample_seeds: torch.Tensor | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Replace the features of a random ``node_mask_ratio`` of each graph's nodes of each type (at least one
        when the type is present) by the type's mask token. The graph is not modified.

        Returns:
            ``x_dict`` with masked features ``{type: [N_t, text_dim]}`` and ``{type: [N_t]}`` boolean masks.
        """
        x_dict, node_mask = {}, {}
        for type_index, node_type in enumerate(NODE_TYPES):
            # a type without nodes goes through the same ops (empty tensors): its mask token still gets a (zero)
            # gradient, so every parameter takes part in every step
            x, batch = graph[node_type].x, batch_dict[node_type]
            counts = torch.bincount(batch)
            num_masked = torch.round(counts * self.node_mask_ratio).clamp(min=1).minimum(counts)
            noise = self._node_noise(batch, positions_within_groups(batch), 1 + type_index, sample_seeds)
            ranks = rank_within_groups(batch, noise)
            masked = ranks < num_masked[batch]
            x_dict[node_type] = torch.where(masked.unsqueeze(1), self.node_mask_token[node_type].to(x.dtype), x)
            node_mask[node_type] = masked
        return x_dict, node_mask

    def forward_contrastive_loss(self, image_embedding: torch.Tensor, region_embedding: torch.Tensor,
                                 cross_rank: CrossRank | None = None) -> torch.Tensor:
        """Symmetric InfoNCE on L2-normalised ``[B, P]`` projections; negatives from the global batch when
        ``cross_rank`` is given."""
        image = F.normalize(image_embedding, dim=-1)
        region = F.normalize(region_embedding, dim=-1)
        offset, all_image, all_region = 0, image, region
        if cross_rank is not None and cross_rank.world_size > 1:
            all_image, all_region = cross_rank.all_gather(image), cross_rank.all_gather(region)
            offset = cross_rank.rank * image.shape[0]
        labels = torch.arange(image.shape[0], device=image.device) + offset
        image_to_region = image @ all_region.t() / self.temperature
        region_to_image = region @ all_image.t() / self.temperature
        return (F.cross_entropy(image_to_region, labels) + F.cross_entropy(region_to_image, labels)) / 2

    def forward_consistency(self, latent: torch.Tensor, ids_keep: torch.Tensor, grid: tuple[int, int],
                            node_embeddings: dict[str, torch.Tensor], graph: HeteroData,
                            node_mask: dict[str, torch.Tensor], batch_dict: dict[str, torch.Tensor],
                            sample_seeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Fuse visible image tokens with the masked nodes and predict their original features.

        Returns:
            ``(predicted [M, text_dim], original [M, text_dim])`` for the M masked nodes that entered the fusion.
        """
        fusion = self.fusion_encoder
        tokens, pos = fusion.node_tokens(node_embeddings, graph, grid)
        select = {t: node_mask[t].nonzero().squeeze(1) for t in NODE_TYPES}
        batch = torch.cat([batch_dict[t][select[t]] for t in NODE_TYPES])
        # element ids unique within a graph across types: type index in the high bits, position in the low ones
        element = torch.cat([positions_within_groups(batch_dict[t])[select[t]] + (i << 24)
                             for i, t in enumerate(NODE_TYPES)])
        target = torch.cat([graph[t].x[select[t]] for t in NODE_TYPES])
        # no masked node: the same ops on empty tensors (one fully padded key), an empty prediction that keeps the
        # fusion blocks and the head in the autograd graph
        node_tokens = torch.cat([tokens[t][select[t]] for t in NODE_TYPES])
        node_pos = torch.cat([pos[t][select[t]] for t in NODE_TYPES])
        keep = rank_within_groups(batch, self._node_noise(batch, element, 9, sample_seeds)) < self.max_masked_nodes
        order = torch.sort(batch[keep], stable=True).indices
        batch, target = batch[keep][order], target[keep][order]
        packed, packed_pos, padding_mask = pack_nodes(node_tokens[keep][order], node_pos[keep][order], batch,
                                                      latent.shape[0])
        image_pos = fusion.image_pos_table(grid)[ids_keep]  # [B, K, C]
        _, fused_nodes = fusion.fuse(latent[:, 1:], image_pos, packed, packed_pos, padding_mask)
        return self.node_pred(fused_nodes[~padding_mask]), target

    # ----------------------------------------------------------------------------------------------------------
    # the contrastive heads as embeddings in the shared image-OSM space
    def project_image_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The image projection head on the mean patch token: ``[B, 1 + L, D]`` final-normed tokens (cls first,
        excluded from the mean; all patches or only the visible ones) -> ``[B, projection_dim]``."""
        return self.image_projection(tokens[:, 1:].mean(dim=1))

    def encode_image(self, images: torch.Tensor, normalize: bool = False, validate: bool = True) -> torch.Tensor:
        """Images in the shared image-OSM space: the image projection head on the mean of the final patch tokens
        (no masking; the official ``img_consistency_prj`` head).

        Args:
            images: ``[B, C, H, W]`` normalised float images.
            normalize: L2-normalise the output (for cosine search); False returns the head's raw output, as the
                official heads do.
            validate: refuse non-finite pixels (shape and dtype are always checked).

        Returns:
            ``[B, projection_dim]``.
        """
        validate_images(images, self.image_encoder.in_chans, check_finite=validate)
        embedding = self.project_image_tokens(self.image_encoder.forward_features(images))
        return F.normalize(embedding, dim=-1) if normalize else embedding

    def encode_osm(self, graph: HeteroData, normalize: bool = False, validate: bool = True) -> torch.Tensor:
        """OSM graphs in the shared image-OSM space: the region projection head on the region embedding of the
        unmasked graph (the official ``osm_graph_consistency_prj`` head).

        Args:
            graph: a ``Batch`` of B graphs, or one ``HeteroData``.
            normalize: L2-normalise the output (for cosine search).
            validate: check ``graph`` with :func:`~geolink.graph.schema.validate_graph` first.

        Returns:
            ``[B, projection_dim]``.
        """
        _, region = self.osm_encoder.encode(graph, validate=validate)
        embedding = self.region_projection(region)
        return F.normalize(embedding, dim=-1) if normalize else embedding

    # ----------------------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, graph: HeteroData, sample_seeds: torch.Tensor | None = None,
                cross_rank: CrossRank | None = None, validate: bool = True) -> dict[str, torch.Tensor]:
        """One pretraining step's forward pass.

        Args:
            images: ``[B, C, H, W]`` normalised float images (shape and dtype are always checked).
            graph: ``Batch`` of B graphs.
            sample_seeds: int64 ``[B]``; when given, every mask is a function of its sample's seed alone.
            cross_rank: collectives for data parallelism (global contrastive negatives, global node-loss mean).
            validate: also refuse non-finite pixels and check ``graph`` with
                :func:`~geolink.graph.schema.validate_graph`; False skips these reductions.

        Returns:
            ``loss`` (weighted total), ``loss_mae``, ``loss_contrastive``, ``loss_consistency``, and for inspection
            ``pred`` ``[B, L, p·p·C]``, ``mask`` ``[B, L]``, ``node_mask`` (``{type: [N_t]}``), ``node_pred`` /
            ``node_target`` ``[M, text_dim]``, ``image_embedding`` / ``region_embedding`` ``[B, projection_dim]``.
        """
        batch_dict, num_graphs = check_image_graph_batch(images, graph, self.image_encoder, self.osm_encoder, validate)
        latent, mask, ids_keep, ids_restore, grid = self.forward_encoder(images, self.mask_ratio, sample_seeds)
        pred = self.forward_decoder(latent, ids_restore, grid)
        loss_mae = self.forward_loss(images, pred, mask)

        masked_x, node_mask = self.mask_nodes(graph, batch_dict, sample_seeds)
        node_embeddings, region = self.osm_encoder.encode(with_node_features(graph, masked_x), validate=False)
        image_embedding = self.project_image_tokens(latent)
        region_embedding = self.region_projection(region)
        loss_contrastive = self.forward_contrastive_loss(image_embedding, region_embedding, cross_rank)

        node_pred, node_target = self.forward_consistency(latent, ids_keep, grid, node_embeddings, graph, node_mask,
                                                          batch_dict, sample_seeds)
        # mean over the masked nodes of the global batch (data-parallel gradients are averaged over ranks)
        count = torch.tensor(float(node_pred.shape[0]), device=images.device)
        world_size = 1
        if cross_rank is not None and cross_rank.world_size > 1:
            count, world_size = cross_rank.all_sum(count), cross_rank.world_size
        # a batch without masked nodes gives an exact zero through the same (empty) graph, so every parameter of the
        # fusion blocks and the head takes part in every step (data parallelism needs no unused-parameter search)
        loss_consistency = (node_pred - node_target).square().mean(dim=-1).sum() * world_size / count.clamp(min=1)
        loss = loss_mae + self.contrastive_weight * loss_contrastive + self.consistency_weight * loss_consistency
        return {
            "loss": loss, "loss_mae": loss_mae, "loss_contrastive": loss_contrastive,
            "loss_consistency": loss_consistency, "pred": pred, "mask": mask, "node_mask": node_mask,
            "node_pred": node_pred, "node_target": node_target, "image_embedding": image_embedding,
            "region_embedding": region_embedding,
        }


def require_pretraining_model(model: object, needs: str) -> GeoLinkForPretraining:
    """``model`` itself when it is a :class:`GeoLinkForPretraining` (the only class with the pretraining heads).

    Args:
        model: what the user passed.
        needs: what the calling tool needs of the heads, for the message (e.g. "the contrastive projection heads").

    Raises:
        InputError: another model (e.g. a fusion-only folder), naming what is missing and which folder to pass.
    """
    if not isinstance(model, GeoLinkForPretraining):
        raise InputError(f"model is a {type(model).__name__}, without {needs}: pass a GeoLinkForPretraining (a folder "
                         "saved from the pretraining model, e.g. geolink_tiny.demo or a `geolink pretrain` run, "
                         "loaded with load_model(<folder>))")
    return model
