"""Weighted k-nearest-neighbour classification of frozen global features (the DINO / InstDisc protocol).

Features are L2-normalised; each test sample takes its ``k`` most cosine-similar training samples, and each
neighbour votes for its class with weight ``exp(similarity / temperature)``. The predicted class is the one with the
largest summed vote (top-5 uses the five largest). Defaults ``k=20, temperature=0.07`` are the standard ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from geolink.errors import InputError
from geolink.eval.encoders import extract_features
from geolink.eval.metrics import classification_metrics, confusion_matrix, topk_accuracy

FeatureSet = tuple[torch.Tensor, torch.Tensor]
"""Precomputed ``(features [N, D], labels [N])``."""


def knn_scores(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor, k: int = 20,
               temperature: float = 0.07, num_classes: int | None = None, chunk_size: int = 1024) -> torch.Tensor:
    """Class votes of the weighted kNN classifier.

    Args:
        train_features: ``[N, D]`` (normalised here).
        train_labels: ``[N]`` class ids.
        test_features: ``[M, D]`` (normalised here).
        k: neighbours per test sample (capped at N).
        temperature: vote weight ``exp(cos / temperature)``.
        num_classes: C; default ``max(train_labels) + 1``.
        chunk_size: test rows per similarity block (bounds memory to ``chunk_size × N``).

    Returns:
        ``[M, C]`` summed vote weights.
    """
    if train_features.shape[0] != train_labels.shape[0]:
        raise InputError(f"{train_features.shape[0]} training features for {train_labels.shape[0]} labels")
    if train_features.shape[0] == 0:
        raise InputError("the kNN training set is empty")
    if train_features.shape[1] != test_features.shape[1]:
        raise InputError(f"train features have width {train_features.shape[1]}, test {test_features.shape[1]}")
    if k < 1 or temperature <= 0:
        raise InputError(f"k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    num_classes = num_classes or int(train_labels.max()) + 1
    train = F.normalize(train_features.float(), dim=1)
    labels = train_labels.long().to(train.device)
    k = min(k, train.shape[0])
    scores = []
    for start in range(0, test_features.shape[0], chunk_size):
        test = F.normalize(test_features[start:start + chunk_size].float().to(train.device), dim=1)
        similarity, index = (test @ train.T).topk(k, dim=1)  # [m, k]
        weights = (similarity / temperature).exp()
        votes = torch.zeros(test.shape[0], num_classes, device=train.device)
        votes.scatter_add_(1, labels[index], weights)
        scores.append(votes)
    return torch.cat(scores) if scores else torch.zeros(0, num_classes)


def knn_classify(encoder: nn.Module | None, train: Iterable | FeatureSet, test: Iterable | FeatureSet, k: int = 20,
                 temperature: float = 0.07, num_classes: int | None = None, class_names: Sequence[str] | None = None,
                 **extract_kwargs: Any) -> dict[str, Any]:
    """Weighted kNN accuracy of an encoder's frozen global features.

    Args:
        encoder: a ``GeoLinkImageEncoder``, a timm model or any ``[B, D]`` encoder (see
            :func:`geolink.eval.encoders.encode_images`); may be ``None`` when both sets are precomputed.
        train, test: ``Dataset`` of ``(image [C, H, W] in [0, 1], label)``, a ``DataLoader`` of batches, or
            precomputed ``(features, labels)``.
        k, temperature: the protocol's parameters.
        num_classes: C; default: one more than the largest label seen.
        class_names: names for the per-class accuracies.
        **extract_kwargs: passed to :func:`~geolink.eval.encoders.extract_features` (``mean``, ``std``, ``pool``,
            ``device``, ``batch_size``, ``amp_dtype``, ``progress``).

    Returns:
        ``{"top1", "top5", "k", "temperature", "num_train", "num_test", "accuracy", "mean_class_accuracy",
        "macro_f1", "per_class_accuracy", ...}`` (accuracies in ``[0, 1]``).
    """
    train_x, train_y = _features(encoder, train, "kNN train", extract_kwargs)
    test_x, test_y = _features(encoder, test, "kNN test", extract_kwargs)
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    scores = knn_scores(train_x, train_y, test_x, k, temperature, num_classes)
    matrix = confusion_matrix(scores.argmax(1), test_y, num_classes)
    return {**topk_accuracy(scores, test_y, (1, 5)), "k": k, "temperature": temperature,
            "num_train": len(train_y), "num_test": len(test_y),
            **classification_metrics(matrix, class_names)}


def _features(encoder: nn.Module | None, data: Iterable | FeatureSet, desc: str,
              extract_kwargs: dict[str, Any]) -> FeatureSet:
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return data[0], data[1].long()
    if encoder is None:
        raise InputError("pass an encoder, or precomputed (features, labels) tuples for both sets")
    return extract_features(encoder, data, desc=desc, **extract_kwargs)
