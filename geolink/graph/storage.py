"""Storing tile graphs: the stored-graph codec, vocabulary files and the one tag-mixing kernel.

Owns the stored graph format (one safetensors file per tile holding the compact form: tag vocabulary ids + weights
as CSR, anchors, edges as relation codes; nothing is pickled), its one decoder (:func:`graph_from_tensors`, shared
by tile files and pair shards), the vocabulary files of a graph folder (``<name>.json`` + optional
``<name>.safetensors`` embedding table), and how tag features become node features: :func:`mix_tags` (the one
kernel, ``embedding_bag`` on the CSR form: builder, stored graphs and pair shards all use it) and
:func:`pad_tags` (the one CSR → padded ``[N, K]`` slotting).
"""

from __future__ import annotations

import json
import os
import stat
import warnings
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch_geometric.data import HeteroData

from geolink.errors import DataError, InputError, MissingInputError
from geolink.graph.schema import EDGE_TYPES, NODE_TYPES, NUM_ANCHORS, POS_TOLERANCE, RELATIONS, edge_type_name
from geolink.graph.tags import TagVocabulary

FORMAT_VERSION = "geolink-graph/1"

REVERSE_EDGE_TYPE = {("polygon", "to", "line"): ("line", "to", "polygon"),
                     ("line", "to", "point"): ("point", "to", "line"),
                     ("polygon", "to", "point"): ("point", "to", "polygon")}
"""Edge types stored as the transpose of another (same relation codes, see DESIGN §3) when they are exactly that."""

MAX_INDEX_BYTES = 256 * 2**20
"""Size limit of a JSON index or vocabulary file of a dataset (``index.json``, ``vocab.json``, ``index.jsonl``)."""
MAX_TABLE_BYTES = 16 * 2**30
"""Size limit of an embedding table file (``vocab.safetensors``)."""
MAX_GRAPH_BYTES = 1 * 2**30
"""Size limit of one stored tile graph file (and of an official-layout graph file)."""
MAX_GEOJSON_BYTES = 8 * 2**30
"""Size limit of a GeoJSON file (read whole into memory)."""
MAX_INPUT_BYTES = 2**40
"""Size limit of an input file read as a stream (``.osm.pbf`` extracts, GeoTIFF headers, vector files)."""


# ---------------------------------------------------------------------------------------------- safe dataset files


def path_inside(root: str | Path, name: Any, where: str) -> str:
    """The path of ``name`` (a file named by an index) under the dataset ``root``, refusing any path that escapes it.

    The one check of names read from index files (pair datasets and graph folders): ``name`` must be a plain
    relative name (no absolute path, no ``..``, no URL); for a local ``root`` the resolved path (symlinks followed)
    must also lie inside the resolved root. For a URL ``root`` (``s3://...``) the name is joined under it.

    Args:
        root: the dataset folder or fsspec URL.
        name: the file name as the index gives it.
        where: the index entry, for messages (e.g. ``"index.json shards[3].file"``).

    Raises:
        DataError: ``name`` is not a string, is absolute, contains ``..`` or leads outside ``root``.
    """
    if not isinstance(name, str) or not name or "\\" in name or "://" in name or "\0" in name:
        raise DataError(f"{where} is {name!r}: it must be a file name relative to the dataset folder {root}; "
                        "restore the index or rebuild the dataset")
    parts = PurePosixPath(name).parts
    if PurePosixPath(name).is_absolute() or ".." in parts:
        raise DataError(f"{where} is {name!r}, which leads outside the dataset folder {root}: index entries must be "
                        "relative names inside it; restore the index or rebuild the dataset")
    if "://" in str(root):
        return str(root).rstrip("/") + "/" + name
    base = Path(root).resolve()
    path = Path(root) / name
    if not path.resolve().is_relative_to(base):
        raise DataError(f"{where} is {name!r}, a link to {path.resolve()} outside the dataset folder {root}: index "
                        "entries must be files inside it; replace the link with the file or rebuild the dataset")
    return str(path)


def check_file(path: str | Path, what: str, max_bytes: int) -> int:
    """Check, before reading, that ``path`` is a regular file (not a FIFO, device or link to one) of at most
    ``max_bytes`` bytes; returns its size.

    Raises:
        MissingInputError: ``path`` does not exist.
        DataError: it is not a regular file, or is larger than the format allows.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise MissingInputError(f"{what} {path} not found") from None
    if not stat.S_ISREG(info.st_mode):
        raise DataError(f"{what} {path} is not a regular file (a device, pipe or folder, or a link to one): replace "
                        "it with the file itself")
    if info.st_size > max_bytes:
        raise DataError(f"{what} {path} has {info.st_size} bytes, more than the {max_bytes} this format allows: "
                        "the file is corrupt or not what its name says")
    return int(info.st_size)


def read_jsonl(path: str | Path, what: str, repair: bool = False) -> list[Any]:
    """The records of a JSON-lines file that a writer appends to (``index.jsonl``, ``metrics.jsonl``), tolerating
    the torn last line of a write cut short by a kill.

    The one reader of such files. A last line that is not JSON (or lacks its newline) is what a kill in the middle of
    an append leaves: it is dropped with a ``UserWarning`` naming the file (every record is a JSON object, so a cut
    record never parses). With ``repair`` the file is rewritten atomically without it, so the next append starts on
    a fresh line. A bad line before the last is not a torn write: it is named and nothing is changed.

    Args:
        path: the file (checked: a regular file within :data:`MAX_INDEX_BYTES`).
        what: what the file is, for messages (e.g. ``"graph folder index"``).
        repair: rewrite the file without its torn last line.

    Returns:
        The decoded lines (blank lines skipped).

    Raises:
        MissingInputError: ``path`` does not exist.
        DataError: not a regular file, too large, or a line before the last is not JSON.
    """
    path = Path(path)
    check_file(path, what, MAX_INDEX_BYTES)
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail: bytes after the last newline (empty when the file ends with one)
    records, kept = [], []
    for number, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if number < len(complete) or tail.strip():
                raise DataError(f"{what} {path} line {number} is not a JSON record; repair or delete that line (the "
                                "file is damaged: only a torn last line is repaired)") from None
            complete = complete[:number - 1]
            tail = line
            break
        kept.append(line)
    torn = bool(tail.strip())
    if torn:
        try:
            records.append(json.loads(tail))
            kept.append(tail)  # a whole record whose newline was cut off: kept, the newline restored by a repair
        except ValueError:
            warnings.warn(f"{path}: dropped a torn last line (line {len(complete) + 1} of this {what}, a write cut "
                          "short by a kill)", UserWarning, stacklevel=2)
    if torn and repair:
        staging = path.with_name(f".{path.name}.tmp")
        staging.write_bytes(b"".join(line + b"\n" for line in kept))
        os.replace(staging, path)
    return records


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


def check_graph_arrays(arrays: Mapping[str, np.ndarray], where: str, vocab_size: int | None = None) -> None:
    """Check the flat stored-graph arrays of one graph (the :func:`graph_tensors` keys, flattened) before decoding.

    Cheap vectorised checks: every key is present with a plausible dtype and size, ``pos``, ``x``, ``tag_weight``
    and ``bbox`` are finite, ``pos`` lies in ``[0, 1]`` (up to the schema's tolerance), ``tag_count`` is
    non-negative and sums to the number of ``tag_ids``, tag ids lie in ``[0, vocab_size)``, edge indices lie inside
    their node types and relation codes inside their edge type's relations.

    Args:
        arrays: the flat arrays.
        where: the file and sample, for messages.
        vocab_size: the number of tag strings (ids are checked against it when given).

    Raises:
        DataError: the first inconsistency found, naming ``where`` and the key.
    """
    def fail(key: str, problem: str) -> DataError:
        return DataError(f"{where}: stored graph column {key!r} {problem}; the file is corrupt: rebuild it")

    def get(key: str, kind: str) -> np.ndarray:
        if key not in arrays:
            raise fail(key, "is missing")
        value = np.asarray(arrays[key]).reshape(-1)
        if value.dtype.kind not in kind:
            raise fail(key, f"has dtype {value.dtype}")
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise fail(key, f"holds NaN or infinite values (first at element {int(np.argmin(np.isfinite(value)))})")
        return value

    counts = {}
    for t in NODE_TYPES:
        pos = get(f"{t}.pos", "f")
        if pos.size % (2 * NUM_ANCHORS[t]):
            raise fail(f"{t}.pos", f"has {pos.size} values, not a multiple of {2 * NUM_ANCHORS[t]}")
        n = counts[t] = pos.size // (2 * NUM_ANCHORS[t])
        if pos.size and (float(pos.min()) < -POS_TOLERANCE or float(pos.max()) > 1 + POS_TOLERANCE):
            raise fail(f"{t}.pos", f"spans [{float(pos.min()):.4g}, {float(pos.max()):.4g}], outside the [0, 1] of "
                       "normalised anchors")
        if f"{t}.tag_ids" in arrays:
            ids, count = get(f"{t}.tag_ids", "iu"), get(f"{t}.tag_count", "iu")
            weight = get(f"{t}.tag_weight", "f")
            if count.size != n or (count < 0).any() or int(count.sum()) != ids.size or weight.size != ids.size:
                raise fail(f"{t}.tag_count", f"does not match {n} nodes with {ids.size} tag ids and {weight.size} "
                           "weights")
            if ids.size and (int(ids.min()) < 0 or (vocab_size is not None and int(ids.max()) >= vocab_size)):
                raise fail(f"{t}.tag_ids", f"holds ids from {int(ids.min())} to {int(ids.max())}, outside the "
                           f"vocabulary of {vocab_size} tag strings")
        else:
            x = get(f"{t}.x", "f")
            if (x.size % n) if n else x.size:
                raise fail(f"{t}.x", f"has {x.size} values for {n} nodes")
    for edge_type in EDGE_TYPES:
        name = edge_type_name(edge_type)
        if f"{name}.edge_index" not in arrays and edge_type in REVERSE_EDGE_TYPE:
            continue  # rebuilt from its reverse, checked there
        edges, relation = get(f"{name}.edge_index", "iu"), get(f"{name}.relation", "iu")
        src, _, dst = edge_type
        if edges.size % 2 or relation.size != edges.size // 2:
            raise fail(f"{name}.edge_index", f"has {edges.size} values for {relation.size} relation codes")
        pairs = edges.reshape(2, -1)
        if pairs.size and (int(pairs.min()) < 0 or int(pairs[0].max()) >= counts[src]
                           or int(pairs[1].max()) >= counts[dst]):
            raise fail(f"{name}.edge_index", f"refers to nodes outside the {counts[src]} {src} and {counts[dst]} "
                       f"{dst} nodes")
        if relation.size and int(relation.max()) >= len(RELATIONS[edge_type]):
            raise fail(f"{name}.relation", f"holds code {int(relation.max())}, {edge_type} has "
                       f"{len(RELATIONS[edge_type])} relations")
    if get("bbox", "f").size != 4:
        raise fail("bbox", "does not hold 4 values")


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


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
                     ) -> Path:
    """Write a safetensors file atomically, byte for byte the same for the same tensors and metadata.

    The one writer of every graph-layer safetensors file (tile graphs, vocabulary tables, tag tables). The
    ``safetensors`` package writes its metadata in hash order, which changes from process to process; here the
    header is fixed: metadata keys sorted, tensors ordered by dtype size (largest first, which keeps every tensor
    aligned) then name, the header padded with spaces to a multiple of 8 bytes, as ``safetensors`` itself does.

    Args:
        tensors: name → tensor (any device; written contiguous, little-endian).
        path: output file; written to ``<path>.tmp`` first, then renamed over ``path``.
        metadata: string → string metadata (``__metadata__``).
    """
    import json
    import struct

    names = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(metadata[k]) for k in sorted(metadata)}
    blobs, offset = [], 0
    for name in names:
        tensor = tensors[name].detach().contiguous().cpu()
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise InputError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors files cannot hold")
        blob = (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy().tobytes()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text)
        for blob in blobs:
            handle.write(blob)
    tmp.chmod(0o644)
    tmp.replace(path)
    return path


def save_graph(graph: HeteroData, path: str | Path, **metadata: str) -> Path:
    """Write a tile graph as one safetensors file (atomically); see :func:`graph_tensors` for the layout.

    Args:
        graph: a DESIGN §3 graph, compact (``tags``/``tag_weight``) or materialised (``x``).
        path: output file (``.safetensors``).
        metadata: extra string metadata (e.g. ``vocab`` naming the vocabulary file of the folder).
    """
    return save_safetensors(graph_tensors(graph), path, {"format": FORMAT_VERSION, "crs": str(graph.crs),
                                                         **{k: str(v) for k, v in metadata.items()}})


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

    check_file(path, "graph file", MAX_GRAPH_BYTES)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT_VERSION:
                raise DataError(f"{path} is not a geolink graph file (format {metadata.get('format')!r})")
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    except DataError:
        raise
    except Exception as err:  # safetensors raises its own error types
        raise DataError(f"graph file {path} is not a readable safetensors file ({err}): rebuild it") from None
    check_graph_arrays(tensors, f"graph file {path}")
    graph = graph_from_tensors(tensors, metadata.get("crs", "EPSG:4326"))
    if table is not None and f"{NODE_TYPES[0]}.tag_ids" in tensors:
        materialize_x(graph, table)
    return graph


# ---------------------------------------------------------------------------------------------- vocabulary files


def save_vocabulary(folder: str | Path, vocabulary: TagVocabulary, name: str = "vocab",
                    table: torch.Tensor | None = None, **info: Any) -> None:
    """Write ``<name>.json`` (the tag strings) and, when given, ``<name>.safetensors`` (the ``[V, D]`` table)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if table is not None:
        if table.shape[0] != len(vocabulary):
            raise InputError(f"embedding table has {table.shape[0]} rows for {len(vocabulary)} tag strings")
        save_safetensors({"embeddings": table.float()}, folder / f"{name}.safetensors",
                         {k: str(v) for k, v in info.items()})
    vocabulary.save(folder / f"{name}.json", **info)


def load_table(folder: str | Path, name: str = "vocab") -> torch.Tensor:
    """The ``[V, D]`` embedding table ``<name>.safetensors`` of a graph folder.

    Raises:
        MissingInputError: the folder has no table (it was built without a text model).
    """
    from safetensors.torch import load_file

    path = Path(folder) / f"{name}.safetensors"
    if not path.exists():
        raise MissingInputError(f"{path} not found: build the folder with text_model, or pass tag_encoder= to "
                                "GraphFolder to embed the vocabulary now")
    check_file(path, "embedding table", MAX_TABLE_BYTES)
    try:
        table = load_file(str(path))["embeddings"]
    except Exception as err:  # safetensors raises its own error types
        raise DataError(f"embedding table {path} is not a readable safetensors file ({err}): rebuild it") from None
    return check_table(table, str(path))


def check_table(table: torch.Tensor, where: str) -> torch.Tensor:
    """``table`` if it is a finite ``[V, D]`` embedding table; raises :class:`DataError` naming ``where`` and the
    first non-finite row otherwise."""
    if table.ndim != 2:
        raise DataError(f"embedding table {where} has shape {list(table.shape)}, not [V, D]: rebuild it")
    finite = torch.isfinite(table).all(1)
    if not bool(finite.all()):
        raise DataError(f"embedding table {where} has NaN or infinite values in row {int((~finite).nonzero()[0])}: "
                        "rebuild it with the text model")
    return table
