"""Encoders for evaluation: resolving a model spec, global image features, frozen feature extraction.

One place decides how any supported encoder turns images into a global vector, so geolink encoders and plain timm
models are compared under the same protocol:

- ``GeoLinkImageEncoder``: :meth:`~geolink.models.image.GeoLinkImageEncoder.pooled_features` (``"avg"`` = mean of
  the final-normed patch tokens, GeoLink's contrastive pooling; ``"token"`` = the cls token);
- timm ViTs (anything with ``num_prefix_tokens``): the same two poolings on ``forward_features``;
- other timm models (CNNs): ``forward_head(..., pre_logits=True)`` (their own global pool);
- anything else: ``model(images)`` must return ``[B, D]``.

Model specs are strings: a geolink folder, a pretrained tag (``"geolink_vit_large_patch16_224.neurips2025"``), a
registered architecture (random weights; for tests) or ``"timm:<name>"``. Devices, precision and normalisation follow
:mod:`geolink.runtime`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
from torch import nn
from tqdm.auto import tqdm

from geolink.errors import DataError, InputError, MissingWeightsError
from geolink.models.heads import global_features
from geolink.models.image import GeoLinkImageEncoder
from geolink.runtime import IMAGENET_MEAN, IMAGENET_STD, autocast, normalise, resolve_device

logger = logging.getLogger(__name__)


class Pool(str, Enum):
    """How an encoder's tokens become one global vector (see :func:`encode_images`)."""

    AVG = "avg"
    TOKEN = "token"
    DEFAULT = "default"


@dataclass
class LoadedEncoder:
    """A resolved encoder and how to feed it.

    Attributes:
        model: the module (in eval mode).
        name: a display name.
        mean, std: per-band input normalisation for images in ``[0, 1]``.
        pretrained: whether weights were loaded (False = random initialisation).
    """

    model: nn.Module
    name: str
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    pretrained: bool = True


def load_encoder(spec: str, component: str = "image", timm_pretrained: bool = True, warn: bool = True,
                 **overrides: Any) -> LoadedEncoder:
    """Resolve a model spec to an encoder.

    Args:
        spec: a pretrained tag ``"<architecture>.<tag>"``; a geolink ``save_pretrained`` folder, Hub repo or
            official ``.pth`` checkpoint (converted once and cached, see :func:`geolink.load_model`); a
            registered architecture name (random weights — a warning is printed); or ``"timm:<model name>"``
            (only for ``component="image"``).
        component: ``"image"`` or ``"fusion"`` (or any :func:`geolink.create_model` component).
        timm_pretrained: for ``"timm:"`` specs, load timm's pretrained weights: from the local Hugging Face cache,
            else downloaded once (logged at INFO level).
        warn: warn (``UserWarning``) when the weights are random.
        **overrides: for registered architectures, config sections (``image={"img_size": 64}``, see
            :func:`geolink.create_model`); for timm models, ``timm.create_model`` kwargs (``img_size=64``).

    Returns:
        The :class:`LoadedEncoder` (model in eval mode).

    Raises:
        InputError: the spec names nothing geolink knows.
        MissingWeightsError: timm's pretrained weights are neither cached nor downloadable (offline).
    """
    from geolink import registry

    if spec.startswith("timm:"):
        if component != "image":
            raise InputError(f"model {spec!r} is a timm model; only component='image' can be a timm model")
        import timm

        name = spec[len("timm:"):]
        if timm_pretrained and not _timm_weights_cached(name) and not huggingface_hub.constants.HF_HUB_OFFLINE:
            logger.info("downloading the pretrained weights of timm model %s (once: later runs use the local cache)",
                        name)
        try:
            model = timm.create_model(name, pretrained=timm_pretrained, num_classes=0, **overrides)
        except OSError as error:  # not cached and no network: LocalEntryNotFoundError, URLError, ConnectionError
            raise MissingWeightsError(
                f"timm model {name!r}: its pretrained weights are not in the local Hugging Face cache and cannot be "
                f"downloaded ({type(error).__name__}); download them once with network access, or use random "
                "weights: timm_pretrained=False (geolink eval --no-timm-pretrained)") from error
        cfg = model.pretrained_cfg or {}
        if warn and not timm_pretrained:
            warnings.warn(f"{name} has random weights (timm pretrained=False)", stacklevel=2)
        return LoadedEncoder(model.eval(), name, tuple(cfg.get("mean", IMAGENET_MEAN)),
                             tuple(cfg.get("std", IMAGENET_STD)), timm_pretrained)
    if spec in registry.list_pretrained():  # a registered tag always means the registry's, never a folder
        tag = registry.get_pretrained_tag(spec)
        model = registry.create_model(spec, pretrained=True, component=component)
        return LoadedEncoder(model.eval(), spec, tuple(tag.mean), tuple(tag.std))
    if Path(spec).is_dir() or Path(spec).suffix == ".pth" or ("/" in spec and Path(spec).suffix != ".json"):
        model = registry.load_model(spec, component=component)  # a folder, a Hub repo, or an official .pth
        return LoadedEncoder(model.eval(), Path(spec).name or spec, *_norm_of(model))
    if spec.partition(".")[0] in registry.list_models() or Path(spec).suffix == ".json":
        if "." in spec and Path(spec).suffix != ".json":
            raise InputError(f"model {spec!r} is not a known pretrained tag (known: "
                             f"{', '.join(registry.list_pretrained())})")
        model = registry.create_model(spec, component=component, **overrides)
        if warn:
            warnings.warn(f"{spec} is an architecture name, so its weights are random; pass a pretrained tag "
                          f"({', '.join(registry.list_pretrained())}) or a converted folder for real results",
                          stacklevel=2)
        return LoadedEncoder(model.eval(), spec, pretrained=False)
    raise InputError(f"cannot resolve model {spec!r} (pass a geolink folder, a pretrained tag "
                     f"({', '.join(registry.list_pretrained())}), an architecture "
                     f"({', '.join(registry.list_models())}) or 'timm:<timm model name>')")


def _timm_weights_cached(name: str) -> bool:
    """Whether timm's pretrained weights of ``name`` are in the local Hugging Face cache (weights timm fetches from
    other URLs count as not cached)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    repo = getattr(cfg, "hf_hub_id", None)
    return bool(repo) and any(isinstance(huggingface_hub.try_to_load_from_cache(repo, filename), str)
                              for filename in ("model.safetensors", "pytorch_model.bin"))


def _norm_of(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    image = model if isinstance(model, GeoLinkImageEncoder) else getattr(model, "image_encoder", None)
    if isinstance(image, GeoLinkImageEncoder):
        cfg = image.hub_config()["pretrained_cfg"]
        return tuple(cfg["mean"]), tuple(cfg["std"])
    return IMAGENET_MEAN, IMAGENET_STD


def encode_images(model: nn.Module, images: torch.Tensor, pool: Pool | str = Pool.AVG) -> torch.Tensor:
    """Global features ``[B, D]`` of normalised images ``[B, C, H, W]`` (see the module docstring for the rules).

    Args:
        model: a ``GeoLinkImageEncoder``, a timm model or a module returning ``[B, D]``.
        images: normalised input.
        pool: ``"avg"`` (mean of patch tokens), ``"token"`` (cls token) or ``"default"`` (the model's own head
            pooling; for geolink encoders the same as ``"avg"``).
    """
    return global_features(model, images, pool)


@torch.no_grad()
def extract_features(model: nn.Module, data: Iterable, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None, pool: Pool | str = Pool.AVG,
                     device: torch.device | str | None = None,
                     batch_size: int = 64, num_workers: int = 0, amp_dtype: torch.dtype | None = None,
                     progress: bool = True, desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen global features of a labelled image set.

    Args:
        model: any encoder :func:`encode_images` accepts; put in eval mode here.
        data: a ``Dataset`` of ``(image [C, H, W] in [0, 1], label)`` (batched here) or an iterable of
            ``(images [B, C, H, W], labels [B])`` batches (e.g. a ``DataLoader``).
        mean, std: normalisation applied on the device; ``None`` = images are already normalised.
        pool: see :func:`encode_images`.
        device: a device name or ``"auto"``/None (CUDA when available; :func:`geolink.runtime.resolve_device`).
        batch_size, num_workers: used only when ``data`` is a ``Dataset``.
        amp_dtype: autocast dtype (:func:`geolink.runtime.resolve_precision`, e.g. ``torch.bfloat16``); features are
            returned as float32.
        progress: show a tqdm bar.
        desc: the bar's label.

    Returns:
        ``features [N, D]`` (float32, CPU) and ``labels [N]`` (int64, CPU).
    """
    device = resolve_device(device)
    if isinstance(data, torch.utils.data.Dataset):
        data = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    model = model.to(device).eval()
    features, labels = [], []
    for images, targets in tqdm(data, desc=desc, disable=not progress, leave=False):
        images = images.to(device, non_blocking=True).float()
        if mean is not None and std is not None:
            images = normalise(images, mean, std)
        with autocast(device, amp_dtype):
            out = encode_images(model, images, pool)
        features.append(out.float().cpu())
        labels.append(torch.as_tensor(targets).long().cpu())
    if not features:
        raise DataError("the dataset holds no samples to extract features from (check that it has images)")
    return torch.cat(features), torch.cat(labels)

