"""Side-by-side evaluation of several encoders under the same frozen-feature protocols (kNN, linear probe).

:func:`compare_encoders` extracts each encoder's features once per split and runs every requested protocol on
them; :func:`format_table` prints the results as an aligned text table (one column per encoder). This is what
``geolink eval knn --compare-timm ...`` runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from geolink.eval.encoders import LoadedEncoder, extract_features
from geolink.eval.knn import knn_classify
from geolink.eval.linear_probe import linear_probe

PROTOCOLS = ("knn", "linear")


def compare_encoders(encoders: Sequence[LoadedEncoder], train: Dataset, test: Dataset,
                     protocols: Sequence[str] = ("knn",), k: int = 20, temperature: float = 0.07,
                     probe_epochs: int = 100, probe_lr: float = 1e-3, pool: str = "avg", batch_size: int = 64,
                     num_workers: int = 0, device: torch.device | str | None = None,
                     amp_dtype: torch.dtype | None = None, class_names: Sequence[str] | None = None, seed: int = 0,
                     progress: bool = True) -> dict[str, dict[str, Any]]:
    """Run the protocols for each encoder on the same splits.

    Args:
        encoders: resolved encoders (:func:`geolink.eval.encoders.load_encoder`); each uses its own mean/std.
        train, test: datasets of ``(image [C, H, W] in [0, 1], label)``.
        protocols: any of ``"knn"``, ``"linear"``.
        k, temperature: kNN parameters.
        probe_epochs, probe_lr: linear-probe parameters.
        pool: global pooling (see :func:`geolink.eval.encoders.encode_images`).
        batch_size, num_workers, device, amp_dtype: feature extraction.
        class_names: for per-class results.
        seed: linear-probe seed.
        progress: progress bars.

    Returns:
        ``{encoder name: {"knn": {...}, "linear": {...}, "feature_dim": D, "pretrained": bool}}``.
    """
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown or not protocols:
        raise ValueError(f"protocols must be a non-empty subset of {PROTOCOLS}, got {list(protocols)}")
    results: dict[str, dict[str, Any]] = {}
    for encoder in encoders:
        name = encoder.name if encoder.name not in results else f"{encoder.name} ({len(results)})"
        options = dict(mean=encoder.mean, std=encoder.std, pool=pool, batch_size=batch_size, num_workers=num_workers,
                       device=device, amp_dtype=amp_dtype, progress=progress)
        train_set = extract_features(encoder.model, train, desc=f"{name} train", **options)
        test_set = extract_features(encoder.model, test, desc=f"{name} test", **options)
        entry: dict[str, Any] = {"feature_dim": int(train_set[0].shape[1]), "pretrained": encoder.pretrained}
        if "knn" in protocols:
            entry["knn"] = knn_classify(None, train_set, test_set, k=k, temperature=temperature,
                                        num_classes=len(class_names) if class_names else None, class_names=class_names)
        if "linear" in protocols:
            entry["linear"] = linear_probe(None, train_set, test_set,
                                           num_classes=len(class_names) if class_names else None,
                                           epochs=probe_epochs, lr=probe_lr, seed=seed, class_names=class_names,
                                           progress=progress)
        results[name] = entry
    return results


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """An aligned text table: one row per (protocol, metric), one column per encoder; accuracies in percent."""
    names = list(results)
    rows: list[tuple[str, list[str]]] = [("feature dim", [str(results[n]["feature_dim"]) for n in names]),
                                         ("weights", ["pretrained" if results[n]["pretrained"] else "random"
                                                      for n in names])]
    for protocol, metrics in (("knn", ("top1", "top5", "mean_class_accuracy")),
                              ("linear", ("top1", "top5", "mean_class_accuracy"))):
        if not any(protocol in results[n] for n in names):
            continue
        for metric in metrics:
            label = f"{protocol} {metric}" + (f" (k={results[names[0]][protocol]['k']})"
                                              if protocol == "knn" and metric == "top1" else "")
            rows.append((label, [f"{100 * results[n][protocol][metric]:.2f}" if protocol in results[n] else "-"
                                 for n in names]))
    first = max(len(r[0]) for r in rows + [("metric", [])])
    widths = [max(len(n), *(len(r[1][i]) for r in rows)) for i, n in enumerate(names)]
    lines = ["  ".join(["metric".ljust(first)] + [n.rjust(w) for n, w in zip(names, widths)])]
    lines.append("  ".join(["-" * first] + ["-" * w for w in widths]))
    lines += ["  ".join([label.ljust(first)] + [v.rjust(w) for v, w in zip(values, widths)]) for label, values in rows]
    return "\n".join(lines)


def evaluate_image_folder(model: str, data: str, protocols: Sequence[str] = ("knn",),
                          compare_timm: Sequence[str] = (), timm_pretrained: bool = True, img_size: int = 224,
                          pool: str = "avg", k: int = 20, temperature: float = 0.07, probe_epochs: int = 100,
                          probe_lr: float = 1e-3, batch_size: int = 64, num_workers: int = 0,
                          device: str | None = None, precision: str = "auto", test_fraction: float = 0.2,
                          seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """What ``geolink eval`` runs: resolve the encoders, split the ImageFolder, compare them.

    Args:
        model: geolink model spec (folder, pretrained tag or architecture; see
            :func:`geolink.eval.encoders.load_encoder`).
        data: ImageFolder root (``train/`` + ``test/``/``val/`` sub-folders, or class folders split here).
        protocols: ``"knn"`` and/or ``"linear"``.
        compare_timm: timm model names evaluated next to the geolink encoder.
        timm_pretrained: load timm's pretrained weights for those (downloads them once).
        img_size: evaluation input size (images are resized and centre-cropped).
        device: default CUDA when available.
        precision: autocast choice (see :func:`geolink.eval.encoders.resolve_precision`).
        test_fraction, seed: the split, when the folder has none.
        pool, k, temperature, probe_epochs, probe_lr, batch_size, num_workers, progress: see
            :func:`compare_encoders`.

    Returns:
        ``{"results": {name: {...}}, "classes": [...], "num_train": N, "num_test": M, "settings": {...}}``.
    """
    from geolink.eval.data import image_folder_splits
    from geolink.eval.encoders import default_device, load_encoder, resolve_precision

    torch_device = torch.device(device) if device else default_device()
    amp_dtype = resolve_precision(precision, torch_device)
    train, test, classes = image_folder_splits(data, img_size=img_size, test_fraction=test_fraction, seed=seed)
    encoders = [load_encoder(model, component="image", img_size=img_size)]
    for name in compare_timm:
        try:
            encoders.append(load_encoder(f"timm:{name}", timm_pretrained=timm_pretrained, img_size=img_size))
        except TypeError:  # a timm model without an img_size argument (CNNs take any size)
            encoders.append(load_encoder(f"timm:{name}", timm_pretrained=timm_pretrained))
    results = compare_encoders(encoders, train, test, protocols=protocols, k=k, temperature=temperature,
                               probe_epochs=probe_epochs, probe_lr=probe_lr, pool=pool, batch_size=batch_size,
                               num_workers=num_workers, device=torch_device, amp_dtype=amp_dtype,
                               class_names=classes, seed=seed, progress=progress)
    settings = {"data": str(data), "img_size": img_size, "pool": pool, "k": k, "temperature": temperature,
                "probe_epochs": probe_epochs, "probe_lr": probe_lr, "precision": precision, "seed": seed}
    return {"results": results, "classes": classes, "num_train": len(train), "num_test": len(test),
            "settings": settings}
