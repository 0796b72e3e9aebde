"""``geolink embed --engine ray``: the same per-window functions on a Ray cluster, with ``ray.data``.

The windows become a Ray Dataset; a pool of build actors turns each into ``(image, graph, meta)`` with the job's
:class:`~geolink.embed.dataset.EmbedDataset` (shipped once per actor through the object store: the OSM features
already read and reprojected, and the tag embeddings already computed, so no actor reads a source or runs the text
model); a pool of model actors (one per GPU, or one on CPU) runs :class:`~geolink.embed.encoder.WindowEncoder` on
batches, the field's standard batch-inference pattern. The driver commits the finished windows in the same parts as
the local engine, so ``resume`` works across engines.
"""

from __future__ import annotations

import copy
import json
import pickle
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from geolink.runtime import import_ray


class TagTable:
    """A tag encoder that only looks up precomputed embeddings (what build actors get instead of the text model).

    Args:
        table: ``{tag string: [D] float32}``.
    """

    def __init__(self, table: dict[str, np.ndarray]) -> None:
        self.table = table

    def encode(self, strings: Iterable[str], progress: bool = False) -> torch.Tensor:
        """``[n, D]`` embeddings of ``strings`` (all of them precomputed)."""
        strings = list(strings)
        if not strings:
            width = len(next(iter(self.table.values()))) if self.table else 0
            return torch.zeros(0, width)
        return torch.from_numpy(np.stack([self.table[s] for s in strings]))


def portable_dataset(dataset: Any, tag_encoder: Any) -> Any:
    """A copy of the job's dataset that pickles: file handles dropped, the text model replaced by a
    :class:`TagTable` of every tag string of the sources."""
    portable = copy.copy(dataset)
    portable._handles = {}
    if tag_encoder is not None:
        strings = sorted({s for tags in dataset.sources.tags() for s in dataset.builder.tag_strings(tags)})
        vectors = tag_encoder.encode(strings).numpy()
        portable.builder = copy.copy(dataset.builder)
        portable.builder.tag_encoder = TagTable(dict(zip(strings, vectors, strict=True)))
    return portable


class BuildWindows:
    """Ray actor: window positions → pixels, graphs and metadata (:meth:`EmbedDataset.__getitem__`)."""

    def __init__(self, dataset_bytes: bytes) -> None:
        self.dataset = pickle.loads(dataset_bytes)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, graphs, metas = [], [], []
        for position in batch["position"]:
            image, graph, meta = self.dataset[int(position)]
            images.append(pickle.dumps(image.numpy() if image is not None else None))
            graphs.append(pickle.dumps(graph))
            metas.append(json.dumps(meta))
        return {"image": np.array(images, dtype=object), "graph": np.array(graphs, dtype=object),
                "meta": np.array(metas, dtype=object)}


class EncodeWindows:
    """Ray actor: the model, loaded once per actor, embedding batches of built windows."""

    def __init__(self, model: str, device: str, precision: str) -> None:
        from geolink.embed.encoder import load_window_encoder

        self.encoder, _ = load_window_encoder(model, device, precision)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        metas = [json.loads(m) for m in batch["meta"]]
        images = [pickle.loads(b) for b in batch["image"]]
        graphs = [pickle.loads(b) for b in batch["graph"]]
        kept = [i for i, meta in enumerate(metas) if not meta["skipped"]]
        embeddings: list[bytes] = [pickle.dumps(None)] * len(metas)
        if kept:
            vectors, _ = self.encoder(torch.from_numpy(np.stack([images[i] for i in kept])), [graphs[i] for i in kept],
                                      [metas[i]["mode"] for i in kept])
            for i, vector in zip(kept, vectors, strict=True):
                embeddings[i] = pickle.dumps(vector)
        return {"meta": batch["meta"], "embedding": np.array(embeddings, dtype=object)}


def run_ray(config: Any, job: dict[str, Any], todo: Sequence[tuple[int, Any]], parts: Any) -> dict[str, int]:
    """Embed ``todo`` on Ray (started locally when no cluster is connected); the driver hands the finished windows
    to ``parts`` (:class:`~geolink.embed.job.PartWriter`), which commits them as the local engine does.

    Returns:
        Window counts: fused, image, skipped, failed_windows.
    """
    ray = import_ray()
    dataset = job["dataset"]
    portable = copy.copy(dataset)
    portable.windows = list(todo)
    portable = portable_dataset(portable, job["tag_encoder"])
    windows = ray.data.from_items([{"position": k} for k in range(len(todo))])
    workers = max(1, config.workers)
    gpus = 1 if job["encoder"].device.type == "cuda" else 0
    built = windows.map_batches(BuildWindows, fn_constructor_args=(pickle.dumps(portable),), concurrency=workers,
                                batch_size=config.batch_size, batch_format="numpy")
    encoded = built.map_batches(EncodeWindows, fn_constructor_args=(config.model, config.device,
                                                                    config.precision.value),
                                concurrency=max(1, torch.cuda.device_count()) if gpus else 1, num_gpus=gpus,
                                batch_size=config.batch_size, batch_format="numpy")
    counts = {"fused": 0, "image": 0, "skipped": 0, "failed_windows": 0}
    from tqdm.auto import tqdm

    from geolink.embed.encoder import window_errors

    with tqdm(total=len(todo), desc="embedding (ray)", unit="window", disable=config.quiet) as bar:
        for batch in encoded.iter_batches(batch_size=config.part_size, batch_format="numpy"):
            metas = [json.loads(m) for m in batch["meta"]]
            counts["failed_windows"] += window_errors(metas, config.keep_going)
            counts["skipped"] += sum(m["skipped"] and not m.get("error") for m in metas)
            rows = [(m, pickle.loads(e)) for m, e in zip(metas, batch["embedding"], strict=True) if not m["skipped"]]
            for meta, _ in rows:
                counts[meta["mode"]] += 1
            parts.add([m for m, _ in rows], [e for _, e in rows])
            bar.update(len(metas))
    parts.commit()
    return counts
