"""Side-by-side evaluation of several encoders under the same frozen-feature protocols (kNN, linear probe).

:func:`compare_encoders` extracts each encoder's features once per split and runs every requested protocol on
them; :func:`format_table` prints the results as an aligned text table (one column per encoder).
:class:`EvalConfig` + :func:`evaluate_image_folder` are the ``geolink eval`` job.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from geolink.errors import ConfigError, MissingInputError
from geolink.eval.encoders import LoadedEncoder, Pool, extract_features
from geolink.eval.knn import knn_classify
from geolink.eval.linear_probe import linear_probe
from geolink.runtime import Precision, option

PROTOCOLS = ("knn", "linear")


def compare_encoders(encoders: Sequence[LoadedEncoder], train: Dataset, test: Dataset,
                     protocols: Sequence[str] = ("knn",), k: int = 20, temperature: float = 0.07,
                     probe_epochs: int = 100, probe_lr: float = 1e-3, pool: Pool | str = Pool.AVG,
                     batch_size: int = 64,
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
        raise ConfigError(f"protocols must be a non-empty subset of {PROTOCOLS}; got {list(protocols)}")
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
    """An aligned text table: one row per (protocol, metric), one column per encoder; accuracies in percent.

    A top-k row appears only for k smaller than the number of classes (top-5 of a 5-class task is always 100 %)."""
    names = list(results)
    rows: list[tuple[str, list[str]]] = [("feature dim", [str(results[n]["feature_dim"]) for n in names]),
                                         ("weights", ["pretrained" if results[n]["pretrained"] else "random"
                                                      for n in names])]
    for protocol in ("knn", "linear"):
        done = [results[n][protocol] for n in names if protocol in results[n]]
        if not done:
            continue
        topk = ("top1", "top5") if len(done[0]["per_class_accuracy"]) > 5 else ("top1",)
        for metric in (*topk, "mean_class_accuracy"):
            label = f"{protocol} {metric}" + (f" (k={done[0]['k']})" if protocol == "knn" and metric == "top1" else "")
            rows.append((label, [f"{100 * results[n][protocol][metric]:.2f}" if protocol in results[n] else "-"
                                 for n in names]))
    first = max(len(r[0]) for r in rows + [("metric", [])])
    widths = [max(len(n), *(len(r[1][i]) for r in rows)) for i, n in enumerate(names)]
    lines = ["  ".join(["metric".ljust(first)] + [n.rjust(w) for n, w in zip(names, widths)])]
    lines.append("  ".join(["-" * first] + ["-" * w for w in widths]))
    lines += ["  ".join([label.ljust(first)] + [v.rjust(w) for v, w in zip(values, widths)]) for label, values in rows]
    return "\n".join(lines)


class Protocol(str, Enum):
    """Which frozen-feature protocols ``geolink eval`` runs."""

    KNN = "knn"
    LINEAR = "linear"
    ALL = "all"

    @property
    def protocols(self) -> tuple[str, ...]:
        """The :data:`PROTOCOLS` this choice runs."""
        return PROTOCOLS if self is Protocol.ALL else (self.value,)


@dataclass
class EvalConfig:
    """Frozen-feature scene-classification protocols on an ImageFolder dataset (EuroSAT, RESISC-45, ...): the
    weighted kNN (L2-normalised global features, k=20, T=0.07) and/or a linear probe. The folder is either
    <data>/train + <data>/test (or val) with one sub-folder per class, or one sub-folder per class, split here
    (stratified, seeded). Timm models named in compare_timm are evaluated under the same protocol and printed in the
    same table.

    The ``geolink eval`` job; :func:`evaluate_image_folder` runs it.
    """

    protocol: Protocol = field(metadata={"help": "which protocol(s) to run", "positional": True})
    model: str = field(metadata={"help": "geolink folder, Hub repo, pretrained tag, or architecture name (random "
                                         "weights)"})
    data: Path = field(metadata={"help": "ImageFolder root"})
    compare_timm: tuple[str, ...] = option((), "timm model(s) to evaluate alongside, e.g. vit_tiny_patch16_224",
                                            metavar="NAME")
    timm_pretrained: bool = option(True, "load timm's pretrained weights for the compare_timm models (downloads "
                                          "once)")
    img_size: int = option(224, "input size")
    pool: Pool = option(Pool.AVG, "global feature: mean of patch tokens (avg), cls token (token), or the model's "
                                   "own pooling (default)")
    k: int = option(20, "kNN neighbours")
    temperature: float = option(0.07, "kNN vote temperature")
    probe_epochs: int = option(100, "linear-probe epochs")
    probe_lr: float = option(1e-3, "linear-probe AdamW learning rate")
    test_fraction: float = option(0.2, "held-out share per class when the folder has no train/test split")
    batch_size: int = option(64, "feature-extraction batch size")
    workers: int = option(0, "data-loader workers")
    device: str = option("auto", "cuda, cuda:1, cpu, or auto (cuda if available)")
    precision: Precision = option(Precision.AUTO, "autocast precision; auto: bf16 on GPUs that support it, fp16 on "
                                                   "other GPUs, fp32 on CPU")
    seed: int = option(0, "split and probe seed")
    output: Path | None = option(None, "also write all results to this JSON file")
    quiet: bool = option(False, "no progress bars")

    def __post_init__(self) -> None:
        self.data = Path(self.data)
        self.output = None if self.output is None else Path(self.output)
        try:
            self.protocol, self.pool = Protocol(self.protocol), Pool(self.pool)
        except ValueError as error:
            raise ConfigError(f"{error} (protocol is knn, linear or all; pool is avg, token or default)") from None
        for name in ("img_size", "k", "probe_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1; got {getattr(self, name)}")
        if self.temperature <= 0 or self.probe_lr <= 0:
            raise ConfigError(f"temperature and probe_lr must be positive; got {self.temperature}, {self.probe_lr}")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"test_fraction must be between 0 and 1 (exclusive); got {self.test_fraction}")
        if self.workers < 0:
            raise ConfigError(f"workers must not be negative; got {self.workers}")


def evaluate_image_folder(config: EvalConfig) -> dict[str, Any]:
    """What ``geolink eval`` runs: resolve the encoders, split the ImageFolder, compare them, and write
    ``config.output`` when set.

    Returns:
        ``{"results": {name: {...}}, "classes": [...], "num_train": N, "num_test": M, "settings": {...}}``.

    Raises:
        MissingInputError: ``config.data`` is not a folder.
        InputError: ``config.model`` names nothing geolink knows.
    """
    from geolink.eval.data import image_folder_splits
    from geolink.eval.encoders import load_encoder
    from geolink.runtime import resolve_device, resolve_precision

    if not config.data.is_dir():
        raise MissingInputError(f"data {str(config.data)!r} is not a folder (pass an ImageFolder root: "
                                "<data>/<class>/<image>, or <data>/train + <data>/test)")
    device = resolve_device(config.device)
    amp_dtype = resolve_precision(config.precision, device)
    train, test, classes = image_folder_splits(config.data, img_size=config.img_size,
                                               test_fraction=config.test_fraction, seed=config.seed)
    encoders = [load_encoder(config.model, component="image", image={"img_size": config.img_size})]
    for name in config.compare_timm:
        try:
            encoders.append(load_encoder(f"timm:{name}", timm_pretrained=config.timm_pretrained,
                                         img_size=config.img_size))
        except TypeError:  # a timm model without an img_size argument (CNNs take any size)
            encoders.append(load_encoder(f"timm:{name}", timm_pretrained=config.timm_pretrained))
    results = compare_encoders(encoders, train, test, protocols=config.protocol.protocols, k=config.k,
                               temperature=config.temperature, probe_epochs=config.probe_epochs,
                               probe_lr=config.probe_lr, pool=config.pool, batch_size=config.batch_size,
                               num_workers=config.workers, device=device, amp_dtype=amp_dtype, class_names=classes,
                               seed=config.seed, progress=not config.quiet)
    settings = {"data": str(config.data), "img_size": config.img_size, "pool": config.pool.value, "k": config.k,
                "temperature": config.temperature, "probe_epochs": config.probe_epochs, "probe_lr": config.probe_lr,
                "precision": Precision(config.precision).value, "seed": config.seed}
    report = {"results": results, "classes": classes, "num_train": len(train), "num_test": len(test),
              "settings": settings}
    if config.output is not None:
        config.output.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report
