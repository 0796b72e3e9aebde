"""Fine-tune a GeoLink image encoder for scene classification (EuroSAT, RESISC-45, any ImageFolder).

Data (``--data``), as EuroSAT and RESISC-45 ship or as prepared splits::

    <data>/<class>/<image>                                   # split here: --val-fraction per class, seeded
    <data>/train/<class>/ + <data>/val/<class>/ [+ <data>/test/<class>/]   # given splits (or train/ + test/)

or, with torchgeo installed (``pip install torchgeo``), ``--torchgeo eurosat`` / ``--torchgeo resisc45`` reads
torchgeo's copy under ``--data`` (``--torchgeo-download`` fetches it once). The head is a linear layer on the mean
of the final-normed patch tokens (``--pool token`` for the cls token); ``--freeze-encoder`` gives a linear probe
trained end to end with augmentation (for the frozen-feature protocols use ``geolink eval``).

Example (RESISC-45, 20 % train split as in the paper's protocol, on a GPU)::

    python examples/finetune_classification.py --data NWPU-RESISC45 --val-fraction 0.8 --epochs 100 \\
        --batch-size 64 --lr 5e-4 --output-dir runs/resisc45

Outputs in ``--output-dir``: ``best/`` and ``last/`` checkpoints and ``metrics.json`` (top-1/top-5, mean class
accuracy, macro F1, per-class accuracy; of the best and last epochs and of ``test/`` when present).
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

from finetune_utils import Normalised, add_common_args, fit, load_image_encoder, seed_everything  # noqa: E402

from geolink.eval.data import eval_transform, image_folder, image_folder_splits, train_transform  # noqa: E402
from geolink.eval.metrics import ConfusionMatrix, classification_metrics, topk_accuracy  # noqa: E402
from geolink.models.heads import ImageClassifier  # noqa: E402

TORCHGEO_DATASETS = ("eurosat", "resisc45")


class TorchGeoScenes(Dataset):
    """A torchgeo scene-classification dataset as ``(image [3, H, W] in [0, 1], label)``.

    EuroSAT is read with its RGB bands (B04, B03, B02) and scaled by ``1 / 3000`` (clipped), the usual
    reflectance-to-display stretch; RESISC-45 images are 8-bit and scaled by ``1 / 255``.
    """

    def __init__(self, name: str, root: str, split: str, transform: Any, download: bool) -> None:
        try:
            import torchgeo.datasets as tgd
        except ImportError:
            raise ImportError("--torchgeo needs torchgeo: pip install torchgeo "
                              "(or use an ImageFolder --data)") from None
        if name == "eurosat":
            self.dataset = tgd.EuroSAT(root, split=split, bands=("B04", "B03", "B02"), download=download)
            self.scale = 1 / 3000.0
        elif name == "resisc45":
            self.dataset = tgd.RESISC45(root, split=split, download=download)
            self.scale = 1 / 255.0
        else:
            raise ValueError(f"--torchgeo must be one of {TORCHGEO_DATASETS}, got {name!r}")
        self.transform = transform
        self.classes = list(getattr(self.dataset, "classes", []))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from torchvision.transforms.functional import to_pil_image

        sample = self.dataset[index]
        image = (sample["image"].float() * self.scale).clamp(0, 1)
        return self.transform(to_pil_image(image)), int(sample["label"])


def load_splits(args: argparse.Namespace) -> tuple[Dataset, Dataset, Dataset | None, list[str]]:
    """``(train, val, test or None, class names)`` from ``--data`` / ``--torchgeo``."""
    root = Path(args.data)
    if args.torchgeo:
        make = lambda split, tf: TorchGeoScenes(args.torchgeo, args.data, split, tf, args.torchgeo_download)  # noqa: E731
        train = make("train", train_transform(args.img_size))
        return train, make("val", eval_transform(args.img_size)), make("test", eval_transform(args.img_size)), \
            train.classes or [str(i) for i in range(max(int(train[i][1]) for i in range(len(train))) + 1)]
    if (root / "train").is_dir() and (root / "val").is_dir():
        train = image_folder(root / "train", train_transform(args.img_size))
        val = image_folder(root / "val", eval_transform(args.img_size))
        test = image_folder(root / "test", eval_transform(args.img_size)) if (root / "test").is_dir() else None
        for other in (val, test):
            if other is not None and other.classes != train.classes:
                raise ValueError(f"class folders differ between splits of {root}: {train.classes} vs {other.classes}")
        return train, val, test, list(train.classes)
    train, val, classes = image_folder_splits(root, args.img_size, test_fraction=args.val_fraction, seed=args.seed,
                                              train_augment=True)
    return train, val, None, classes


def classification_loss(model: torch.nn.Module, batch: Any, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy of ``model(images)`` (``[B, K]``) against the labels."""
    images, labels = batch
    return F.cross_entropy(model(images).float(), labels, label_smoothing=label_smoothing)


def evaluate_classification(model: torch.nn.Module, loader: Any, num_classes: int,
                            class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Top-1/top-5, mean class accuracy, macro F1 and per-class accuracy of ``model`` over ``loader``."""
    matrix = ConfusionMatrix(num_classes)
    scores, targets = [], []
    for images, labels in loader:
        logits = model(images).float()
        matrix.update(logits.argmax(1), labels)
        scores.append(logits.cpu())
        targets.append(labels.cpu())
    return {**topk_accuracy(torch.cat(scores), torch.cat(targets), (1, 5)),
            **classification_metrics(matrix.matrix, class_names)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, help="ImageFolder root (layouts above) or torchgeo root")
    data.add_argument("--val-fraction", type=float, default=0.2,
                      help="held-out share per class when the folder has no splits (default 0.2)")
    data.add_argument("--torchgeo", choices=TORCHGEO_DATASETS, default=None,
                      help="read a torchgeo dataset instead of an ImageFolder (needs torchgeo)")
    data.add_argument("--torchgeo-download", action="store_true", help="let torchgeo download the dataset")
    head = parser.add_argument_group("head")
    head.add_argument("--pool", choices=["avg", "token"], default="avg",
                      help="global feature: mean of patch tokens (default) or cls token")
    head.add_argument("--label-smoothing", type=float, default=0.1, help="cross-entropy smoothing (default 0.1)")
    head.add_argument("--head-dropout", type=float, default=0.0, help="dropout before the linear head")
    add_common_args(parser, epochs=100, batch_size=64, lr=5e-4, img_size=224)
    parser.set_defaults(output_dir="runs/classification")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the script; returns the exit code."""
    args = build_parser().parse_args(argv)
    seed_everything(args.seed)  # model initialisation (head, random encoders) depends on it
    train, val, test, names = load_splits(args)
    loaded = load_image_encoder(args)
    model = Normalised(ImageClassifier(loaded.model, len(names), pool=args.pool, dropout=args.head_dropout),
                       loaded.mean, loaded.std)
    fit(model, train, val, loss_fn=lambda m, b: classification_loss(m, b, args.label_smoothing),
        evaluate_fn=lambda m, loader: evaluate_classification(m, loader, len(names), names),
        args=args, primary="accuracy", encoder=loaded.model, test_set=test,
        extra_metrics={"class_names": names, "num_train": len(train), "num_val": len(val)})
    print(f"done: {Path(args.output_dir) / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
