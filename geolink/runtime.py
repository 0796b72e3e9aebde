"""What every job shares at run time: device, rank and world, precision, seeds, normalisation, schedule, AdamW groups.

Pretraining, evaluation, fine-tuning, the examples and the apps all use these, so each rule has one meaning:

- **precision** ``"auto"`` is bf16 on GPUs that support it, fp16 on other GPUs, fp32 on CPU
  (:func:`resolve_precision`);
- **device** ``"auto"`` (or None) is CUDA when available, else CPU (:func:`resolve_device`);
- **rank / world** come from an initialised ``torch.distributed`` group, else from ``torchrun``'s ``RANK`` /
  ``WORLD_SIZE`` / ``LOCAL_RANK`` (:func:`rank_and_world`);
- **seeds** derived from a run seed use the named strides below, never bare numbers, so a stream of random
  numbers can be traced back to what seeded it;
- **normalisation** is ``(x - mean) / std`` per band (:func:`normalise`) with ImageNet statistics by default;
- **schedule** is linear warmup then cosine decay (:func:`warmup_cosine`);
- **job-config fields** carry their command-line help in their metadata (:func:`option`);
- **CPU cores** are shared by independent pieces of work on one torch thread each when single ops keep them poorly
  busy (:func:`run_single_threaded`);
- **parameter groups** exempt from weight decay every 1-D tensor and whatever the models' ``no_weight_decay()``
  name (:func:`param_groups`).
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import random
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import field
from enum import Enum
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from geolink.errors import ConfigError, InputError, MissingDependencyError

T = TypeVar("T")

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# ---------------------------------------------------------------------------------------------------------- seeds
#: stride between epochs when a data-order permutation is seeded from (run seed, epoch)
EPOCH_SEED_STRIDE = 100_003
#: stride between ranks when a rank's dropout stream is seeded from (run seed, rank)
RANK_SEED_STRIDE = 7_919
#: stride between run seeds when per-sample mask seeds are derived from (run seed, stream position)
SAMPLE_SEED_STRIDE = 1_000_003
#: stride between samples when an augmentation seed is derived from (seed, sample index, draw)
DRAW_SEED_STRIDE = 1_000_033
#: stride between epochs when a fine-tuning epoch reseeds from (run seed, epoch)
FINETUNE_EPOCH_STRIDE = 1_000


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of the data-order permutation of ``epoch`` in a run seeded with ``seed``."""
    return seed * EPOCH_SEED_STRIDE + epoch


def rank_seed(seed: int, rank: int) -> int:
    """Seed of rank ``rank``'s own random stream (dropout) in a run seeded with ``seed``."""
    return seed * RANK_SEED_STRIDE + rank


def sample_seed(seed: int, index: int, draw: int) -> int:
    """Augmentation seed of draw ``draw`` of sample ``index``: independent of workers, processes and batches."""
    return ((seed * SAMPLE_SEED_STRIDE + index) * DRAW_SEED_STRIDE + draw) % (2**63 - 1)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------ device and ranks
def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` or ``"auto"``: CUDA when available, else CPU; anything else as ``torch.device`` reads it.

    Raises:
        InputError: the name is not a device, or names CUDA on a machine without it.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise InputError(f"device {device!r} is not a device name (use cpu, cuda, cuda:1 or auto)") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asks for CUDA, which this machine does not have (use cpu or auto)")
    return resolved


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: the initialised process group, else ``$RANK`` / ``$WORLD_SIZE``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's index on its machine (``$LOCAL_RANK``, set by ``torchrun``; 0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """True on rank 0 (and in a single-process run)."""
    return rank_and_world()[0] == 0


# ------------------------------------------------------------------------------------------------------- precision
class Precision(str, Enum):
    """Autocast precision of a job. ``AUTO``: bf16 on GPUs that support it, fp16 on other GPUs, fp32 on CPU."""

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


PRECISIONS = tuple(p.value for p in Precision)


def resolve_precision(precision: Precision | str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``; ``None`` means full fp32 (no autocast).

    Raises:
        ConfigError: an unknown precision, or fp16 on a CPU (CPU autocast is bf16 only).
    """
    try:
        precision = Precision(precision)
    except ValueError:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}") from None
    device = torch.device(device)
    if precision is Precision.AUTO:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    if precision is Precision.FP16 and device.type == "cpu":
        raise ConfigError("precision fp16 needs a CUDA device; on a CPU use bf16 or fp32")
    return {Precision.FP32: None, Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """``torch.autocast`` for a dtype from :func:`resolve_precision` (disabled when it is None)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


# --------------------------------------------------------------------------------------------------- normalisation
def normalise(images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """``(images - mean) / std`` per band, for ``[C, H, W]`` or ``[B, C, H, W]`` images: uint8 images are first
    scaled by 1/255, any other dtype is taken to be in ``[0, 1]`` already. Computed in float32 (float64 stays
    float64) as one multiply-add, ``images × (1 / std) + (-mean / std)``.

    Raises:
        InputError: the number of bands differs from the length of ``mean`` / ``std``.
    """
    channels = images.shape[-3]
    if len(mean) != channels or len(std) != channels:
        raise InputError(f"normalisation has {len(mean)} mean and {len(std)} std values but the images have "
                         f"{channels} bands; pass one value per band")
    scale, shift = _normalise_affine(tuple(map(float, mean)), tuple(map(float, std)), images.dtype == torch.uint8)
    floats = images.double() if images.dtype == torch.float64 else images.float()
    return torch.addcmul(shift.to(floats), floats, scale.to(floats))


@functools.lru_cache(maxsize=64)
def _normalise_affine(mean: tuple[float, ...], std: tuple[float, ...], from_uint8: bool
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` ``[C, 1, 1]`` float32 of :func:`normalise` (made once per statistics)."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    scale = 1.0 / std_t
    return (scale / 255.0 if from_uint8 else scale), -mean_t / std_t


# -------------------------------------------------------------------------------------------------------- schedule
def warmup_cosine(step: int, peak: float, warmup_steps: int, total_steps: int, floor: float = 0.0) -> float:
    """Learning rate of optimisation step ``step`` (0-based): linear warmup to ``peak`` over ``warmup_steps``
    (step 0 already gets ``peak / warmup_steps``), then half a cosine down to ``floor`` at ``total_steps``."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ------------------------------------------------------------------------------------------------ parameter groups
def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full parameter names that the model's modules exempt from weight decay through their ``no_weight_decay()``
    (timm's convention: names relative to the module that declares them)."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        declared = getattr(module, "no_weight_decay", None)
        if callable(declared):
            names.update(f"{prefix}.{name}" if prefix else name for name in declared())
    return names


def param_groups(model: nn.Module, weight_decay: float, lr: float | None = None,
                 lr_scales: dict[nn.Module, float] | None = None) -> list[dict[str, Any]]:
    """AdamW parameter groups: no weight decay on 1-D tensors (norms, biases) and on what ``no_weight_decay()``
    names (tokens, position tables); optionally a learning-rate scale per sub-module.

    Args:
        model: the model whose trainable parameters are grouped (frozen ones are left out).
        weight_decay: decay of the decayed groups.
        lr: base learning rate; when given, each group gets ``lr`` (scaled) and ``base_lr`` entries.
        lr_scales: ``{sub-module: factor}``, e.g. ``{encoder: 0.1}`` for a pretrained encoder under a new head.

    Returns:
        Non-empty groups, decayed before not decayed, unscaled before scaled.
    """
    exempt = no_weight_decay_names(model)
    scale_of = {id(p): scale for module, scale in (lr_scales or {}).items() for p in module.parameters()}
    grouped: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            no_decay = parameter.ndim <= 1 or name in exempt
            grouped.setdefault((scale_of.get(id(parameter), 1.0), no_decay), []).append(parameter)
    groups = []
    for (scale, no_decay), params in sorted(grouped.items(), key=lambda item: (item[0][0] != 1.0, item[0][1])):
        group: dict[str, Any] = {"params": params, "weight_decay": 0.0 if no_decay else weight_decay}
        if lr is not None:
            group["lr"] = group["base_lr"] = lr * scale
        groups.append(group)
    return groups


# ------------------------------------------------------------------------------------------------------ CPU cores
_POOL: ThreadPoolExecutor | None = None  # one worker per CPU core but the caller's, shared by every call
_POOL_LOCK = threading.Lock()


def run_single_threaded(calls: Sequence[Callable[[], T]]) -> list[T]:
    """Run ``calls`` at the same time, each on its own thread with one torch intra-op thread; their results, in order
    (more calls than CPU cores wait for a free worker).

    For CPU inference made of many small kernels (a text model on a few hundred tokens: few-token attention, layer
    norms, Python between ops), one op spread over several threads keeps the cores poorly busy; independent shares
    of the work, one per core, keep them all busy (``benchmarks/profile_tag_text.py`` shows the parts of a text
    model's time). The calling thread runs the first call. Matrix products, attention and layer norms compute each
    output element on one thread, so a share gives what it gives in a plain call (tested for the text models).

    torch's thread count is process-wide: it is 1 until every call has returned, then restored, so other threads
    that start torch work meanwhile run single-threaded too.
    """
    if len(calls) <= 1:
        return [call() for call in calls]
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max(1, (os.cpu_count() or 2) - 1), thread_name_prefix="geolink-cpu")
        pool = _POOL

    def single_threaded(call: Callable[[], T]) -> T:
        torch.set_num_threads(1)  # this thread's intra-op threads
        return call()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    futures = [pool.submit(single_threaded, call) for call in calls[1:]]
    try:
        first = calls[0]()
        return [first, *(future.result() for future in futures)]
    finally:
        wait(futures)
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ job-config fields
class Engine(str, Enum):
    """Where a job's per-item work runs: ``local`` (this process and its workers) or ``ray`` (a Ray cluster, started
    locally when none is connected; ``pip install geolink[distributed]``)."""

    LOCAL = "local"
    RAY = "ray"


def require_module(module: str, extra: str, purpose: str = "this") -> Any:
    """Import an optional dependency, or raise naming the geolink extra that installs it.

    Args:
        module: the module to import, e.g. ``"rasterio"`` or ``"pyarrow.parquet"``.
        extra: the geolink extra that installs it, e.g. ``"embed"``.
        purpose: what needs it, for the message (e.g. ``"reading rasters"``).

    Raises:
        MissingDependencyError: the module is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(f"{module.partition('.')[0]} is needed for {purpose}; install it with "
                                     f"`pip install geolink[{extra}]`") from err


def import_ray() -> Any:
    """The ``ray`` module (with ``ray.data``), started locally when no cluster is connected.

    Raises:
        MissingDependencyError: Ray is not installed.
    """
    require_module("ray.data", "distributed", "engine ray")
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    return ray


def option(default: Any, help: str, **metadata: Any) -> Any:
    """A job-config dataclass field with a default and its help (``geolink`` derives the field's flag from it; the
    other metadata keys, ``flag``, ``positional`` and ``metavar``, are described in :mod:`geolink.cli`)."""
    return field(default=default, metadata={"help": help, **metadata})
