"""Fine-tune a siamese GeoLink encoder + UPerNet for binary change detection (F1 / IoU of the change class).

Data layout (the LEVIR-CD one; files matched by name without suffix)::

    <data>/A/<tile>.png  <data>/B/<tile>.png  <data>/label/<tile>.png          # split here (--val-fraction)
    <data>/{train,val}/{A,B,label}/ [<data>/test/{A,B,label}/]                  # or given splits

``A`` and ``B`` are the two dates; a label pixel greater than 0 is "changed" (LEVIR-CD stores 255, SpaceNet7
building-change masks prepared from two months 1). Both dates go through one shared encoder; each of the four
``default_out_indices`` levels is reduced to ``|f_A - f_B|`` (``--fusion concat`` keeps both and the difference)
and decoded by UPerNet (ViT multi-scale neck on). Training takes the same random crop and flips of both dates (they
are stacked and moved as one by ``geolink.data.transforms``); the loop, checkpoints and resume are
``geolink.finetune``'s.

Example (LEVIR-CD cut to 256² tiles, on a GPU)::

    python examples/finetune_change_detection.py --data LEVIR-CD256 --img-size 256 --epochs 100 \\
        --batch-size 16 --lr 1e-4 --model geolink_vit_large_patch16_224.neurips2025_unimodal --output-dir runs/levir

Outputs in ``--output-dir``: ``best/`` and ``last/`` checkpoints and ``metrics.json`` (F1, IoU, precision, recall of
the change class, overall accuracy; best and last epochs, and ``test/`` when present).
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
from geolink.eval.metrics import ConfusionMatrix, change_detection_metrics
from geolink.finetune import (
    FinetuneConfig,
    Normalised,
    check_patch_multiple,
    fit,
    load_task_encoder,
    pad_collate,
    paired_files,
    read_image,
    read_mask,
    split_samples,
)
from geolink.models.heads import SiameseChangeDetector
from geolink.runtime import seed_everything

IGNORE = 255  # only used for padding
DEFAULTS = {"epochs": 100, "batch_size": 8, "lr": 1e-4, "img_size": 256, "output_dir": Path("runs/change_detection")}


@dataclass(kw_only=True)
class ChangeDetectionConfig(FinetuneConfig):
    """Binary change detection of two-date image folders."""

    data: Path = field(metadata={"help": "dataset root (layouts above)"})
    dirs: tuple[str, str, str] = field(default=("A", "B", "label"), metadata={
        "help": "sub-folder names of the two dates and the mask", "metavar": ("DATE_A", "DATE_B", "MASK")})
    val_fraction: float = field(default=0.2, metadata={"help": "held-out share when there are no train/ val/ folders"})
    fusion: str = field(default="absdiff", metadata={"help": "per-level combination of the dates: absdiff or concat"})
    change_weight: float = field(default=1.0, metadata={"help": "loss weight of the change class (raise it if rare)"})
    decoder_channels: int = field(default=256, metadata={"help": "UPerNet width"})
    norm: str = field(default="bn", metadata={"help": "decoder norm: bn or gn"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fusion not in ("absdiff", "concat") or self.norm not in ("bn", "gn"):
            raise ConfigError(f"fusion must be absdiff or concat and norm bn or gn; got {self.fusion!r}, {self.norm!r}")


class ChangeFolder(Dataset):
    """``(image_a [C, H, W], image_b [C, H, W], change [H, W] in {0, 1})``; both dates and the mask go through
    ``transform`` together when given."""

    def __init__(self, samples: Sequence[tuple[str, list[Path]]], transform: JointTransform | None = None) -> None:
        self.samples, self.transform = list(samples), transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _, (path_a, path_b, path_mask) = self.samples[index]
        image_a, image_b, mask = read_image(path_a), read_image(path_b), read_mask(path_mask)
        if not image_a.shape[-2:] == image_b.shape[-2:] == mask.shape:
            raise DataError(f"{path_a}, {path_b} and {path_mask} differ in size: {tuple(image_a.shape[-2:])}, "
                            f"{tuple(image_b.shape[-2:])}, {tuple(mask.shape)}")
        both, change = torch.cat([image_a, image_b]), (mask > 0).long()
        if self.transform is not None:
            both, change = self.transform(both, change)
        image_a, image_b = both.split(len(image_a))
        return image_a.contiguous(), image_b.contiguous(), change.contiguous()


def change_loss(model: torch.nn.Module, batch: Any, change_weight: float) -> torch.Tensor:
    """Cross-entropy over {no change, change}, the change class weighted by ``change_weight``."""
    image_a, image_b, mask = batch
    weight = torch.tensor([1.0, change_weight], device=mask.device)
    return F.cross_entropy(model(image_a, image_b).float(), mask, weight=weight, ignore_index=IGNORE)


def evaluate_change(model: torch.nn.Module, loader: Any) -> dict[str, Any]:
    """Change-class F1 / IoU / precision / recall over all pixels of ``loader`` (one 2×2 confusion matrix)."""
    matrix = ConfusionMatrix(2, ignore_index=IGNORE)
    for image_a, image_b, mask in loader:
        matrix.update(model(image_a, image_b).argmax(1), mask)
    return change_detection_metrics(matrix.matrix)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the script; returns the exit code."""
    config = parse_config(ChangeDetectionConfig, argv, __doc__, DEFAULTS)
    seed_everything(config.seed)  # model initialisation (head, random encoders) depends on it
    train_samples, val_samples = split_samples(config.data, config.dirs, config.val_fraction, config.seed)
    test_dir = config.data / "test"
    test_samples = paired_files(test_dir, config.dirs) if test_dir.is_dir() else None
    loaded = load_task_encoder(config)
    patch = int(getattr(loaded.model, "patch_size", 16))
    check_patch_multiple(config.img_size, patch)
    model = Normalised(SiameseChangeDetector(loaded.model, 2, fusion=config.fusion, channels=config.decoder_channels,
                                             norm=config.norm), loaded.mean, loaded.std)
    augment = Compose([RandomCrop(config.img_size, fill=IGNORE), RandomFlip()])
    fit(model, ChangeFolder(train_samples, augment), ChangeFolder(val_samples),
        loss_fn=lambda m, b: change_loss(m, b, config.change_weight), evaluate_fn=evaluate_change, config=config,
        primary="f1", encoder=loaded.model, collate_fn=pad_collate(patch, IGNORE),
        test_set=ChangeFolder(test_samples) if test_samples else None,
        extra_metrics={"num_train": len(train_samples), "num_val": len(val_samples)})
    print(f"done: {config.output_dir / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
