"""Image–OSM pair datasets over the sharded format, and the collate that batches pairs for the models.

A pair is ``(image [C, H, W] float, graph HeteroData)`` following ``geolink.graph.schema``. :func:`collate_pairs`
stacks images and batches graphs into one PyG ``Batch``. :class:`PairShards` (map-style) and
:class:`StreamingPairShards` (iterable, split across DDP ranks and DataLoader workers) read the sharded format of
:mod:`geolink.data.shards`: decode the stored image bytes, apply a joint augmentation (:mod:`geolink.data.transforms`),
normalise (:func:`geolink.runtime.normalise`), and compute ``x`` from the dataset's embedding table. Folder datasets
(graph folders, the official example layout) live in :mod:`geolink.data.folders`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info
from torch_geometric.data import Batch, HeteroData

from geolink.data.shards import PairShardReader, decode_image
from geolink.data.transforms import default_eval_transform, default_train_transform
from geolink.errors import DataError, InputError
from geolink.graph.storage import graph_from_tensors
from geolink.runtime import IMAGENET_MEAN, IMAGENET_STD, normalise, rank_and_world, sample_seed


def collate_pairs(pairs: Sequence[tuple[torch.Tensor, HeteroData]]) -> tuple[torch.Tensor, Batch]:
    """``[(image, graph), ...] -> (images [B, C, H, W], Batch of B graphs)``."""
    images, graphs = zip(*pairs)
    return torch.stack(images), Batch.from_data_list(list(graphs))


def _resolve_transform(transform: Any, img_size: int) -> Any:
    if isinstance(transform, str):
        if transform == "train":
            return default_train_transform(img_size)
        if transform == "eval":
            return default_eval_transform(img_size)
        raise InputError(f"transform must be 'train', 'eval', None or a JointTransform, got {transform!r}")
    return transform


class _PairDecoder:
    """What both shard datasets do to one stored sample (whose graph already has ``x`` from :meth:`table`): decode
    the image, augment image and graph jointly, normalise."""

    def __init__(self, root: str | Path, transform: Any, img_size: int, seed: int | None, tag_encoder: Any,
                 mean: Sequence[float] | None, std: Sequence[float] | None,
                 storage_options: Mapping[str, Any] | None) -> None:
        self.reader = PairShardReader(root, storage_options)
        self.transform = _resolve_transform(transform, img_size)
        self.seed = seed
        index = self.reader.index
        self.mean = tuple(mean or index.get("mean") or IMAGENET_MEAN)
        self.std = tuple(std or index.get("std") or IMAGENET_STD)
        self.tag_encoder = tag_encoder
        self._table: torch.Tensor | None = None

    def table(self) -> torch.Tensor:
        """The ``[V, D]`` tag embedding table (the stored one, or the vocabulary embedded by ``tag_encoder``)."""
        if self._table is None:
            if self.tag_encoder is not None:
                self._table = self.tag_encoder.embedding_table(self.reader.vocabulary())
            else:
                self._table = self.reader.table()
        return self._table

    def decode(self, image_bytes: bytes | memoryview, graph: HeteroData, name: str, seed: int | None
               ) -> tuple[torch.Tensor, HeteroData]:
        image = decode_image(image_bytes, name)  # uint8 [3, H, W]: transforms crop before converting to float
        if self.transform is not None:
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            image, graph = self.transform(image, graph, generator)
        image = normalise(image, self.mean, self.std)  # uint8 or float in [0, 1]
        graph.name = name
        return image.contiguous(), graph


class PairShards(Dataset):
    """Map-style dataset over a sharded pair dataset (:mod:`geolink.data.shards`), local or fsspec URL.

    Item ``i`` is ``(image [3, H, W] float32 normalised, graph HeteroData)`` with ``g[t].x`` ``[N, D]``
    materialised from the dataset's embedding table (D = the text model width) and ``g.name`` the sample name.
    ``dataset[i, draw]`` gives the augmentation draw ``draw`` of sample ``i``: augmentation is seeded by
    ``(seed, i, draw)``, so it never depends on worker or process layout (``dataset[i]`` is draw 0; pass the
    epoch or stream position as ``draw`` to vary it).

    Args:
        root: dataset folder or URL (``index.json`` inside).
        transform: ``"train"`` (:func:`~geolink.data.transforms.default_train_transform`), ``"eval"`` (resize),
            a :class:`~geolink.data.transforms.JointTransform`, or None (native image size).
        img_size: output side of the ``"train"``/``"eval"`` transforms.
        seed: augmentation seed; None draws from the global torch RNG instead (not reproducible).
        tag_encoder: embed the stored vocabulary with this text model instead of reading the stored table.
        mean: normalisation mean (default: the dataset's index, else ImageNet).
        std: normalisation std (default: the dataset's index, else ImageNet).
        storage_options: fsspec options for URLs.
    """

    def __init__(self, root: str | Path, transform: Any = "train", img_size: int = 224, seed: int | None = 0,
                 tag_encoder: Any = None, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 storage_options: Mapping[str, Any] | None = None) -> None:
        self._decoder = _PairDecoder(root, transform, img_size, seed, tag_encoder, mean, std, storage_options)
        self.reader = self._decoder.reader
        self.names = self.reader.names
        if not self.names:
            raise DataError(f"{root} holds no pairs")

    def __len__(self) -> int:
        return len(self.reader)

    @property
    def transform(self) -> Any:
        """The joint transform applied to every item."""
        return self._decoder.transform

    def table(self) -> torch.Tensor:
        """The ``[V, D]`` tag embedding table."""
        return self._decoder.table()

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, HeteroData]:
        index, draw = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), 0)
        k, j = self.reader.locate(index)
        shard = self.reader.shard(k)
        seed = None if self._decoder.seed is None else sample_seed(self._decoder.seed, index % len(self), draw)
        return self._decoder.decode(shard.image_bytes(j), shard.graph(j, self._decoder.table()), shard.names[j], seed)


class StreamingPairShards(IterableDataset):
    """Iterable dataset streaming a sharded pair dataset once per epoch, split without duplicates.

    The ``world_size × num_workers`` readers (DDP ranks × DataLoader workers) each get a disjoint part: whole
    shards (``shard_order[slot::slots]``) when there are at least as many shards as readers, otherwise every reader
    scans all shards and keeps the samples with ``global_index % slots == slot``. The shard order is shuffled with
    ``(seed, epoch)`` and samples pass through a shuffle buffer seeded with ``(seed, epoch, slot)``; augmentation is
    seeded by ``(seed, global index, epoch)``. Readers can receive different sample counts (±1 shard): give DDP ranks
    equal data (shards of equal size, a multiple of the reader count) or stop each epoch after a fixed step count.

    Args:
        root: dataset folder or URL.
        transform: as :class:`PairShards`.
        img_size: as :class:`PairShards`.
        seed: shuffle + augmentation seed.
        shuffle: shuffle shard order and samples (buffer); False streams in stored order.
        buffer_size: samples held by the shuffle buffer (compact, undecoded: ~tens of kB each).
        rank: this process's rank (default: :func:`geolink.runtime.rank_and_world`).
        world_size: number of processes (default: as ``rank``).
        tag_encoder: as :class:`PairShards`.
        mean: as :class:`PairShards`.
        std: as :class:`PairShards`.
        storage_options: fsspec options for URLs.
    """

    def __init__(self, root: str | Path, transform: Any = "train", img_size: int = 224, seed: int = 0,
                 shuffle: bool = True, buffer_size: int = 256, rank: int | None = None,
                 world_size: int | None = None, tag_encoder: Any = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, storage_options: Mapping[str, Any] | None = None) -> None:
        self._decoder = _PairDecoder(root, transform, img_size, seed, tag_encoder, mean, std, storage_options)
        self.reader = self._decoder.reader
        self.seed, self.shuffle, self.buffer_size = int(seed), shuffle, max(1, int(buffer_size))
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (reshuffles shards and buffer, changes augmentation draws); call before iterating."""
        self.epoch = int(epoch)

    @property
    def num_samples(self) -> int:
        """Samples in the whole dataset (all readers together)."""
        return len(self.reader)

    def assignment(self, slot: int, slots: int) -> list[tuple[int, int | None]]:
        """``(shard, sample filter)`` pairs reader ``slot`` of ``slots`` reads, in order (filter None = all)."""
        order = list(range(len(self.reader.shards)))
        if self.shuffle:
            generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, 0))
            order = torch.randperm(len(order), generator=generator).tolist()
        if len(order) >= slots:
            return [(k, None) for k in order[slot::slots]]
        return [(k, slot) for k in order]

    def _compact(self, slot: int, slots: int) -> Iterator[tuple[int, bytes, dict, str, str]]:
        vocab_size = int(self._decoder.table().shape[0])
        for k, keep in self.assignment(slot, slots):
            shard = self.reader.shard(k)
            first = int(self.reader.offsets[k])
            for j in range(shard.num_samples):
                if keep is not None and (first + j) % slots != keep:
                    continue
                yield (first + j, bytes(shard.image_bytes(j)), shard.graph_arrays(j, vocab_size), shard.crs[j],
                       shard.names[j])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, HeteroData]]:
        worker = get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        rank, world = ((int(self.rank), int(self.world_size)) if self.rank is not None and self.world_size is not None
                       else rank_and_world())
        slot, slots = rank * workers + worker_id, world * workers
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, slot + 1))
        buffer: list[tuple[int, bytes, dict, str, str]] = []

        def emit(item: tuple[int, bytes, dict, str, str]) -> tuple[torch.Tensor, HeteroData]:
            index, data, tensors, crs, name = item
            return self._decoder.decode(data, graph_from_tensors(tensors, crs, self._decoder.table()), name,
                                        sample_seed(self.seed, index, self.epoch))

        for item in self._compact(slot, slots):
            if not self.shuffle:
                yield emit(item)
                continue
            if len(buffer) < self.buffer_size:
                buffer.append(item)
                continue
            pick = int(torch.randint(0, len(buffer), (), generator=generator))
            buffer[pick], item = item, buffer[pick]
            yield emit(item)
        while buffer:
            pick = int(torch.randint(0, len(buffer), (), generator=generator))
            yield emit(buffer.pop(pick))
