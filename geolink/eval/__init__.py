"""Downstream evaluation: frozen-feature protocols (weighted kNN, linear probe) and task metrics.

Public API::

    from geolink.eval import knn_classify, linear_probe, load_encoder, image_folder_splits
    train, test, classes = image_folder_splits("EuroSAT_RGB", img_size=224)
    encoder = load_encoder("geolink_vit_large_patch16_224.neurips2025_unimodal")
    knn_classify(encoder.model, train, test, mean=encoder.mean, std=encoder.std)["top1"]

    # the ``geolink eval`` job
    report = evaluate_image_folder(EvalConfig("all", model="geolink_tiny", data="EuroSAT_RGB"))
"""

from geolink.eval.compare import EvalConfig, Protocol, compare_encoders, evaluate_image_folder, format_table
from geolink.eval.data import image_folder, image_folder_splits, stratified_split
from geolink.eval.encoders import LoadedEncoder, Pool, encode_images, extract_features, load_encoder
from geolink.eval.knn import knn_classify, knn_scores
from geolink.eval.linear_probe import linear_probe, train_linear_classifier
from geolink.eval.metrics import (
    ConfusionMatrix,
    change_detection_metrics,
    classification_metrics,
    confusion_matrix,
    per_class_iou,
    precision_recall_f1,
    segmentation_metrics,
    topk_accuracy,
)

__all__ = [
    "ConfusionMatrix",
    "EvalConfig",
    "LoadedEncoder",
    "Pool",
    "Protocol",
    "change_detection_metrics",
    "classification_metrics",
    "compare_encoders",
    "confusion_matrix",
    "encode_images",
    "evaluate_image_folder",
    "extract_features",
    "format_table",
    "image_folder",
    "image_folder_splits",
    "knn_classify",
    "knn_scores",
    "linear_probe",
    "load_encoder",
    "per_class_iou",
    "precision_recall_f1",
    "segmentation_metrics",
    "stratified_split",
    "topk_accuracy",
    "train_linear_classifier",
]
