"""Fine-tune a GeoLink image encoder + UPerNet for semantic segmentation of image / mask folders (mIoU).

Data layout (files matched by name without suffix; images PNG/JPG/TIF or ``.npy`` ``[H, W, C]``; masks single-band
class ids, ``--ignore-index`` for unlabelled pixels)::

    <data>/img/<tile>.png     <data>/label/<tile>.png              # split here (--val-fraction, seeded)
    <data>/train/{img,label}/ <data>/val/{img,label}/ [<data>/test/{img,label}/]   # or given splits

Training takes random ``--img-size`` crops with flips; validation runs on whole tiles (padded to a multiple of the
patch size). The encoder's four ``default_out_indices`` maps go through the ViT multi-scale neck and UPerNet.

Example (AI4SmallFarms prepared as RGB tiles, paper-style schedule on a GPU)::

    python examples/finetune_segmentation.py --data ai4smallfarms --num-classes 2 --epochs 50 --batch-size 16 \\
        --lr 1e-4 --output-dir runs/ai4sf

Outputs in ``--output-dir``: ``best/`` and ``last/`` checkpoints, ``metrics.json`` (mIoU, per-class IoU/F1, overall
accuracy of the best and last epochs, and of ``test/`` when present).
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
    class_names_arg,
    fit,
    infer_num_classes,
    joint_augment,
    load_image_encoder,
    pad_collate,
    paired_files,
    read_image,
    read_mask,
    seed_everything,
    split_samples,
)

from geolink.eval.metrics import ConfusionMatrix, segmentation_metrics  # noqa: E402
from geolink.models.heads import ImageSegmenter  # noqa: E402


class SegmentationFolder(Dataset):
    """``(image [C, H, W] in [0, 1], mask [H, W] int64)`` pairs; random crops and flips when ``train``."""

    def __init__(self, samples: Sequence[tuple[str, list[Path]]], size: int, ignore_index: int, train: bool) -> None:
        self.samples, self.size, self.ignore_index, self.train = list(samples), size, ignore_index, train

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        _, (image_path, mask_path) = self.samples[index]
        image, mask = read_image(image_path), read_mask(mask_path)
        if image.shape[-2:] != mask.shape:
            raise ValueError(f"{image_path} is {tuple(image.shape[-2:])} but its mask {mask_path} is "
                             f"{tuple(mask.shape)}")
        (image, mask), _ = joint_augment([image, mask], self.size, self.ignore_index, self.train)
        return image, mask


def segmentation_loss(model: torch.nn.Module, batch: Any, ignore_index: int) -> torch.Tensor:
    """Pixel cross-entropy of ``model(images)`` against the masks, unlabelled pixels ignored."""
    images, masks = batch
    return F.cross_entropy(model(images).float(), masks, ignore_index=ignore_index)


def evaluate_segmentation(model: torch.nn.Module, loader: Any, num_classes: int, ignore_index: int,
                          class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """mIoU etc. of ``model`` over ``loader``: ``argmax`` of the ``[B, K, H, W]`` logits against the masks, one
    confusion matrix over all pixels (see :func:`geolink.eval.metrics.segmentation_metrics`)."""
    matrix = ConfusionMatrix(num_classes, ignore_index)
    for images, masks in loader:
        matrix.update(model(images).argmax(1), masks)
    return segmentation_metrics(matrix.matrix, class_names)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, help="dataset root (layouts above)")
    data.add_argument("--image-dir", default="img", help="image sub-folder name (default %(default)s)")
    data.add_argument("--mask-dir", default="label", help="mask sub-folder name (default %(default)s)")
    data.add_argument("--num-classes", type=int, default=None,
                      help="classes (default: largest id in the training masks + 1)")
    data.add_argument("--class-names", default=None, help="comma-separated class names for metrics.json")
    data.add_argument("--ignore-index", type=int, default=255, help="mask value of unlabelled pixels (default 255)")
    data.add_argument("--val-fraction", type=float, default=0.2,
                      help="held-out share when the data has no train/ and val/ folders (default 0.2)")
    head = parser.add_argument_group("head")
    head.add_argument("--decoder-channels", type=int, default=256, help="UPerNet width (default 256)")
    head.add_argument("--norm", choices=["bn", "gn"], default="bn", help="decoder norm (default bn)")
    head.add_argument("--no-neck", action="store_true", help="skip the ViT multi-scale neck (maps stay at 1/patch)")
    add_common_args(parser, epochs=50, batch_size=8, lr=1e-4, img_size=224)
    parser.set_defaults(output_dir="runs/segmentation")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the script; returns the exit code."""
    args = build_parser().parse_args(argv)
    seed_everything(args.seed)  # model initialisation (head, random encoders) depends on it
    root = Path(args.data)
    folders = [args.image_dir, args.mask_dir]
    train_samples, val_samples = split_samples(root, folders, args.val_fraction, args.seed)
    test_samples = paired_files(root / "test", folders) if (root / "test").is_dir() else None
    num_classes = args.num_classes or infer_num_classes([s[1][1] for s in train_samples], args.ignore_index)
    names = class_names_arg(args.class_names, num_classes)
    loaded = load_image_encoder(args)
    encoder = loaded.model
    patch = int(getattr(encoder, "patch_size", 16))
    if args.img_size % patch:
        raise ValueError(f"--img-size {args.img_size} is not a multiple of the patch size {patch}")
    model = Normalised(ImageSegmenter(encoder, num_classes, channels=args.decoder_channels, norm=args.norm,
                                      neck=not args.no_neck), loaded.mean, loaded.std)
    make = lambda samples, train: SegmentationFolder(samples, args.img_size, args.ignore_index, train)  # noqa: E731
    fit(model, make(train_samples, True), make(val_samples, False),
        loss_fn=lambda m, b: segmentation_loss(m, b, args.ignore_index),
        evaluate_fn=lambda m, loader: evaluate_segmentation(m, loader, num_classes, args.ignore_index, names),
        args=args, primary="mIoU", encoder=encoder, collate_fn=pad_collate(patch, args.ignore_index),
        test_set=make(test_samples, False) if test_samples else None,
        extra_metrics={"num_classes": num_classes, "class_names": names, "num_train": len(train_samples),
                       "num_val": len(val_samples)})
    print(f"done: {Path(args.output_dir) / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
