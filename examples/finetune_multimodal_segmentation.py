"""Fine-tune the GeoLink fusion encoder (image + OSM graph) + UPerNet for multimodal mapping, e.g. urban
functional zones (UFZ) or urban villages; reports mIoU and IoU per class.

Data layout (the official UFZ example layout works as is; files matched by name without suffix)::

    <data>/img/<tile>.png  <data>/label/<tile>.png  <data>/graph/<tile>.safetensors      # split here
    <data>/{train,val}/{img,label,graph}/ [<data>/test/{img,label,graph}/]             # or given splits

Graphs are official-layout safetensors (``<type>.x`` = text features + flattened anchors, as in
``official_examples/ufz``; the official ``.pt`` pickles are not read) or ``geolink build-graphs`` files (tag
features from ``--graph-vocab``), as wide as the model's ``text_dim`` (384: the demo model, 512: the official
release). Tiles are resized to ``--img-size``; training flips image, label and graph anchors together
(``geolink.data.transforms``). The fusion encoder's four maps go through the ViT multi-scale neck and UPerNet.

Example (the official release on UFZ, on a GPU)::

    python examples/finetune_multimodal_segmentation.py --data ufz --model geolink_vit_large_patch16_224.neurips2025 \\
        --class-names ufz --epochs 50 --batch-size 8 --lr 1e-4 --output-dir runs/ufz

Outputs in ``--output-dir``: ``best/``, ``last/`` and ``metrics.json`` (mIoU, per-class IoU / F1, overall accuracy).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.data import Dataset
from torch_geometric.data import HeteroData

from geolink.cli import parse_config
from geolink.data.transforms import Compose, JointTransform, RandomFlip, Resize
from geolink.errors import MissingInputError
from geolink.eval.metrics import ConfusionMatrix, segmentation_metrics
from geolink.finetune import (
    FinetuneConfig,
    Normalised,
    check_patch_multiple,
    class_names,
    fit,
    infer_num_classes,
    load_task_encoder,
    pad_collate,
    paired_files,
    read_image,
    read_mask,
    read_tile_graph,
    split_samples,
)
from geolink.graph.schema import NODE_TYPES, validate_graph
from geolink.models.heads import FusionSegmenter
from geolink.runtime import seed_everything

UFZ_CLASSES = ("water", "green", "farmland", "undeveloped", "residential", "commercial", "institution", "industrial",
               "transport")  # the official UFZ example's (dataset/DownstreamDataset.py of the official repository)
DEFAULTS = {"epochs": 50, "batch_size": 8, "lr": 1e-4, "output_dir": Path("runs/multimodal_segmentation")}


@dataclass(kw_only=True)
class MultimodalConfig(FinetuneConfig):
    """Image + OSM graph segmentation."""

    data: Path = field(metadata={"help": "dataset root (layouts above)"})
    dirs: tuple[str, str, str] = field(default=("img", "label", "graph"), metadata={
        "help": "sub-folder names of images, labels and graphs", "metavar": ("IMAGES", "LABELS", "GRAPHS")})
    graph_vocab: Path | None = field(default=None, metadata={"help": "vocab.safetensors of compact graph files"})
    num_classes: int | None = field(default=None, metadata={"help": "classes (default: largest label id + 1)"})
    class_names: tuple[str, ...] = field(default=(), metadata={"help": "class names, or 'ufz' for the UFZ names"})
    ignore_index: int = field(default=255, metadata={"help": "label value of unlabelled pixels"})
    val_fraction: float = field(default=0.2, metadata={"help": "held-out share when there are no train/ val/ folders"})
    decoder_channels: int = field(default=256, metadata={"help": "UPerNet width"})
    norm: str = field(default="bn", metadata={"help": "decoder norm: bn or gn"})


class MultimodalFolder(Dataset):
    """``(image [3, S, S] in [0, 1], label [S, S], graph)`` with S = the transform's size."""

    def __init__(self, samples: Sequence[tuple[str, list[Path]]], graph_dir: Path, transform: JointTransform,
                 table: torch.Tensor | None = None) -> None:
        self.samples, self.transform, self.table = list(samples), transform, table
        self.graph_paths = [graph_dir / f"{stem}.safetensors" for stem, _ in self.samples]
        missing = [path for path in self.graph_paths if not path.is_file()]
        if missing:
            raise MissingInputError(f"{len(missing)} tiles have no graph (e.g. {missing[0]}); every image needs a "
                                    "graph file (build missing ones with geolink build-graphs)")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, HeteroData]:
        _, (image_path, label_path) = self.samples[index]
        graph = read_tile_graph(self.graph_paths[index], self.table)
        image, (label, graph) = self.transform(read_image(image_path), (read_mask(label_path), graph))
        return image.contiguous(), label.contiguous(), graph


def multimodal_loss(model: torch.nn.Module, batch: Any, ignore_index: int) -> torch.Tensor:
    """Pixel cross-entropy of ``model(images, graphs)``, unlabelled pixels ignored."""
    images, labels, graphs = batch
    return F.cross_entropy(model(images, graphs).float(), labels, ignore_index=ignore_index)


def evaluate_multimodal(model: torch.nn.Module, loader: Any, num_classes: int, ignore_index: int,
                        names: Sequence[str] | None = None) -> dict[str, Any]:
    """mIoU, per-class IoU / F1 and overall accuracy over all pixels of ``loader``."""
    matrix = ConfusionMatrix(num_classes, ignore_index)
    for images, labels, graphs in loader:
        matrix.update(model(images, graphs).argmax(1), labels)
    return segmentation_metrics(matrix.matrix, names)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the script; returns the exit code."""
    config = parse_config(MultimodalConfig, argv, __doc__, DEFAULTS)
    seed_everything(config.seed)  # model initialisation (head, random encoders) depends on it
    root, (image_dir, label_dir, graph_dir) = config.data, config.dirs
    table = load_file(str(config.graph_vocab))["embeddings"] if config.graph_vocab else None
    train_samples, val_samples = split_samples(root, [image_dir, label_dir], config.val_fraction, config.seed)
    split_root = (lambda name: root / name) if (root / "train").is_dir() else (lambda name: root)
    test_samples = paired_files(root / "test", [image_dir, label_dir]) if (root / "test").is_dir() else None
    num_classes = config.num_classes or infer_num_classes([s[1][1] for s in train_samples], config.ignore_index)
    names = class_names(UFZ_CLASSES if config.class_names == ("ufz",) else config.class_names, num_classes)
    resize = Resize(config.img_size)
    make = lambda samples, split, transform: MultimodalFolder(  # noqa: E731
        samples, split_root(split) / graph_dir, transform, table)
    train_set, val_set = make(train_samples, "train", Compose([resize, RandomFlip()])), make(val_samples, "val", resize)
    text_dim = int(train_set[0][2][NODE_TYPES[0]].x.shape[1])
    encoder = load_task_encoder(config, component="fusion", osm={"text_dim": text_dim})
    validate_graph(train_set[0][2], feature_dim=encoder.model.osm_encoder.text_dim)
    check_patch_multiple(config.img_size, encoder.model.image_encoder.patch_size)
    model = Normalised(FusionSegmenter(encoder.model, num_classes, channels=config.decoder_channels, norm=config.norm),
                       encoder.mean, encoder.std)
    fit(model, train_set, val_set, loss_fn=lambda m, b: multimodal_loss(m, b, config.ignore_index),
        evaluate_fn=lambda m, loader: evaluate_multimodal(m, loader, num_classes, config.ignore_index, names),
        config=config, primary="mIoU", encoder=encoder.model, collate_fn=pad_collate(1, config.ignore_index),
        test_set=make(test_samples, "test", resize) if test_samples else None,
        extra_metrics={"num_classes": num_classes, "class_names": names, "text_dim": text_dim,
                       "num_train": len(train_samples), "num_val": len(val_samples)})
    print(f"done: {config.output_dir / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
