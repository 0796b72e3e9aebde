"""Fine-tune a siamese GeoLink encoder + UPerNet for binary change detection (F1 / IoU of the change class).

Data layout (the LEVIR-CD one; files matched by name without suffix)::

    <data>/A/<tile>.png  <data>/B/<tile>.png  <data>/label/<tile>.png          # split here (--val-fraction)
    <data>/{train,val}/{A,B,label}/ [<data>/test/{A,B,label}/]                  # or given splits

``A`` and ``B`` are the two dates; a label pixel greater than 0 is "changed" (LEVIR-CD stores 255, SpaceNet7
building-change masks prepared from two months 1). Both dates go through one shared encoder; each of the four
``default_out_indices`` levels is reduced to ``|f_A - f_B|`` (``--fusion concat`` keeps both and the difference)
and decoded by UPerNet (ViT multi-scale neck on). Training uses the same random crop and flips on both dates.

Example (LEVIR-CD cut to 256² tiles, on a GPU)::

    python examples/finetune_change_detection.py --data LEVIR-CD256 --img-size 256 --epochs 100 \\
        --batch-size 16 --lr 1e-4 --output-dir runs/levir

Outputs in ``--output-dir``: ``best/`` and ``last/`` checkpoints and ``metrics.json`` (F1, IoU, precision, recall of
the change class, overall accuracy; best and last epochs, and ``test/`` when present).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from finetune_utils import (  # noqa: E402
    Normalised,
    add_common_args,
    fit,
    joint_augment,
    load_image_encoder,
    pad_collate,
    paired_files,
    read_image,
    read_mask,
    seed_everything,
    split_samples,
)

from geolink.eval.metrics import ConfusionMatrix, change_detection_metrics  # noqa: E402
from geolink.models.heads import SiameseChangeDetector  # noqa: E402

IGNORE = 255  # only used for padding


class ChangeFolder(Dataset):
    """``(image_a [C, H, W], image_b [C, H, W], change [H, W] in {0, 1})``; shared crop and flips when ``train``."""

    def __init__(self, samples: Sequence[tuple[str, list[Path]]], size: int, train: bool) -> None:
        self.samples, self.size, self.train = list(samples), size, train

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _, (path_a, path_b, path_mask) = self.samples[index]
        image_a, image_b, mask = read_image(path_a), read_image(path_b), read_mask(path_mask)
        if not image_a.shape[-2:] == image_b.shape[-2:] == mask.shape:
            raise ValueError(f"{path_a}, {path_b} and {path_mask} differ in size: {tuple(image_a.shape[-2:])}, "
                             f"{tuple(image_b.shape[-2:])}, {tuple(mask.shape)}")
        (image_a, image_b, mask), _ = joint_augment([image_a, image_b, (mask > 0).long()], self.size, IGNORE,
                                                    self.train)
        return image_a, image_b, mask


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, help="dataset root (layouts above)")
    data.add_argument("--dirs", nargs=3, default=["A", "B", "label"], metavar=("DATE_A", "DATE_B", "MASK"),
                      help="sub-folder names of the two dates and the mask (default: A B label)")
    data.add_argument("--val-fraction", type=float, default=0.2,
                      help="held-out share when the data has no train/ and val/ folders (default 0.2)")
    head = parser.add_argument_group("head")
    head.add_argument("--fusion", choices=["absdiff", "concat"], default="absdiff",
                      help="per-level combination of the dates (default absdiff)")
    head.add_argument("--change-weight", type=float, default=1.0,
                      help="loss weight of the change class (raise it for rare change; default 1)")
    head.add_argument("--decoder-channels", type=int, default=256, help="UPerNet width (default 256)")
    head.add_argument("--norm", choices=["bn", "gn"], default="bn", help="decoder norm (default bn)")
    add_common_args(parser, epochs=100, batch_size=8, lr=1e-4, img_size=256)
    parser.set_defaults(output_dir="runs/change_detection")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the script; returns the exit code."""
    args = build_parser().parse_args(argv)
    seed_everything(args.seed)  # model initialisation (head, random encoders) depends on it
    root = Path(args.data)
    train_samples, val_samples = split_samples(root, args.dirs, args.val_fraction, args.seed)
    test_samples = paired_files(root / "test", args.dirs) if (root / "test").is_dir() else None
    loaded = load_image_encoder(args)
    patch = int(getattr(loaded.model, "patch_size", 16))
    if args.img_size % patch:
        raise ValueError(f"--img-size {args.img_size} is not a multiple of the patch size {patch}")
    model = Normalised(SiameseChangeDetector(loaded.model, 2, fusion=args.fusion, channels=args.decoder_channels,
                                             norm=args.norm), loaded.mean, loaded.std)
    fit(model, ChangeFolder(train_samples, args.img_size, True), ChangeFolder(val_samples, args.img_size, False),
        loss_fn=lambda m, b: change_loss(m, b, args.change_weight), evaluate_fn=evaluate_change, args=args,
        primary="f1", encoder=loaded.model, collate_fn=pad_collate(patch, IGNORE),
        test_set=ChangeFolder(test_samples, args.img_size, False) if test_samples else None,
        extra_metrics={"num_train": len(train_samples), "num_val": len(val_samples)})
    print(f"done: {Path(args.output_dir) / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
