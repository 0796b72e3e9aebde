"""Downstream metrics from confusion matrices: accuracy, per-class IoU / mIoU, precision / recall / F1.

Everything is computed from one integer confusion matrix ``[C, C]`` (rows = ground truth, columns = prediction), so
metrics accumulate exactly over batches, devices and epochs: :class:`ConfusionMatrix` sums counts, and the
``*_metrics`` functions turn counts into numbers. A class that never occurs in the ground truth nor in the
predictions has an undefined IoU (``nan``) and is left out of the means, as in mmseg.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from geolink.errors import InputError


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int | None = None) -> torch.Tensor:
    """Count (target, prediction) pairs.

    Args:
        pred: predicted class ids, any shape (e.g. ``[B]`` or ``[B, H, W]``).
        target: ground-truth class ids, same shape as ``pred``.
        num_classes: C.
        ignore_index: target value to skip (e.g. 255 for unlabelled pixels).

    Returns:
        int64 ``[C, C]``: entry ``[t, p]`` counts elements of class ``t`` predicted as ``p``.

    Raises:
        InputError: shapes differ, or a (non-ignored) id is outside ``[0, C)``.
    """
    if pred.shape != target.shape:
        raise InputError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    for name, ids in (("target", target), ("prediction", pred)):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_classes):
            raise InputError(f"{name} holds class id {int(ids.min()) if int(ids.min()) < 0 else int(ids.max())} "
                             f"outside [0, {num_classes}); set num_classes to cover every label, or mark unlabelled "
                             f"pixels with ignore_index ({ignore_index})")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu()


class ConfusionMatrix:
    """Accumulates a ``[C, C]`` confusion matrix over batches.

    Args:
        num_classes: C.
        ignore_index: target value to skip.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = None) -> None:
        if num_classes < 1:
            raise InputError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``pred`` and ``target`` class ids of the same shape (use ``logits.argmax(1)``)."""
        self.matrix += confusion_matrix(pred.detach(), target.detach(), self.num_classes, self.ignore_index)

    def reset(self) -> None:
        """Zero the counts."""
        self.matrix.zero_()


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    num, den = num.double(), den.double()
    return torch.where(den > 0, num / den.clamp(min=1), torch.full_like(num, float("nan")))


def _nanmean(values: torch.Tensor) -> float:
    values = values[~torch.isnan(values)]
    return float(values.mean()) if values.numel() else float("nan")


def per_class_iou(matrix: torch.Tensor) -> torch.Tensor:
    """``[C]`` IoU = TP / (TP + FP + FN) per class; ``nan`` for a class absent from both target and prediction."""
    tp = matrix.diag()
    return _safe_div(tp, matrix.sum(0) + matrix.sum(1) - tp)


def precision_recall_f1(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class ``[C]`` precision TP/(TP+FP), recall TP/(TP+FN) and F1 = 2TP/(2TP+FP+FN); ``nan`` when undefined."""
    tp = matrix.diag()
    return _safe_div(tp, matrix.sum(0)), _safe_div(tp, matrix.sum(1)), _safe_div(2 * tp, matrix.sum(0) + matrix.sum(1))


def _named(values: torch.Tensor, class_names: Sequence[str] | None) -> dict[str, float | None]:
    names = list(class_names) if class_names is not None else [str(i) for i in range(values.numel())]
    if len(names) != values.numel():
        raise InputError(f"{len(names)} class names for {values.numel()} classes")
    return {n: (None if math.isnan(float(v)) else float(v)) for n, v in zip(names, values)}


def classification_metrics(matrix: torch.Tensor, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Scene-classification metrics of a confusion matrix.

    Returns:
        ``{"accuracy", "mean_class_accuracy", "macro_f1", "per_class_accuracy": {name: value}, "num_samples"}``
        (per-class values are ``None`` for classes without samples).
    """
    total = int(matrix.sum())
    _, recall, f1 = precision_recall_f1(matrix)
    return {
        "accuracy": float(matrix.diag().sum()) / total if total else float("nan"),
        "mean_class_accuracy": _nanmean(recall),
        "macro_f1": _nanmean(f1),
        "per_class_accuracy": _named(recall, class_names),
        "num_samples": total,
    }


def segmentation_metrics(matrix: torch.Tensor, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Semantic-segmentation metrics of a pixel confusion matrix.

    Returns:
        ``{"mIoU", "overall_accuracy", "mean_accuracy", "mean_f1", "per_class_iou": {name: value},
        "per_class_f1": {...}, "num_pixels"}``; means skip classes whose IoU is undefined.
    """
    total = int(matrix.sum())
    iou = per_class_iou(matrix)
    _, recall, f1 = precision_recall_f1(matrix)
    return {
        "mIoU": _nanmean(iou),
        "overall_accuracy": float(matrix.diag().sum()) / total if total else float("nan"),
        "mean_accuracy": _nanmean(recall),
        "mean_f1": _nanmean(f1),
        "per_class_iou": _named(iou, class_names),
        "per_class_f1": _named(f1, class_names),
        "num_pixels": total,
    }


def change_detection_metrics(matrix: torch.Tensor) -> dict[str, Any]:
    """Binary change-detection metrics of a ``[2, 2]`` pixel confusion matrix (class 1 = change), as reported for
    LEVIR-CD / SpaceNet7: precision, recall, F1 and IoU **of the change class**, plus overall accuracy and the
    change/no-change mIoU.

    Raises:
        InputError: the matrix is not 2×2.
    """
    if matrix.shape != (2, 2):
        raise InputError("change detection needs a 2×2 confusion matrix (no change / change), "
                         f"got {tuple(matrix.shape)}")
    precision, recall, f1 = precision_recall_f1(matrix)
    iou = per_class_iou(matrix)
    total = int(matrix.sum())

    def value(x: torch.Tensor) -> float | None:
        return None if math.isnan(float(x)) else float(x)

    return {
        "f1": value(f1[1]),
        "iou": value(iou[1]),
        "precision": value(precision[1]),
        "recall": value(recall[1]),
        "overall_accuracy": float(matrix.diag().sum()) / total if total else float("nan"),
        "mIoU": _nanmean(iou),
        "num_pixels": total,
    }


def topk_accuracy(scores: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy of class scores ``[N, C]`` against labels ``[N]``: ``{"top1": ..., "top5": ...}``;
    k larger than C counts as C (every sample is then correct)."""
    if scores.shape[0] != target.shape[0]:
        raise InputError(f"{scores.shape[0]} score rows for {target.shape[0]} labels")
    result = {}
    for k in ks:
        top = scores.topk(min(k, scores.shape[1]), dim=1).indices
        hits = (top == target.unsqueeze(1)).any(dim=1).float()
        result[f"top{k}"] = float(hits.mean()) if len(target) else float("nan")
    return result
