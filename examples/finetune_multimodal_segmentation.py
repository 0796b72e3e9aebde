"""Fine-tune the GeoLink fusion encoder (image + OSM graph) + UPerNet for multimodal mapping, e.g. urban
functional zones (UFZ) or urban villages; reports mIoU and IoU per class.

Data layout (the official UFZ example layout works as is; files matched by name without suffix)::

    <data>/img/<tile>.png  <data>/label/<tile>.png  <data>/graph/<tile>.safetensors      # split here
    <data>/{train,val}/{img,label,graph}/ [<data>/test/{img,label,graph}/]             # or given splits

Graphs are either the official layout stored as safetensors (``<type>.x`` = text features + flattened anchors, as in
``official_examples/ufz``; the official ``.pt`` pickles are not read, as that needs unpickling) or geolink graph files
(``geolink build-graphs``), whose tag features come from the folder's embedding table (``--graph-vocab``). The
text-feature width of the graphs must match the model's (``text_dim``: 512 for the CLIP features of the official
release). Tiles are resized to ``--img-size`` (labels nearest-neighbour); training flips image, label and the graph's
anchor coordinates together. The fusion encoder's four maps (three raw ViT levels + the fused map) go through the
ViT multi-scale neck and UPerNet.

Example (the official release on UFZ, on a GPU)::

    python examples/finetune_multimodal_segmentation.py --data ufz --model geolink_vit_large_patch16_224.neurips2025 \\
        --class-names ufz --epochs 50 --batch-size 8 --lr 1e-4 --output-dir runs/ufz

Outputs in ``--output-dir``: ``best/`` and ``last/`` checkpoints and ``metrics.json`` (mIoU, per-class IoU and F1,
overall accuracy; best and last epochs, and ``test/`` when present).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torch_geometric.data import Batch, HeteroData

sys.path.insert(0, str(Path(__file__).resolve().parent))

from finetune_utils import (  # noqa: E402
    Normalised,
    add_common_args,
    class_names_arg,
    fit,
    infer_num_classes,
    load_image_encoder,
    paired_files,
    read_image,
    read_mask,
    seed_everything,
    split_samples,
)

from geolink.eval.metrics import ConfusionMatrix, segmentation_metrics  # noqa: E402
from geolink.graph.schema import NODE_TYPES, validate_graph  # noqa: E402
from geolink.models.heads import FusionSegmenter  # noqa: E402

UFZ_CLASSES = ("water", "green", "farmland", "undeveloped", "residential", "commercial", "institution", "industrial",
               "transport")
"""Class names of the official UFZ example (``dataset/DownstreamDataset.py`` of the official repository)."""
PRESETS = {"ufz": UFZ_CLASSES}


def load_tile_graph(path: Path, table: torch.Tensor | None = None) -> HeteroData:
    """One tile's graph: a geolink graph file (``format`` metadata; ``x`` from ``table`` when stored compactly) or
    an official-layout safetensors file.

    Raises:
        ValueError: a compact geolink graph without its embedding table.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if "format" in metadata:
        from geolink.graph.io import load_graph

        graph = load_graph(path, table)
        if "x" not in graph[NODE_TYPES[0]]:
            raise ValueError(f"{path} stores tag ids, not features: pass --graph-vocab <folder>/vocab.safetensors "
                             "(the embedding table written by geolink build-graphs --text-model)")
        return graph
    from geolink.convert import load_official_graph

    return load_official_graph(path)


def flip_graph(graph: HeteroData, horizontal: bool, vertical: bool) -> HeteroData:
    """A copy of ``graph`` with anchors mirrored like the image: ``u -> 1 - u`` (horizontal), ``v -> 1 - v``."""
    if not (horizontal or vertical):
        return graph
    graph = graph.clone()
    for node_type in NODE_TYPES:
        pos = graph[node_type].pos.clone()
        if horizontal:
            pos[..., 0] = 1 - pos[..., 0]
        if vertical:
            pos[..., 1] = 1 - pos[..., 1]
        graph[node_type].pos = pos
    return graph


class MultimodalFolder(Dataset):
    """``(image [3, S, S] in [0, 1], label [S, S], graph)`` with S = ``size``; flips (graph included) when
    ``train``."""

    def __init__(self, samples: Sequence[tuple[str, list[Path]]], graph_dir: Path, size: int, train: bool,
                 table: torch.Tensor | None = None) -> None:
        self.samples, self.size, self.train, self.table = list(samples), size, train, table
        self.graph_paths = []
        for stem, _ in self.samples:
            path = graph_dir / f"{stem}.safetensors"
            if not path.is_file():
                raise FileNotFoundError(f"tile {stem!r} has no graph {path}; every image needs a graph file (build "
                                        "missing ones with geolink build-graphs)")
            self.graph_paths.append(path)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, HeteroData]:
        _, (image_path, label_path) = self.samples[index]
        image, label = read_image(image_path), read_mask(label_path)
        graph = load_tile_graph(self.graph_paths[index], self.table)
        if image.shape[-2:] != (self.size, self.size):
            image = F.interpolate(image[None], size=(self.size, self.size), mode="bilinear", antialias=True,
                                  align_corners=False)[0]
        if label.shape != (self.size, self.size):
            label = F.interpolate(label[None, None].float(), size=(self.size, self.size), mode="nearest")[0, 0].long()
        if self.train:
            horizontal, vertical = bool(torch.rand(()) < 0.5), bool(torch.rand(()) < 0.5)
            if horizontal:
                image, label = image.flip(-1), label.flip(-1)
            if vertical:
                image, label = image.flip(-2), label.flip(-2)
            graph = flip_graph(graph, horizontal, vertical)
        return image.contiguous(), label.contiguous(), graph


def collate(samples: list) -> tuple[torch.Tensor, torch.Tensor, Batch]:
    """Stack images and labels; batch the graphs with ``Batch.from_data_list``."""
    images, labels, graphs = zip(*samples)
    return torch.stack(images), torch.stack(labels), Batch.from_data_list(list(graphs))


def multimodal_loss(model: torch.nn.Module, batch: Any, ignore_index: int) -> torch.Tensor:
    """Pixel cross-entropy of ``model(images, graphs)``, unlabelled pixels ignored."""
    images, labels, graphs = batch
    return F.cross_entropy(model(images, graphs).float(), labels, ignore_index=ignore_index)


def evaluate_multimodal(model: torch.nn.Module, loader: Any, num_classes: int, ignore_index: int,
                        class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """mIoU, per-class IoU / F1 and overall accuracy over all pixels of ``loader``."""
    matrix = ConfusionMatrix(num_classes, ignore_index)
    for images, labels, graphs in loader:
        matrix.update(model(images, graphs).argmax(1), labels)
    return segmentation_metrics(matrix.matrix, class_names)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, help="dataset root (layouts above)")
    data.add_argument("--dirs", nargs=3, default=["img", "label", "graph"], metavar=("IMAGES", "LABELS", "GRAPHS"),
                      help="sub-folder names (default: img label graph)")
    data.add_argument("--graph-vocab", default=None,
                      help="embedding table (vocab.safetensors) for compact geolink graph files")
    data.add_argument("--num-classes", type=int, default=None,
                      help="classes (default: largest id in the training labels + 1)")
    data.add_argument("--class-names", default=None,
                      help="comma-separated class names, or 'ufz' for the official UFZ names")
    data.add_argument("--ignore-index", type=int, default=255, help="label value of unlabelled pixels (default 255)")
    data.add_argument("--val-fraction", type=float, default=0.2,
                      help="held-out share when the data has no train/ and val/ folders (default 0.2)")
    head = parser.add_argument_group("head")
    head.add_argument("--decoder-channels", type=int, default=256, help="UPerNet width (default 256)")
    head.add_argument("--norm", choices=["bn", "gn"], default="bn", help="decoder norm (default bn)")
    add_common_args(parser, epochs=50, batch_size=8, lr=1e-4, img_size=224)
    parser.set_defaults(output_dir="runs/multimodal_segmentation",
                        model="geolink_vit_large_patch16_224.neurips2025")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the script; returns the exit code."""
    args = build_parser().parse_args(argv)
    seed_everything(args.seed)  # model initialisation (head, random encoders) depends on it
    root = Path(args.data)
    image_dir, label_dir, graph_dir = args.dirs
    table = None
    if args.graph_vocab:
        from safetensors.torch import load_file

        table = load_file(args.graph_vocab)["embeddings"]
    train_samples, val_samples = split_samples(root, [image_dir, label_dir], args.val_fraction, args.seed)
    split_root = (lambda name: root / name) if (root / "train").is_dir() else (lambda name: root)
    test_samples = paired_files(root / "test", [image_dir, label_dir]) if (root / "test").is_dir() else None
    num_classes = args.num_classes or infer_num_classes([s[1][1] for s in train_samples], args.ignore_index)
    names = class_names_arg(args.class_names, num_classes, PRESETS)
    make = lambda samples, split, train: MultimodalFolder(  # noqa: E731
        samples, split_root(split) / graph_dir, args.img_size, train, table)
    train_set, val_set = make(train_samples, "train", True), make(val_samples, "val", False)
    text_dim = int(train_set[0][2][NODE_TYPES[0]].x.shape[1])
    loaded = load_image_encoder(args, component="fusion", text_dim=text_dim)
    encoder = loaded.model
    validate_graph(train_set[0][2], feature_dim=encoder.osm_encoder.text_dim)
    patch = encoder.image_encoder.patch_size
    if args.img_size % patch:
        raise ValueError(f"--img-size {args.img_size} is not a multiple of the patch size {patch}")
    model = Normalised(FusionSegmenter(encoder, num_classes, channels=args.decoder_channels, norm=args.norm),
                       loaded.mean, loaded.std)
    fit(model, train_set, val_set, loss_fn=lambda m, b: multimodal_loss(m, b, args.ignore_index),
        evaluate_fn=lambda m, loader: evaluate_multimodal(m, loader, num_classes, args.ignore_index, names),
        args=args, primary="mIoU", encoder=encoder, collate_fn=collate,
        test_set=make(test_samples, "test", False) if test_samples else None,
        extra_metrics={"num_classes": num_classes, "class_names": names, "text_dim": text_dim,
                       "num_train": len(train_samples), "num_val": len(val_samples)})
    print(f"done: {Path(args.output_dir) / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
