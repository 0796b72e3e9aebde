"""Masked-tag suggestion and OSM–image disagreement, from the pretraining node head.

Pretraining (DESIGN §6) teaches GeoLink to predict a masked OSM object's tag feature from the image and the other
objects: the object's input feature is replaced by its type's mask token (its anchors stay), the OSM encoder runs on
the masked graph, the fusion block reads the image tokens with the masked node as its only key, and ``node_pred``
regresses the original feature. The tools here run exactly that, each node masked alone, on the unmasked image:

- :func:`masked_predictions`: the predicted tag feature of every (or some) node(s), ``{type: [N_t, text_dim]}``;
- :func:`suggest_tags`: candidate tag strings embedded with the same text model, ranked by cosine with a node's
  prediction;
- :func:`disagreement`: per node, ``1 - cos(prediction, actual feature)`` (0 = the model expected exactly these tags,
  up to 2 = the opposite).

What the disagreement score can and cannot mean: a high score says the object's tags are unlike what the model
expects *from this image and these neighbours*. That flags candidate mapping errors (a ``landuse:grass`` polygon over
a car park), outdated data, or simply rare tags the model has little prior for; it cannot tell these apart, it is
only as good as the weights (the bundled demo saw five tiles), and it knows nothing about tags that are invisible
from above (names, opening hours). Use it to rank objects for a human to review, never to edit the map.

The ``osm-qa`` job (:class:`OsmQaConfig` → :func:`osm_qa`) writes the scores as GeoJSON plus a map PNG.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch_geometric.data import Batch, HeteroData

from geolink.errors import InputError
from geolink.explain import (
    fusion_inputs,
    heat_colours,
    load_tool_model,
    node_labels,
    read_image,
    read_osm_input,
    text_encoder_for,
)
from geolink.graph.schema import NODE_TYPES
from geolink.models import GeoLinkForPretraining
from geolink.models.pretrain import require_pretraining_model, with_node_features

#: graph copies per chunk of the masked pass (each copy masks one node)
MASK_CHUNK = 32
#: how many of the commonest keys of the key-frequency table join the default candidates
COMMON_KEYS = 200


def _node_list(graph: HeteroData, nodes: Iterable[tuple[str, int]] | None) -> list[tuple[str, int]]:
    counts = {t: graph[t].num_nodes or 0 for t in NODE_TYPES}
    if not sum(counts.values()):
        raise InputError("graph has no nodes: pass a graph with at least one OSM object")
    if nodes is None:
        return [(t, i) for t in NODE_TYPES for i in range(counts[t])]
    nodes = list(nodes)
    for node_type, index in nodes:
        if node_type not in NODE_TYPES or not 0 <= int(index) < counts[node_type]:
            raise InputError(f"node ({node_type!r}, {index}) is out of range: the graph has "
                             + ", ".join(f"{counts[t]} {t}s" for t in NODE_TYPES))
    return [(t, int(i)) for t, i in nodes]


@torch.no_grad()
def masked_predictions(model: GeoLinkForPretraining, image: torch.Tensor, graph: HeteroData,
                       nodes: Iterable[tuple[str, int]] | None = None, validate: bool = True
                       ) -> list[torch.Tensor]:
    """The node head's prediction of each node's tag feature with that node masked alone (see the module docstring).

    Args:
        model: a ``GeoLinkForPretraining`` (eval mode).
        image: ``[C, H, W]`` or ``[1, C, H, W]`` normalised image.
        graph: its graph (one ``HeteroData``).
        nodes: ``(type, index)`` pairs; None = every node, in type then index order.
        validate: check the image and graph first.

    Returns:
        One ``[text_dim]`` prediction per node of ``nodes``.
    """
    model = require_pretraining_model(model, "the node mask tokens and node prediction head this tool needs")
    fusion = model.fusion_encoder
    images = image.unsqueeze(0) if image.dim() == 3 else image
    nodes = _node_list(graph, nodes)
    image_inputs = fusion_inputs(fusion, images, graph, validate)  # the image side (its node part is unmasked)
    out = []
    for start in range(0, len(nodes), MASK_CHUNK):
        chunk = nodes[start:start + MASK_CHUNK]
        copies = []
        for node_type, index in chunk:
            x = graph[node_type].x.clone()
            x[index] = model.node_mask_token[node_type].to(x.dtype)[0]
            copies.append(with_node_features(graph, {node_type: x}))
        batch = Batch.from_data_list(copies)
        node_embeddings, _ = model.osm_encoder.encode(batch, validate=False)
        tokens, pos = fusion.node_tokens(node_embeddings, batch, image_inputs.grid)
        rows = [int(batch[t].ptr[k]) + i for k, (t, i) in enumerate(chunk)]  # the node's row in the batch
        node = torch.stack([tokens[t][row] for (t, _), row in zip(chunk, rows)]).unsqueeze(1)
        node_pos = torch.stack([pos[t][row] for (t, _), row in zip(chunk, rows)]).unsqueeze(1)
        padding = torch.zeros(len(chunk), 1, dtype=torch.bool, device=node.device)
        image_tokens = image_inputs.image_tokens.expand(len(chunk), -1, -1)
        _, fused = fusion.fuse(image_tokens, image_inputs.image_pos, node, node_pos, padding)
        out += list(model.node_pred(fused[:, 0]).float())
    return out


def disagreement(model: GeoLinkForPretraining, image: torch.Tensor, graph: HeteroData,
                 validate: bool = True) -> dict[str, torch.Tensor]:
    """Per node, the cosine distance ``1 - cos`` between the masked prediction and the node's actual feature ``x``:
    ``{type: [N_t]}`` in ``[0, 2]`` (see the module docstring for what it can and cannot mean)."""
    nodes = _node_list(graph, None)
    predictions = masked_predictions(model, image, graph, nodes, validate)
    scores = {t: torch.zeros(graph[t].num_nodes or 0) for t in NODE_TYPES}
    for (node_type, index), prediction in zip(nodes, predictions):
        actual = graph[node_type].x[index].float()
        scores[node_type][index] = 1 - F.cosine_similarity(prediction, actual, dim=0)
    return scores


def default_candidates(graph: HeteroData | None = None, vocabulary: Sequence[str] | None = None,
                       common_keys: int = COMMON_KEYS) -> list[str]:
    """The region's vocabulary (the tag strings of its nodes, from the compact ``tags`` ids and ``vocabulary``, or
    all of ``vocabulary`` without a graph) followed by the ``<key>:<key>`` strings (the tag string of
    ``<key>=yes``) of the ``common_keys`` commonest keys of the official key-frequency table (it holds keys only, no
    values), duplicates removed."""
    from geolink.graph.tags import load_key_frequency, tag_string

    strings: list[str] = []
    if vocabulary is not None:
        if graph is not None and graph[NODE_TYPES[0]].get("tags") is not None:
            used = sorted({int(i) for t in NODE_TYPES for i in graph[t].tags.flatten().tolist() if i >= 0})
            strings += [vocabulary[i] for i in used]
        else:
            strings += list(vocabulary)
    frequency = load_key_frequency("official") or {}
    strings += [tag_string(key, "yes") for key, _ in sorted(frequency.items(), key=lambda kv: -kv[1])[:common_keys]]
    return list(dict.fromkeys(strings))


def _check_text_width(model: GeoLinkForPretraining, tag_encoder: Any) -> None:
    width = int(getattr(tag_encoder, "dim", -1))
    if width != model.osm_encoder.text_dim:
        raise InputError(f"tag_encoder embeds {width}-wide tag features but the model reads "
                         f"{model.osm_encoder.text_dim}-wide ones: pass the text model the weights were trained with "
                         "(tag_encoder_for(<pretrained tag>))")


def rank_candidates(prediction: torch.Tensor, candidates: Sequence[str], tag_encoder: Any,
                    top_k: int = 10) -> list[tuple[str, float]]:
    """``candidates`` ranked by cosine between their embedding and ``prediction [text_dim]``: the ``top_k`` best
    ``(tag, cosine)`` pairs."""
    if not candidates:
        raise InputError("candidates is empty: pass tag strings to rank (or None for the default candidates)")
    embeddings = tag_encoder.encode(list(candidates)).float()
    scores = F.cosine_similarity(embeddings, prediction.float().unsqueeze(0), dim=1)
    best = torch.topk(scores, min(top_k, len(candidates)))
    return [(candidates[i], float(s)) for s, i in zip(best.values.tolist(), best.indices.tolist())]


def suggest_tags(model: GeoLinkForPretraining, image: torch.Tensor, graph: HeteroData, node: tuple[str, int],
                 candidates: Sequence[str] | None = None, top_k: int = 10, *, tag_encoder: Any,
                 vocabulary: Sequence[str] | None = None) -> list[tuple[str, float]]:
    """Tags the model expects on ``node`` from the image and the other objects, best first.

    Args:
        model: a ``GeoLinkForPretraining``.
        image: ``[C, H, W]`` normalised image.
        graph: its graph.
        node: ``(type, index)``, e.g. ``("polygon", 3)``.
        candidates: tag strings to rank (``"building:building"``, ``"landuse:grass"``); None =
            :func:`default_candidates` (the region's vocabulary when ``vocabulary`` is given, plus the commonest
            keys).
        top_k: how many to return.
        tag_encoder: the text model the weights were trained with (``tag_encoder_for("geolink_tiny.demo")``).
        vocabulary: the strings the graph's compact ``tags`` ids point into (for the default candidates).

    Returns:
        ``[(tag, cosine), ...]``, ``top_k`` long at most.

    Raises:
        InputError: a model without the heads, a node out of range, a graph without nodes, or a text model of
            another width than the model's.
    """
    model = require_pretraining_model(model, "the node mask tokens and node prediction head this tool needs")
    _check_text_width(model, tag_encoder)
    prediction = masked_predictions(model, image, graph, [node])[0]
    if candidates is None:
        candidates = default_candidates(graph, vocabulary)
    return rank_candidates(prediction, list(candidates), tag_encoder, top_k)


# ------------------------------------------------------------------------------------------------ the CLI job
@dataclass
class OsmQaConfig:
    """OSM–image disagreement: for each OSM object of a tile, how much a GeoLink model that sees the image and the
    other objects disagrees with the object's tags (cosine distance of its masked prediction to its actual tag
    feature). Writes a GeoJSON of the objects' anchors with their scores, and a map PNG. A high score asks for a
    human look; it is not proof of an error."""

    image: Path = field(metadata={"help": "the tile's image file"})
    osm: Path = field(metadata={"help": "the tile's OSM data: a stored graph (.safetensors), a folder of per-type "
                                        "GeoJSON files with meta.json, or a GeoJSON file (with bbox)"})
    model: str = field(default="geolink_tiny.demo", metadata={"help": "pretrained tag, pretraining-model folder or "
                                                                       "official .pth (the heads are needed)"})
    out: Path = field(default=Path("osm_qa.geojson"), metadata={"help": "output GeoJSON (the PNG goes next to it)"})
    text_model: str | None = field(default=None, metadata={"help": "text model for the tags (default: the tag's)"})
    bbox: tuple[float, float, float, float] | None = field(default=None, metadata={
        "help": "west south east north of the tile, when the OSM input has no meta.json"})
    top_k: int = field(default=3, metadata={"help": "tags suggested per object in the GeoJSON (0: none)"})

    def __post_init__(self) -> None:
        if self.top_k < 0:
            raise InputError(f"top_k must be 0 or more, got {self.top_k}")


def anchor_lonlat(graph: HeteroData, node_type: str, index: int) -> tuple[float, float]:
    """The node's centre anchor (polygon centroid, line centroid, the point) in the graph's CRS."""
    west, south, east, north = graph.bbox.reshape(-1).tolist()
    u, v = graph[node_type].pos[index, 3 if node_type == "polygon" else 0].tolist()
    return west + u * (east - west), north - v * (north - south)


def draw_scores(picture: Image.Image, graph: HeteroData, scores: dict[str, torch.Tensor], size: int = 512
                ) -> Image.Image:
    """The image with every node's centre as a disc coloured by its score (scaled to the tile's maximum), with the
    highest-scoring objects numbered, and a colour bar."""
    shown = picture.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    sheet = Image.new("RGB", (size + 40, size + 60), (255, 255, 255))
    sheet.paste(shown, (20, 20))
    draw = ImageDraw.Draw(sheet)
    top = max((float(s.max()) for s in scores.values() if s.numel()), default=1.0) or 1.0
    ranked = sorted(((float(scores[t][i]), t, i) for t in NODE_TYPES for i in range(scores[t].numel())), reverse=True)
    font = ImageFont.load_default(size=13)
    for rank, (score, node_type, index) in enumerate(reversed(ranked)):  # highest drawn last, on top
        u, v = graph[node_type].pos[index, 3 if node_type == "polygon" else 0].tolist()
        x, y = 20 + u * size, 20 + v * size
        colour = tuple(int(c) for c in heat_colours(np.array(score / top)))
        radius = 5 + 6 * score / top
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour, outline=(0, 0, 0))
        place = len(ranked) - rank
        if place <= 5:
            draw.text((x + radius + 2, y), str(place), fill=(255, 255, 255), font=font, anchor="lm",
                      stroke_width=2, stroke_fill=(0, 0, 0))
    bar = heat_colours(np.linspace(0, 1, size))[None].repeat(12, axis=0)
    sheet.paste(Image.fromarray(bar), (20, size + 28))
    draw.text((20, size + 44), "0", fill=(20, 20, 20), font=font)
    draw.text((20 + size, size + 44), f"{top:.3f}  disagreement (1 - cos)", fill=(20, 20, 20), font=font,
              anchor="ra")
    return sheet


def osm_qa(config: OsmQaConfig) -> dict[str, Any]:
    """Score every object of the tile, write the GeoJSON and the PNG; returns a summary (printed as JSON)."""
    model = load_tool_model(config.model, "pretraining")
    picture, pixels = read_image(config.image, model)
    graph, vocabulary = read_osm_input(config.osm, config.model, config.text_model, config.bbox)
    nodes = _node_list(graph, None)
    predictions = masked_predictions(model, pixels, graph, nodes)
    labels = node_labels(graph, vocabulary) or {t: [""] * (graph[t].num_nodes or 0) for t in NODE_TYPES}
    encoder = None
    if config.top_k:
        encoder = text_encoder_for(config.model, config.text_model)
        _check_text_width(model, encoder)
        candidates = default_candidates(graph, vocabulary)
    scores = {t: torch.zeros(graph[t].num_nodes or 0) for t in NODE_TYPES}
    features = []
    for (node_type, index), prediction in zip(nodes, predictions):
        score = float(1 - F.cosine_similarity(prediction, graph[node_type].x[index].float(), dim=0))
        scores[node_type][index] = score
        properties: dict[str, Any] = {"type": node_type, "index": index, "tags": labels[node_type][index],
                                      "disagreement": round(score, 6)}
        if encoder is not None:
            properties["suggested"] = [f"{tag} ({cos:.3f})"
                                       for tag, cos in rank_candidates(prediction, candidates, encoder, config.top_k)]
        lon, lat = anchor_lonlat(graph, node_type, index)
        features.append({"type": "Feature", "properties": properties,
                         "geometry": {"type": "Point", "coordinates": [lon, lat]}})
    features.sort(key=lambda f: -f["properties"]["disagreement"])
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    collection = {"type": "FeatureCollection", "features": features}
    crs = str(getattr(graph, "crs", "EPSG:4326"))
    if crs not in ("EPSG:4326", "OGC:CRS84"):
        collection["crs"] = {"type": "name", "properties": {"name": crs}}
    out.write_text(json.dumps(collection, indent=1))
    png = out.with_suffix(".png")
    draw_scores(picture, graph, scores).save(png)
    top = features[0]["properties"]
    return {"objects": len(features), "geojson": str(out), "png": str(png),
            "highest": {"type": top["type"], "index": top["index"], "tags": top["tags"],
                        "disagreement": top["disagreement"]}}
