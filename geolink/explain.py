"""Object→patch attention maps: where in the image each OSM object looks, from the fusion block's attention.

The two-way fusion block (DESIGN §6) lets every OSM node token read the image tokens
(``K = LN(K + Attn(K + PK, Q + PQ, Q))``, the official ``cross_attn_image_to_token``). Its attention weights,
averaged over heads, are a map ``[H/p, W/p]`` per node: :func:`node_attention` returns them per sample and type,

- ``isolated=False``: inside the actual fused forward pass, every node of the graph present (what the fused map
  was computed with);
- ``isolated=True``: each node run alone through the block, the semantics of the official (undocumented)
  ``get_osm_to_img_attn`` helper, whose shapes only work for one node; done here for all nodes at once.

:func:`plot_node_attention` draws a grid of maps over the image with each node's anchors; the ``geolink explain``
job (:class:`ExplainConfig` → :func:`explain`) does both for an image and its OSM data. Works with a
``GeoLinkFusionEncoder`` or a ``GeoLinkForPretraining`` (the block lives in the fusion encoder).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from torch_geometric.data import Batch, HeteroData

from geolink.demo import GREY, INK, TYPE_COLOURS, _wrap
from geolink.errors import InputError, MissingInputError
from geolink.graph.schema import NODE_TYPES
from geolink.models import GeoLinkForPretraining, GeoLinkFusionEncoder
from geolink.models.fusion import check_image_graph_batch, pack_nodes

#: nodes per chunk of the isolated pass (each node gets its own copy of the image tokens)
ISOLATED_CHUNK = 64


def fusion_encoder_of(model: nn.Module) -> GeoLinkFusionEncoder:
    """The fusion encoder of a ``GeoLinkForPretraining``, or the model itself when it is one.

    Raises:
        InputError: any other model (an image or OSM encoder has no fusion block).
    """
    if isinstance(model, GeoLinkForPretraining):
        return model.fusion_encoder
    if isinstance(model, GeoLinkFusionEncoder):
        return model
    raise InputError(f"model is a {type(model).__name__}, which has no fusion block: pass a GeoLinkFusionEncoder or "
                     "a GeoLinkForPretraining (load_model(<folder>, component='fusion'))")


def as_batch(graphs: HeteroData | Sequence[HeteroData]) -> HeteroData:
    """A ``Batch`` of graphs from a ``Batch``, one ``HeteroData`` or a list of them."""
    if isinstance(graphs, HeteroData):  # a Batch is one too
        return graphs
    graphs = list(graphs)
    if not graphs:
        raise InputError("graphs is empty; pass one graph per image")
    return Batch.from_data_list(graphs)


@dataclass
class FusionInputs:
    """What the fusion block reads, for a batch: image tokens ``[B, L, D]`` (final-normed, patches only), their
    positions ``[1, L, C]``, node tokens and positions per type ``{type: [N_t, C]}``, the graph index of every node
    per type and the patch grid."""

    image_tokens: torch.Tensor
    image_pos: torch.Tensor
    tokens: dict[str, torch.Tensor]
    pos: dict[str, torch.Tensor]
    batch: dict[str, torch.Tensor]
    num_graphs: int
    grid: tuple[int, int]


def fusion_inputs(fusion: GeoLinkFusionEncoder, images: torch.Tensor, graph: HeteroData,
                  validate: bool = True) -> FusionInputs:
    """The inputs of the fusion block for ``images`` and their graphs (the stages of
    :meth:`GeoLinkFusionEncoder.forward` before the block, unmasked)."""
    batch_dict, num_graphs = check_image_graph_batch(images, graph, fusion.image_encoder, fusion.osm_encoder, validate)
    patch = fusion.image_encoder.patch_size
    grid = (images.shape[-2] // patch, images.shape[-1] // patch)
    last = fusion.image_encoder.forward_intermediates(images, indices=fusion.out_indices[-1:], output_fmt="NLC",
                                                      intermediates_only=True)[-1]
    node_embeddings = fusion.osm_encoder.node_embeddings(graph, batch_dict, num_graphs)
    tokens, pos = fusion.node_tokens(node_embeddings, graph, grid)
    return FusionInputs(fusion.image_encoder.trunk.norm(last), fusion.image_pos_table(grid).unsqueeze(0), tokens,
                        pos, batch_dict, num_graphs, grid)


def _block_index(fusion: GeoLinkFusionEncoder, layer: int) -> int:
    depth = len(fusion.blocks)
    if not -depth <= layer < depth:
        raise InputError(f"layer={layer} is out of range for {depth} fusion block(s); use 0..{depth - 1} or -1")
    return layer % depth


@torch.no_grad()
def node_attention(model: nn.Module, images: torch.Tensor, graphs: HeteroData | Sequence[HeteroData],
                   isolated: bool = False, layer: int = -1, validate: bool = True) -> list[dict[str, torch.Tensor]]:
    """Each OSM node's attention over the image patches in a cross-modal block (heads averaged).

    Args:
        model: a ``GeoLinkFusionEncoder`` or ``GeoLinkForPretraining`` (put it in eval mode: attention dropout).
        images: ``[B, C, H, W]`` normalised images.
        graphs: a ``Batch`` of B graphs, a list of B graphs, or one graph when B = 1.
        isolated: run each node alone through the block (the official ``get_osm_to_img_attn``) instead of
            reading the attention of the fused forward pass with all nodes present.
        layer: which fusion block (``-1`` = the last, the only one in the released models).
        validate: check the images and graphs first.

    Returns:
        Per sample ``{type: [N_t, H/p, W/p]}``; each map sums to 1 over the patches.
    """
    fusion = fusion_encoder_of(model)
    graph = as_batch(graphs)
    block = _block_index(fusion, layer)
    inputs = fusion_inputs(fusion, images, graph, validate)
    counts = {t: torch.bincount(inputs.batch[t], minlength=inputs.num_graphs).tolist() for t in NODE_TYPES}
    length = inputs.image_tokens.shape[1]
    if isolated:
        rows = _isolated_rows(fusion, inputs, block)
    else:
        nodes, node_pos, padding = pack_nodes(torch.cat([inputs.tokens[t] for t in NODE_TYPES]),
                                              torch.cat([inputs.pos[t] for t in NODE_TYPES]),
                                              torch.cat([inputs.batch[t] for t in NODE_TYPES]), inputs.num_graphs)
        attention = fusion.fuse(inputs.image_tokens, inputs.image_pos, nodes, node_pos, padding,
                                return_attention=True)[2][block]  # [B, N_max, L]
        # pack_nodes keeps, within a graph, the concatenation order: its polygons, then lines, then points
        rows = {}
        for t_index, node_type in enumerate(NODE_TYPES):
            per_graph = []
            for b in range(inputs.num_graphs):
                start = sum(counts[t][b] for t in NODE_TYPES[:t_index])
                per_graph.append(attention[b, start:start + counts[node_type][b]])
            rows[node_type] = torch.cat(per_graph) if per_graph else attention.new_zeros(0, length)
    maps = []
    for b in range(inputs.num_graphs):
        maps.append({t: rows[t][inputs.batch[t] == b].reshape(-1, *inputs.grid).float() for t in NODE_TYPES})
    return maps


def _isolated_rows(fusion: GeoLinkFusionEncoder, inputs: FusionInputs, block: int) -> dict[str, torch.Tensor]:
    """Every node alone through the blocks with its own image: ``{type: [N_t, L]}`` attention rows."""
    rows = {}
    for node_type in NODE_TYPES:
        tokens, pos, batch = inputs.tokens[node_type], inputs.pos[node_type], inputs.batch[node_type]
        out = []
        for start in range(0, tokens.shape[0], ISOLATED_CHUNK):
            chunk = slice(start, start + ISOLATED_CHUNK)
            count = tokens[chunk].shape[0]
            padding = torch.zeros(count, 1, dtype=torch.bool, device=tokens.device)
            attention = fusion.fuse(inputs.image_tokens[batch[chunk]], inputs.image_pos, tokens[chunk].unsqueeze(1),
                                    pos[chunk].unsqueeze(1), padding, return_attention=True)[2][block]
            out.append(attention[:, 0])
        rows[node_type] = torch.cat(out) if out else inputs.image_tokens.new_zeros(0, inputs.image_tokens.shape[1])
    return rows


# ---------------------------------------------------------------------------------------------------- pictures
#: colour stops of the heat map (dark violet → red → yellow), from 0 to 1
HEAT_STOPS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """``[...]`` values in [0, 1] -> ``[..., 3]`` uint8 colours along :data:`HEAT_STOPS`."""
    position = np.clip(values, 0, 1) * (len(HEAT_STOPS) - 1)
    grid = np.arange(len(HEAT_STOPS))
    return np.stack([np.interp(position, grid, HEAT_STOPS[:, c]) for c in range(3)], axis=-1).astype(np.uint8)


def overlay_map(image: Image.Image, values: torch.Tensor | np.ndarray, alpha: float = 0.6) -> Image.Image:
    """A ``[h, w]`` map stretched to its own range (min → dark, max → bright), coloured and blended over ``image``
    (bicubic upsampling)."""
    values = np.asarray(values, dtype=np.float64)
    scaled = (values - values.min()) / max(float(values.max() - values.min()), 1e-12)
    heat = Image.fromarray(heat_colours(scaled)).resize(image.size, Image.Resampling.BICUBIC)
    return Image.blend(image.convert("RGB"), heat, alpha)


def draw_anchors(draw: ImageDraw.ImageDraw, node_type: str, anchors: np.ndarray, size: tuple[int, int]) -> None:
    """A node's outline from its anchors (DESIGN §3): a polygon's interior points joined around its centroid, a
    line from its first vertex through its centroid to its last, a point as a ring."""
    xy = [(float(u) * size[0], float(v) * size[1]) for u, v in anchors]
    colour = (*TYPE_COLOURS[node_type], 255)
    if node_type == "polygon":
        draw.polygon(xy[:3], outline=colour, width=2)
        x, y = xy[3]
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour, outline=(0, 0, 0, 255))
    elif node_type == "line":
        draw.line([xy[1], xy[0], xy[2]], fill=colour, width=3)
        for x, y in xy:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour, outline=(0, 0, 0, 255))
    else:
        x, y = xy[0]
        draw.ellipse([x - 7, y - 7, x + 7, y + 7], outline=colour, width=3)


def pick_nodes(maps: dict[str, torch.Tensor], count: int) -> list[tuple[str, int]]:
    """The ``count`` nodes with the most concentrated maps (highest peak), ties in type then index order."""
    peaks = [(float(maps[t][i].max()), -k, t, i) for k, t in enumerate(NODE_TYPES) for i in range(maps[t].shape[0])]
    return [(t, i) for _, _, t, i in sorted(peaks, reverse=True)[:count]]


def plot_node_attention(image: Image.Image, graph: HeteroData, maps: dict[str, torch.Tensor],
                        nodes: Sequence[tuple[str, int]] | None = None, labels: dict[str, list[str]] | None = None,
                        max_nodes: int = 8, columns: int = 4, panel: int = 256, title: str | None = None,
                        caption: str | None = None) -> Image.Image:
    """A grid of panels, one per node: its attention map over the image with its outline drawn from its anchors.

    Args:
        image: the RGB image the maps were computed on (any size; the maps are resized to it).
        graph: that sample's graph (its ``pos`` anchors).
        maps: that sample's ``{type: [N_t, h, w]}`` from :func:`node_attention`.
        nodes: ``(type, index)`` pairs to show; None = the ``max_nodes`` with the most concentrated maps.
        labels: optional ``{type: [text per node]}`` shown under each panel (e.g. its tags).
        max_nodes: how many nodes when ``nodes`` is None.
        columns: panels per row.
        panel: panel width and height in pixels.
        title, caption: text above and below the grid.

    Returns:
        The figure (a PIL image; ``.save("attention.png")``).
    """
    if nodes is None:
        nodes = pick_nodes(maps, max_nodes)
    nodes = list(nodes)
    if not nodes:
        raise InputError("graph has no nodes to show: pass a graph with at least one OSM object")
    for node_type, index in nodes:
        if node_type not in NODE_TYPES or not 0 <= index < maps[node_type].shape[0]:
            raise InputError(f"node ({node_type!r}, {index}) does not exist: the graph has "
                             + ", ".join(f"{maps[t].shape[0]} {t}s" for t in NODE_TYPES))
    columns = min(columns, len(nodes))
    rows = -(-len(nodes) // columns)
    gap, margin, header, label_h = 12, 20, 40 if title else 8, 40
    width = 2 * margin + columns * panel + (columns - 1) * gap
    caption_lines = 0
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    small = ImageFont.load_default(size=13)
    if caption:
        caption_lines = len(_wrap(probe, caption, small, width - 2 * margin))
    sheet = Image.new("RGB", (width, header + rows * (panel + label_h) + 18 * caption_lines + margin),
                      (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((margin, header // 2 + 2), title, fill=INK, font=ImageFont.load_default(size=18), anchor="lm")
    shown = image.convert("RGB").resize((panel, panel), Image.Resampling.BICUBIC)
    for k, (node_type, index) in enumerate(nodes):
        left = margin + (k % columns) * (panel + gap)
        top = header + (k // columns) * (panel + label_h)
        tile = overlay_map(shown, maps[node_type][index].cpu().numpy())
        tile_draw = ImageDraw.Draw(tile, "RGBA")
        draw_anchors(tile_draw, node_type, graph[node_type].pos[index].cpu().numpy(), tile.size)
        sheet.paste(tile, (left, top))
        text = f"{node_type} {index}"
        if labels is not None and index < len(labels.get(node_type, [])):
            text += f": {labels[node_type][index]}"
        for row, line in enumerate(_wrap(draw, text, small, panel)[:2]):
            draw.text((left, top + panel + 4 + 16 * row), line, fill=INK, font=small)
    for row, line in enumerate(_wrap(draw, caption, small, width - 2 * margin) if caption else []):
        draw.text((margin, header + rows * (panel + label_h) + 18 * row), line, fill=GREY, font=small)
    return sheet


# ------------------------------------------------------------------------------------------- reading the inputs
def read_image(path: str | Path, model: nn.Module) -> tuple[Image.Image, torch.Tensor]:
    """An image file as the RGB picture and the model's normalised ``[1, C, H, W]`` input (its preprocessing)."""
    from geolink.data.transforms import Preprocess
    from geolink.registry import resolve_data_config

    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"image {path} does not exist: pass an image file (PNG, JPEG, ...)")
    with Image.open(path) as opened:
        picture = opened.convert("RGB")
    return picture, Preprocess(**resolve_data_config(model))(picture).unsqueeze(0)


def node_labels(graph: HeteroData, vocabulary: Sequence[str] | None) -> dict[str, list[str]] | None:
    """Each node's tag strings joined with ``; `` (from the compact ``tags`` ids), or None without them."""
    if vocabulary is None or graph[NODE_TYPES[0]].get("tags") is None:
        return None
    return {t: ["; ".join(vocabulary[int(i)] for i in row if i >= 0) for row in graph[t].tags.tolist()]
            for t in NODE_TYPES}


def text_encoder_for(model_name: str, text_model: str | None = None) -> Any:
    """The :class:`~geolink.graph.text.TagEncoder` of ``text_model``, else of the pretrained tag ``model_name``.

    Raises:
        InputError: ``model_name`` is a folder or file (it records no text model) and ``text_model`` is None.
    """
    from geolink.graph.text import TagEncoder
    from geolink.registry import list_pretrained, tag_encoder_for

    if text_model is not None:
        return TagEncoder(text_model)
    if model_name not in list_pretrained():
        raise InputError(f"model {model_name} is not a pretrained tag, so its text model is unknown: pass text_model "
                         "(the text model its weights were trained with, e.g. 'clip' for the official release)")
    return tag_encoder_for(model_name)


def read_osm_input(path: str | Path, model_name: str, text_model: str | None = None,
                   bbox: tuple[float, float, float, float] | None = None) -> tuple[HeteroData, list[str] | None]:
    """The graph of a tile's OSM data, and its tag vocabulary when known.

    Args:
        path: a stored graph (``.safetensors`` from ``geolink build-graphs``; its folder's ``vocab`` table is used
            when ``x`` is not stored), a folder of per-type GeoJSON files with a ``meta.json`` bbox (the layout of
            the official example tiles), or one GeoJSON file (pass ``bbox``).
        model_name: the pretrained tag the graph is for: its text model embeds the tags (when ``text_model`` is
            None).
        text_model: a text model (short name, Hub id or folder) instead of the tag's.
        bbox: (west, south, east, north) of the tile, when ``path`` has no ``meta.json``.
    """
    from geolink.graph import OSMGraphBuilder
    from geolink.graph.readers import read_features
    from geolink.graph.tags import TagVocabulary

    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"OSM input {path} does not exist: pass a stored graph, a tile folder of GeoJSON "
                                "files or a GeoJSON file")
    if path.suffix == ".safetensors":
        return _read_stored_graph(path)
    files = sorted(path.glob("*.geojson")) if path.is_dir() else [path]
    if bbox is None:
        meta = (path if path.is_dir() else path.parent) / "meta.json"
        if not meta.is_file():
            raise MissingInputError(f"no bbox for {path}: pass bbox (west, south, east, north) or put a meta.json "
                                    "with bbox_west_south_east_north next to the GeoJSON")
        bbox = tuple(json.loads(meta.read_text())["bbox_west_south_east_north"])
    by_type = {t: [f for f in files if f.stem.endswith(f"_{t}")] for t in NODE_TYPES}
    ordered = [f for t in NODE_TYPES for f in by_type[t]] + [f for f in files if all(f not in v for v in
                                                                                       by_type.values())]
    features = [feature for file in ordered for feature in read_features(file)[0]]
    encoder = text_encoder_for(model_name, text_model)
    vocabulary = TagVocabulary()
    graph = OSMGraphBuilder(encoder, tag_weights="official").build(features, bbox=bbox, vocabulary=vocabulary,
                                                                   materialize=True)
    return graph, vocabulary.strings


def _read_stored_graph(path: Path) -> tuple[HeteroData, list[str] | None]:
    """A tile of a ``build-graphs`` folder (``x`` from its vocabulary table, found in the folder or the one above)
    or an official-layout graph file (the UFZ samples: features stored, no tag text)."""
    from safetensors import safe_open

    from geolink.data.folders import GraphFolder
    from geolink.graph.official import load_official_graph
    from geolink.graph.storage import FORMAT_VERSION
    from geolink.graph.tags import TagVocabulary

    with safe_open(str(path), framework="pt") as handle:
        geolink_file = (handle.metadata() or {}).get("format") == FORMAT_VERSION
    if not geolink_file:
        return load_official_graph(path), None
    for folder in (path.parent, path.parent.parent):
        if any(folder.glob("index*.jsonl")):
            tiles = GraphFolder(folder)
            entry = next((e for e in tiles.entries if (folder / e["file"]).resolve() == path.resolve()), None)
            if entry is not None:
                strings = TagVocabulary.load(folder / f"{entry['vocab']}.json").strings
                return tiles[entry["name"]], strings
    raise MissingInputError(f"{path} is a stored graph outside its build-graphs folder: pass the tile inside the "
                            "folder that holds its index*.jsonl and vocabulary")


# ------------------------------------------------------------------------------------------------ the CLI job
@dataclass
class ExplainConfig:
    """Object→patch attention maps: where in the image each OSM object of the tile looks, in the fusion block of a
    GeoLink model, drawn over the image as a grid of panels (one per object) in a PNG."""

    image: Path = field(metadata={"help": "the tile's image file"})
    osm: Path = field(metadata={"help": "the tile's OSM data: a stored graph (.safetensors), a folder of per-type "
                                        "GeoJSON files with meta.json, or a GeoJSON file (with bbox)"})
    model: str = field(default="geolink_tiny.demo", metadata={"help": "pretrained tag, model folder (fusion or "
                                                                       "pretraining) or official .pth"})
    out: Path = field(default=Path("attention.png"), metadata={"help": "output PNG"})
    text_model: str | None = field(default=None, metadata={"help": "text model for the tags (default: the tag's)"})
    bbox: tuple[float, float, float, float] | None = field(default=None, metadata={
        "help": "west south east north of the tile, when the OSM input has no meta.json"})
    isolated: bool = field(default=False, metadata={"help": "each object alone through the block (the official "
                                                            "get_osm_to_img_attn) instead of all together"})
    nodes: int = field(default=8, metadata={"help": "how many objects to show (the most concentrated maps)"})
    layer: int = field(default=-1, metadata={"help": "fusion block to read (-1: the last)"})

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise InputError(f"nodes must be at least 1, got {self.nodes}")


def load_tool_model(location: str, component: str) -> nn.Module:
    """A model for the tools, in eval mode: ``component="fusion"`` from any folder holding one, ``"pretraining"``
    only from a full pretraining model (the heads), else an error naming the folder type to pass."""
    from geolink.registry import load_model

    model = load_model(location)
    if component == "fusion":
        return fusion_encoder_of(model).eval()
    if not isinstance(model, GeoLinkForPretraining):
        raise InputError(f"{location} holds a {type(model).__name__}, without the pretraining heads (projection "
                         "heads, node mask tokens, node prediction) this tool needs: pass a GeoLinkForPretraining "
                         "folder (saved from the pretraining model, e.g. geolink_tiny.demo, a `geolink pretrain` "
                         "run, or `geolink convert` without --component)")
    return model.eval()


def explain(config: ExplainConfig) -> Path:
    """Compute the attention maps of the tile's objects and write the grid PNG; returns the PNG."""
    fusion = load_tool_model(config.model, "fusion")
    picture, pixels = read_image(config.image, fusion)
    graph, vocabulary = read_osm_input(config.osm, config.model, config.text_model, config.bbox)
    maps = node_attention(fusion, pixels, [graph], isolated=config.isolated, layer=config.layer)[0]
    mode = "each object alone (isolated)" if config.isolated else "all objects together (the fused forward pass)"
    figure = plot_node_attention(
        picture, graph, maps, labels=node_labels(graph, vocabulary), max_nodes=config.nodes,
        title=f"Where each OSM object looks: {Path(config.image).name}, model {config.model}",
        caption=f"Attention of each OSM object over the image patches in fusion block {config.layer}, heads "
                f"averaged, {mode}; bright = high. Each map is stretched to its own range. Outlines come from the "
                "object's anchors: interior points of polygons, the ends and centre of lines, points as rings.")
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.save(out)
    print(f"{sum(m.shape[0] for m in maps.values())} objects; wrote {out.resolve()}")
    return out
