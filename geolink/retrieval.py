"""Image↔OSM retrieval in the shared space of the contrastive heads: indexes, exact top-k search, recall@k.

GeoLink's pretraining pulls an image and its OSM region together in one ``projection_dim``-wide space
(:meth:`GeoLinkForPretraining.encode_image` / :meth:`~GeoLinkForPretraining.encode_osm`). This module owns:

- :func:`topk_cosine`: exact top-k by cosine, queries against keys in chunks of a torch matmul (no ANN index: at
  ``projection_dim`` 64, a million keys is a 256 MB float32 matrix and a query batch a few matmuls);
- :class:`EmbeddingIndex`: unit vectors with their names and modality, built from image files, graph files, a pair
  dataset (:func:`pair_embeddings`) or the ``embedding`` column of a GeoParquet (e.g. ``geolink embed``'s output,
  read with pyarrow only);
- :func:`recall_at_k`: image→OSM and OSM→image recall@k of paired embeddings, next to chance (k / N);
- the ``geolink retrieve`` job (:class:`RetrieveConfig` → :func:`retrieve`): top-k with scores as JSON or CSV plus a
  contact sheet PNG of the query and its hits, or ``--evaluate`` for recall@k.
"""

from __future__ import annotations

import csv
import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset
from torch_geometric.data import Batch, HeteroData

from geolink.errors import DataError, InputError, MissingInputError
from geolink.graph.schema import NODE_TYPES
from geolink.models import GeoLinkForPretraining
from geolink.models.pretrain import require_pretraining_model

MODALITIES = ("image", "osm")
BUNDLED_PAIRS = Path(__file__).parent / "assets" / "pairs"


def topk_cosine(queries: torch.Tensor, keys: torch.Tensor, k: int = 10, chunk: int = 65536
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k cosine similarity of every query against every key.

    Args:
        queries: ``[Q, P]``; keys ``[N, P]`` (both normalised here).
        k: hits per query (at most N).
        chunk: keys per matmul; each chunk's top-k is merged into the running top-k, so memory is ``Q × chunk``.

    Returns:
        ``(scores [Q, k], indices [Q, k])``, best first.
    """
    if queries.shape[-1] != keys.shape[-1]:
        raise InputError(f"queries are {queries.shape[-1]}-wide but the index holds {keys.shape[-1]}-wide "
                         "embeddings: embed both with the same model (encode_image / encode_osm)")
    if keys.shape[0] == 0:
        raise InputError("the index is empty: build it from at least one image or graph")
    queries, keys = F.normalize(queries.float(), dim=-1), F.normalize(keys.float(), dim=-1)
    k = min(k, keys.shape[0])
    best_scores = queries.new_full((queries.shape[0], 0), float("-inf"))
    best_indices = torch.zeros(queries.shape[0], 0, dtype=torch.long, device=queries.device)
    for start in range(0, keys.shape[0], chunk):
        chunk_top = torch.topk(queries @ keys[start:start + chunk].t(), min(k, keys.shape[0] - start), dim=1)
        merged_scores = torch.cat([best_scores, chunk_top.values], dim=1)  # [Q, ≤ 2k]
        merged_indices = torch.cat([best_indices, chunk_top.indices + start], dim=1)
        top = torch.topk(merged_scores, min(k, merged_scores.shape[1]), dim=1)
        best_scores, best_indices = top.values, torch.gather(merged_indices, 1, top.indices)
    return best_scores, best_indices


@dataclass
class EmbeddingIndex:
    """L2-normalised embeddings ``[N, P]`` of one modality with a name per row (and optionally what to draw)."""

    embeddings: torch.Tensor
    names: list[str]
    modality: str
    items: list[Any] | None = None  # image tensors or graphs, for contact sheets

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise InputError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        if self.embeddings.dim() != 2 or self.embeddings.shape[0] != len(self.names):
            raise InputError(f"embeddings {tuple(self.embeddings.shape)} do not match {len(self.names)} names")
        self.embeddings = F.normalize(self.embeddings.float(), dim=-1)

    def __len__(self) -> int:
        return len(self.names)

    def search(self, queries: torch.Tensor, k: int = 10) -> list[list[tuple[int, str, float]]]:
        """Top-k ``(row, name, cosine)`` per query of ``queries [Q, P]``."""
        scores, indices = topk_cosine(queries, self.embeddings, k)
        return [[(int(i), self.names[int(i)], float(s)) for s, i in zip(row_s, row_i)]
                for row_s, row_i in zip(scores.tolist(), indices.tolist())]

    @classmethod
    def from_parquet(cls, path: str | Path, modality: str, column: str = "embedding") -> EmbeddingIndex:
        """An index over the ``column`` list column of a (Geo)Parquet file; names from a ``name`` or ``id`` column
        when present, else the row numbers. The embeddings must come from the same head as the queries."""
        import pyarrow.parquet as pq

        path = Path(path)
        if not path.is_file():
            raise MissingInputError(f"parquet file {path} does not exist")
        table = pq.read_table(path)
        if column not in table.column_names:
            raise DataError(f"{path} has no {column!r} column (columns: {', '.join(table.column_names)})")
        embeddings = torch.tensor(np.asarray(table.column(column).to_pylist(), dtype=np.float32))
        name_column = next((c for c in ("name", "id") if c in table.column_names), None)
        names = ([str(n) for n in table.column(name_column).to_pylist()] if name_column
                 else [str(i) for i in range(table.num_rows)])
        return cls(embeddings, names, modality)


@torch.no_grad()
def embed_images(model: GeoLinkForPretraining, images: Sequence[torch.Tensor], batch_size: int = 32,
                 normalize: bool = True) -> torch.Tensor:
    """``encode_image`` over normalised ``[C, H, W]`` images of one size, in batches: ``[N, P]``."""
    model = require_pretraining_model(model, "the contrastive projection heads retrieval needs")
    out = [model.encode_image(torch.stack(list(images[i:i + batch_size])), normalize=normalize)
           for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, model.region_projection.out_features)


@torch.no_grad()
def embed_graphs(model: GeoLinkForPretraining, graphs: Sequence[HeteroData], batch_size: int = 32,
                 normalize: bool = True) -> torch.Tensor:
    """``encode_osm`` over graphs, in batches: ``[N, P]``."""
    model = require_pretraining_model(model, "the contrastive projection heads retrieval needs")
    out = [model.encode_osm(Batch.from_data_list(list(graphs[i:i + batch_size])), normalize=normalize)
           for i in range(0, len(graphs), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, model.region_projection.out_features)


def open_pairs(spec: str | Path, draws: int = 1, seed: int = 0) -> tuple[list[str], list[torch.Tensor],
                                                                           list[HeteroData]]:
    """Image-graph pairs for retrieval: names, normalised 224 × 224 images and graphs.

    Args:
        spec: ``"bundled"`` (the five real pairs shipped with geolink), a pair dataset (``index.json``) or the
            official layout ``img/`` + ``graph/`` (the UFZ samples; their graphs carry CLIP-512 features).
        draws: 1 = each pair resized whole; more = that many seeded random crops of each pair (the graph cropped
            with the image), each crop its own pair (a harder pool: crops of one tile look alike).
        seed: crop seed.
    """
    from geolink.data.folders import OfficialPairFolder
    from geolink.data.pairs import PairShards

    root = BUNDLED_PAIRS if str(spec) == "bundled" else Path(spec)
    if not root.is_dir():
        raise MissingInputError(f"pairs {spec!r} is not a folder: pass 'bundled', a pair dataset (index.json) or an "
                                "official img/ + graph/ folder")
    names, images, graphs = [], [], []
    if not (root / "index.json").is_file():
        folder = OfficialPairFolder(root)
        for index, name in enumerate(folder.names):
            image, graph = folder[index]
            names.append(name), images.append(image), graphs.append(graph)
        return names, images, graphs
    dataset: Dataset = PairShards(root, transform="eval" if draws == 1 else "train", seed=seed)
    for index in range(len(dataset)):
        for draw in range(draws):
            image, graph = dataset[index, draw]
            names.append(dataset.names[index] + (f"#{draw}" if draws > 1 else ""))
            images.append(image), graphs.append(graph)
    return names, images, graphs


def pair_indexes(model: GeoLinkForPretraining, spec: str | Path, draws: int = 1, seed: int = 0
                 ) -> tuple[EmbeddingIndex, EmbeddingIndex]:
    """The image index and the OSM index of a pair dataset (row i of both = pair i)."""
    names, images, graphs = open_pairs(spec, draws, seed)
    return (EmbeddingIndex(embed_images(model, images), names, "image", images),
            EmbeddingIndex(embed_graphs(model, graphs), names, "osm", graphs))


def recall_at_k(image_embeddings: torch.Tensor, osm_embeddings: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                chunk: int = 4096) -> dict[str, dict[int, float]]:
    """Recall@k of paired embeddings (row i of both is pair i): the fraction of queries whose partner is among
    the top k, image→OSM and OSM→image, with chance ``min(k, N) / N``.

    A partner's rank counts every key scoring at least as high as it (ties count against the query: two identical
    graphs, e.g. of two crops holding the same objects, cannot be told apart, so neither is credited), so the result
    does not depend on how a sort orders equal scores. Queries are processed ``chunk`` rows at a time."""
    if image_embeddings.shape[0] != osm_embeddings.shape[0]:
        raise InputError(f"{image_embeddings.shape[0]} image embeddings but {osm_embeddings.shape[0]} OSM "
                         "embeddings: recall needs pairs")
    count = image_embeddings.shape[0]
    result: dict[str, dict[int, float]] = {}
    for direction, (queries, keys) in {"image_to_osm": (image_embeddings, osm_embeddings),
                                       "osm_to_image": (osm_embeddings, image_embeddings)}.items():
        queries, keys = F.normalize(queries.float(), dim=-1), F.normalize(keys.float(), dim=-1)
        ranks = []
        for start in range(0, count, chunk):
            scores = queries[start:start + chunk] @ keys.t()  # [c, N]
            rows = torch.arange(scores.shape[0])
            partner = scores[rows, rows + start].unsqueeze(1)
            ranks.append((scores >= partner).sum(dim=1))
        rank = torch.cat(ranks)
        result[direction] = {k: float((rank <= k).float().mean()) for k in ks}
    result["chance"] = {k: min(k, count) / count for k in ks}
    return result


# ----------------------------------------------------------------------------------------------- contact sheet
def item_picture(item: Any, size: int) -> Image.Image:
    """A square thumbnail of an index item: a normalised image tensor (un-normalised with ImageNet statistics) or a
    graph (its objects' anchors drawn on white)."""
    from geolink.explain import draw_anchors
    from geolink.runtime import IMAGENET_MEAN, IMAGENET_STD

    if isinstance(item, torch.Tensor):
        mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
        pixels = ((item[:3].float() * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        return Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (size, size), (250, 250, 250))
    draw = ImageDraw.Draw(canvas, "RGBA")
    for node_type in NODE_TYPES:
        for anchors in item[node_type].pos.numpy():
            draw_anchors(draw, node_type, anchors, (size, size))
    return canvas


def contact_sheet(query: Any, query_label: str, hits: list[tuple[Any, str]], size: int = 160) -> Image.Image:
    """The query, then its hits left to right (best first), each with a label under it."""
    gap, margin, label = 10, 16, 36
    sheet = Image.new("RGB", (2 * margin + (len(hits) + 1) * (size + gap) + gap, 2 * margin + size + label),
                      (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=12)
    for k, (item, text) in enumerate([(query, query_label), *hits]):
        left = margin + k * (size + gap) + (gap if k else 0)
        sheet.paste(item_picture(item, size), (left, margin))
        if k == 0:
            draw.rectangle([left - 3, margin - 3, left + size + 2, margin + size + 2], outline=(200, 30, 30), width=3)
        for row, line in enumerate(text.split("\n")[:2]):
            draw.text((left, margin + size + 4 + 15 * row), line[:28], fill=(20, 20, 20), font=font)
    return sheet


# ------------------------------------------------------------------------------------------------ the CLI job
class Direction(str, enum.Enum):
    IMAGE_TO_OSM = "image-to-osm"
    OSM_TO_IMAGE = "osm-to-image"
    IMAGE_TO_IMAGE = "image-to-image"


@dataclass
class RetrieveConfig:
    """Image↔OSM retrieval with the contrastive heads of a GeoLink pretraining model: index the images or OSM graphs
    of a pair dataset (or a Parquet file of embeddings), query it with one of its pairs or an image file, and write
    the top-k with scores (JSON or CSV) and a contact sheet PNG; or measure recall@k over all pairs (--evaluate)."""

    pairs: str = field(default="bundled", metadata={"help": "pairs to index: 'bundled', a pair dataset (index.json) "
                                                            "or an official img/ + graph/ folder"})
    model: str = field(default="geolink_tiny.demo", metadata={"help": "pretrained tag, pretraining-model folder or "
                                                                       "official .pth (the heads are needed)"})
    direction: Direction = field(default=Direction.IMAGE_TO_OSM, metadata={"help": "query modality to index "
                                                                                   "modality"})
    query: int = field(default=0, metadata={"help": "query with pair number N of --pairs"})
    query_image: Path | None = field(default=None, metadata={"help": "query with this image file instead"})
    parquet: Path | None = field(default=None, metadata={"help": "index the 'embedding' column of this Parquet file "
                                                                 "instead (same head as the queries)"})
    k: int = field(default=5, metadata={"help": "hits per query"})
    draws: int = field(default=1, metadata={"help": "random crops per pair (1: each pair whole)"})
    evaluate: bool = field(default=False, metadata={"help": "print recall@1/5/10 of image<->OSM over all pairs "
                                                            "instead of querying"})
    out: Path = field(default=Path("retrieval.json"), metadata={"help": "hits file (.json or .csv); the contact "
                                                                        "sheet PNG goes next to it"})

    def __post_init__(self) -> None:
        if self.k < 1:
            raise InputError(f"k must be at least 1, got {self.k}")
        if self.draws < 1:
            raise InputError(f"draws must be at least 1, got {self.draws}")
        if self.out.suffix not in (".json", ".csv"):
            raise InputError(f"out must end in .json or .csv, got {self.out}")


def retrieve(config: RetrieveConfig) -> dict[str, Any]:
    """Run the query (or the evaluation) of ``config``; returns what was written (printed as JSON)."""
    from geolink.explain import load_tool_model, read_image

    model = load_tool_model(config.model, "pretraining")
    images, graphs = pair_indexes(model, config.pairs, config.draws)
    if config.evaluate:
        return {"pairs": len(images), "recall": recall_at_k(images.embeddings, graphs.embeddings)}
    source = Direction(config.direction).value.split("-to-")
    if config.query_image is not None:
        if source[0] != "image":
            raise InputError(f"query_image is an image but direction is {Direction(config.direction).value}")
        picture, pixels = read_image(config.query_image, model)
        query_item, query_label = pixels[0], Path(config.query_image).name
        query = model.encode_image(pixels, normalize=True)
    else:
        pool = images if source[0] == "image" else graphs
        if not 0 <= config.query < len(pool):
            raise InputError(f"query {config.query} is out of range: the pairs hold {len(pool)} samples")
        query_item, query_label = pool.items[config.query], f"query: {pool.names[config.query]}"
        query = pool.embeddings[config.query:config.query + 1]
    index = images if source[1] == "image" else graphs
    if config.parquet is not None:
        index = EmbeddingIndex.from_parquet(config.parquet, source[1])
    hits = index.search(query, config.k)[0]
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"rank": r + 1, "name": name, "score": round(score, 6)} for r, (_, name, score) in enumerate(hits)]
    if out.suffix == ".csv":
        with open(out, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["rank", "name", "score"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        out.write_text(json.dumps({"query": query_label, "direction": Direction(config.direction).value,
                                   "hits": rows}, indent=1))
    written = {"hits": str(out), "top": rows[0]}
    if index.items is not None:
        png = out.with_suffix(".png")
        contact_sheet(query_item, query_label, [(index.items[i], f"{r + 1}. {name}\ncos {score:.3f}")
                                                for r, (i, name, score) in enumerate(hits)]).save(png)
        written["png"] = str(png)
    return written
