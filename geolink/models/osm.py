"""The GeoLink OSM graph encoder: heterogeneous GAT over polygon/line/point nodes, per-graph norm, region readout.

Input is a graph (or ``Batch``) following ``geolink.graph.schema``; the encoder reads ``x``, never modifies it.
Nine ``GATConv(text_dim → osm_dim)`` (one per edge type, no edge features; the official ``HeteroConv``) are averaged,
for each destination type, over the three edge types pointing at it, including empty ones (which contribute their
bias). A ReLU and a per-type layer norm whose statistics are pooled per graph follow, so a sample's embedding never
depends on the other samples of its batch. ``encode(graph)`` gives the node embeddings and the region embedding of
every graph in one pass; ``forward`` only the nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch_geometric.data import HeteroData
from torch_geometric.nn import GATConv, Set2Set

from geolink.errors import ConfigError, InputError
from geolink.graph.schema import EDGE_TYPES, NODE_TYPES, NUM_ANCHORS, EdgeType, edge_type_name, validate_graph
from geolink.hub import GeoLinkHubMixin

TYPE_WEIGHTINGS = ("sum", "softmax")


class GraphLayerNorm(nn.Module):
    """Layer norm over all nodes and channels of one graph: ``(x - mean) / (std + eps) · weight + bias``.

    Statistics are pooled per graph of the batch (the official code pooled over the whole batch, which is the same
    with one graph per batch). Parameter names match ``torch_geometric.nn.LayerNorm``.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
        """``x [N, C]``, ``batch [N]`` graph index of each node -> ``[N, C]``."""
        count = torch.zeros(num_graphs, dtype=x.dtype, device=x.device).index_add_(
            0, batch, torch.full_like(batch, x.shape[1], dtype=x.dtype)).clamp_(min=1)
        mean = torch.zeros(num_graphs, dtype=x.dtype, device=x.device).index_add_(0, batch, x.sum(dim=1)) / count
        centred = x - mean[batch].unsqueeze(1)
        var = torch.zeros(num_graphs, dtype=x.dtype, device=x.device).index_add_(
            0, batch, centred.square().sum(dim=1)) / count
        return centred / (var.sqrt()[batch].unsqueeze(1) + self.eps) * self.weight + self.bias


    def forward_dense(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The same norm on padded ``x [B, N, C]``, statistics over the ``mask [B, N]`` nodes of each sample."""
        weight = mask.unsqueeze(-1).to(x.dtype)
        count = (weight.sum(dim=(1, 2)) * x.shape[-1]).clamp(min=1)[:, None, None]
        mean = (x * weight).sum(dim=(1, 2), keepdim=True) / count
        centred = x - mean
        var = (centred.square() * weight).sum(dim=(1, 2), keepdim=True) / count
        return centred / (var.sqrt() + self.eps) * self.weight + self.bias


def graph_batch_vectors(graph: HeteroData) -> tuple[dict[str, torch.Tensor], int]:
    """The graph index of every node per type, and the number of graphs (1 for a plain ``HeteroData``)."""
    num_graphs = int(getattr(graph, "num_graphs", 1))
    if num_graphs == 0:
        raise InputError("graph is an empty batch (0 graphs); pass at least one graph")
    batch_dict = {}
    for node_type in NODE_TYPES:
        store = graph[node_type]
        batch = store.get("batch")
        if batch is None:
            batch = torch.zeros(store.num_nodes or 0, dtype=torch.long, device=store.x.device)
        batch_dict[node_type] = batch
    return batch_dict, num_graphs


def graph_edge_index_dict(graph: HeteroData) -> dict[EdgeType, torch.Tensor]:
    """``edge_index`` of all nine edge types; an edge type the graph lacks counts as having no edges."""
    device = graph[NODE_TYPES[0]].x.device
    empty = torch.zeros(2, 0, dtype=torch.long, device=device)
    return {et: graph[et].edge_index if et in graph.edge_types else empty for et in EDGE_TYPES}


class GeoLinkOSMEncoder(nn.Module, GeoLinkHubMixin):
    """GeoLink OSM encoder: heterogeneous GAT node embeddings and a region embedding per graph.

    Args:
        text_dim: width of the node tag features ``x`` (512 for the CLIP ViT-B/16 text tower, 384 for MiniLM).
        osm_dim: node and region embedding width.
        type_weighting: how per-type region embeddings combine: ``"sum"`` (what the official weights were trained
            with: the official softmax runs over a size-1 axis, so every weight is 1) or ``"softmax"`` (a learned
            softmax over the types present in each graph).
        set2set_steps: processing steps of the Set2Set readout.
    """

    weights_description = "The OSM graph branch of a GeoLink model (heterogeneous GAT + Set2Set region readout)."

    def __init__(self, text_dim: int = 512, osm_dim: int = 128, type_weighting: str = "sum",
                 set2set_steps: int = 5) -> None:
        super().__init__()
        if type_weighting not in TYPE_WEIGHTINGS:
            raise ConfigError(f"type_weighting must be one of {TYPE_WEIGHTINGS}, got {type_weighting!r}")
        self.text_dim = text_dim
        self.osm_dim = osm_dim
        self.type_weighting = type_weighting
        # keyed by our own stable names, not HeteroConv's (whose key format changed across PyG releases)
        self.convs = nn.ModuleDict(
            {edge_type_name(et): GATConv(text_dim, osm_dim, heads=1, add_self_loops=False) for et in EDGE_TYPES})
        self.norm = nn.ModuleDict({t: GraphLayerNorm(osm_dim) for t in NODE_TYPES})
        self.readout = nn.ModuleDict({t: Set2Set(osm_dim, processing_steps=set2set_steps) for t in NODE_TYPES})
        self.readout_proj = nn.ModuleDict({t: nn.Linear(2 * osm_dim, osm_dim) for t in NODE_TYPES})
        self.type_attention = nn.Linear(osm_dim, 1)

    def node_embeddings(self, graph: HeteroData, batch_dict: dict[str, torch.Tensor], num_graphs: int
                        ) -> dict[str, torch.Tensor]:
        """Node embeddings ``{type: [N_t, osm_dim]}``, normalised per graph (``batch_dict``: graph index of each
        node per type, from :func:`graph_batch_vectors`)."""
        x_dict = {t: graph[t].x for t in NODE_TYPES}
        for node_type in NODE_TYPES:
            width = x_dict[node_type].shape[1]
            if width != self.text_dim:
                raise InputError(f"{node_type} features have width {width}, this encoder expects {self.text_dim}: "
                                 "build graphs with the text model the weights were trained with")
        edge_index_dict = graph_edge_index_dict(graph)
        incoming: dict[str, list[torch.Tensor]] = {t: [] for t in NODE_TYPES}
        for edge_type in EDGE_TYPES:
            src, _, dst = edge_type
            conv = self.convs[edge_type_name(edge_type)]
            incoming[dst].append(conv((x_dict[src], x_dict[dst]), edge_index_dict[edge_type]))
        return {t: self.norm[t](torch.stack(incoming[t]).mean(dim=0).relu(), batch_dict[t], num_graphs)
                for t in NODE_TYPES}

    def readout_region(self, node_embeddings: dict[str, torch.Tensor], batch_dict: dict[str, torch.Tensor],
                       num_graphs: int) -> torch.Tensor:
        """One embedding per graph, ``[B, osm_dim]``, from the node embeddings.

        Per type: Set2Set over the graph's nodes, then a linear map; types a graph lacks contribute zero. The per-type
        vectors are summed (``type_weighting="sum"``) or softmax-weighted over the present types.
        """
        per_type, present = [], []
        for node_type in NODE_TYPES:
            nodes, batch = node_embeddings[node_type], batch_dict[node_type]
            pooled = self.readout[node_type](nodes, batch, dim_size=num_graphs)
            per_type.append(self.readout_proj[node_type](pooled))
            present.append(torch.bincount(batch, minlength=num_graphs) > 0)
        embeddings = torch.stack(per_type, dim=1)  # [B, T, C]
        mask = torch.stack(present, dim=1)  # [B, T]
        embeddings = embeddings * mask.unsqueeze(-1).to(embeddings.dtype)
        if self.type_weighting == "sum":
            return embeddings.sum(dim=1)
        scores = self.type_attention(embeddings).squeeze(-1).masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=1).nan_to_num(0.0)  # a graph with no nodes at all gets zeros
        return (weights.unsqueeze(-1) * embeddings).sum(dim=1)

    def forward(self, graph: HeteroData, validate: bool = True) -> dict[str, torch.Tensor]:
        """``graph`` (``HeteroData`` or ``Batch``) -> ``{type: [N_t, osm_dim]}`` node embeddings.

        Args:
            graph: the graph batch.
            validate: check it with :func:`~geolink.graph.schema.validate_graph` first (all node and edge types,
                shapes, anchors per type, finite ``x`` and ``pos``, ``pos`` in [0, 1]); False skips the check.
        """
        if validate:
            validate_graph(graph, self.text_dim)
        return self.node_embeddings(graph, *graph_batch_vectors(graph))

    def encode(self, graph: HeteroData, validate: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Node and region embeddings of a graph batch in one pass.

        Args:
            graph: ``HeteroData`` (one graph) or ``Batch`` of B graphs; its ``x`` is read, never modified.
            validate: check it with :func:`~geolink.graph.schema.validate_graph` first; False skips the check.

        Returns:
            ``({type: [N_t, osm_dim]}, [B, osm_dim])``.
        """
        if validate:
            validate_graph(graph, self.text_dim)
        batch_dict, num_graphs = graph_batch_vectors(graph)
        nodes = self.node_embeddings(graph, batch_dict, num_graphs)
        return nodes, self.readout_region(nodes, batch_dict, num_graphs)

    def region_embedding(self, graph: HeteroData, node_embeddings: dict[str, torch.Tensor] | None = None
                         ) -> torch.Tensor:
        """One embedding per graph, ``[B, osm_dim]`` (see :meth:`readout_region`).

        Args:
            graph: the graph batch.
            node_embeddings: output of :meth:`forward` on ``graph`` when already computed.
        """
        if node_embeddings is None:
            return self.encode(graph)[1]
        return self.readout_region(node_embeddings, *graph_batch_vectors(graph))

    def dense_node_embeddings(self, nodes: torch.Tensor, node_mask: torch.Tensor, node_types: torch.Tensor,
                              adjacency: torch.Tensor) -> torch.Tensor:
        """:meth:`node_embeddings` on a :class:`PaddedGraphs` batch: the same function in dense tensor ops only (no
        PyG, no data-dependent shapes), so it exports to ONNX and ``torch.export``.

        Args:
            nodes: ``[B, N, text_dim]``; node_mask, node_types ``[B, N]``; adjacency ``[B, N, N]`` (see
                :class:`PaddedGraphs`).

        Returns:
            ``[B, N, osm_dim]`` node embeddings (padding rows hold finite values to be ignored).
        """
        if nodes.shape[-1] != self.text_dim:
            raise InputError(f"node features have width {nodes.shape[-1]}, this encoder expects {self.text_dim}: "
                             "build graphs with the text model the weights were trained with")
        is_type = [(node_types == i) & node_mask for i in range(len(NODE_TYPES))]  # [B, N] each
        out = nodes.new_zeros(*nodes.shape[:2], self.osm_dim)
        for d, dst in enumerate(NODE_TYPES):
            incoming = [dense_gat(self.convs[edge_type_name((src, "to", dst))], nodes,
                                  adjacency * (is_type[d].unsqueeze(2) & is_type[s].unsqueeze(1)).to(adjacency.dtype))
                        for s, src in enumerate(NODE_TYPES)]
            hidden = torch.stack(incoming).mean(dim=0).relu()
            out = torch.where(is_type[d].unsqueeze(-1), self.norm[dst].forward_dense(hidden, is_type[d]), out)
        return out

    # ----------------------------------------------------------------------------------------------------------
    # timm optimiser conventions
    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay beyond the 1-D ones: none (the encoder has no tokens or tables)."""
        return set()

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's parameter groups for layer-wise learning-rate decay: the graph layer (GAT convolutions and their
        norms), then the region readout."""
        return {"stem": r"^convs\.|^norm\.", "blocks": r"^readout|^type_attention"}


# ------------------------------------------------------------------------------------------------------------------
# the padded (dense) form of a graph batch: what an exported encoder takes instead of a PyG batch
@dataclass
class PaddedGraphs:
    """A graph batch as plain padded tensors (no PyG), the input of the dense forward passes and exported encoders.

    Each sample's nodes are laid out polygons, then lines, then points (the order of :data:`NODE_TYPES`), then
    padding up to ``N`` (the largest node count of the batch, at least 1).

    Attributes:
        nodes: ``[B, N, text_dim]`` float tag features ``x`` (zero rows for padding).
        node_mask: ``[B, N]`` bool, True for a real node.
        node_types: ``[B, N]`` int64 index into :data:`NODE_TYPES` (0 for padding).
        anchors: ``[B, N, A, 2]`` anchors ``pos`` (``A = max(NUM_ANCHORS)`` = 4; a type with fewer anchors fills the
            first ``NUM_ANCHORS[type]`` rows, the rest are zero and ignored).
        adjacency: ``[B, N, N]`` float edge counts, ``adjacency[b, i, j]`` = number of edges from node ``j`` to node
            ``i`` of sample ``b``; an edge's type follows from its end nodes' types (every type pair is one of the
            nine edge types).
    """

    nodes: torch.Tensor
    node_mask: torch.Tensor
    node_types: torch.Tensor
    anchors: torch.Tensor
    adjacency: torch.Tensor

    def as_tuple(self) -> tuple[torch.Tensor, ...]:
        """``(nodes, node_mask, node_types, anchors, adjacency)``, the argument order of the dense forwards."""
        return self.nodes, self.node_mask, self.node_types, self.anchors, self.adjacency


def pad_graphs(graph: HeteroData, max_nodes: int | None = None) -> PaddedGraphs:
    """Pack a graph batch (``Batch`` of B graphs, or one ``HeteroData``) into :class:`PaddedGraphs`.

    Vectorised over the batch (no loop over samples). Duplicate edges are kept as counts, so the dense attention
    weighs them like the edge-list form does.

    Args:
        graph: the graph batch, following :mod:`geolink.graph.schema`.
        max_nodes: pad every sample to this many nodes (e.g. a size fixed at export); default the largest count.

    Raises:
        InputError: a sample has more than ``max_nodes`` nodes.
    """
    batch_dict, num_graphs = graph_batch_vectors(graph)
    x = torch.cat([graph[t].x for t in NODE_TYPES])
    device = x.device
    max_anchors = max(NUM_ANCHORS.values())
    anchors = torch.cat([torch.nn.functional.pad(graph[t].pos.to(x.dtype), (0, 0, 0, max_anchors - NUM_ANCHORS[t]))
                         for t in NODE_TYPES])
    types = torch.cat([torch.full((graph[t].x.shape[0],), i, dtype=torch.long, device=device)
                       for i, t in enumerate(NODE_TYPES)])
    batch = torch.cat([batch_dict[t] for t in NODE_TYPES])
    # slot of every node in its sample: types in NODE_TYPES order (a stable sort by sample keeps that order)
    order = torch.sort(batch, stable=True).indices
    counts = torch.bincount(batch, minlength=num_graphs)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(batch)
    slot[order] = torch.arange(batch.numel(), device=device) - starts[batch[order]]
    size = max(1, int(counts.max())) if batch.numel() else 1
    if max_nodes is not None:
        if size > max_nodes:
            raise InputError(f"a graph has {size} nodes, more than max_nodes={max_nodes}; raise max_nodes")
        size = max_nodes
    nodes = x.new_zeros(num_graphs, size, x.shape[1])
    nodes[batch, slot] = x
    padded_anchors = anchors.new_zeros(num_graphs, size, max_anchors, 2)
    padded_anchors[batch, slot] = anchors
    node_types = torch.zeros(num_graphs, size, dtype=torch.long, device=device)
    node_types[batch, slot] = types
    node_mask = torch.arange(size, device=device).unsqueeze(0) < counts.unsqueeze(1)
    # global node index (types concatenated) of each type's first node, to map edge_index into slots
    offsets = dict(zip(NODE_TYPES, torch.tensor([0] + [graph[t].x.shape[0] for t in NODE_TYPES]).cumsum(0).tolist()))
    adjacency = x.new_zeros(num_graphs, size, size)
    for (src, _, dst), edge_index in graph_edge_index_dict(graph).items():
        source, target = edge_index[0] + offsets[src], edge_index[1] + offsets[dst]
        adjacency.index_put_((batch[target], slot[target], slot[source]),
                             torch.ones(target.numel(), dtype=x.dtype, device=device), accumulate=True)
    return PaddedGraphs(nodes, node_mask, node_types, padded_anchors, adjacency)


def dense_gat(conv: GATConv, x: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
    """A single-head ``GATConv`` (no self loops, no edge features) on padded dense inputs, the same function as its
    edge-list form: ``out_i = Σ_j softmax_j(LeakyReLU(a_dst·W x_i + a_src·W x_j) + log c_ij) W x_j + bias`` over the
    ``c_ij > 0`` edges ``j → i`` (``c_ij`` their count); a node without incoming edges gets ``bias``.

    Args:
        conv: the convolution whose weights are used.
        x: ``[B, N, C_in]`` features of all nodes (the caller selects the rows and columns of one edge type with
            ``adjacency``).
        adjacency: ``[B, N, N]`` edge counts ``c_ij`` (0 = no edge), rows are destinations.

    Returns:
        ``[B, N, C_out]``.
    """
    if conv.heads != 1 or conv.add_self_loops or conv.lin is None:
        raise ConfigError("dense_gat supports the single-head GATConv without self loops of GeoLinkOSMEncoder")
    hidden = conv.lin(x)  # [B, N, C]
    alpha_src = (hidden * conv.att_src[0]).sum(-1)  # [B, N]
    alpha_dst = (hidden * conv.att_dst[0]).sum(-1)
    logits = torch.nn.functional.leaky_relu(alpha_dst.unsqueeze(2) + alpha_src.unsqueeze(1), conv.negative_slope)
    has_edge = adjacency > 0
    logits = torch.where(has_edge, logits + torch.log(adjacency.clamp(min=1)), torch.full_like(logits, -torch.inf))
    # rows without edges: softmax of all -inf is NaN; zero them (the edge-list sum over no edges is 0)
    weights = torch.softmax(logits, dim=-1).masked_fill(~has_edge.any(dim=-1, keepdim=True), 0.0)
    return weights @ hidden + conv.bias
