"""Shared machinery of the fine-tuning examples: arguments, seeding, mixed precision, the training loop,
checkpointing / resuming, and folder datasets for dense tasks.

The scripts in this folder import it (``python examples/<script>.py`` puts this folder on ``sys.path``). A task is
a model plus two functions — ``loss_fn(model, batch)`` and ``evaluate_fn(model, loader)`` — and :func:`fit` does
the rest:

- AdamW with a separate (scaled) learning rate for the pretrained encoder, no weight decay on norms, biases,
  tokens and position tables; linear warm-up then cosine decay, stepped per iteration;
- ``torch.autocast`` (``--precision auto``: bf16 on CPU and recent GPUs, fp16 + loss scaling on older GPUs);
- ``<out>/last/`` (``model.safetensors`` + ``training_state.pt``) after every epoch and ``<out>/best/`` for the
  best validation score; a rerun with the same ``--output-dir`` resumes from ``last/`` (``--no-resume`` restarts);
- determinism: every epoch reseeds the global RNG and the shuffling generator from ``(seed, epoch)``, so a resumed
  run sees the same batches and augmentations as an uninterrupted one;
- ``<out>/metrics.json`` at the end: best and last validation metrics, the per-epoch history and the arguments.

Optimizer state is saved with ``torch.save`` of plain tensors and numbers and read back with
``torch.load(weights_only=True)``; weights are safetensors.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from geolink.eval.encoders import default_device, normalise, resolve_precision

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".npy")


# ----------------------------------------------------------------------------------------------------- arguments
def add_common_args(parser: argparse.ArgumentParser, *, epochs: int, batch_size: int, lr: float,
                    img_size: int = 224) -> None:
    """Arguments every fine-tuning script shares (model, optimisation, precision, checkpointing)."""
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="geolink_vit_large_patch16_224.neurips2025_unimodal",
                       help="geolink folder, Hub repo, pretrained tag, or architecture name (random weights, for "
                            "tests); default: %(default)s")
    model.add_argument("--img-size", type=int, default=img_size, help="training crop size (default %(default)s)")
    model.add_argument("--freeze-encoder", action="store_true",
                       help="train only the head (frozen-encoder protocol)")
    model.add_argument("--drop-path", type=float, default=0.1,
                       help="stochastic depth of the encoder for architecture names (default %(default)s)")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=epochs, help="training epochs (default %(default)s)")
    optim.add_argument("--batch-size", type=int, default=batch_size, help="batch size (default %(default)s)")
    optim.add_argument("--lr", type=float, default=lr, help="peak learning rate of the head (default %(default)s)")
    optim.add_argument("--encoder-lr-scale", type=float, default=0.1,
                       help="encoder learning rate = lr × this (default %(default)s)")
    optim.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default %(default)s)")
    optim.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up (default %(default)s)")
    optim.add_argument("--max-steps-per-epoch", type=int, default=None,
                       help="cap the iterations per epoch (quick runs)")
    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", default="runs/finetune", help="checkpoints and metrics (default %(default)s)")
    run.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                     help="continue from <output-dir>/last when it exists (default: yes)")
    run.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                     help="autocast precision: auto = bf16 on CPU and bf16-capable GPUs, fp16 otherwise")
    run.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if available)")
    run.add_argument("--workers", type=int, default=2, help="data-loader worker processes (default %(default)s)")
    run.add_argument("--seed", type=int, default=0, help="seed of everything (default %(default)s)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")


# ------------------------------------------------------------------------------------------------------- seeding
def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _worker_init(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, workers: int, seed: int = 0,
                collate_fn: Callable | None = None, drop_last: bool = False) -> DataLoader:
    """A ``DataLoader`` whose shuffling and worker seeds come from ``seed`` (reseed it per epoch)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      generator=torch.Generator().manual_seed(seed), worker_init_fn=_worker_init,
                      collate_fn=collate_fn, drop_last=drop_last, persistent_workers=False,
                      pin_memory=torch.cuda.is_available())


# -------------------------------------------------------------------------------------------------- the encoder
def load_image_encoder(args: argparse.Namespace, component: str = "image", **overrides: Any):
    """The encoder named by ``--model`` (see :func:`geolink.eval.load_encoder`), with ``--drop-path`` and
    ``--img-size`` applied to architecture names."""
    from geolink.eval import load_encoder
    from geolink.registry import list_models

    if args.model.partition(".")[0] in list_models() and "." not in args.model:
        overrides = {"img_size": args.img_size, "drop_path_rate": args.drop_path, **overrides}
    return load_encoder(args.model, component=component, **overrides)


class Normalised(nn.Module):
    """Wraps a model so it takes images in ``[0, 1]`` and normalises them with the encoder's mean/std first."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def norm(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std

    def forward(self, *images_and_more: Any) -> torch.Tensor:
        """Images (one or more leading ``[B, C, H, W]`` tensors in [0, 1]) and other inputs, passed through."""
        args = [self.norm(a) if isinstance(a, torch.Tensor) and a.dim() == 4 else a for a in images_and_more]
        return self.model(*args)


# ------------------------------------------------------------------------------------------------ the training loop
@dataclass
class FitResult:
    """What :func:`fit` returns (and writes to ``metrics.json``)."""

    best: dict[str, Any]
    last: dict[str, Any]
    best_epoch: int
    history: list[dict[str, Any]]


def param_groups(model: nn.Module, lr: float, encoder_lr_scale: float, weight_decay: float,
                 encoder: nn.Module | None) -> list[dict[str, Any]]:
    """AdamW groups: encoder / head × decayed / not decayed (1-D tensors, tokens and position tables)."""
    encoder_ids = {id(p) for p in encoder.parameters()} if encoder is not None else set()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith(("cls_token", "pos_embed", "mask_token"))
        groups.setdefault((id(param) in encoder_ids, no_decay), []).append(param)
    return [{"params": params, "lr": lr * (encoder_lr_scale if is_encoder else 1.0),
             "weight_decay": 0.0 if no_decay else weight_decay, "base_lr": lr * (encoder_lr_scale if is_encoder else 1)}
            for (is_encoder, no_decay), params in sorted(groups.items())]


def _save_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def save_weights(model: nn.Module, folder: Path) -> None:
    """``folder/model.safetensors`` (atomically)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "model.safetensors.tmp"
    safetensors.torch.save_model(model, str(tmp))
    tmp.replace(folder / "model.safetensors")


def load_weights(model: nn.Module, folder: Path) -> None:
    """Strictly load ``folder/model.safetensors`` into ``model``."""
    missing, unexpected = safetensors.torch.load_model(model, str(folder / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{folder}/model.safetensors does not match the model (missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]}): was it written with other --model / --num-classes settings?")


def fit(model: nn.Module, train_set: Dataset, val_set: Dataset, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
        evaluate_fn: Callable[[nn.Module, DataLoader], dict[str, Any]], args: argparse.Namespace, primary: str,
        encoder: nn.Module | None = None, collate_fn: Callable | None = None, test_set: Dataset | None = None,
        extra_metrics: dict[str, Any] | None = None) -> FitResult:
    """Train ``model`` and keep the best checkpoint by ``primary`` (higher is better).

    Args:
        model: the task model (already on no particular device; moved here).
        train_set, val_set: datasets; batches go through ``collate_fn``.
        loss_fn: ``(model, batch on device) -> scalar loss``, run under autocast.
        evaluate_fn: ``(model, val loader) -> metrics dict`` (must contain ``primary``), run under autocast and
            ``no_grad`` with the model in eval mode.
        args: the parsed common arguments (:func:`add_common_args`).
        primary: the metric selecting ``best/``.
        encoder: the pretrained part (gets ``lr × encoder_lr_scale``; frozen with ``--freeze-encoder``).
        collate_fn: batch collation.
        test_set: evaluated once with the best weights at the end (``"test"`` in ``metrics.json``).
        extra_metrics: more entries for ``metrics.json`` (e.g. class names).

    Returns:
        :class:`FitResult`; ``best/model.safetensors`` is loaded into ``model`` before returning.
    """
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device) if args.device else default_device()
    amp_dtype = resolve_precision(args.precision, device)
    seed_everything(args.seed)
    if encoder is not None and args.freeze_encoder:
        encoder.requires_grad_(False)
    model.to(device)
    if len(train_set) == 0 or len(val_set) == 0:
        raise ValueError(f"empty split: {len(train_set)} training and {len(val_set)} validation samples")
    drop_last = len(train_set) > args.batch_size  # BatchNorm heads need > 1 sample per batch
    steps = math.ceil(len(train_set) / args.batch_size) if not drop_last else len(train_set) // args.batch_size
    if args.max_steps_per_epoch:
        steps = min(steps, args.max_steps_per_epoch)
    total_steps, warmup_steps = max(1, steps * args.epochs), int(round(args.warmup_epochs * steps))
    optimizer = torch.optim.AdamW(param_groups(model, args.lr, args.encoder_lr_scale, args.weight_decay, encoder),
                                  lr=args.lr, betas=(0.9, 0.999))

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start_epoch, best_score, best_epoch, history = 0, -math.inf, -1, []
    last_dir, best_dir = out / "last", out / "best"
    if args.resume and (last_dir / "training_state.pt").is_file():
        state = torch.load(last_dir / "training_state.pt", map_location="cpu", weights_only=True)
        load_weights(model, last_dir)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best_score, best_epoch = state["epoch"] + 1, state["best_score"], state["best_epoch"]
        history = json.loads(state["history"])
        print(f"resuming from {last_dir} at epoch {start_epoch}", file=sys.stderr)
    (out / "args.json").write_text(json.dumps(vars(args), indent=2, default=str))
    val_loader = make_loader(val_set, args.batch_size, False, args.workers, collate_fn=collate_fn)

    for epoch in range(start_epoch, args.epochs):
        seed_everything(args.seed * 1000 + epoch)
        loader = make_loader(train_set, args.batch_size, True, args.workers, seed=args.seed * 1000 + epoch,
                             collate_fn=collate_fn, drop_last=drop_last)
        model.train()
        if encoder is not None and args.freeze_encoder:
            encoder.eval()
        started, losses = time.time(), []
        bar = tqdm(loader, total=steps, desc=f"epoch {epoch + 1}/{args.epochs}", disable=args.quiet, leave=False)
        for step, batch in enumerate(bar):
            if step >= steps:
                break
            batch = to_device(batch, device)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch + 1} step {step}; lower --lr "
                                         "or use --precision fp32")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 3.0)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{scheduler.get_last_lr()[-1]:.2e}")
        metrics = evaluate(model, val_loader, evaluate_fn, device, amp_dtype)
        if primary not in metrics:
            raise KeyError(f"evaluation returned no {primary!r}")
        score = metrics[primary]
        record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                  "seconds": round(time.time() - started, 2), **_scalars(metrics)}
        history.append(record)
        print(json.dumps(record), file=sys.stderr)
        if score is not None and not math.isnan(score) and score > best_score:
            best_score, best_epoch = score, epoch
            save_weights(model, best_dir)
            (best_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        save_weights(model, last_dir)
        _save_state(last_dir / "training_state.pt", {
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "epoch": epoch, "best_score": best_score, "best_epoch": best_epoch, "history": json.dumps(history)})

    last = evaluate(model, val_loader, evaluate_fn, device, amp_dtype)
    if best_epoch < 0:  # no finite score (e.g. zero epochs): the current weights are the best we have
        save_weights(model, best_dir)
        best_epoch = args.epochs - 1
    load_weights(model, best_dir)
    best = evaluate(model, val_loader, evaluate_fn, device, amp_dtype)
    result = FitResult(best=best, last=last, best_epoch=best_epoch + 1, history=history)
    summary = {"primary_metric": primary, "best_epoch": result.best_epoch, "best": best, "last": last}
    if test_set is not None:
        test_loader = make_loader(test_set, args.batch_size, False, args.workers, collate_fn=collate_fn)
        summary["test"] = evaluate(model, test_loader, evaluate_fn, device, amp_dtype)
    write_metrics(out, {**summary, **(extra_metrics or {}), "history": history, "args": vars(args)})
    return result


def evaluate(model: nn.Module, loader: DataLoader, evaluate_fn: Callable, device: torch.device,
             amp_dtype: torch.dtype | None) -> dict[str, Any]:
    """Run ``evaluate_fn`` in eval mode, without gradients, under autocast."""
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        return evaluate_fn(model, DeviceLoader(loader, device))


class DeviceLoader:
    """Iterates a loader, moving each batch to a device."""

    def __init__(self, loader: DataLoader, device: torch.device) -> None:
        self.loader, self.device = loader, device

    def __iter__(self):
        for batch in self.loader:
            yield to_device(batch, self.device)

    def __len__(self) -> int:
        return len(self.loader)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move tensors (and PyG batches) inside lists/tuples/dicts to ``device``."""
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if hasattr(batch, "to") and not isinstance(batch, str):
        return batch.to(device, non_blocking=True) if isinstance(batch, torch.Tensor) else batch.to(device)
    return batch


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) or v is None}


def write_metrics(out: Path, metrics: dict[str, Any]) -> Path:
    """``out/metrics.json`` (atomically; NaN written as null)."""
    def clean(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    path = Path(out) / "metrics.json"
    tmp = path.with_name("metrics.json.tmp")
    tmp.write_text(json.dumps(clean(metrics), indent=2, default=str))
    tmp.replace(path)
    return path


# -------------------------------------------------------------------------------------------- dense-task datasets
def list_images(folder: Path) -> dict[str, Path]:
    """``{stem: path}`` of the images directly in ``folder`` (suffixes in ``IMAGE_SUFFIXES``)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder {folder}")
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}


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
            array = np.asarray(image, dtype=np.float32)[None] / 65535.0
            return torch.from_numpy(np.ascontiguousarray(array))
        array = np.asarray(image.convert("RGB"))
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float() / 255.0


def read_mask(path: Path) -> torch.Tensor:
    """A class-id mask as int64 ``[H, W]`` (single-band PNG/TIF, or ``.npy``)."""
    if path.suffix.lower() == ".npy":
        return torch.from_numpy(np.load(path).astype(np.int64))
    from PIL import Image

    with Image.open(path) as image:
        if image.mode not in ("L", "P", "I", "I;16", "1"):
            raise ValueError(f"{path} is a {image.mode} image; masks must be single-band class ids (mode L/P/I)")
        return torch.from_numpy(np.asarray(image).astype(np.int64))


def paired_files(root: Path, folders: Sequence[str]) -> list[tuple[str, list[Path]]]:
    """Samples present in every one of ``root/<folder>`` (matched by file stem), sorted by stem.

    Raises:
        FileNotFoundError: a folder is missing or no stem is shared by all of them.
    """
    listings = [list_images(root / f) for f in folders]
    stems = sorted(set.intersection(*(set(listing) for listing in listings)))
    if not stems:
        raise FileNotFoundError(f"no sample has a file in each of {[str(root / f) for f in folders]} "
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
        raise ValueError(f"{root} has {len(samples)} sample(s); need at least 2 to hold one out for validation")
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    n_val = min(len(samples) - 1, max(1, round(len(samples) * val_fraction)))
    val_idx = set(order[:n_val])
    return ([s for i, s in enumerate(samples) if i not in val_idx], [s for i, s in enumerate(samples) if i in val_idx])


def joint_augment(tensors: list[torch.Tensor], size: int, ignore_index: int, train: bool
                  ) -> tuple[list[torch.Tensor], tuple[bool, bool]]:
    """Same random crop (padding when smaller, masks padded with ``ignore_index``) and flips for images
    ``[C, H, W]`` and masks ``[H, W]``; no-op when ``train`` is False.

    Returns:
        the transformed tensors and the ``(horizontal, vertical)`` flips applied.
    """
    if not train:
        return tensors, (False, False)
    height, width = tensors[0].shape[-2:]
    pad_h, pad_w = max(0, size - height), max(0, size - width)
    if pad_h or pad_w:
        tensors = [_pad(t, pad_h, pad_w, ignore_index) for t in tensors]
        height, width = tensors[0].shape[-2:]
    top = int(torch.randint(0, height - size + 1, ()))
    left = int(torch.randint(0, width - size + 1, ()))
    tensors = [t[..., top:top + size, left:left + size] for t in tensors]
    hflip, vflip = bool(torch.rand(()) < 0.5), bool(torch.rand(()) < 0.5)
    if hflip:
        tensors = [t.flip(-1) for t in tensors]
    if vflip:
        tensors = [t.flip(-2) for t in tensors]
    return [t.contiguous() for t in tensors], (hflip, vflip)


def _pad(tensor: torch.Tensor, pad_h: int, pad_w: int, ignore_index: int) -> torch.Tensor:
    """Pad bottom/right: images ``[C, H, W]`` with 0, masks ``[H, W]`` with ``ignore_index``."""
    if tensor.dim() == 3:
        return F.pad(tensor, (0, pad_w, 0, pad_h))
    return F.pad(tensor[None], (0, pad_w, 0, pad_h), value=ignore_index)[0]


def pad_collate(multiple: int, ignore_index: int) -> Callable[[list], list]:
    """Collate ``(tensor, ...)`` samples of different sizes: pad images with 0 and masks with ``ignore_index`` to the
    largest size in the batch rounded up to ``multiple`` (the patch size); non-tensor fields become lists."""
    def collate(samples: list) -> list:
        fields = list(zip(*samples))
        sized = [t for field in fields for t in field if isinstance(t, torch.Tensor) and t.dim() in (2, 3)]
        height = max(t.shape[-2] for t in sized)
        width = max(t.shape[-1] for t in sized)
        height, width = height + (-height) % multiple, width + (-width) % multiple
        out = []
        for field in fields:
            if isinstance(field[0], torch.Tensor) and field[0].dim() in (2, 3):
                out.append(torch.stack([_pad(t, height - t.shape[-2], width - t.shape[-1], ignore_index)
                                        for t in field]))
            elif isinstance(field[0], torch.Tensor):
                out.append(torch.stack(field))
            else:
                out.append(list(field))
        return out

    return collate


def pad_to_multiple(images: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad ``[B, C, H, W]`` on the bottom/right to multiples of ``multiple``; returns the original size."""
    height, width = images.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    return (F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images), (height, width)


def infer_num_classes(mask_paths: Sequence[Path], ignore_index: int) -> int:
    """One more than the largest class id in the masks (``ignore_index`` excluded)."""
    largest = -1
    for path in mask_paths:
        mask = read_mask(path)
        mask = mask[mask != ignore_index]
        if mask.numel():
            largest = max(largest, int(mask.max()))
    if largest < 0:
        raise ValueError("every mask is empty or ignored; pass --num-classes")
    return largest + 1


def class_names_arg(value: str | None, num_classes: int, presets: dict[str, Sequence[str]] | None = None) -> list[str]:
    """Class names from ``--class-names`` (comma-separated, or a preset name); missing ones are ``class_<i>``."""
    names: list[str] = []
    if value:
        names = list(presets[value]) if presets and value in presets else [n.strip() for n in value.split(",")]
    if len(names) > num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes; pass --num-classes {len(names)}")
    return names + [f"class_{i}" for i in range(len(names), num_classes)]


def normalise_batch(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Re-export of :func:`geolink.eval.encoders.normalise` for scripts."""
    return normalise(images, mean, std)
