"""Storing tile graphs: the stored-graph codec, vocabulary files and the one tag-mixing kernel.

Owns the stored graph format (one safetensors file per tile holding the compact form: tag vocabulary ids + weights
as CSR, anchors, edges as relation codes; nothing is pickled), its one decoder (:func:`graph_from_tensors`, shared
by tile files and pair shards), the vocabulary files of a graph folder (``<name>.json`` + optional
``<name>.safetensors`` embedding table), and how tag features become node features: :func:`mix_tags` (the one
kernel, ``embedding_bag`` on the CSR form: builder, stored graphs and pair shards all use it) and
:func:`pad_tags` (the one CSR → padded ``[N, K]`` slotting).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch_geometric.data import HeteroData

from geolink.errors import DataError, InputError, MissingInputError
from geolink.graph.schema import EDGE_TYPES, NODE_TYPES, NUM_ANCHORS, RELATIONS, edge_type_name
from geolink.graph.tags import TagVocabulary

FORMAT_VERSION = "geolink-graph/1"

REVERSE_EDGE_TYPE = {("polygon", "to", "line"): ("line", "to", "polygon"),
                     ("line", "to", "point"): ("point", "to", "line"),
                     ("polygon", "to", "point"): ("point", "to", "polygon")}
"""Edge types stored as the transpose of another (same relation codes, see DESIGN §3) when they are exactly that."""


# ---------------------------------------------------------------------------------------------- tag features


def mix_tags(table: torch.Tensor, ids: torch.Tensor | np.ndarray, weights: torch.Tensor | np.ndarray,
             counts: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Node features from tags in CSR form: ``x[i] = sum_k weights[k] * table[ids[k]]`` over node ``i``'s tags.

    The one tag-mixing kernel (``embedding_bag``, mode sum), used by the builder, stored graphs and pair shards.

    Args:
        table: ``[V, D]`` embedding table.
        ids: flat tag ids ``[T]`` into ``table``, node by node.
        weights: flat weights ``[T]`` (cast to the table's dtype).
        counts: tags per node ``[N]`` (sums to ``T``; a node without tags gets zeros).

    Returns:
        ``[N, D]`` features, in the table's dtype.

    Raises:
        DataError: an id is outside the table (the graph was written with another vocabulary).
    """
    ids = torch.as_tensor(ids).long()
    counts = torch.as_tensor(counts).long()
    if ids.numel() and int(ids.max()) >= table.shape[0]:
        raise DataError(f"the graph refers to tag id {int(ids.max())} but the table has {table.shape[0]} rows: "
                        "load the vocabulary the graph was written with")
    return F.embedding_bag(ids, table, torch.cumsum(counts, 0) - counts, mode="sum",
                           per_sample_weights=torch.as_tensor(weights).to(table.dtype))


def pad_tags(ids: np.ndarray, weights: np.ndarray, counts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR tags → the padded compact form: ``tags`` int64 ``[N, K]`` (-1 padded) and ``tag_weight`` float32
    ``[N, K]``, with ``K`` the largest tag count (0 without nodes)."""
    counts = np.asarray(counts, dtype=np.int64)
    n = counts.shape[0]
    width = int(counts.max()) if n else 0
    rows = np.repeat(np.arange(n), counts)
    slot = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
    padded_ids = np.full((n, width), -1, dtype=np.int64)
    padded_weight = np.zeros((n, width), dtype=np.float32)
    padded_ids[rows, slot] = ids
    padded_weight[rows, slot] = weights
    return torch.from_numpy(padded_ids), torch.from_numpy(padded_weight)


def _csr(ids: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The padded compact form → CSR ``(ids, weights, counts)`` (padding dropped)."""
    valid = ids >= 0
    return ids[valid], weight[valid], valid.sum(1)


def materialize_x(graph: HeteroData, table: torch.Tensor, drop_compact: bool = False) -> HeteroData:
    """Set ``g[t].x = sum_k tag_weight[:, k] * table[tags[:, k]]`` for each node type (in place; returns graph).

    Args:
        graph: a graph in compact form (``tags``/``tag_weight``).
        table: the ``[V, D]`` embedding table of its vocabulary.
        drop_compact: remove ``tags``/``tag_weight`` afterwards (their width K differs between graphs, so graphs
            must drop them before ``Batch.from_data_list``).

    Raises:
        DataError: a tag id is outside the table.
    """
    for t in NODE_TYPES:
        store = graph[t]
        store.x = mix_tags(table, *_csr(store.tags.long(), store.tag_weight.float()))
        if drop_compact:
            del store.tags, store.tag_weight
    return graph


# ---------------------------------------------------------------------------------------------- codec


def _index_dtype(limit: int) -> torch.dtype:
    return torch.int16 if limit < 2**15 else torch.int32


def _sorted_transpose(edge_index: torch.Tensor, relation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flipped = edge_index.flip(0)
    order = np.lexsort((flipped[1].numpy(), flipped[0].numpy()))
    return flipped[:, order], relation[order]


def _relation_codes(edge_attr: torch.Tensor) -> torch.Tensor:
    return edge_attr.argmax(1).to(torch.uint8) if edge_attr.numel() else torch.zeros(0, dtype=torch.uint8)


def graph_tensors(graph: HeteroData) -> dict[str, torch.Tensor]:
    """The flat tensors of a graph's stored form.

    Per node type: ``pos`` float32; either the compact tags in CSR form (``tag_ids`` flat vocabulary ids,
    ``tag_count`` int16 tags per node, ``tag_weight`` flat float32 weights; padding removed) or ``x`` float32. Per
    edge type: ``edge_index`` (int16 when the node counts allow) and ``relation`` (uint8 codes of the one-hot).
    polygon→line, line→point and polygon→point are omitted when they are the sorted transpose of their reverse
    (always, for builder output).
    """
    counts = {t: int(graph[t].pos.shape[0]) for t in NODE_TYPES}
    tensors: dict[str, torch.Tensor] = {"bbox": graph.bbox.to(torch.float64).reshape(1, 4)}
    for t in NODE_TYPES:
        store = graph[t]
        tensors[f"{t}.pos"] = store.pos.to(torch.float32).contiguous()
        if "tags" in store:
            ids, weight, count = _csr(store.tags.long(), store.tag_weight.float())
            tensors[f"{t}.tag_ids"] = ids.to(torch.int32).contiguous()
            tensors[f"{t}.tag_count"] = count.to(torch.int16).contiguous()
            tensors[f"{t}.tag_weight"] = weight.contiguous()
        else:
            tensors[f"{t}.x"] = store.x.to(torch.float32).contiguous()
    for edge_type in EDGE_TYPES:
        store = graph[edge_type]
        relation = _relation_codes(store.edge_attr)
        reverse = REVERSE_EDGE_TYPE.get(edge_type)
        if reverse is not None:
            flipped, flipped_rel = _sorted_transpose(graph[reverse].edge_index.cpu(),
                                                     _relation_codes(graph[reverse].edge_attr))
            if torch.equal(flipped, store.edge_index.cpu()) and torch.equal(flipped_rel, relation):
                continue
        src, _, dst = edge_type
        name = edge_type_name(edge_type)
        tensors[f"{name}.edge_index"] = store.edge_index.to(_index_dtype(max(counts[src], counts[dst]))).contiguous()
        tensors[f"{name}.relation"] = relation.contiguous()
    return tensors


def graph_from_tensors(tensors: Mapping[str, torch.Tensor | np.ndarray], crs: str,
                       table: torch.Tensor | None = None) -> HeteroData:
    """Rebuild a graph from the (flattened) tensors of :func:`graph_tensors`.

    The one decoder of the stored graph format, for tile files (:func:`load_graph`) and pair shards alike:
    ``pos`` → ``[N, A, 2]``; ``tag_ids``/``tag_count``/``tag_weight`` → the padded compact form (:func:`pad_tags`),
    or, with ``table`` (the dataset's ``[V, D]`` embedding table), ``x`` directly (:func:`mix_tags` on the stored
    CSR form); relation codes → one-hot ``edge_attr``; omitted transposed edge types are rebuilt from their
    reverse. In numpy because these tensors are tiny and per-op overhead dominates.
    """
    arrays = {k: v.numpy() if torch.is_tensor(v) else v for k, v in tensors.items()}
    graph = HeteroData()
    for t in NODE_TYPES:
        pos = arrays[f"{t}.pos"].reshape(-1, NUM_ANCHORS[t], 2)
        n = pos.shape[0]
        store = graph[t]
        store.pos = torch.from_numpy(pos)
        if f"{t}.tag_ids" in arrays:
            csr = (arrays[f"{t}.tag_ids"].astype(np.int64), arrays[f"{t}.tag_weight"],
                   arrays[f"{t}.tag_count"].astype(np.int64))
            if table is not None:
                store.x = mix_tags(table, *(torch.from_numpy(a) for a in csr))
            else:
                store.tags, store.tag_weight = pad_tags(*csr)
        else:
            store.x = torch.from_numpy(arrays[f"{t}.x"].astype(np.float32).reshape(n, -1))
        store.num_nodes = n
    for edge_type in EDGE_TYPES:
        name = edge_type_name(edge_type)
        if f"{name}.edge_index" in arrays:
            edge_index = arrays[f"{name}.edge_index"].astype(np.int64).reshape(2, -1)
            relation = arrays[f"{name}.relation"].astype(np.int64)
        else:
            # the transpose of the reverse type, sorted by (src, dst), as _sorted_transpose writes it
            reverse = edge_type_name(REVERSE_EDGE_TYPE[edge_type])
            flipped = arrays[f"{reverse}.edge_index"].astype(np.int64).reshape(2, -1)[::-1]
            order = np.lexsort((flipped[1], flipped[0]))
            edge_index = np.ascontiguousarray(flipped[:, order])
            relation = arrays[f"{reverse}.relation"].astype(np.int64)[order]
        store = graph[edge_type]
        store.edge_index = torch.from_numpy(edge_index)
        store.edge_attr = torch.from_numpy(_eye(len(RELATIONS[edge_type]))[relation])
    graph.bbox = torch.from_numpy(arrays["bbox"].astype(np.float64).reshape(1, 4))
    graph.crs = crs
    return graph


_EYES: dict[int, np.ndarray] = {}


def _eye(k: int) -> np.ndarray:
    if k not in _EYES:
        _EYES[k] = np.eye(k, dtype=np.float32)
    return _EYES[k]


def save_graph(graph: HeteroData, path: str | Path, **metadata: str) -> Path:
    """Write a tile graph as one safetensors file (atomically); see :func:`graph_tensors` for the layout.

    Args:
        graph: a DESIGN §3 graph, compact (``tags``/``tag_weight``) or materialised (``x``).
        path: output file (``.safetensors``).
        metadata: extra string metadata (e.g. ``vocab`` naming the vocabulary file of the folder).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(graph_tensors(graph), str(tmp), metadata={"format": FORMAT_VERSION, "crs": str(graph.crs),
                                                        **{k: str(v) for k, v in metadata.items()}})
    tmp.chmod(0o644)
    tmp.replace(path)
    return path


def load_graph(path: str | Path, table: torch.Tensor | None = None) -> HeteroData:
    """Read a graph written by :func:`save_graph`.

    Args:
        path: the ``.safetensors`` file.
        table: the folder's ``[V, D]`` embedding table; when given, ``x`` is materialised from the compact form
            (which is kept).

    Raises:
        DataError: the file is not a geolink graph file.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT_VERSION:
            raise DataError(f"{path} is not a geolink graph file (format {metadata.get('format')!r})")
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    graph = graph_from_tensors(tensors, metadata.get("crs", "EPSG:4326"))
    if table is not None and f"{NODE_TYPES[0]}.tag_ids" in tensors:
        materialize_x(graph, table)
    return graph


# ---------------------------------------------------------------------------------------------- vocabulary files


def save_vocabulary(folder: str | Path, vocabulary: TagVocabulary, name: str = "vocab",
                    table: torch.Tensor | None = None, **info: Any) -> None:
    """Write ``<name>.json`` (the tag strings) and, when given, ``<name>.safetensors`` (the ``[V, D]`` table)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if table is not None:
        if table.shape[0] != len(vocabulary):
            raise InputError(f"embedding table has {table.shape[0]} rows for {len(vocabulary)} tag strings")
        tmp = folder / f"{name}.safetensors.tmp"
        save_file({"embeddings": table.float().contiguous()}, str(tmp),
                  metadata={k: str(v) for k, v in info.items()})
        tmp.replace(folder / f"{name}.safetensors")
    vocabulary.save(folder / f"{name}.json", **info)


def load_table(folder: str | Path, name: str = "vocab") -> torch.Tensor:
    """The ``[V, D]`` embedding table ``<name>.safetensors`` of a graph folder.

    Raises:
        MissingInputError: the folder has no table (it was built without a text model).
    """
    from safetensors.torch import load_file

    path = Path(folder) / f"{name}.safetensors"
    if not path.is_file():
        raise MissingInputError(f"{path} not found: build the folder with text_model, or pass tag_encoder= to "
                                "GraphFolder to embed the vocabulary now")
    return load_file(str(path))["embeddings"]
