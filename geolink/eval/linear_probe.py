"""Linear probing: a linear classifier trained on frozen global features.

Features are extracted once (the encoder never trains), then a :class:`~geolink.models.heads.LinearClassifier` with
the MAE recipe's ``BatchNorm1d(affine=False)`` in front is trained with AdamW, a cosine schedule and label-smoothing-
free cross-entropy on shuffled mini-batches. Everything after extraction is seeded, so a probe is reproducible bit
for bit on one device.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from geolink.errors import InputError
from geolink.eval.knn import FeatureSet, _features
from geolink.eval.metrics import classification_metrics, confusion_matrix, topk_accuracy
from geolink.models.heads import LinearClassifier


def train_linear_classifier(features: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None,
                            epochs: int = 100, lr: float = 1e-3, weight_decay: float = 1e-4, batch_size: int = 256,
                            batch_norm: bool = True, seed: int = 0, device: torch.device | str | None = None,
                            progress: bool = True) -> LinearClassifier:
    """Fit a linear classifier on fixed features.

    Args:
        features: ``[N, D]`` training features.
        labels: ``[N]`` class ids.
        num_classes: K; default ``max(labels) + 1``.
        epochs: passes over the features.
        lr: peak AdamW learning rate (cosine decay to 0 over all steps, no warmup).
        weight_decay: AdamW weight decay.
        batch_size: mini-batch size (the last, smaller batch is kept).
        batch_norm: standardise features with a non-affine BatchNorm first (recommended: ViT feature scales vary).
        seed: seeds initialisation and shuffling.
        device: where to train (default CPU: the problem is small).
        progress: show a tqdm bar over epochs.

    Returns:
        The trained head, in eval mode, on ``device``.
    """
    if features.shape[0] != labels.shape[0] or features.shape[0] == 0:
        raise InputError(f"need as many labels as features and at least one sample; got {features.shape[0]} "
                         f"features and {labels.shape[0]} labels")
    device = torch.device(device) if device is not None else torch.device("cpu")
    num_classes = num_classes or int(labels.max()) + 1
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = LinearClassifier(features.shape[1], num_classes, batch_norm=batch_norm).to(device)
    features, labels = features.float().to(device), labels.long().to(device)
    # BatchNorm needs two samples in training mode; a lone trailing sample joins the previous batch
    steps_per_epoch = max(1, math.ceil(len(labels) / batch_size))
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    total = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    head.train()
    for _ in tqdm(range(epochs), desc="linear probe", disable=not progress, leave=False):
        order = torch.randperm(len(labels), generator=generator).to(device)
        batches = list(order.split(batch_size))
        if len(batches) > 1 and len(batches[-1]) == 1:
            batches[-2] = torch.cat(batches[-2:])
            batches.pop()
        for index in batches:
            if batch_norm and len(index) == 1:
                continue  # a single sample has no batch statistics
            loss = F.cross_entropy(head(features[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return head.eval()


def linear_probe(encoder: nn.Module | None, train: Iterable | FeatureSet, test: Iterable | FeatureSet,
                 num_classes: int | None = None, epochs: int = 100, lr: float = 1e-3, weight_decay: float = 1e-4,
                 batch_size: int = 256, batch_norm: bool = True, seed: int = 0,
                 class_names: Sequence[str] | None = None, progress: bool = True,
                 **extract_kwargs: Any) -> dict[str, Any]:
    """Linear-probe accuracy of an encoder's frozen global features.

    Args:
        encoder: a ``GeoLinkImageEncoder``, a timm model or any ``[B, D]`` encoder; may be ``None`` when both sets
            are precomputed ``(features, labels)``.
        train, test: ``Dataset`` of ``(image [C, H, W] in [0, 1], label)``, a ``DataLoader`` of batches, or
            precomputed ``(features, labels)``.
        num_classes: K; default one more than the largest label.
        epochs, lr, weight_decay, batch_size, batch_norm, seed: see :func:`train_linear_classifier`.
        class_names: names for the per-class accuracies.
        progress: show progress bars.
        **extract_kwargs: passed to :func:`~geolink.eval.encoders.extract_features` (``mean``, ``std``, ``pool``,
            ``device``, ``batch_size`` is the probe's — use ``extract_batch_size``; ``amp_dtype``).

    Returns:
        ``{"top1", "top5", "train_accuracy", "epochs", "lr", "num_train", "num_test", "accuracy",
        "mean_class_accuracy", "macro_f1", "per_class_accuracy", ...}``.
    """
    if "extract_batch_size" in extract_kwargs:
        extract_kwargs["batch_size"] = extract_kwargs.pop("extract_batch_size")
    extract_kwargs.setdefault("progress", progress)
    train_x, train_y = _features(encoder, train, "probe train", extract_kwargs)
    test_x, test_y = _features(encoder, test, "probe test", extract_kwargs)
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    head = train_linear_classifier(train_x, train_y, num_classes, epochs, lr, weight_decay, batch_size, batch_norm,
                                   seed, progress=progress)
    with torch.no_grad():
        scores = head(test_x.float())
        train_accuracy = float((head(train_x.float()).argmax(1) == train_y).float().mean())
    matrix = confusion_matrix(scores.argmax(1), test_y, num_classes)
    return {**topk_accuracy(scores, test_y, (1, 5)), "train_accuracy": train_accuracy, "epochs": epochs, "lr": lr,
            "num_train": len(train_y), "num_test": len(test_y), **classification_metrics(matrix, class_names)}
