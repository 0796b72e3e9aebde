"""Fine-tune a GeoLink image encoder for scene classification (EuroSAT, RESISC-45, any ImageFolder).

Data (``--data``), as EuroSAT and RESISC-45 ship or as prepared splits::

    <data>/<class>/<image>                                   # split here: --val-fraction per class, seeded
    <data>/train/<class>/ + <data>/val/<class>/ [+ <data>/test/<class>/]   # given splits (or train/ + test/)

or, with torchgeo installed (``pip install torchgeo``), ``--torchgeo eurosat`` / ``--torchgeo resisc45`` reads
torchgeo's copy under ``--data`` (``--torchgeo-download`` fetches it once). The head is a linear layer on the mean
of the final-normed patch tokens (``--pool token`` for the cls token); ``--freeze-encoder`` gives a linear probe
trained end to end with augmentation (for the frozen-feature protocols use ``geolink eval``). Augmentation (random
resized crops and flips) is ``geolink.eval.data``'s, from ``geolink.data.transforms``; the loop, checkpoints and
resume are ``geolink.finetune``'s.

Example (RESISC-45, 20 % train split as in the paper's protocol, on a GPU)::

    python examples/finetune_classification.py --data NWPU-RESISC45 --val-fraction 0.8 --epochs 100 \\
        --batch-size 64 --lr 5e-4 --model geolink_vit_large_patch16_224.neurips2025_unimodal --output-dir runs/resisc45

Outputs in ``--output-dir``: ``best/`` and ``last/`` checkpoints and ``metrics.json`` (top-1/top-5, mean class
accuracy, macro F1, per-class accuracy; of the best and last epochs and of ``test/`` when present).
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
from geolink.errors import ConfigError, DataError
from geolink.eval.data import eval_transform, image_folder, image_folder_splits, train_transform
from geolink.eval.metrics import ConfusionMatrix, classification_metrics, topk_accuracy
from geolink.finetune import FinetuneConfig, Normalised, fit, load_task_encoder
from geolink.models.heads import ImageClassifier
from geolink.runtime import seed_everything

DEFAULTS = {"epochs": 100, "batch_size": 64, "lr": 5e-4, "output_dir": Path("runs/classification")}
TORCHGEO_SCALES = {"eurosat": 1 / 3000.0, "resisc45": 1 / 255.0}


@dataclass(kw_only=True)
class ClassificationConfig(FinetuneConfig):
    """Scene classification of an ImageFolder or a torchgeo dataset."""

    data: Path = field(metadata={"help": "ImageFolder root (layouts above) or torchgeo root"})
    val_fraction: float = field(default=0.2, metadata={"help": "held-out share per class when there are no splits"})
    torchgeo: str | None = field(default=None, metadata={"help": "eurosat or resisc45: read a torchgeo dataset"})
    torchgeo_download: bool = field(default=False, metadata={"help": "let torchgeo download the dataset"})
    pool: str = field(default="avg", metadata={"help": "global feature: avg (mean of patch tokens) or token (cls)"})
    label_smoothing: float = field(default=0.1, metadata={"help": "cross-entropy label smoothing"})
    head_dropout: float = field(default=0.0, metadata={"help": "dropout before the linear head"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.torchgeo not in (None, *TORCHGEO_SCALES) or self.pool not in ("avg", "token"):
            raise ConfigError(f"torchgeo must be one of {sorted(TORCHGEO_SCALES)} and pool avg or token; got "
                              f"{self.torchgeo!r}, {self.pool!r}")


class TorchGeoScenes(Dataset):
    """A torchgeo scene-classification dataset as ``(image [3, H, W] in [0, 1], label)``.

    EuroSAT is read with its RGB bands (B04, B03, B02) and scaled by ``1 / 3000`` (clipped), the usual
    reflectance-to-display stretch; RESISC-45 images are 8-bit and scaled by ``1 / 255``.
    """

    def __init__(self, name: str, root: Path, split: str, transform: Any, download: bool) -> None:
        try:
            import torchgeo.datasets as tgd
        except ImportError:
            raise ImportError("torchgeo datasets need torchgeo: pip install torchgeo (or use an ImageFolder)") from None
        self.dataset = (tgd.EuroSAT(root, split=split, bands=("B04", "B03", "B02"), download=download)
                        if name == "eurosat" else tgd.RESISC45(root, split=split, download=download))
        self.scale, self.transform = TORCHGEO_SCALES[name], transform
        self.classes = list(getattr(self.dataset, "classes", []))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.dataset[index]
        return self.transform((sample["image"].float() * self.scale).clamp(0, 1)), int(sample["label"])


def load_splits(config: ClassificationConfig) -> tuple[Dataset, Dataset, Dataset | None, list[str]]:
    """``(train, val, test or None, class names)`` from ``data`` / ``torchgeo``."""
    root, train_tf, eval_tf = config.data, train_transform(config.img_size), eval_transform(config.img_size)
    if config.torchgeo:
        make = lambda split, tf: TorchGeoScenes(config.torchgeo, root, split, tf, config.torchgeo_download)  # noqa: E731
        train = make("train", train_tf)
        return train, make("val", eval_tf), make("test", eval_tf), train.classes
    if (root / "train").is_dir() and (root / "val").is_dir():
        train, val = image_folder(root / "train", train_tf), image_folder(root / "val", eval_tf)
        test = image_folder(root / "test", eval_tf) if (root / "test").is_dir() else None
        for other in (val, test):
            if other is not None and other.classes != train.classes:
                raise DataError(f"class folders differ between splits of {root}: {train.classes} vs {other.classes}")
        return train, val, test, list(train.classes)
    train, val, classes = image_folder_splits(root, config.img_size, test_fraction=config.val_fraction,
                                              seed=config.seed, train_augment=True)
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the script; returns the exit code."""
    config = parse_config(ClassificationConfig, argv, __doc__, DEFAULTS)
    seed_everything(config.seed)  # model initialisation (head, random encoders) depends on it
    train, val, test, names = load_splits(config)
    loaded = load_task_encoder(config)
    model = Normalised(ImageClassifier(loaded.model, len(names), pool=config.pool, dropout=config.head_dropout),
                       loaded.mean, loaded.std)
    fit(model, train, val, loss_fn=lambda m, b: classification_loss(m, b, config.label_smoothing),
        evaluate_fn=lambda m, loader: evaluate_classification(m, loader, len(names), names),
        config=config, primary="accuracy", encoder=loaded.model, test_set=test,
        extra_metrics={"class_names": names, "num_train": len(train), "num_val": len(val)})
    print(f"done: {config.output_dir / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
