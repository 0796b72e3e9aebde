"""Image-folder datasets for the evaluation protocols: loading, resizing and deterministic train/test splits.

Datasets here yield ``(image [C, H, W] float in [0, 1], label)``, augmented with :mod:`geolink.data.transforms`;
normalisation is the encoder's business (see :func:`geolink.eval.encoders.extract_features`), so the same loader
feeds a geolink encoder and a timm model with different means and stds. Layouts accepted by :func:`image_folder_splits`:

- ``root/train/<class>/*.jpg`` + ``root/test/<class>/*`` (or ``val/``), e.g. prepared RESISC-45 / EuroSAT splits;
- ``root/<class>/*.jpg`` (EuroSAT and RESISC-45 as they ship): split here, stratified per class and seeded.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset
from torchvision import datasets

from geolink.data.transforms import (
    CenterCrop,
    Compose,
    ImageTransform,
    RandomFlip,
    RandomResizedCrop,
    ResizeShortSide,
)
from geolink.errors import MissingInputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
TEST_SPLIT_NAMES = ("test", "val", "validation")


def eval_transform(img_size: int) -> ImageTransform:
    """Resize the short side to ``img_size`` (bicubic), centre-crop ``img_size``², float tensor in ``[0, 1]``."""
    return ImageTransform(Compose([ResizeShortSide(img_size, interpolation="bicubic"), CenterCrop(img_size)]))


def train_transform(img_size: int) -> ImageTransform:
    """Fine-tuning augmentation: random resized crop (scale 0.5–1, bicubic), horizontal and vertical flips
    (overhead imagery has no canonical up), float tensor in ``[0, 1]``."""
    return ImageTransform(Compose([RandomResizedCrop(img_size, scale=(0.5, 1.0), interpolation="bicubic"),
                                   RandomFlip()]))


def _rgb_loader(path: str):
    from PIL import Image

    with open(path, "rb") as handle:
        return Image.open(handle).convert("RGB")


def image_folder(root: str | Path, transform: Callable | None = None) -> datasets.ImageFolder:
    """A torchvision ``ImageFolder`` (classes = sorted sub-folder names) with images converted to RGB.

    Raises:
        MissingInputError: ``root`` is missing or has a class folder without images.
    """
    root = Path(root)
    if not root.is_dir():
        raise MissingInputError(f"no image folder at {root} (pass an ImageFolder root: <root>/<class name>/<image>)")
    try:
        return datasets.ImageFolder(str(root), transform=transform, loader=_rgb_loader,
                                    is_valid_file=lambda p: p.lower().endswith(IMAGE_EXTENSIONS))
    except FileNotFoundError:
        empty = sorted(d.name for d in root.iterdir() if d.is_dir() and not any(
            f.name.lower().endswith(IMAGE_EXTENSIONS) for f in d.rglob("*")))
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise MissingInputError(f"{root} is not an ImageFolder: the class folders {shown} hold no "
                                f"{'/'.join(IMAGE_EXTENSIONS)} image (expected <root>/<class name>/<image>)") from None


def stratified_split(labels: Sequence[int], test_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Per-class seeded split of sample indices: ``(train_indices, test_indices)``, both sorted.

    Each class with at least two samples keeps at least one in each part; ``round(n · test_fraction)`` go to test.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(index)
    rng = random.Random(seed)
    train, test = [], []
    for label in sorted(by_class):
        indices = by_class[label][:]
        rng.shuffle(indices)
        n_test = round(len(indices) * test_fraction)
        if len(indices) >= 2:
            n_test = min(max(n_test, 1), len(indices) - 1)
        test += indices[:n_test]
        train += indices[n_test:]
    return sorted(train), sorted(test)


def image_folder_splits(root: str | Path, img_size: int = 224, test_fraction: float = 0.2, seed: int = 0,
                        train_augment: bool = False) -> tuple[Dataset, Dataset, list[str]]:
    """Train and test sets of an image-classification folder (layouts in the module docstring).

    Args:
        root: the dataset folder.
        img_size: output size (short-side resize + centre crop for evaluation).
        test_fraction: share of each class held out when the folder has no ``train``/``test`` split.
        seed: seeds that split.
        train_augment: use :func:`train_transform` for the training part (fine-tuning) instead of the evaluation
            transform (frozen-feature protocols).

    Returns:
        ``(train, test, class_names)``.
    """
    root = Path(root)
    train_tf = train_transform(img_size) if train_augment else eval_transform(img_size)
    test_tf = eval_transform(img_size)
    test_dir = next((root / n for n in TEST_SPLIT_NAMES if (root / n).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        train, test = image_folder(root / "train", train_tf), image_folder(test_dir, test_tf)
        if train.classes != test.classes:
            raise ValueError(f"{root}/train and {test_dir} have different class folders: {train.classes} vs "
                             f"{test.classes}")
        return train, test, list(train.classes)
    full_train, full_test = image_folder(root, train_tf), image_folder(root, test_tf)
    train_idx, test_idx = stratified_split(full_train.targets, test_fraction, seed)
    if not test_idx:
        raise ValueError(f"{root} is too small to hold out {test_fraction:.0%} per class; add images or pass a "
                         "train/ and test/ split")
    return Subset(full_train, train_idx), Subset(full_test, test_idx), list(full_train.classes)


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """Labels of an ``ImageFolder`` or a ``Subset`` of one, without loading images."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise ValueError(f"{type(dataset).__name__} exposes no targets")
    return torch.as_tensor(targets, dtype=torch.long)
