"""Exported encoders for serving, edge use and non-Python runtimes: ``geolink export`` / :func:`export_model`.

Two components, two formats (ONNX for onnxruntime and other ONNX runtimes, ``torch.export`` ``.pt2`` for
``torch.export.load`` / AOTInductor):

- ``image``: the image encoder's ``forward_features``, ``images [B, C, H, W] -> tokens [B, 1 + L, D]`` (cls first,
  final-normed). The batch is dynamic; the input size is fixed at export (it sets the position table).
- ``fusion``: the fusion encoder on a *padded* graph batch, ``(images, nodes, node_mask, node_types, anchors,
  adjacency) -> four maps [B, D_i, H/p, W/p]``. Batch and node count are dynamic, the input size is fixed. The
  graph stays in Python up to :func:`~geolink.models.osm.pad_graphs` (re-exported here), which turns a ``HeteroData``
  batch into those plain tensors; the exported graph itself needs no PyG. The heterogeneous GAT message passing is
  computed densely there (:meth:`~geolink.models.osm.GeoLinkOSMEncoder.dense_node_embeddings`: a masked softmax over
  an ``[N, N]`` edge-count matrix), which is the same function as the edge-list form, in fixed-shape ops that both
  exporters support.

Every exported file carries its input size in its name (``geolink_image_224x224.onnx``) and, with the rest of what
a runtime needs (normalisation, input and output names, widths, the geolink version), in its metadata: the ONNX
model's ``metadata_props``, the ``.pt2``'s ``extra_files["geolink.json"]``, and a ``<file>.json`` next to it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn

import geolink
from geolink.errors import ConfigError, InputError, MissingDependencyError
from geolink.graph.schema import EDGE_TYPES, NODE_TYPES, NUM_ANCHORS, empty_graph
from geolink.models.fusion import GeoLinkFusionEncoder
from geolink.models.image import GeoLinkImageEncoder
from geolink.models.osm import PaddedGraphs, pad_graphs
from geolink.registry import load_model
from geolink.runtime import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["ExportComponent", "ExportConfig", "ExportFormat", "FusionExport", "ImageExport", "PaddedGraphs",
           "export", "export_model", "pad_graphs", "read_metadata"]

IMAGE_INPUTS = ("images",)
IMAGE_OUTPUTS = ("tokens",)
FUSION_INPUTS = ("images", "nodes", "node_mask", "node_types", "anchors", "adjacency")


class ExportFormat(str, Enum):
    """``onnx`` (a ``.onnx`` file, opset 18) or ``torch-export`` (a ``torch.export`` ``.pt2`` program)."""

    ONNX = "onnx"
    TORCH_EXPORT = "torch-export"

    @property
    def suffix(self) -> str:
        return ".onnx" if self is ExportFormat.ONNX else ".pt2"


class ExportComponent(str, Enum):
    """``image`` (the image encoder's tokens) or ``fusion`` (the fusion encoder's four maps)."""

    IMAGE = "image"
    FUSION = "fusion"


class ImageExport(nn.Module):
    """The exported function of the image component: ``images [B, C, H, W] -> forward_features [B, 1 + L, D]``."""

    def __init__(self, encoder: GeoLinkImageEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.forward_features(images)


class FusionExport(nn.Module):
    """The exported function of the fusion component: :meth:`GeoLinkFusionEncoder.forward_padded` with the
    :class:`PaddedGraphs` fields as separate tensors, the maps as a tuple."""

    def __init__(self, encoder: GeoLinkFusionEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor, nodes: torch.Tensor, node_mask: torch.Tensor, node_types: torch.Tensor,
                anchors: torch.Tensor, adjacency: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.encoder.forward_padded(images, nodes, node_mask, node_types, anchors, adjacency))


def example_graphs(text_dim: int, batch: int = 2, nodes: int = 3) -> PaddedGraphs:
    """A small padded batch to trace the fusion export with (every node type and edge type present)."""
    generator = torch.Generator().manual_seed(0)
    graphs = []
    for _ in range(batch):
        graph = empty_graph(text_dim)
        for node_type in NODE_TYPES:
            graph[node_type].x = torch.randn(nodes, text_dim, generator=generator)
            graph[node_type].pos = torch.rand(nodes, NUM_ANCHORS[node_type], 2, generator=generator)
        for edge_type in EDGE_TYPES:
            graph[edge_type].edge_index = torch.randint(0, nodes, (2, 2 * nodes), generator=generator)
        graphs.append(graph)
    from torch_geometric.data import Batch

    return pad_graphs(Batch.from_data_list(graphs))


def _image_size(encoder: GeoLinkImageEncoder, image_size: int | None) -> tuple[int, int]:
    size = image_size or encoder.grid_size[0] * encoder.patch_size
    if size % encoder.patch_size:
        raise InputError(f"image_size {size} is not a multiple of the patch size {encoder.patch_size}")
    return size, size


def metadata(model: nn.Module, component: ExportComponent, size: tuple[int, int], source: str) -> dict[str, Any]:
    """What a runtime needs to call an exported file (stored in it and next to it)."""
    image = model if isinstance(model, GeoLinkImageEncoder) else model.image_encoder
    info: dict[str, Any] = {
        "geolink_version": geolink.__version__, "component": component.value, "source": source,
        "image_size": list(size), "in_chans": image.in_chans, "patch_size": image.patch_size,
        "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "dynamic": ["batch"],
    }
    if component is ExportComponent.IMAGE:
        info.update(inputs=list(IMAGE_INPUTS), outputs=list(IMAGE_OUTPUTS), embed_dim=image.embed_dim,
                    output_shape=["B", 1 + (size[0] // image.patch_size) * (size[1] // image.patch_size),
                                  image.embed_dim])
    else:
        grid = [size[0] // image.patch_size, size[1] // image.patch_size]
        info.update(inputs=list(FUSION_INPUTS), outputs=[f"map{i}" for i in range(len(model.out_indices))],
                    out_indices=list(model.out_indices), out_channels=model.out_channels, grid=grid,
                    text_dim=model.osm_encoder.text_dim, node_types=list(NODE_TYPES),
                    anchors_per_type=[NUM_ANCHORS[t] for t in NODE_TYPES], dynamic=["batch", "nodes"],
                    padded_inputs="geolink.export.pad_graphs(graph_batch).as_tuple()")
    return info


def _program(model: nn.Module, component: ExportComponent, size: tuple[int, int]
             ) -> tuple[nn.Module, tuple[torch.Tensor, ...], dict[str, Any]]:
    """The module to export, its example inputs and their dynamic dimensions."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    parameter = next(model.parameters())
    if component is ExportComponent.IMAGE:
        images = torch.randn(2, model.in_chans, *size, dtype=parameter.dtype, device=parameter.device)
        return ImageExport(model).eval(), (images,), {"images": {0: batch}}
    nodes = torch.export.Dim("nodes", min=1, max=65536)
    image = model.image_encoder
    images = torch.randn(2, image.in_chans, *size, dtype=parameter.dtype, device=parameter.device)
    graphs = example_graphs(model.osm_encoder.text_dim)
    inputs = (images, graphs.nodes.to(parameter), graphs.node_mask.to(parameter.device),
              graphs.node_types.to(parameter.device), graphs.anchors.to(parameter), graphs.adjacency.to(parameter))
    dynamic = {"images": {0: batch}, "nodes": {0: batch, 1: nodes}, "node_mask": {0: batch, 1: nodes},
               "node_types": {0: batch, 1: nodes}, "anchors": {0: batch, 1: nodes},
               "adjacency": {0: batch, 1: nodes, 2: nodes}}
    return FusionExport(model).eval(), inputs, dynamic


def export_model(model: nn.Module, out_dir: str | Path, component: ExportComponent | str = "image",
                 format: ExportFormat | str = "onnx", image_size: int | None = None, source: str = "") -> Path:
    """Export the image or fusion encoder of ``model`` to ``out_dir``; returns the file's path.

    Args:
        model: a :class:`GeoLinkImageEncoder` (component ``image``), a :class:`GeoLinkFusionEncoder`, or a model
            holding one (``GeoLinkForPretraining``).
        out_dir: output folder (created); the file is ``geolink_<component>_<H>x<W>.<onnx|pt2>`` with a
            ``.json`` of its metadata next to it.
        component: ``"image"`` or ``"fusion"``.
        format: ``"onnx"`` or ``"torch-export"``.
        image_size: the (square) input size the file takes; default the model's training size.
        source: where the weights came from, recorded in the metadata.

    Raises:
        InputError: the model has no such component, or the size is not a multiple of the patch size.
        MissingDependencyError: ONNX export without the ``onnx``/``onnxscript`` packages (``pip install
            geolink[export]``).
    """
    component, format = ExportComponent(component), ExportFormat(format)
    target = _component(model, component)
    image = target if isinstance(target, GeoLinkImageEncoder) else target.image_encoder
    size = _image_size(image, image_size)
    info = metadata(target, component, size, source)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"geolink_{component.value}_{size[0]}x{size[1]}{format.suffix}"
    was_training = target.training
    target.eval()
    try:
        module, inputs, dynamic = _program(target, component, size)
        with torch.no_grad():
            if format is ExportFormat.TORCH_EXPORT:
                program = torch.export.export(module, inputs, dynamic_shapes=dynamic)
                torch.export.save(program, str(path), extra_files={"geolink.json": json.dumps(info)})
            else:
                _export_onnx(module, inputs, dynamic, path, info)
    finally:
        target.train(was_training)
    path.with_name(path.name + ".json").write_text(json.dumps(info, indent=2) + "\n")
    return path


def _export_onnx(module: nn.Module, inputs: tuple[torch.Tensor, ...], dynamic: dict[str, Any], path: Path,
                 info: dict[str, Any]) -> None:
    try:
        import onnx
        import onnxscript  # noqa: F401 (the dynamo ONNX exporter needs it)
    except ImportError as error:
        raise MissingDependencyError("ONNX export needs the onnx and onnxscript packages: pip install "
                                     "'geolink[export]'") from error
    program = torch.onnx.export(module, inputs, dynamo=True, dynamic_shapes=dynamic, input_names=info["inputs"],
                                output_names=info["outputs"], opset_version=18, optimize=True,
                                verbose=False)
    program.save(str(path))
    proto = onnx.load(str(path))
    for key, value in info.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"geolink.{key}", json.dumps(value)
    onnx.save(proto, str(path))


def _component(model: nn.Module, component: ExportComponent) -> nn.Module:
    if component is ExportComponent.IMAGE:
        if isinstance(model, GeoLinkImageEncoder):
            return model
        found = getattr(model, "image_encoder", None)
    else:
        found = model if isinstance(model, GeoLinkFusionEncoder) else getattr(model, "fusion_encoder", None)
    if found is None:
        raise InputError(f"a {type(model).__name__} has no {component.value!r} component to export")
    return found


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The geolink metadata of an exported file (from the ``.json`` next to it)."""
    sidecar = Path(f"{path}.json")
    if not sidecar.is_file():
        raise InputError(f"{path} has no metadata file {sidecar.name} next to it; export it with geolink export")
    return json.loads(sidecar.read_text())


@dataclass
class ExportConfig:
    """Export a GeoLink encoder to ONNX or torch.export for serving: the image encoder (images -> tokens
    [B, 1+L, D]) or the fusion encoder (images + a padded graph batch -> the four maps). The input size is fixed at
    export and written in the file name; the batch (and the node count) stay dynamic.
    """

    model: str = field(metadata={"help": "pretrained tag, from_pretrained folder, Hub repo or official .pth"})
    out: Path = field(default=Path("exported"), metadata={"help": "output folder (the file name gets the component "
                                                                  "and input size)"})
    component: ExportComponent = field(default=ExportComponent.IMAGE, metadata={"help": "what to export"})
    format: ExportFormat = field(default=ExportFormat.ONNX, metadata={"help": "onnx or torch-export (.pt2)"})
    image_size: int | None = field(default=None, metadata={"help": "input size (square) the file takes; default "
                                                                    "the model's training size"})

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.component, self.format = ExportComponent(self.component), ExportFormat(self.format)
        if self.image_size is not None and self.image_size < 1:
            raise ConfigError(f"image_size must be positive; got {self.image_size}")


def export(config: ExportConfig) -> int:
    """Run ``geolink export``: load the model's component, export it, print the file's path; returns 0."""
    model = load_model(config.model, component=config.component.value)
    path = export_model(model, config.out, config.component, config.format, config.image_size, source=config.model)
    print(f"exported {config.component.value} encoder: {path}")
    return 0
