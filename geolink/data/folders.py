"""Datasets over plain folders: the tile graphs of ``geolink build-graphs`` and the official example pairs.

Owns :class:`GraphFolder` (a ``build-graphs`` output folder, ``x`` materialised on access from the stored or a
freshly embedded vocabulary table) and :class:`OfficialPairFolder` (``img/<name>.png`` + ``graph/<name>.safetensors``
in the official graph layout, as the UFZ samples ship). The sharded pair datasets live in :mod:`geolink.data.pairs`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torch_geometric.data import HeteroData

from geolink.errors import DataError, MissingInputError
from geolink.graph.official import load_official_graph
from geolink.graph.storage import (
    MAX_INDEX_BYTES,
    MAX_INPUT_BYTES,
    check_file,
    load_graph,
    load_table,
    materialize_x,
    path_inside,
    read_jsonl,
)
from geolink.graph.tags import TagVocabulary
from geolink.runtime import IMAGENET_MEAN, IMAGENET_STD, normalise


class GraphFolder:
    """The tiles written by ``geolink build-graphs`` (or :func:`geolink.graph.tiles.build_tiles`), with ``x``
    materialised on access.

    Args:
        folder: the output folder (``index*.jsonl``, ``vocab*.json``, ``vocab*.safetensors``, ``tiles/``).
        tag_encoder: embeds the vocabulary now instead of reading the stored tables (e.g. another text model).

    Raises:
        MissingInputError: the folder indexes no tiles.
        DataError: an index file is not a regular file or too large, a line before its last is not JSON, or an entry
            names a file outside the folder. (A torn last line, left by a killed ``build-graphs``, is skipped with a
            warning: that tile is rebuilt when the build is resumed.)
    """

    def __init__(self, folder: str | Path, tag_encoder: Any = None) -> None:
        self.folder = Path(folder)
        entries: dict[str, dict[str, Any]] = {}
        for index in sorted(self.folder.glob("index*.jsonl")):
            for number, entry in enumerate(read_jsonl(index, "graph folder index"), 1):
                if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                    raise DataError(f"graph folder index {index} line {number} is not a tile record (no 'name'): "
                                    "restore the index or rebuild the folder with geolink build-graphs")
                for key, name in (("file", entry.get("file")), ("vocab", f"{entry.get('vocab')}.json")):
                    path_inside(self.folder, name, f"{index} line {number} {key!r}")
                entries[entry["name"]] = entry
        if not entries:
            raise MissingInputError(f"no tiles indexed in {self.folder} (expected index*.jsonl): build it with "
                                    "geolink build-graphs")
        self.entries = [entries[k] for k in sorted(entries)]
        self._names = {e["name"]: i for i, e in enumerate(self.entries)}
        self.tag_encoder = tag_encoder
        self._tables: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def table(self, vocab: str) -> torch.Tensor:
        """Embedding table of the vocabulary ``vocab`` (cached)."""
        if vocab not in self._tables:
            if self.tag_encoder is not None:
                path = self.folder / f"{vocab}.json"
                check_file(path, "vocabulary", MAX_INDEX_BYTES)
                strings = TagVocabulary.load(path).strings
                self._tables[vocab] = self.tag_encoder.encode(strings)
            else:
                self._tables[vocab] = load_table(self.folder, vocab)
        return self._tables[vocab]

    def __getitem__(self, key: int | str) -> HeteroData:
        entry = self.entries[self._names[key] if isinstance(key, str) else key]
        graph = load_graph(self.folder / entry["file"])
        materialize_x(graph, self.table(entry["vocab"]))
        graph.name = entry["name"]
        return graph


def image_to_tensor(path: str | Path, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
                    ) -> torch.Tensor:
    """Read an RGB image file as a normalised float tensor ``[3, H, W]``."""
    check_file(path, "image", MAX_INPUT_BYTES)
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"))  # uint8 [H, W, 3]
    return normalise(torch.from_numpy(array.copy()).permute(2, 0, 1), mean, std)


class OfficialPairFolder(Dataset):
    """Pairs in the official example layout: ``<root>/img/<name>.png`` and ``<root>/graph/<name>.safetensors``.

    Args:
        root: the folder holding ``img/`` and ``graph/``.

    Raises:
        MissingInputError: no image has a matching graph.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        images = {p.stem: p for p in sorted((self.root / "img").glob("*.png"))}
        graphs = {p.stem: p for p in sorted((self.root / "graph").glob("*.safetensors"))}
        self.names = sorted(set(images) & set(graphs))
        if not self.names:
            raise MissingInputError(f"{self.root} has no img/<name>.png with a matching graph/<name>.safetensors")
        self._images = [images[n] for n in self.names]
        self._graphs = [load_official_graph(graphs[n]) for n in self.names]

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, HeteroData]:
        return image_to_tensor(self._images[index]), self._graphs[index]
