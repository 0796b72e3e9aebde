"""Metric tests against hand-computed confusion matrices (geolink.eval.metrics)."""

from __future__ import annotations

import math

import pytest
import torch

from geolink.eval.metrics import (
    ConfusionMatrix,
    change_detection_metrics,
    classification_metrics,
    confusion_matrix,
    segmentation_metrics,
    topk_accuracy,
)

# target / prediction pairs worked out by hand:
#   target 0 -> predicted 0, 1;  target 1 -> 1, 1;  target 2 -> 2, 0, 2
#   confusion (rows = target): [[1, 1, 0], [0, 2, 0], [1, 0, 2]]
TARGET = torch.tensor([0, 0, 1, 1, 2, 2, 2])
PRED = torch.tensor([0, 1, 1, 1, 2, 0, 2])


def test_confusion_matrix_by_hand():
    assert confusion_matrix(PRED, TARGET, 3).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 2]]


def test_segmentation_metrics_by_hand():
    metrics = segmentation_metrics(confusion_matrix(PRED, TARGET, 3), ["a", "b", "c"])
    # IoU = TP / (TP + FP + FN): a = 1 / (1 + 1 + 1), b = 2 / (2 + 1 + 0), c = 2 / (2 + 0 + 1)
    assert metrics["per_class_iou"] == pytest.approx({"a": 1 / 3, "b": 2 / 3, "c": 2 / 3})
    assert metrics["mIoU"] == pytest.approx(5 / 9)
    assert metrics["overall_accuracy"] == pytest.approx(5 / 7)
    # F1 = 2TP / (2TP + FP + FN): a = 2/4, b = 4/5, c = 4/5
    assert metrics["per_class_f1"] == pytest.approx({"a": 0.5, "b": 0.8, "c": 0.8})
    # recall per class: 1/2, 2/2, 2/3
    assert metrics["mean_accuracy"] == pytest.approx((0.5 + 1 + 2 / 3) / 3)


def test_ignore_index_and_absent_class():
    target = torch.cat([TARGET, torch.tensor([255, 255])])
    pred = torch.cat([PRED, torch.tensor([3, 0])])
    matrix = ConfusionMatrix(4, ignore_index=255)
    matrix.update(pred[:4], target[:4])
    matrix.update(pred[4:], target[4:])
    metrics = segmentation_metrics(matrix.matrix)
    assert metrics["num_pixels"] == 7
    assert metrics["per_class_iou"]["3"] is None  # never in target nor prediction: left out of the mean
    assert metrics["mIoU"] == pytest.approx(5 / 9)


def test_out_of_range_label_is_an_error():
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0]), 3)


def test_change_detection_by_hand():
    target = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0])
    pred = torch.tensor([0, 1, 0, 1, 1, 0, 1, 0])
    # TP = 3, FP = 1, FN = 1, TN = 3
    metrics = change_detection_metrics(confusion_matrix(pred, target, 2))
    assert metrics["precision"] == pytest.approx(0.75)
    assert metrics["recall"] == pytest.approx(0.75)
    assert metrics["f1"] == pytest.approx(0.75)
    assert metrics["iou"] == pytest.approx(3 / 5)
    assert metrics["overall_accuracy"] == pytest.approx(6 / 8)
    with pytest.raises(ValueError, match="2×2"):
        change_detection_metrics(torch.zeros(3, 3, dtype=torch.long))


def test_no_change_anywhere_gives_undefined_f1():
    metrics = change_detection_metrics(confusion_matrix(torch.zeros(4), torch.zeros(4), 2))
    assert metrics["f1"] is None and metrics["overall_accuracy"] == 1.0


def test_classification_and_topk_by_hand():
    metrics = classification_metrics(confusion_matrix(PRED, TARGET, 3))
    assert metrics["accuracy"] == pytest.approx(5 / 7)
    assert metrics["per_class_accuracy"] == pytest.approx({"0": 0.5, "1": 1.0, "2": 2 / 3})
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    target = torch.tensor([2, 0, 1])
    # top-1: only sample 1 right; top-2: sample 0 (2 is second) and 1 right, sample 2 (1 is second) right too
    result = topk_accuracy(scores, target, (1, 2, 5))
    assert result["top1"] == pytest.approx(1 / 3)
    assert result["top2"] == pytest.approx(1.0)
    assert result["top5"] == pytest.approx(1.0)
    assert math.isnan(classification_metrics(torch.zeros(2, 2, dtype=torch.long))["accuracy"])
