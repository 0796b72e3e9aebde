"""Sharded, append-only, streamable storage of image–OSM pairs, and the ``geolink make-pairs`` job that writes it.

Owns the on-disk dataset format, its reader/writer, and building a dataset from image tiles and OSM data
(:class:`MakePairsConfig` → :func:`make_pairs`). A dataset is a folder (local, or any fsspec URL for
reading)::

    index.json                format version, shard list (file, sample count, names, bytes), image formats,
                              text model id + width, vocabulary files, normalisation mean/std
    vocab.json                the tag vocabulary (:class:`~geolink.graph.tags.TagVocabulary`, append-only ids)
    vocab.safetensors         its ``[V, D]`` embedding table (float32)
    shard-00000.safetensors   many samples, column-major (below)

One shard is a plain safetensors file (no pickle; readable with ``safetensors.safe_open``) holding, for ``n``
samples:

* ``image`` uint8 ``[total bytes]``: the image files exactly as stored (JPEG / PNG / GeoTIFF bytes), concatenated;
  ``image.offsets`` int64 ``[n + 1]``.
* for every key ``k`` of :func:`geolink.graph.storage.graph_tensors` (the compact per-tile graph: anchors, tag ids,
  tag counts, tag weights, edges as relation codes, bbox): ``graph.<k>`` the flattened per-sample tensors
  concatenated (one dtype per key, the widest the samples used), ``graph.<k>.offsets`` int64 ``[n + 1]`` and
  ``graph.<k>.present`` uint8 ``[n]`` (``graph_tensors`` omits transposed edge types per graph).
* metadata: ``format`` (:data:`FORMAT`), ``names``, ``crs`` and ``image_formats`` (JSON lists of ``n`` strings).

Column-major storage keeps a shard a handful of tensors whatever the sample count, and the per-sample overhead is
the offsets (about 0.3 kB). Appending writes new shard files and then atomically replaces ``index.json``; existing
shards are never rewritten, so readers of the old index keep working. Local shards are memory-mapped; URL shards
are read whole (one request per shard), which is what streaming wants.
"""

from __future__ import annotations

import io
import json
import os
import struct
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch_geometric.data import HeteroData

from geolink.errors import ConfigError, DataError, InputError, MissingDependencyError, MissingInputError
from geolink.graph.build import OSMGraphBuilder
from geolink.graph.readers import read_geojson, reproject_bbox, require_file
from geolink.graph.schema import NODE_TYPES
from geolink.graph.storage import (
    MAX_INDEX_BYTES,
    MAX_TABLE_BYTES,
    check_file,
    check_graph_arrays,
    check_table,
    graph_from_tensors,
    graph_tensors,
    path_inside,
    save_vocabulary,
)
from geolink.graph.tags import TagVocabulary
from geolink.graph.text import POOLINGS
from geolink.graph.tiles import Tile, footprint_tiles, iter_tile_features, read_region
from geolink.runtime import IMAGENET_MEAN, IMAGENET_STD

FORMAT = "geolink-pairs/1"
"""Format version written into ``index.json`` and every shard; readers refuse other versions."""

INDEX_FILE = "index.json"
VOCAB_NAME = "vocab"
IMAGE_FORMATS = {b"\xff\xd8\xff": "jpeg", b"\x89PNG": "png", b"II*\x00": "tiff", b"MM\x00*": "tiff",
                 b"II+\x00": "tiff", b"MM\x00+": "tiff"}

_DTYPES = {"U8": np.uint8, "I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64, "F16": np.float16,
           "F32": np.float32, "F64": np.float64, "BOOL": np.bool_}
_MAX_HEADER = 100 * 2**20
_MAX_SHARD = 64 * 2**30


class CorruptShardError(DataError):
    """A shard, index or vocabulary file is unreadable, truncated or of another format version (names the file)."""


def image_format(data: bytes) -> str:
    """``"jpeg"``, ``"png"`` or ``"tiff"`` from an image file's magic bytes.

    Raises:
        InputError: the bytes are none of these formats.
    """
    for magic, name in IMAGE_FORMATS.items():
        if data[:len(magic)] == magic:
            return name
    raise InputError(f"image bytes start with {data[:8]!r}: not a JPEG, PNG or (Geo)TIFF file")


def _is_url(root: str | Path) -> bool:
    return "://" in str(root)


def _fsspec_fs(url: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, str]:
    try:
        import fsspec
    except ImportError as err:
        raise MissingDependencyError(f"reading {url} needs fsspec (and the filesystem's package, e.g. s3fs or gcsfs): "
                                     "`pip install fsspec`; local paths work without it") from err
    return fsspec.core.url_to_fs(url, **dict(storage_options or {}))


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


# ---------------------------------------------------------------------------------------------- one shard


class Shard:
    """A read-only view of one shard file: per-sample image bytes and graph tensors, zero-copy where possible.

    Args:
        buffer: the whole file (``np.memmap`` for local files, ``bytes`` for URLs).
        name: the file name or URL, used in every error message.
    """

    def __init__(self, buffer: np.ndarray | bytes, name: str) -> None:
        self.name = name
        data = np.frombuffer(buffer, dtype=np.uint8) if isinstance(buffer, bytes | bytearray) else buffer
        if data.size < 8:
            raise CorruptShardError(f"shard {name} is truncated ({data.size} bytes): rebuild it with make-pairs")
        (header_len,) = struct.unpack("<Q", bytes(data[:8]))
        if header_len > _MAX_HEADER or 8 + header_len > data.size:
            raise CorruptShardError(f"shard {name} has a corrupt or truncated header (declares {header_len} bytes, "
                                    f"file has {data.size}): rebuild it with make-pairs")
        try:
            header = json.loads(bytes(data[8:8 + header_len]).decode("utf-8"))
            metadata = header.pop("__metadata__", None) or {}
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError) as err:
            raise CorruptShardError(f"shard {name} has a corrupt header ({err}): rebuild it with make-pairs") from None
        if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
            found = metadata.get("format") if isinstance(metadata, dict) else None
            raise CorruptShardError(f"shard {name} has format {found!r}, this geolink reads "
                                    f"{FORMAT!r}: rebuild the dataset with this version's make-pairs")
        body = data[8 + header_len:]
        self.arrays: dict[str, np.ndarray] = {}
        for key, info in header.items():
            try:
                start, end = (int(v) for v in info["data_offsets"])
                dtype = np.dtype(_DTYPES[info["dtype"]])
                if end > body.size or not 0 <= start <= end:
                    raise CorruptShardError(f"shard {name} is truncated: tensor {key!r} ends at byte {end} of a "
                                            f"{body.size}-byte body; rebuild it with make-pairs")
                self.arrays[key] = body[start:end].view(dtype).reshape([int(d) for d in info["shape"]])
            except (KeyError, TypeError, ValueError) as err:
                raise CorruptShardError(f"shard {name} has a corrupt header entry for tensor {key!r} ({err!r}): "
                                        "rebuild it with make-pairs") from None
        try:
            self.names: list[str] = json.loads(metadata["names"])
            self.crs: list[str] = json.loads(metadata["crs"])
            self.image_formats: list[str] = json.loads(metadata["image_formats"])
            if not all(isinstance(v, list) and len(v) == len(self.names) and all(isinstance(x, str) for x in v)
                       for v in (self.names, self.crs, self.image_formats)):
                raise TypeError("names, crs and image_formats must be lists of as many strings")
        except (KeyError, TypeError, json.JSONDecodeError) as err:
            raise CorruptShardError(f"shard {name} lacks valid metadata ({err})") from None
        self.num_samples = len(self.names)
        self.graph_keys = sorted(k[len("graph."):-len(".offsets")] for k in self.arrays
                                 if k.startswith("graph.") and k.endswith(".offsets"))
        self._check_offsets("image", self.arrays.get("image.offsets"))
        for key in self.graph_keys:
            present = self.arrays.get(f"graph.{key}.present")
            if present is None or present.shape != (self.num_samples,):
                raise CorruptShardError(f"shard {name}: column graph.{key}.present does not hold one flag per "
                                        f"sample ({self.num_samples}); rebuild it with make-pairs")
            self._check_offsets(f"graph.{key}", self.arrays[f"graph.{key}.offsets"])

    def _check_offsets(self, key: str, offsets: np.ndarray | None) -> None:
        column = self.arrays.get(key)
        if (column is None or offsets is None or offsets.dtype.kind not in "iu"
                or offsets.shape != (self.num_samples + 1,) or int(offsets[0]) != 0
                or int(offsets[-1]) != column.size or (np.diff(offsets) < 0).any()):
            raise CorruptShardError(f"shard {self.name}: {key}.offsets do not match its {self.num_samples} samples "
                                    "and the column size; rebuild it with make-pairs")

    def __len__(self) -> int:
        return self.num_samples

    def image_bytes(self, j: int) -> memoryview:
        """The stored image file of sample ``j`` (JPEG/PNG/TIFF bytes)."""
        offsets = self.arrays["image.offsets"]
        return memoryview(self.arrays["image"][int(offsets[j]):int(offsets[j + 1])])

    def graph_arrays(self, j: int, vocab_size: int | None = None) -> dict[str, np.ndarray]:
        """Sample ``j``'s flat graph arrays (the :func:`geolink.graph.storage.graph_tensors` keys, flattened; small
        writable copies, independent of the memory map), checked by
        :func:`~geolink.graph.storage.check_graph_arrays` (tag ids against ``vocab_size`` when given).

        Raises:
            CorruptShardError: a column of the sample is inconsistent or non-finite (names the file and sample).
        """
        out = {}
        arrays = self.arrays
        for key in self.graph_keys:
            if not arrays[f"graph.{key}.present"][j]:
                continue
            start, end = arrays[f"graph.{key}.offsets"][j:j + 2].tolist()
            out[key] = np.array(arrays[f"graph.{key}"][start:end])
        try:
            check_graph_arrays(out, f"shard {self.name} sample {j} ({self.names[j]!r})", vocab_size)
        except DataError as err:
            raise CorruptShardError(str(err)) from None
        return out

    def graph_tensors(self, j: int) -> dict[str, torch.Tensor]:
        """Sample ``j``'s flat graph tensors (:meth:`graph_arrays` as torch tensors)."""
        return {k: torch.from_numpy(v) for k, v in self.graph_arrays(j).items()}

    def graph(self, j: int, table: torch.Tensor | None = None) -> HeteroData:
        """Sample ``j``'s graph: the compact contract form (``tags``/``tag_weight``, or ``x`` when stored so), or
        with ``x`` computed from ``table``."""
        return graph_from_tensors(self.graph_arrays(j, None if table is None else table.shape[0]), self.crs[j], table)


def encode_shard(samples: Sequence[tuple[str, bytes, HeteroData]]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of one shard holding ``samples`` (``(name, image bytes, compact graph)``)."""
    images = [np.frombuffer(bytes(data), dtype=np.uint8) for _, data, _ in samples]
    flat = [{k: v.reshape(-1) for k, v in graph_tensors(graph).items()} for _, _, graph in samples]
    tensors: dict[str, torch.Tensor] = {
        "image": torch.from_numpy(np.concatenate(images) if images else np.zeros(0, np.uint8)),
        "image.offsets": torch.from_numpy(np.concatenate([[0], np.cumsum([len(i) for i in images])]).astype(np.int64)),
    }
    keys = sorted({k for sample in flat for k in sample})
    for key in keys:
        pieces = [sample.get(key) for sample in flat]
        dtypes = {p.dtype for p in pieces if p is not None}
        dtype = max(dtypes, key=lambda d: (d.is_floating_point, torch.finfo(d).bits if d.is_floating_point
                                           else torch.iinfo(d).bits))
        present = [p is not None for p in pieces]
        chunks = [p.to(dtype) if p is not None else torch.zeros(0, dtype=dtype) for p in pieces]
        tensors[f"graph.{key}"] = torch.cat(chunks).contiguous()
        tensors[f"graph.{key}.offsets"] = torch.tensor([0] + np.cumsum([c.numel() for c in chunks]).tolist(),
                                                       dtype=torch.int64)
        tensors[f"graph.{key}.present"] = torch.tensor(present, dtype=torch.uint8)
    metadata = {"format": FORMAT, "names": json.dumps([name for name, _, _ in samples], ensure_ascii=False),
                "crs": json.dumps([str(graph.crs) for _, _, graph in samples]),
                "image_formats": json.dumps([image_format(bytes(data[:8])) for _, data, _ in samples])}
    return tensors, metadata


# ---------------------------------------------------------------------------------------------- reader


class PairShardReader:
    """Reads a pair dataset folder (local path or fsspec URL) written by :class:`PairShardWriter`.

    Args:
        root: the dataset folder or URL (``s3://bucket/pairs``, ``file:///data/pairs``, ``memory://pairs``).
        storage_options: passed to fsspec for URLs.
        cache_shards: how many remote shards to keep in memory (local shards are memory-mapped, all kept open).

    Attributes:
        index: the parsed ``index.json``.
        offsets: int64 ``[S + 1]`` first global sample index of each shard.
    """

    def __init__(self, root: str | Path, storage_options: Mapping[str, Any] | None = None,
                 cache_shards: int = 2) -> None:
        self.root = str(root)
        self.storage_options = dict(storage_options or {})
        self.cache_shards = max(1, int(cache_shards))
        self._fs, self._base = (None, self.root) if not _is_url(self.root) else _fsspec_fs(self.root,
                                                                                          self.storage_options)
        self.index = self._read_index()
        self.shards: list[dict[str, Any]] = self.index["shards"]
        counts = [int(s["samples"]) for s in self.shards]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._open: OrderedDict[int, Shard] = OrderedDict()
        self._table: torch.Tensor | None = None

    # -- files
    def _path(self, name: str) -> str:
        return _join(self._base, name) if self._fs is not None else str(Path(self._base) / name)

    def _read_bytes(self, name: str, max_bytes: int, where: str | None = None) -> bytes:
        """The bytes of the dataset file ``name`` (named by the index entry ``where``, checked to stay inside the
        root), after checking it is a regular file of at most ``max_bytes`` bytes."""
        if where is not None:
            path_inside(self.root, name, f"{self._display(INDEX_FILE)} {where}")
        path = self._path(name)
        try:
            if self._fs is not None:
                info = self._fs.info(path)
                if info.get("type") != "file" or int(info.get("size") or 0) > max_bytes:
                    raise DataError(f"{self._display(name)} is not a regular file of at most {max_bytes} bytes "
                                    f"({info.get('type')}, {info.get('size')} bytes): replace it with the file itself")
                return self._fs.cat_file(path)
            check_file(path, "dataset file", max_bytes)
            with open(path, "rb") as handle:
                return handle.read(max_bytes + 1)
        except FileNotFoundError:
            raise MissingInputError(f"{self._display(name)} not found") from None

    def _display(self, name: str) -> str:
        return _join(self.root, name) if self._fs is not None else str(Path(self.root) / name)

    def _read_index(self) -> dict[str, Any]:
        name = self._display(INDEX_FILE)
        try:
            raw = self._read_bytes(INDEX_FILE, MAX_INDEX_BYTES)
        except FileNotFoundError:
            raise MissingInputError(f"{name} not found: {self.root} is not a geolink pair dataset (build one with "
                                    "make_pairs / geolink make-pairs)") from None
        try:
            index = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CorruptShardError(f"{name} is not valid JSON ({err}); restore it or rebuild the dataset") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            found = index.get("format") if isinstance(index, dict) else None
            raise CorruptShardError(f"{name} has format {found!r}, this geolink reads {FORMAT!r}: "
                                    "rebuild the dataset with this version's make-pairs")
        try:
            path_inside(self.root, f"{index.get('vocabulary', VOCAB_NAME)}.json", f"{name} vocabulary")
            for k, entry in enumerate(index["shards"]):
                path_inside(self.root, entry["file"], f"{name} shards[{k}].file")
        except DataError as err:
            raise CorruptShardError(str(err)) from None
        except (KeyError, TypeError) as err:
            raise CorruptShardError(f"{name} has a malformed shard list ({err!r}); restore it or rebuild the "
                                    "dataset") from None
        return index

    # -- samples
    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def names(self) -> list[str]:
        """Sample names in global order."""
        return [n for s in self.shards for n in s["names"]]

    def locate(self, index: int) -> tuple[int, int]:
        """``(shard number, position in shard)`` of global sample ``index``."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} out of range for a dataset of {len(self)}")
        index %= len(self)
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return k, index - int(self.offsets[k])

    def shard(self, k: int) -> Shard:
        """Shard number ``k`` (opened on first use; local files memory-mapped, remote ones read whole)."""
        shard = self._open.get(k)
        if shard is not None:
            self._open.move_to_end(k)
            return shard
        entry = self.shards[k]
        name = self._display(entry["file"])
        if self._fs is None:
            path = path_inside(self.root, entry["file"], f"{self._display(INDEX_FILE)} shards[{k}].file")
            if not os.path.lexists(path):
                raise MissingInputError(f"shard {name} listed in {INDEX_FILE} is missing")
            size = check_file(path, "shard", _MAX_SHARD)
            if "bytes" in entry and size != int(entry["bytes"]):
                raise CorruptShardError(f"shard {name} has {size} bytes, {INDEX_FILE} says {entry['bytes']}: the file "
                                        "is truncated or was modified; rebuild it with make-pairs")
            buffer = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        else:
            buffer = self._read_bytes(entry["file"], int(entry.get("bytes", _MAX_SHARD)), f"shards[{k}].file")
            if "bytes" in entry and len(buffer) != int(entry["bytes"]):
                raise CorruptShardError(f"shard {name} has {len(buffer)} bytes, {INDEX_FILE} says {entry['bytes']}: "
                                        "the file is truncated or was modified; rebuild it with make-pairs")
        shard = Shard(buffer, name)
        if shard.num_samples != int(entry["samples"]):
            raise CorruptShardError(f"shard {name} holds {shard.num_samples} samples, {INDEX_FILE} says "
                                    f"{entry['samples']}")
        self._open[k] = shard
        if self._fs is not None:
            while len(self._open) > self.cache_shards:
                self._open.popitem(last=False)
        return shard

    def table(self) -> torch.Tensor:
        """The ``[V, D]`` tag embedding table (cached)."""
        if self._table is None:
            from safetensors.torch import load

            vocab = self.index.get("vocabulary", VOCAB_NAME)
            name = f"{vocab}.safetensors"
            try:
                raw = self._read_bytes(name, MAX_TABLE_BYTES, "vocabulary")
            except FileNotFoundError:
                raise MissingInputError(f"{self._display(name)} not found: the dataset was built without a text "
                                        "model; rebuild it with a text_model, or pass tag_encoder= to embed the "
                                        "vocabulary now") from None
            try:
                table = load(raw)["embeddings"]
            except Exception as err:  # safetensors raises its own error types
                raise CorruptShardError(f"{self._display(name)} is not a readable embedding table ({err})") from None
            try:
                self._table = check_table(table, self._display(name))
            except DataError as err:
                raise CorruptShardError(str(err)) from None
        return self._table

    def vocabulary(self) -> TagVocabulary:
        """The tag vocabulary (``tags`` ids index it)."""
        name = f"{self.index.get('vocabulary', VOCAB_NAME)}.json"
        try:
            strings = json.loads(self._read_bytes(name, MAX_INDEX_BYTES, "vocabulary").decode("utf-8"))["strings"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise CorruptShardError(f"{self._display(name)} is not a tag vocabulary ({err!r}); restore it or rebuild "
                                    "the dataset") from None
        return TagVocabulary(strings)

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers (spawn): reopen shards there, not the mmaps
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()
        return state


# ---------------------------------------------------------------------------------------------- writer


@dataclass
class _Pending:
    name: str
    data: bytes
    graph: HeteroData


class PairShardWriter:
    """Appends pairs to a (new or existing) local dataset folder.

    Pairs are buffered and written ``samples_per_shard`` at a time as new shard files; every :meth:`commit` then
    rewrites the vocabulary, its embedding table and ``index.json`` atomically (temporary file + rename, index
    last). Existing shards are never touched, so an interrupted run leaves a valid dataset (at worst an orphan
    shard file, which is not indexed and never reused).

    Args:
        root: the dataset folder (created).
        tag_encoder: embeds the vocabulary into ``vocab.safetensors`` at each commit (a
            :class:`~geolink.graph.text.TagEncoder` or anything with ``embedding_table(vocabulary) -> [V, D]`` and
            ``info() -> dict``); without it only the vocabulary is stored.
        samples_per_shard: pairs per shard file.
        mean: per-channel normalisation mean recorded in the index (default: ImageNet).
        std: per-channel normalisation std recorded in the index (default: ImageNet).

    Example:
        >>> writer = PairShardWriter("pairs", tag_encoder=TagEncoder(model_dir))
        >>> graph = builder.build(features, bbox, vocabulary=writer.vocabulary)  # compact form, ids into the vocab
        >>> writer.add("tile_0", Path("tile_0.jpg").read_bytes(), graph)
        >>> writer.close()
    """

    def __init__(self, root: str | Path, tag_encoder: Any = None, samples_per_shard: int = 1024,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        if _is_url(root):
            raise InputError(f"PairShardWriter writes local folders; build {root} locally and upload the folder")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.tag_encoder = tag_encoder
        self.samples_per_shard = max(1, int(samples_per_shard))
        info = dict(tag_encoder.info()) if tag_encoder is not None else {}
        if (self.root / INDEX_FILE).is_file():
            self.index = PairShardReader(self.root).index
            old = self.index.get("text_model") or {}
            for key in ("model_id", "dim", "pooling"):
                if info and old and key in old and str(old[key]) != str(info.get(key)):
                    raise ConfigError(f"{self.root / INDEX_FILE} was built with text model {old}, appending with "
                                      f"{info}: tag embeddings would not match; use the same text_model")
            mismatch = (mean is not None and list(mean) != self.index["mean"]) or (
                std is not None and list(std) != self.index["std"])
            if mismatch:
                raise ConfigError(f"{self.root / INDEX_FILE} records mean/std {self.index['mean']}/"
                                  f"{self.index['std']}; appending with different values would mix normalisations")
            vocab_path = self.root / f"{self.index.get('vocabulary', VOCAB_NAME)}.json"
            self.vocabulary = TagVocabulary.load(vocab_path) if vocab_path.is_file() else TagVocabulary()
        else:
            self.index = {"format": FORMAT, "samples": 0, "image_formats": [], "text_model": info or None,
                          "text_dim": info.get("dim"), "vocabulary": VOCAB_NAME,
                          "mean": list(mean or IMAGENET_MEAN), "std": list(std or IMAGENET_STD), "shards": []}
            self.vocabulary = TagVocabulary()
        self.names = {n for s in self.index["shards"] for n in s["names"]}
        self._pending: list[_Pending] = []
        existing = [int(p.stem.split("-")[1]) for p in self.root.glob("shard-*.safetensors")
                    if p.stem.split("-")[1].isdigit()]
        self._next = max(existing + [int(Path(s["file"]).stem.split("-")[1]) for s in self.index["shards"]],
                         default=-1) + 1

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def __len__(self) -> int:
        return int(self.index["samples"]) + len(self._pending)

    def add(self, name: str, image: bytes | str | Path, graph: HeteroData) -> None:
        """Queue one pair; writes a shard when ``samples_per_shard`` are queued.

        Args:
            name: unique sample name (e.g. the tile name).
            image: the image file's bytes (JPEG, PNG or GeoTIFF), or its path.
            graph: the tile graph in compact form with tag ids into :attr:`vocabulary` (or with ``x``).
        """
        if name in self.names:
            raise InputError(f"sample {name!r} is already in {self.root}; names must be unique")
        data = Path(image).read_bytes() if isinstance(image, str | Path) else bytes(image)
        image_format(data[:8])
        for t in NODE_TYPES:
            tags = graph[t].get("tags") if t in graph.node_types else None
            if tags is not None and tags.numel() and int(tags.max()) >= len(self.vocabulary):
                raise InputError(f"graph {name!r} refers to tag id {int(tags.max())} but the dataset vocabulary has "
                                 f"{len(self.vocabulary)} strings: build it with vocabulary=writer.vocabulary")
        self.names.add(name)
        self._pending.append(_Pending(name, data, graph))
        if len(self._pending) >= self.samples_per_shard:
            self.commit()

    def commit(self) -> None:
        """Write the queued pairs as new shard(s), then the vocabulary, table and index (atomically)."""
        from safetensors.torch import save_file

        new_entries = []
        for start in range(0, len(self._pending), self.samples_per_shard):
            chunk = self._pending[start:start + self.samples_per_shard]
            tensors, metadata = encode_shard([(p.name, p.data, p.graph) for p in chunk])
            file = f"shard-{self._next:05d}.safetensors"
            self._next += 1
            tmp = self.root / (file + ".tmp")
            save_file(tensors, str(tmp), metadata=metadata)
            tmp.chmod(0o644)
            tmp.replace(self.root / file)
            formats = json.loads(metadata["image_formats"])
            new_entries.append({"file": file, "samples": len(chunk), "names": [p.name for p in chunk],
                                "bytes": (self.root / file).stat().st_size,
                                "graph_bytes": sum(v.numel() * v.element_size() for k, v in tensors.items()
                                                   if k.startswith("graph.")),
                                "image_bytes": int(tensors["image"].numel())})
            self.index["image_formats"] = sorted(set(self.index["image_formats"]) | set(formats))
            dims = {int(p.graph[t].x.shape[1]) for p in chunk for t in NODE_TYPES
                    if "x" in p.graph[t] and "tags" not in p.graph[t]}
            if dims and self.index.get("text_dim") is None:
                self.index["text_dim"] = dims.pop()
        self._pending = []
        table = None
        if self.tag_encoder is not None:
            table = self.tag_encoder.embedding_table(self.vocabulary)
            self.index["text_dim"] = int(table.shape[1])
        if self.tag_encoder is not None or not (self.root / f"{VOCAB_NAME}.json").is_file():
            save_vocabulary(self.root, self.vocabulary, self.index.get("vocabulary", VOCAB_NAME), table,
                            **(self.index.get("text_model") or {}))
        elif len(self.vocabulary) != len(TagVocabulary.load(self.root / f"{VOCAB_NAME}.json")):
            save_vocabulary(self.root, self.vocabulary, self.index.get("vocabulary", VOCAB_NAME))
            (self.root / f"{VOCAB_NAME}.safetensors").unlink(missing_ok=True)  # stale: it lacks the new strings
        for path in self.root.glob(f"{self.index.get('vocabulary', VOCAB_NAME)}.*"):
            path.chmod(0o644)
        self.index["shards"] = self.index["shards"] + new_entries
        self.index["samples"] = sum(int(s["samples"]) for s in self.index["shards"])
        tmp = self.root / (INDEX_FILE + ".tmp")
        tmp.write_text(json.dumps(self.index, indent=1, ensure_ascii=False), encoding="utf-8")
        tmp.replace(self.root / INDEX_FILE)

    def close(self) -> dict[str, Any]:
        """Commit what is queued; returns the index."""
        self.commit()
        return self.index

    def __enter__(self) -> PairShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()


def shard_sizes(root: str | Path) -> dict[str, float]:
    """Bytes per sample of a local dataset: ``{"samples", "image_bytes", "graph_bytes", "file_bytes"}`` (means)."""
    index = PairShardReader(root).index
    n = max(1, int(index["samples"]))
    return {"samples": int(index["samples"]),
            "image_bytes": sum(s.get("image_bytes", 0) for s in index["shards"]) / n,
            "graph_bytes": sum(s.get("graph_bytes", 0) for s in index["shards"]) / n,
            "file_bytes": sum(s.get("bytes", 0) for s in index["shards"]) / n}


def decode_image(data: bytes | memoryview, name: str = "image") -> torch.Tensor:
    """Decode stored image bytes to an RGB uint8 tensor ``[3, H, W]``.

    JPEG and PNG go through ``torchvision.io.decode_image`` (libjpeg-turbo / libpng, about twice as fast as PIL and
    bit-identical to it on baseline JPEGs); TIFF/GeoTIFF (8-bit RGB or greyscale) and anything torchvision refuses
    go through PIL.

    Raises:
        CorruptShardError: the bytes decode with neither (message names ``name``).
    """
    raw = bytes(data)
    if raw[:3] == b"\xff\xd8\xff" or raw[:4] == b"\x89PNG":
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_image as tv_decode

        try:
            return tv_decode(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass  # e.g. an unusual JPEG variant: let PIL try
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as image:
            if image.mode != "RGB":
                image = image.convert("RGB")
            array = np.array(image)  # writable copy
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise CorruptShardError(f"{name}: the stored image cannot be decoded ({err}); it must be an 8-bit RGB "
                                "JPEG, PNG or GeoTIFF") from None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------------------------------------- make-pairs

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


def official_tiles(folder: str | Path) -> list[tuple[str, Path, list[tuple[Any, Any]], tuple[float, ...], str, str]]:
    """The official example layout ``<folder>/<tile>/{<tile>.jpg, <tile>_{polygon,line,point}.geojson, meta.json}``
    as ``(name, image path, features in polygon/line/point file order, bbox, tile crs, feature crs)`` per tile.

    Raises:
        MissingInputError: the folder does not exist or holds no tile folder, or a tile folder lacks its image or
            ``meta.json`` (the message names it).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingInputError(f"official_tiles {folder}: no such folder (pass the folder holding one sub-folder per "
                                "official example tile)")
    tiles = []
    for tile in sorted(p for p in folder.iterdir() if p.is_dir()):
        meta_path = tile / "meta.json"
        images = [tile / f"{tile.name}{s}" for s in IMAGE_SUFFIXES if (tile / f"{tile.name}{s}").is_file()]
        if not meta_path.is_file() or not images:
            raise MissingInputError(f"{tile} is not an official example tile: it needs meta.json and "
                                    f"{tile.name}.jpg (or .png/.tif)")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        features: list[tuple[Any, Any]] = []
        feature_crs = None
        for kind in NODE_TYPES:
            path = tile / f"{tile.name}_{kind}.geojson"
            if path.is_file():
                rows, feature_crs = read_geojson(path)
                features.extend(rows)
        tile_crs = str(meta.get("crs", "EPSG:4326"))
        tiles.append((tile.name, images[0], features, tuple(meta["bbox_west_south_east_north"]), tile_crs,
                      feature_crs or tile_crs))
    if not tiles:
        raise MissingInputError(f"official_tiles {folder} holds no tile folders")
    return tiles


def _image_tiles(images: Path, footprints: Path | None, crs: str) -> list[tuple[Tile, Path]]:
    paths = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if images.is_dir() else []
    if not paths:
        raise MissingInputError(f"images {images}: no {'/'.join(IMAGE_SUFFIXES)} files found")
    if footprints is None:
        return list(zip(footprint_tiles(paths), paths, strict=True))  # GeoTIFF bounds + CRS
    table = json.loads(require_file(footprints, "footprints file").read_text(encoding="utf-8"))
    if not isinstance(table, dict):
        raise DataError(f"footprints {footprints} must be a JSON object {{image file name or stem: "
                        "[west, south, east, north]}}")
    out = []
    for path in paths:
        bbox = table.get(path.name, table.get(path.stem))
        if bbox is None:
            raise DataError(f"footprints {footprints} has no entry for {path.name} (key by file name or stem)")
        out.append((Tile(path.stem, tuple(float(v) for v in bbox), crs), path))
    return out


@dataclass
class MakePairsConfig:
    """Pair image tiles with their OpenStreetMap graphs and store them as a sharded, append-only pair dataset
    (index.json + safetensors shards + tag vocabulary and embedding table; no pickle) that pretraining,
    PairShards and StreamingPairShards read. Inputs: the official example layout (official_tiles), or a folder of
    image tiles (images) with footprints (a footprints JSON, or the GeoTIFF bounds) and an OSM source (pbf or
    vector). Rerunning on the same out appends new tiles and skips those already stored."""

    out: Path = field(metadata={"help": "dataset folder (created, or appended to)"})
    text_model: str = field(metadata={
        "help": "text model for the tag embedding table: 'minilm' (offline, 384 wide), 'clip' (the official one, "
                "512 wide), a local folder or a Hub id"})
    official_tiles: Path | None = field(default=None, metadata={
        "help": "official layout: DIR/<tile>/{<tile>.jpg, <tile>_{polygon,line,point}.geojson, meta.json}",
        "metavar": "DIR"})
    images: Path | None = field(default=None, metadata={"help": "folder of image tiles (.jpg/.png/.tif)",
                                                        "metavar": "DIR"})
    footprints: Path | None = field(default=None, metadata={
        "help": "with images: {image file name or stem: [west, south, east, north]} in crs (default: read the "
                "GeoTIFF bounds of the images)", "metavar": "JSON"})
    crs: str = field(default="EPSG:4326", metadata={"help": "CRS of footprints"})
    pbf: Path | None = field(default=None, metadata={
        "help": "with images: .osm.pbf / .osm file (read for the tiles' extent only)"})
    vector: Path | None = field(default=None, metadata={
        "help": "with images: any vector file geolink reads (GeoJSON, .gpkg, ...)"})
    pooling: str = field(default="official", metadata={"help": f"tag pooling: {', '.join(POOLINGS)}"})
    tag_weights: str = field(default="official", metadata={
        "help": "key-frequency JSON, or official for the table shipped with geolink"})
    samples_per_shard: int = field(default=1024, metadata={"help": "pairs per shard file"})
    device: str = field(default="auto", metadata={"help": "text model device (auto: cuda if available)"})
    quiet: bool = field(default=False, metadata={"help": "no progress bars"})

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        for name in ("official_tiles", "images", "footprints", "pbf", "vector"):
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))
        if (self.official_tiles is None) == (self.images is None):
            raise ConfigError("pass exactly one input: official_tiles (the official example layout) or images "
                              "(a folder of image tiles)")
        if self.pbf is not None and self.vector is not None:
            raise ConfigError("pass at most one OSM source: pbf or vector")
        if self.images is not None and self.pbf is None and self.vector is None:
            raise ConfigError("images needs an OSM source: pass pbf (e.g. city.osm.pbf) or vector "
                              "(e.g. features.gpkg)")
        extra = [name for name in ("footprints", "pbf", "vector") if getattr(self, name) is not None]
        if self.official_tiles is not None and extra:
            raise ConfigError(f"{', '.join(extra)} only go with images; official_tiles folders carry their own "
                              "footprints and features")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.samples_per_shard < 1:
            raise ConfigError(f"samples_per_shard must be at least 1, got {self.samples_per_shard}")


def make_pairs(config: MakePairsConfig, tag_encoder: Any = None) -> dict[str, Any]:
    """The ``geolink make-pairs`` job: build (or append to) a pair dataset.

    Graphs are built with :class:`~geolink.graph.build.OSMGraphBuilder` in compact form; samples already in
    ``config.out`` are skipped. For ``images``, the OSM source is read once for the whole set
    (:func:`geolink.graph.tiles.read_region`; a ``pbf`` only for the union of the footprints).

    Args:
        config: the job.
        tag_encoder: embeds the vocabulary instead of a :class:`~geolink.graph.text.TagEncoder` of
            ``config.text_model`` (anything with ``embedding_table(vocabulary)`` and ``info()``).

    Returns:
        ``{"out", "added", "skipped", "samples", "nodes", "vocabulary", "shards"}``.

    Raises:
        MissingInputError: an input file or folder does not exist.
    """
    from tqdm.auto import tqdm

    progress = not config.quiet
    for name in ("official_tiles", "images", "footprints", "pbf", "vector"):  # before loading the text model
        if getattr(config, name) is not None:
            require_file(getattr(config, name), name)
    if tag_encoder is None:
        from geolink.graph.text import TagEncoder

        tag_encoder = TagEncoder(config.text_model, pooling=config.pooling, device=config.device)
    builder = OSMGraphBuilder(None, tag_weights=config.tag_weights)
    writer = PairShardWriter(config.out, tag_encoder=tag_encoder, samples_per_shard=config.samples_per_shard)
    jobs: list[tuple[str, Path, Any]] = []  # (name, image, (features, bbox, crs, feature_crs))
    skipped = 0
    if config.official_tiles is not None:
        for name, image, features, bbox, tile_crs, feature_crs in official_tiles(config.official_tiles):
            jobs.append((name, image, (features, bbox, tile_crs, feature_crs)))
    else:
        tiles = _image_tiles(config.images, config.footprints, config.crs)
        todo = [(t, p) for t, p in tiles if t.name not in writer]
        skipped = len(tiles) - len(todo)
        if todo:
            bbox = None
            if config.pbf is not None:  # read the extract for the union of the footprints only
                boxes = np.array([reproject_bbox(t.bbox, t.crs, "EPSG:4326") for t, _ in todo])
                bbox = (*boxes[:, :2].min(0), *boxes[:, 2:].max(0))
            region = read_region(config.pbf, config.vector, crs=config.crs, bbox=bbox,
                                 tag_weights=config.tag_weights, progress=progress)
            paths = {t.name: p for t, p in todo}
            for tile, tile_features in iter_tile_features(region, [t for t, _ in todo]):
                jobs.append((tile.name, paths[tile.name], (tile_features, tile.bbox, tile.crs, region.crs)))
    added = nodes = 0
    for name, image, (features, bbox, tile_crs, feature_crs) in tqdm(jobs, desc="building pairs", unit="pair",
                                                                     disable=not progress):
        if name in writer:
            skipped += 1
            continue
        graph = builder.build(features, bbox, tile_crs, feature_crs=None if feature_crs == tile_crs else feature_crs,
                              vocabulary=writer.vocabulary, materialize=False)
        writer.add(name, image, graph)
        nodes += sum(int(graph[t].pos.shape[0]) for t in NODE_TYPES)
        added += 1
    index = writer.close()
    return {"out": str(config.out), "added": added, "skipped": skipped, "samples": int(index["samples"]),
            "nodes": nodes, "vocabulary": len(writer.vocabulary), "shards": len(index["shards"])}


__all__ = ["FORMAT", "CorruptShardError", "MakePairsConfig", "PairShardReader", "PairShardWriter", "Shard",
           "decode_image", "encode_shard", "image_format", "make_pairs", "official_tiles", "shard_sizes"]
