"""The OSM graph contract shared by the graph builder and the models (DESIGN §3).

A tile's OpenStreetMap data is a PyG ``HeteroData`` with three node types (``polygon``, ``line``, ``point``)
and all nine ``(src, "to", dst)`` edge types, always present (possibly empty). This module is the only place
that names them, fixes their order, the number of position anchors per type and the relation vocabularies of
the one-hot ``edge_attr``. ``geolink.graph`` and ``geolink.models`` both import from here and from nowhere
else across that boundary.
"""

from __future__ import annotations

import torch
from torch_geometric.data import HeteroData

from geolink.errors import InputError

NODE_TYPES: tuple[str, ...] = ("polygon", "line", "point")
"""Canonical node-type order."""

NUM_ANCHORS: dict[str, int] = {"polygon": 4, "line": 3, "point": 1}
"""Anchor points per node of each type: polygon = three interior points then the centroid;
line = centroid, first vertex, last vertex; point = the point itself."""

EdgeType = tuple[str, str, str]

EDGE_TYPES: tuple[EdgeType, ...] = tuple((src, "to", dst) for src in NODE_TYPES for dst in NODE_TYPES)
"""All nine edge types, source-major in canonical node order."""

_SAME_DIMENSION = ("self", "touches", "overlaps", "covers", "covered_by", "equals")

RELATIONS: dict[EdgeType, tuple[str, ...]] = {
    ("polygon", "to", "polygon"): _SAME_DIMENSION,
    ("line", "to", "line"): _SAME_DIMENSION,
    ("line", "to", "polygon"): ("touches", "crosses", "covered_by"),
    ("polygon", "to", "line"): ("touches", "crosses", "covers"),
    ("point", "to", "line"): ("touches", "within"),
    ("point", "to", "polygon"): ("touches", "within"),
    ("line", "to", "point"): ("touches", "contains"),
    ("polygon", "to", "point"): ("touches", "contains"),
    ("point", "to", "point"): ("self", "delaunay"),
}
"""Relation vocabulary of each edge type: ``edge_attr`` is a one-hot over it, describing **src relative to dst**."""


def edge_type_name(edge_type: EdgeType) -> str:
    """The flat name of an edge type used in files and state dicts, e.g. ``"line__to__polygon"``."""
    return "__".join(edge_type)


def empty_graph(feature_dim: int, crs: str = "EPSG:4326", bbox: tuple[float, float, float, float] | None = None
                ) -> HeteroData:
    """A graph with every node and edge type present and no nodes.

    Args:
        feature_dim: width ``D`` of the node features ``x`` (the text model width).
        crs: coordinate reference system of ``bbox``.
        bbox: (west, south, east, north); NaNs when unknown.
    """
    graph = HeteroData()
    for node_type in NODE_TYPES:
        graph[node_type].x = torch.zeros(0, feature_dim)
        graph[node_type].pos = torch.zeros(0, NUM_ANCHORS[node_type], 2)
    for edge_type in EDGE_TYPES:
        graph[edge_type].edge_index = torch.zeros(2, 0, dtype=torch.long)
        graph[edge_type].edge_attr = torch.zeros(0, len(RELATIONS[edge_type]))
    graph.bbox = torch.tensor([bbox if bbox is not None else [float("nan")] * 4], dtype=torch.float64)
    graph.crs = crs
    return graph


POS_TOLERANCE = 1e-3
"""How far outside ``[0, 1]`` a normalised anchor coordinate may lie (float rounding at the bbox edge)."""


def validate_graph(graph: HeteroData, feature_dim: int | None = None) -> None:
    """Check that ``graph`` follows the contract; raise :class:`~geolink.errors.InputError` (a ``ValueError``)
    naming the first violation.

    Works on single graphs and on ``Batch.from_data_list`` batches. Checked: every node and edge type is present
    (a missing type is an error, not filled in: build graphs with ``OSMGraphBuilder`` or start from
    :func:`empty_graph`), the shapes of ``x`` ``[N, D]``, ``pos`` ``[N, A, 2]`` (``A`` from :data:`NUM_ANCHORS`) and
    ``edge_index`` ``[2, E]``, edge indices in range, ``x`` and ``pos`` finite, and ``pos`` within ``[0, 1]``
    (up to :data:`POS_TOLERANCE`). The cost is a few reductions over the node tensors, small next to a forward pass.

    Args:
        graph: the graph to check.
        feature_dim: expected width of ``x``; not checked when None.
    """
    if not isinstance(graph, HeteroData):
        raise InputError(f"graph must be a torch_geometric HeteroData (or a Batch of them), got {type(graph).__name__}")
    for node_type in NODE_TYPES:
        if node_type not in graph.node_types:
            raise InputError(f"graph has no node type {node_type!r}; every graph needs all of {NODE_TYPES}, empty "
                             f"ones as x [0, D] and pos [0, {NUM_ANCHORS[node_type]}, 2] (see schema.empty_graph)")
        store = graph[node_type]
        if "x" not in store or "pos" not in store:
            raise InputError(f"graph[{node_type!r}] needs both 'x' [N, D] and 'pos' [N, A, 2]")
        x, pos = store.x, store.pos
        if x.dim() != 2:
            raise InputError(f"graph[{node_type!r}].x must be [N, D], got shape {tuple(x.shape)}")
        if feature_dim is not None and x.shape[1] != feature_dim:
            raise InputError(f"graph[{node_type!r}].x has width {x.shape[1]}, this encoder expects {feature_dim}: "
                             "build the graph with the text model the model was trained with")
        anchors = NUM_ANCHORS[node_type]
        if pos.shape != (x.shape[0], anchors, 2):
            raise InputError(f"graph[{node_type!r}].pos must be [{x.shape[0]}, {anchors}, 2] ({anchors} anchors per "
                             f"{node_type}), got {tuple(pos.shape)}")
        if x.numel() and not bool(torch.isfinite(x).all()):
            raise InputError(f"graph[{node_type!r}].x has NaN or infinite values; rebuild the graph or drop the "
                             "non-finite features")
        if pos.numel():
            if not bool(torch.isfinite(pos).all()):
                raise InputError(f"graph[{node_type!r}].pos has NaN or infinite values; drop the features with "
                                 "non-finite coordinates")
            low, high = float(pos.min()), float(pos.max())
            if low < -POS_TOLERANCE or high > 1 + POS_TOLERANCE:
                raise InputError(f"graph[{node_type!r}].pos spans [{low:.4g}, {high:.4g}], outside [0, 1]: anchors "
                                 "are normalised image coordinates (u, v); build the graph with the tile's bbox")
    for edge_type in EDGE_TYPES:
        if edge_type not in graph.edge_types:
            raise InputError(f"graph has no edge type {edge_type}; empty edge types must be present as [2, 0]")
        edge_index = graph[edge_type].edge_index
        if edge_index.dim() != 2 or edge_index.shape[0] != 2:
            raise InputError(f"graph[{edge_type}].edge_index must be [2, E], got {tuple(edge_index.shape)}")
        src, _, dst = edge_type
        if edge_index.numel() and (int(edge_index[0].max()) >= graph[src].num_nodes
                                   or int(edge_index[1].max()) >= graph[dst].num_nodes):
            raise InputError(f"graph[{edge_type}].edge_index points past the last node")
