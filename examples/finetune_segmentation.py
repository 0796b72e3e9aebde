"""Fine-tune a GeoLink image encoder + UPerNet for semantic segmentation of image / mask folders (mIoU).

Data layout (files matched by name without suffix; images PNG/JPG/TIF or ``.npy`` ``[H, W, C]``; masks single-band
class ids, ``--ignore-index`` for unlabelled pixels)::

    <data>/img/<tile>.png     <data>/label/<tile>.png              # split here (--val-fraction, seeded)
    <data>/train/{img,label}/ <data>/val/{img,label}/ [<data>/test/{img,label}/]   # or given splits

Training takes random ``--img-size`` crops with flips (``geolink.data.transforms``); validation runs on whole tiles
(padded to a multiple of the patch size). The encoder's four ``default_out_indices`` maps go through the ViT
multi-scale neck and UPerNet; the loop, checkpoints and resume are ``geolink.finetune``'s.

Example (AI4SmallFarms prepared as RGB tiles, paper-style schedule on a GPU)::

    python examples/finetune_segmentation.py --data ai4smallfarms --num-classes 2 --epochs 50 --batch-size 16 \\
        --lr 1e-4 --model geolink_vit_large_patch16_224.neurips2025_unimodal --output-dir runs/ai4sf

Outputs in ``--output-dir``: ``best/`` and ``last/`` checkpoints, ``metrics.json`` (mIoU, per-class IoU/F1, overall
accuracy of the best and last epochs, and of ``test/`` when present).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from geolink.cli import parse_config
from geolink.data.transforms import Compose, JointTransform, RandomCrop, RandomFlip
from geolink.errors import ConfigError, DataError
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
    split_samples,
)
from geolink.models.heads import ImageSegmenter
from geolink.runtime import seed_everything

DEFAULTS = {"epochs": 50, "batch_size": 8, "lr": 1e-4, "output_dir": Path("runs/segmentation")}


@dataclass(kw_only=True)
class SegmentationConfig(FinetuneConfig):
    """Semantic segmentation of image / mask folders."""

    data: Path = field(metadata={"help": "dataset root (layouts above)"})
    image_dir: str = field(default="img", metadata={"help": "image sub-folder name"})
    mask_dir: str = field(default="label", metadata={"help": "mask sub-folder name"})
    num_classes: int | None = field(default=None, metadata={
        "help": "classes (default: largest id in the training masks + 1)"})
    class_names: tuple[str, ...] = field(default=(), metadata={"help": "class names for metrics.json"})
    ignore_index: int = field(default=255, metadata={"help": "mask value of unlabelled pixels"})
    val_fraction: float = field(default=0.2, metadata={"help": "held-out share when there are no train/ val/ folders"})
    decoder_channels: int = field(default=256, metadata={"help": "UPerNet width"})
    norm: str = field(default="bn", metadata={"help": "decoder norm: bn or gn"})
    neck: bool = field(default=True, metadata={"help": "ViT multi-scale neck (off: maps stay at 1/patch)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.norm not in ("bn", "gn"):
            raise ConfigError(f"norm must be bn or gn, got {self.norm!r}")


class SegmentationFolder(Dataset):
    """``(image [C, H, W] in [0, 1], mask [H, W] int64)`` pairs, through ``transform`` when given."""

    def __init__(self, samples: Sequence[tuple[str, list[Path]]], transform: JointTransform | None = None) -> None:
        self.samples, self.transform = list(samples), transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        _, (image_path, mask_path) = self.samples[index]
        image, mask = read_image(image_path), read_mask(mask_path)
        if image.shape[-2:] != mask.shape:
            raise DataError(f"{image_path} is {tuple(image.shape[-2:])} but its mask {mask_path} is "
                            f"{tuple(mask.shape)}")
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return image.contiguous(), mask.contiguous()


def segmentation_loss(model: torch.nn.Module, batch: Any, ignore_index: int) -> torch.Tensor:
    """Pixel cross-entropy of ``model(images)`` against the masks, unlabelled pixels ignored."""
    images, masks = batch
    return F.cross_entropy(model(images).float(), masks, ignore_index=ignore_index)


def evaluate_segmentation(model: torch.nn.Module, loader: Any, num_classes: int, ignore_index: int,
                          names: Sequence[str] | None = None) -> dict[str, Any]:
    """mIoU etc. of ``model`` over ``loader``: ``argmax`` of the ``[B, K, H, W]`` logits against the masks, one
    confusion matrix over all pixels (see :func:`geolink.eval.metrics.segmentation_metrics`)."""
    matrix = ConfusionMatrix(num_classes, ignore_index)
    for images, masks in loader:
        matrix.update(model(images).argmax(1), masks)
    return segmentation_metrics(matrix.matrix, names)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the script; returns the exit code."""
    config = parse_config(SegmentationConfig, argv, __doc__, DEFAULTS)
    seed_everything(config.seed)  # model initialisation (head, random encoders) depends on it
    folders = [config.image_dir, config.mask_dir]
    train_samples, val_samples = split_samples(config.data, folders, config.val_fraction, config.seed)
    test_dir = config.data / "test"
    test_samples = paired_files(test_dir, folders) if test_dir.is_dir() else None
    num_classes = config.num_classes or infer_num_classes([s[1][1] for s in train_samples], config.ignore_index)
    names = class_names(config.class_names, num_classes)
    loaded = load_task_encoder(config)
    patch = int(getattr(loaded.model, "patch_size", 16))
    check_patch_multiple(config.img_size, patch)
    model = Normalised(ImageSegmenter(loaded.model, num_classes, channels=config.decoder_channels, norm=config.norm,
                                      neck=config.neck), loaded.mean, loaded.std)
    augment = Compose([RandomCrop(config.img_size, fill=config.ignore_index), RandomFlip()])
    fit(model, SegmentationFolder(train_samples, augment), SegmentationFolder(val_samples),
        loss_fn=lambda m, b: segmentation_loss(m, b, config.ignore_index),
        evaluate_fn=lambda m, loader: evaluate_segmentation(m, loader, num_classes, config.ignore_index, names),
        config=config, primary="mIoU", encoder=loaded.model, collate_fn=pad_collate(patch, config.ignore_index),
        test_set=SegmentationFolder(test_samples) if test_samples else None,
        extra_metrics={"num_classes": num_classes, "class_names": names, "num_train": len(train_samples),
                       "num_val": len(val_samples)})
    print(f"done: {config.output_dir / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
