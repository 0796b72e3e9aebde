"""Fine-tuning engine: a pretrained encoder under a task head, trained on the library's runtime and checkpoints.

A task is a model plus two functions, ``loss_fn(model, batch) -> loss`` and ``evaluate_fn(model, loader) ->
metrics``; :func:`fit` does the rest, with one meaning for everything it shares with pretraining and evaluation:

- AdamW groups from :func:`geolink.runtime.param_groups` (no weight decay on 1-D tensors and on what the models'
  ``no_weight_decay()`` name; the encoder's learning rate scaled by ``encoder_lr_scale``), the learning rate set
  every step by :func:`geolink.runtime.warmup_cosine`;
- precision and device from :mod:`geolink.runtime` (``auto``: bf16 on GPUs that support it, fp16 + loss scaling
  on other GPUs, fp32 on CPU);
- checkpoints through :mod:`geolink.train.checkpoint` (safetensors + JSON, atomic, strict loading):
  ``<output_dir>/last/`` after every epoch (weights, optimizer, RNG, epoch, best score, history) and
  ``<output_dir>/best/`` for the best validation score; a rerun with the same ``output_dir`` resumes from
  ``last/`` (``resume=False`` restarts);
- exact resume: every epoch reseeds the global RNG and the shuffling generator from
  ``seed × FINETUNE_EPOCH_STRIDE + epoch``, so a resumed run sees the batches and augmentations of an
  uninterrupted one and ends with the same weights;
- ``<output_dir>/metrics.json`` at the end: best, last (and test) metrics, the per-epoch history and the config.

Also here: :class:`FinetuneConfig` (the options every fine-tuning job shares; task scripts extend it), the model
wrapper that normalises images, and the readers, splits and collation of folder datasets for dense tasks (image /
mask / graph files matched by name).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from geolink.errors import ConfigError, DataError, InputError, MissingInputError
from geolink.runtime import (
    FINETUNE_EPOCH_STRIDE,
    Precision,
    autocast,
    normalise,
    param_groups,
    resolve_device,
    resolve_precision,
    seed_everything,
    warmup_cosine,
)
from geolink.train.checkpoint import find_checkpoint, load_checkpoint, load_weights, write_checkpoint

if TYPE_CHECKING:
    from geolink.eval.encoders import LoadedEncoder

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".npy")
GRAD_CLIP_NORM = 3.0
"""Gradient-norm clipping of every fine-tuning step."""


# ------------------------------------------------------------------------------------------------------- config
@dataclass(kw_only=True)
class FinetuneConfig:
    """Fine-tune a pretrained GeoLink encoder under a task head (the options every fine-tuning job shares)."""

    model: str = field(default="geolink_tiny.demo", metadata={
        "help": "geolink folder, Hub repo, pretrained tag, or architecture name (random weights, for tests)"})
    img_size: int = field(default=224, metadata={"help": "training crop size"})
    freeze_encoder: bool = field(default=False, metadata={"help": "train only the head (frozen-encoder protocol)"})
    drop_path: float = field(default=0.1, metadata={"help": "stochastic depth of the encoder (architecture names)"})
    epochs: int = field(default=10, metadata={"help": "training epochs"})
    batch_size: int = field(default=8, metadata={"help": "batch size"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate of the head"})
    encoder_lr_scale: float = field(default=0.1, metadata={"help": "encoder learning rate = lr × this"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay"})
    warmup_epochs: float = field(default=1.0, metadata={"help": "linear warm-up, in epochs"})
    max_steps_per_epoch: int | None = field(default=None, metadata={"help": "cap the iterations per epoch"})
    output_dir: Path = field(default=Path("runs/finetune"), metadata={"help": "checkpoints and metrics"})
    resume: bool = field(default=True, metadata={"help": "continue from <output_dir>/last when it exists"})
    precision: Precision = field(default=Precision.AUTO, metadata={
        "help": "autocast precision (auto: bf16 on GPUs that support it, fp16 on other GPUs, fp32 on CPU)"})
    device: str = field(default="auto", metadata={"help": "cuda, cuda:1, cpu or auto"})
    workers: int = field(default=2, metadata={"help": "data-loader worker processes"})
    seed: int = field(default=0, metadata={"help": "seed of everything"})
    quiet: bool = field(default=False, metadata={"help": "no progress bars"})

    def __post_init__(self) -> None:
        self.output_dir, self.precision = Path(self.output_dir), Precision(self.precision)
        for name in ("epochs", "workers", "max_steps_per_epoch"):
            if (getattr(self, name) or 0) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("img_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.encoder_lr_scale < 0 or self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ConfigError("lr must be > 0 and encoder_lr_scale, weight_decay, warmup_epochs >= 0; got "
                              f"{self.lr}, {self.encoder_lr_scale}, {self.weight_decay}, {self.warmup_epochs}")


def _jsonable(config: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


# -------------------------------------------------------------------------------------------------- the model
def load_task_encoder(config: FinetuneConfig, component: str = "image", **sections: dict[str, Any]) -> LoadedEncoder:
    """The encoder named by ``config.model`` (see :func:`geolink.eval.encoders.load_encoder`); architecture names
    (random weights) get ``img_size`` and ``drop_path`` in their ``image`` section, and ``sections``."""
    from geolink.eval.encoders import load_encoder
    from geolink.registry import list_models

    if config.model in list_models():
        image = {"img_size": config.img_size, "drop_path_rate": config.drop_path, **sections.pop("image", {})}
        sections = {"image": image, **sections}
    return load_encoder(config.model, component=component, **sections)


class Normalised(nn.Module):
    """Wraps a model so it takes images in ``[0, 1]``: every ``[B, C, H, W]`` tensor argument goes through
    :func:`geolink.runtime.normalise` with the encoder's ``mean`` / ``std`` first; other arguments pass as they are."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model, self.mean, self.std = model, tuple(mean), tuple(std)

    def forward(self, *inputs: Any) -> Any:
        return self.model(*(normalise(x, self.mean, self.std) if isinstance(x, torch.Tensor) and x.dim() == 4 else x
                            for x in inputs))


# ------------------------------------------------------------------------------------------------ the training loop
@dataclass
class FitResult:
    """What :func:`fit` returns (and writes to ``metrics.json``); epochs are 1-based."""

    best: dict[str, Any]
    last: dict[str, Any]
    best_epoch: int
    history: list[dict[str, Any]]


def fit(model: nn.Module, train_set: Dataset, val_set: Dataset, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
        evaluate_fn: Callable[[nn.Module, Any], dict[str, Any]], config: FinetuneConfig, primary: str,
        encoder: nn.Module | None = None, collate_fn: Callable | None = None, test_set: Dataset | None = None,
        extra_metrics: dict[str, Any] | None = None) -> FitResult:
    """Train ``model`` and keep the best checkpoint by ``primary`` (higher is better).

    Args:
        model: the task model (moved to ``config.device`` here).
        train_set, val_set: datasets; batches go through ``collate_fn``.
        loss_fn: ``(model, batch on the device) -> scalar loss``, run under autocast.
        evaluate_fn: ``(model, val batches) -> metrics`` (must contain ``primary``), run under autocast and
            ``no_grad`` with the model in eval mode.
        config: the shared options (:class:`FinetuneConfig` or a task's subclass, recorded in ``metrics.json``).
        primary: the metric selecting ``best/``.
        encoder: the pretrained part (learning rate × ``encoder_lr_scale``; frozen with ``freeze_encoder``).
        collate_fn: batch collation.
        test_set: evaluated once with the best weights at the end (``"test"`` in ``metrics.json``).
        extra_metrics: more entries for ``metrics.json`` (e.g. class names).

    Returns:
        The :class:`FitResult`; the best weights are loaded into ``model``.

    Raises:
        DataError: an empty split. FloatingPointError: the loss became NaN or infinite.
    """
    out, device = config.output_dir, resolve_device(config.device)
    amp_dtype = resolve_precision(config.precision, device)
    if len(train_set) == 0 or len(val_set) == 0:
        raise DataError(f"empty split: {len(train_set)} training and {len(val_set)} validation samples")
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed)
    if encoder is not None and config.freeze_encoder:
        encoder.requires_grad_(False)
    model.to(device)
    drop_last = len(train_set) > config.batch_size  # BatchNorm heads need > 1 sample per batch
    steps = len(train_set) // config.batch_size if drop_last else math.ceil(len(train_set) / config.batch_size)
    steps = min(steps, config.max_steps_per_epoch or steps)
    total_steps, warmup_steps = max(1, steps * config.epochs), int(round(config.warmup_epochs * steps))
    lr_scales = {encoder: config.encoder_lr_scale} if encoder is not None else None
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay, lr=config.lr, lr_scales=lr_scales),
                                  lr=config.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start_epoch, best_score, best_epoch, history = 0, -math.inf, -1, []
    checkpoint = find_checkpoint(out / "last") if config.resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer)
        scaler.load_state_dict(state["scaler"])
        start_epoch, best_score, best_epoch = state["epoch"] + 1, state["best_score"], state["best_epoch"]
        history = state["history"]
        print(f"resuming from {checkpoint} at epoch {start_epoch + 1}", file=sys.stderr)
    run = _Evaluator(evaluate_fn, device, amp_dtype)
    val_loader = make_loader(val_set, config, shuffle=False, collate_fn=collate_fn)

    for epoch in range(start_epoch, config.epochs):
        epoch_seed = config.seed * FINETUNE_EPOCH_STRIDE + epoch
        seed_everything(epoch_seed)
        loader = make_loader(train_set, config, shuffle=True, collate_fn=collate_fn, seed=epoch_seed,
                             drop_last=drop_last)
        model.train()
        if encoder is not None and config.freeze_encoder:
            encoder.eval()
        started, losses = time.time(), []
        bar = tqdm(loader, total=steps, desc=f"epoch {epoch + 1}/{config.epochs}", disable=config.quiet, leave=False)
        for step, batch in enumerate(bar):
            if step >= steps:
                break
            for group in optimizer.param_groups:
                group["lr"] = warmup_cosine(epoch * steps + step, group["base_lr"], warmup_steps, total_steps)
            with autocast(device, amp_dtype):
                loss = loss_fn(model, to_device(batch, device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch + 1} step {step}; lower lr or "
                                         "use precision fp32")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], GRAD_CLIP_NORM)
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        metrics = run(model, val_loader)
        if primary not in metrics:
            raise KeyError(f"evaluate_fn returned no {primary!r}")
        score = metrics[primary]
        history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else None,
                        "seconds": round(time.time() - started, 2), **_scalars(metrics)})
        print(json.dumps(_clean(history[-1])), file=sys.stderr)
        if score is not None and not math.isnan(score) and score > best_score:
            best_score, best_epoch = score, epoch
            write_checkpoint(out / "best", model, None, _clean({"epoch": epoch + 1, "metrics": metrics}))
        write_checkpoint(out / "last", model, optimizer, _clean({
            "epoch": epoch, "best_score": best_score, "best_epoch": best_epoch, "history": history,
            "scaler": scaler.state_dict(), "config": _jsonable(config)}))

    last = run(model, val_loader)
    if best_epoch < 0:  # no finite score (e.g. zero epochs): the current weights are the best there are
        best_epoch = config.epochs - 1
        write_checkpoint(out / "best", model, None, _clean({"epoch": best_epoch + 1, "metrics": last}))
    load_weights(find_checkpoint(out / "best"), model)
    best = run(model, val_loader)
    summary = {"primary_metric": primary, "best_epoch": best_epoch + 1, "best": best, "last": last}
    if test_set is not None:
        summary["test"] = run(model, make_loader(test_set, config, shuffle=False, collate_fn=collate_fn))
    write_metrics(out, {**summary, **(extra_metrics or {}), "history": history, "config": _jsonable(config)})
    return FitResult(best=best, last=last, best_epoch=best_epoch + 1, history=history)


class _Evaluator:
    """Runs ``evaluate_fn`` in eval mode, without gradients, under autocast, on batches moved to the device."""

    def __init__(self, evaluate_fn: Callable, device: torch.device, amp_dtype: torch.dtype | None) -> None:
        self.evaluate_fn, self.device, self.amp_dtype = evaluate_fn, device, amp_dtype

    def __call__(self, model: nn.Module, loader: DataLoader) -> dict[str, Any]:
        model.eval()
        with torch.no_grad(), autocast(self.device, self.amp_dtype):
            return self.evaluate_fn(model, DeviceLoader(loader, self.device))


class DeviceLoader:
    """Iterates a loader, moving each batch to a device."""

    def __init__(self, loader: DataLoader, device: torch.device) -> None:
        self.loader, self.device = loader, device

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            yield to_device(batch, self.device)

    def __len__(self) -> int:
        return len(self.loader)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32  # torch seeds each worker from the loader's generator
    random.seed(seed)
    np.random.seed(seed)


def make_loader(dataset: Dataset, config: FinetuneConfig, shuffle: bool, collate_fn: Callable | None = None,
                seed: int = 0, drop_last: bool = False) -> DataLoader:
    """A ``DataLoader`` whose shuffling and worker seeds come from ``seed`` (:func:`fit` reseeds it per epoch)."""
    return DataLoader(dataset, batch_size=config.batch_size, shuffle=shuffle, num_workers=config.workers,
                      generator=torch.Generator().manual_seed(seed), worker_init_fn=_seed_worker,
                      collate_fn=collate_fn, drop_last=drop_last, pin_memory=torch.cuda.is_available())


def to_device(batch: Any, device: torch.device) -> Any:
    """Move tensors (and PyG batches) inside lists/tuples/dicts to ``device``."""
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    return batch.to(device) if hasattr(batch, "to") and not isinstance(batch, str) else batch


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) or v is None}


def _clean(value: Any) -> Any:
    """``value`` with NaN floats as None (JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_metrics(out: str | Path, metrics: dict[str, Any]) -> Path:
    """``out/metrics.json``, written atomically (NaN as null)."""
    path = Path(out) / "metrics.json"
    tmp = path.with_name("metrics.json.tmp")
    tmp.write_text(json.dumps(_clean(metrics), indent=2, default=str))
    tmp.replace(path)
    return path


# -------------------------------------------------------------------------------------------- dense-task datasets
def list_images(folder: Path, recursive: bool = False) -> dict[str, Path]:
    """``{id: path}`` of the images in ``folder`` (suffixes in ``IMAGE_SUFFIXES``), sorted by path; the id is the
    path relative to ``folder`` without suffix (the stem when not ``recursive``)."""
    if not folder.is_dir():
        raise MissingInputError(f"no folder {folder}")
    return {p.relative_to(folder).with_suffix("").as_posix(): p
            for p in sorted(folder.rglob("*") if recursive else folder.iterdir())
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}


def read_image(path: Path) -> torch.Tensor:
    """An image as float ``[C, H, W]`` in ``[0, 1]`` (8-bit: / 255; 16-bit: / 65535; ``.npy`` ``[H, W, C]`` or
    ``[C, H, W]`` floats are taken as they are)."""
    if path.suffix.lower() == ".npy":
        array = np.load(path)
        if array.ndim == 2:
            array = array[None]
        elif array.shape[-1] <= 16 and array.shape[0] > 16:
            array = array.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(array)).float()
    from PIL import Image

    with Image.open(path) as image:
        if image.mode in ("I;16", "I;16B", "I"):
            return torch.from_numpy(np.asarray(image, dtype=np.float32)[None] / 65535.0)
        array = np.asarray(image.convert("RGB"))
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float() / 255.0


def read_mask(path: Path) -> torch.Tensor:
    """A class-id mask as int64 ``[H, W]`` (single-band PNG/TIF, or ``.npy``)."""
    if path.suffix.lower() == ".npy":
        return torch.from_numpy(np.load(path).astype(np.int64))
    from PIL import Image

    with Image.open(path) as image:
        if image.mode not in ("L", "P", "I", "I;16", "1"):
            raise DataError(f"{path} is a {image.mode} image; masks must be single-band class ids (mode L/P/I)")
        return torch.from_numpy(np.asarray(image).astype(np.int64))


def read_tile_graph(path: Path, table: torch.Tensor | None = None):
    """One tile's graph: a geolink graph file (``x`` from ``table`` when it stores tag ids) or an official-layout
    safetensors file.

    Raises:
        InputError: a geolink graph file that stores tag ids, read without its embedding table.
    """
    from safetensors import safe_open

    from geolink.graph.official import load_official_graph
    from geolink.graph.schema import NODE_TYPES
    from geolink.graph.storage import load_graph

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if "format" not in metadata:
        return load_official_graph(path)
    graph = load_graph(path, table)
    if "x" not in graph[NODE_TYPES[0]]:
        raise InputError(f"{path} stores tag ids, not features: pass graph_vocab (the vocab.safetensors embedding "
                         "table written by geolink build-graphs with a text model)")
    return graph


def paired_files(root: Path, folders: Sequence[str]) -> list[tuple[str, list[Path]]]:
    """Samples present in every one of ``root/<folder>`` (matched by file stem), sorted by stem.

    Raises:
        MissingInputError: a folder is missing or no stem is shared by all of them.
    """
    listings = [list_images(root / f) for f in folders]
    stems = sorted(set.intersection(*(set(listing) for listing in listings)))
    if not stems:
        raise MissingInputError(f"no sample has a file in each of {[str(root / f) for f in folders]} "
                                "(files are matched by name without suffix)")
    missing = sorted(set.union(*(set(listing) for listing in listings)) - set(stems))
    if missing:
        print(f"warning: {len(missing)} files in {root} lack a partner and are skipped (e.g. {missing[:3]})",
              file=sys.stderr)
    return [(s, [listing[s] for listing in listings]) for s in stems]


def split_samples(root: Path, folders: Sequence[str], val_fraction: float, seed: int,
                  ) -> tuple[list[tuple[str, list[Path]]], list[tuple[str, list[Path]]]]:
    """Train and validation samples: ``root/train/<folders>`` + ``root/val/<folders>`` when present, else a
    seeded random split of ``root/<folders>`` holding out ``val_fraction`` (at least one sample)."""
    if (root / "train").is_dir() and (root / "val").is_dir():
        return paired_files(root / "train", folders), paired_files(root / "val", folders)
    samples = paired_files(root, folders)
    if len(samples) < 2:
        raise DataError(f"{root} has {len(samples)} sample(s); need at least 2 to hold one out for validation")
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    n_val = min(len(samples) - 1, max(1, round(len(samples) * val_fraction)))
    val_idx = set(order[:n_val])
    return ([s for i, s in enumerate(samples) if i not in val_idx], [s for i, s in enumerate(samples) if i in val_idx])


def pad_collate(multiple: int, ignore_index: int) -> Callable[[list], list]:
    """Collate ``(tensor, ...)`` samples of different sizes: images ``[C, H, W]`` padded with 0 and masks ``[H, W]``
    with ``ignore_index`` (bottom / right) to the largest size in the batch rounded up to ``multiple`` (the patch
    size); other tensors are stacked, graphs batched (``Batch.from_data_list``), other fields become lists."""
    from torch_geometric.data import Batch, HeteroData

    from geolink.data.transforms import pad_bottom_right

    def collate(samples: list) -> list:
        fields = list(zip(*samples))
        sized = [t for f in fields for t in f if isinstance(t, torch.Tensor) and t.dim() in (2, 3)]
        height, width = max(t.shape[-2] for t in sized), max(t.shape[-1] for t in sized)
        height, width = height + (-height) % multiple, width + (-width) % multiple
        out = []
        for f in fields:
            if isinstance(f[0], torch.Tensor) and f[0].dim() in (2, 3):
                out.append(torch.stack([pad_bottom_right(t, height - t.shape[-2], width - t.shape[-1],
                                                         0 if t.dim() == 3 else ignore_index) for t in f]))
            elif isinstance(f[0], HeteroData):
                out.append(Batch.from_data_list(list(f)))
            else:
                out.append(torch.stack(f) if isinstance(f[0], torch.Tensor) else list(f))
        return out

    return collate


def infer_num_classes(mask_paths: Sequence[Path], ignore_index: int) -> int:
    """One more than the largest class id in the masks (``ignore_index`` excluded)."""
    largest = -1
    for path in mask_paths:
        mask = read_mask(path)
        mask = mask[mask != ignore_index]
        if mask.numel():
            largest = max(largest, int(mask.max()))
    if largest < 0:
        raise DataError("every mask is empty or ignored; pass num_classes")
    return largest + 1


def class_names(names: Sequence[str] | None, num_classes: int) -> list[str]:
    """``names`` completed with ``class_<i>`` up to ``num_classes``.

    Raises:
        ConfigError: more names than classes.
    """
    names = list(names or ())
    if len(names) > num_classes:
        raise ConfigError(f"{len(names)} class_names for {num_classes} classes; set num_classes to {len(names)}")
    return names + [f"class_{i}" for i in range(len(names), num_classes)]


def check_patch_multiple(img_size: int, patch: int) -> None:
    """Raises ConfigError unless ``img_size`` is a multiple of the encoder's patch size."""
    if img_size % patch:
        raise ConfigError(f"img_size {img_size} is not a multiple of the encoder's patch size {patch}")

