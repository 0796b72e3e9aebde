"""Official-layout graphs → geolink graphs (DESIGN §3).

The official GeoLink code stores a tile graph as a ``HeteroData`` whose node features are ``[N, text_dim + 2A]``
(tag features, then the A anchors flattened as (u, v) pairs), e.g. the UFZ example graphs as safetensors. This
module owns reading that layout (:func:`load_official_graph`, :func:`official_graph_from_tensors`) and converting it
(:func:`graph_from_official`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch_geometric.data import HeteroData

from geolink.errors import DataError
from geolink.graph.schema import EDGE_TYPES, NODE_TYPES, NUM_ANCHORS, RELATIONS, edge_type_name
from geolink.graph.storage import MAX_GRAPH_BYTES, check_file


def graph_from_official(official: HeteroData, text_dim: int | None = None) -> HeteroData:
    """An official-layout graph -> a geolink graph (DESIGN §3).

    Official node features are ``[N, text_dim + 2A]``: tag features, then the A anchors flattened as (u, v) pairs.
    Edge types the official graph lacks become empty ones; ``edge_attr`` is kept (same vocabularies).

    Args:
        official: ``HeteroData`` with ``x`` per node type and ``edge_index``/``edge_attr`` per edge type.
        text_dim: tag feature width; inferred from the widths when None.

    Returns:
        A new graph; ``official`` is not modified.

    Raises:
        DataError: a node type is missing, or the feature / edge attribute widths do not fit the schema.
    """
    graph = HeteroData()
    for node_type in NODE_TYPES:
        if node_type not in official.node_types:
            raise DataError(f"official graph has no {node_type!r} nodes at all (not even an empty [0, D] x)")
        x = official[node_type].x
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
            raise DataError(f"official {node_type} features must be a float [N, text_dim + 2A] tensor, got "
                            f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        anchors = NUM_ANCHORS[node_type]
        width = x.shape[1] - 2 * anchors if text_dim is None else text_dim
        if width <= 0 or x.shape[1] != width + 2 * anchors:
            raise DataError(f"official {node_type} features have width {x.shape[1]}; expected text_dim + "
                             f"{2 * anchors} anchor coordinates")
        graph[node_type].x = x[:, :width].float().clone()
        graph[node_type].pos = x[:, width:].float().reshape(-1, anchors, 2).clone()
    for edge_type in EDGE_TYPES:
        num_relations = len(RELATIONS[edge_type])
        if edge_type in official.edge_types:
            store = official[edge_type]
            edge_index = store.edge_index.long().clone()
            if edge_index.dim() != 2 or edge_index.shape[0] != 2:
                raise DataError(f"official {edge_type_name(edge_type)} edge_index has shape "
                                f"{tuple(edge_index.shape)}, expected [2, E]")
            edge_attr = store.get("edge_attr")
            edge_attr = (edge_attr.float().clone() if edge_attr is not None
                         else torch.zeros(edge_index.shape[1], num_relations))
            if edge_attr.shape != (edge_index.shape[1], num_relations):
                raise DataError(f"official {edge_type_name(edge_type)} edge_attr has shape {tuple(edge_attr.shape)}, "
                                 f"expected [{edge_index.shape[1]}, {num_relations}]")
        else:
            edge_index, edge_attr = torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, num_relations)
        graph[edge_type].edge_index = edge_index
        graph[edge_type].edge_attr = edge_attr
    graph.bbox = torch.full((1, 4), float("nan"), dtype=torch.float64)
    graph.crs = "EPSG:4326"
    return graph


def official_graph_from_tensors(tensors: dict[str, torch.Tensor], prefix: str = "") -> HeteroData:
    """Rebuild an official-layout ``HeteroData`` from flat tensors (``<type>.x``,
    ``<src>__to__<dst>.edge_index``/``.edge_attr``) as stored in safetensors files, optionally under ``prefix``."""
    official = HeteroData()
    for node_type in NODE_TYPES:
        key = f"{prefix}{node_type}.x"
        if key in tensors:
            official[node_type].x = tensors[key]
    for edge_type in EDGE_TYPES:
        base = f"{prefix}{edge_type_name(edge_type)}"
        if f"{base}.edge_index" in tensors:
            official[edge_type].edge_index = tensors[f"{base}.edge_index"]
            if f"{base}.edge_attr" in tensors:
                official[edge_type].edge_attr = tensors[f"{base}.edge_attr"]
    return official


def load_official_graph(path: str | Path, prefix: str = "", text_dim: int | None = None) -> HeteroData:
    """Read an official-layout graph stored as safetensors (e.g. the UFZ examples) as a geolink graph.

    Raises:
        MissingInputError: ``path`` does not exist.
        DataError: it is not a regular file within :data:`~geolink.graph.storage.MAX_GRAPH_BYTES`, not a readable
            safetensors file, or its tensors do not form an official graph (each naming the file).
    """
    import safetensors
    import safetensors.torch

    check_file(path, "official graph", MAX_GRAPH_BYTES)
    try:
        tensors = safetensors.torch.load_file(str(path))
    except (safetensors.SafetensorError, OSError, ValueError) as error:
        raise DataError(f"official graph {path} is not a readable safetensors file ({error}); restore or "
                        "re-download it") from None
    try:
        return graph_from_official(official_graph_from_tensors(tensors, prefix), text_dim)
    except DataError as error:
        raise DataError(f"official graph {path}: {error}") from None
