"""Named architectures and pretrained tags: ``list_models``, ``list_pretrained``, ``create_model``, ``load_model``.

An **architecture** is a JSON file in ``geolink/configs/`` whose keys are exactly the constructor kwargs of
``GeoLinkForPretraining``; every component (``"fusion"``, ``"image"``, ``"osm"``) is built from the subset of
those kwargs its own constructor takes. A **pretrained tag** (``"<architecture>.<tag>"``, timm style) records where
the weights live (a Hub repo id or a local folder) and how to use them (normalisation, input size, bands, text
model). Weights always load strictly.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from geolink.hub import CONFIG_NAME
from geolink.models import GeoLinkForPretraining, GeoLinkFusionEncoder, GeoLinkImageEncoder, GeoLinkOSMEncoder
from geolink.models.image import IMAGENET_MEAN, IMAGENET_STD

CONFIG_DIR = Path(__file__).parent / "configs"

COMPONENTS: dict[str, type[nn.Module]] = {
    "pretraining": GeoLinkForPretraining,
    "fusion": GeoLinkFusionEncoder,
    "image": GeoLinkImageEncoder,
    "osm": GeoLinkOSMEncoder,
}
_CLASSES = {cls.__name__: cls for cls in COMPONENTS.values()}


@dataclass(frozen=True)
class PretrainedTag:
    """Where a set of pretrained weights lives and how to feed it.

    Attributes:
        location: Hub repo id (``"org/name"``) or local folder holding a ``save_pretrained`` folder.
        revision: Hub revision (branch, tag or commit).
        holds: the component class saved there (``"GeoLinkForPretraining"``, ..., ``"GeoLinkImageEncoder"``).
        mean, std: per-band input normalisation.
        input_size: ``(bands, height, width)`` the weights were trained at.
        bands: band names.
        text_model: Hugging Face id of the text model the OSM tag features must come from, and its width.
        license: weight licence.
        paper: reference.
        origin: how the weights were produced.
    """

    location: str
    revision: str = "main"
    holds: str = "GeoLinkForPretraining"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    input_size: tuple[int, int, int] = (3, 224, 224)
    bands: tuple[str, ...] = ("red", "green", "blue")
    text_model: str | None = "openai/clip-vit-base-patch16"
    text_dim: int | None = 512
    license: str = "mit"
    paper: str = "arXiv:2509.26016"
    origin: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


ASSETS_DIR = Path(__file__).parent / "assets"

_PRETRAINED: dict[str, PretrainedTag] = {
    "geolink_tiny.demo": PretrainedTag(
        location=str(ASSETS_DIR / "geolink_tiny_demo"),
        holds="GeoLinkFusionEncoder",
        text_model="sentence-transformers/all-MiniLM-L6-v2",
        text_dim=384,
        origin="Pretrained with `geolink pretrain` on the five official GeoLink example tiles bundled with geolink "
               "(augmented); shipped inside the package for the offline demo and tests. A demonstration, not a "
               "useful remote-sensing model: see its model card.",
    ),
    "geolink_vit_large_patch16_224.neurips2025": PretrainedTag(
        location="geolink/geolink_vit_large_patch16_224.neurips2025",
        origin="The official GeoLink NeurIPS 2025 multimodal release (ViT-L + OSM encoder), converted with "
               "`geolink convert` and published with `push_to_hub`.",
    ),
    "geolink_vit_large_patch16_224.neurips2025_unimodal": PretrainedTag(
        location="geolink/geolink_vit_large_patch16_224.neurips2025_unimodal",
        holds="GeoLinkImageEncoder",
        text_model=None,
        text_dim=None,
        origin="The official GeoLink NeurIPS 2025 unimodal ViT-L release, converted with `geolink convert` "
               "(a timm folder: `timm.create_model('hf-hub:<repo>', pretrained=True)` loads it too).",
    ),
}


def list_models() -> list[str]:
    """Registered architecture names, sorted."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.json"))


def list_pretrained() -> list[str]:
    """Registered ``architecture.tag`` names, sorted."""
    return sorted(_PRETRAINED)


def register_pretrained(name: str, tag: PretrainedTag) -> None:
    """Register (or replace) a pretrained tag, e.g. for weights you published yourself."""
    architecture, _, tag_name = name.partition(".")
    if not tag_name or architecture not in list_models():
        raise ValueError(f"pretrained names are '<architecture>.<tag>' with a registered architecture "
                         f"({', '.join(list_models())}); got {name!r}")
    _PRETRAINED[name] = tag


def get_pretrained_tag(name: str) -> PretrainedTag:
    """The :class:`PretrainedTag` of ``architecture.tag``."""
    if name not in _PRETRAINED:
        raise KeyError(f"unknown pretrained model {name!r}; known: {', '.join(list_pretrained()) or 'none'}")
    return _PRETRAINED[name]


def get_model_config(name: str | os.PathLike) -> dict[str, Any]:
    """The constructor kwargs of an architecture (a registered name, with or without ``.tag``, or a JSON path)."""
    path = Path(name)
    if path.suffix == ".json" and path.is_file():
        return json.loads(path.read_text())
    architecture = str(name).partition(".")[0]
    config_path = CONFIG_DIR / f"{architecture}.json"
    if not config_path.is_file():
        raise KeyError(f"unknown architecture {architecture!r}; known: {', '.join(list_models())} "
                       "(or pass the path of a config JSON)")
    return json.loads(config_path.read_text())


def component_kwargs(component: str, config: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``config`` that the constructor of ``component`` takes."""
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {sorted(COMPONENTS)}, got {component!r}")
    parameters = inspect.signature(COMPONENTS[component].__init__).parameters
    return {k: v for k, v in config.items() if k in parameters}


def create_model(name: str | os.PathLike, pretrained: bool | str | os.PathLike = False, component: str = "pretraining",
                 **overrides: Any) -> nn.Module:
    """Build a model by architecture name, optionally with pretrained weights.

    Args:
        name: ``"geolink_vit_large_patch16_224"``, ``"geolink_vit_large_patch16_224.neurips2025"`` (a pretrained
            tag) or the path of a config JSON.
        pretrained: ``True`` loads the tag's weights (from the Hub or the local Hugging Face cache; set
            ``HF_HUB_OFFLINE=1`` to stay offline); a folder path or Hub repo id loads from there instead.
        component: ``"pretraining"`` (everything), ``"fusion"``, ``"image"`` or ``"osm"``.
        **overrides: constructor kwargs replacing the config's (e.g. ``drop_path_rate=0.1``, ``text_dim=384``).

    Returns:
        The model; in eval mode when weights were loaded.
    """
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {sorted(COMPONENTS)}, got {component!r}")
    config = get_model_config(name)
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise TypeError(f"unknown config keys {unknown}; valid keys: {', '.join(sorted(config))}")
    if not pretrained:
        return COMPONENTS[component](**component_kwargs(component, {**config, **overrides}))
    if pretrained is True:
        tag = get_pretrained_tag(str(name))
        return load_model(tag.location, component=component, revision=tag.revision, **overrides)
    return load_model(pretrained, component=component, **overrides)


def load_model(location: str | os.PathLike, component: str | None = None, revision: str | None = None,
               **overrides: Any) -> nn.Module:
    """Load any geolink ``save_pretrained`` folder or Hub repo, whatever class it holds.

    Args:
        location: folder or Hub repo id.
        component: return this component (``"fusion"``, ``"image"``, ``"osm"``, ``"pretraining"``), extracted from a
            larger saved model when needed; ``None`` returns what the folder holds.
        revision: Hub revision.
        **overrides: constructor kwargs replacing the saved ones.
    """
    config = _read_config(location, revision)
    held = config.get("model_class", "GeoLinkImageEncoder" if "pretrained_cfg" in config else None)
    if held not in _CLASSES:
        raise ValueError(f"{location} does not hold a geolink model (config.json has no known model_class)")
    model = _CLASSES[held].from_pretrained(str(location), revision=revision, **overrides)
    if component is None or COMPONENTS[component].__name__ == held:
        return model
    extracted = extract_component(model, component)
    if extracted is None:
        raise ValueError(f"{location} holds a {held}, which has no {component!r} component")
    return extracted


def extract_component(model: nn.Module, component: str) -> nn.Module | None:
    """The ``component`` sub-model of a pretraining or fusion model (None when it has none)."""
    fusion = model.fusion_encoder if isinstance(model, GeoLinkForPretraining) else model
    if not isinstance(fusion, GeoLinkFusionEncoder):
        return None
    return {"fusion": fusion, "image": fusion.image_encoder, "osm": fusion.osm_encoder}.get(component)


def _read_config(location: str | os.PathLike, revision: str | None) -> dict[str, Any]:
    if Path(location).is_dir():
        path = Path(location) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{location} has no {CONFIG_NAME}: not a geolink model folder")
        return json.loads(path.read_text())
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(str(location), CONFIG_NAME, revision=revision)).read_text())
    except LocalEntryNotFoundError as error:
        raise FileNotFoundError(
            f"{location} is neither a local folder nor in the Hugging Face cache, and the Hub cannot be reached "
            f"({type(error).__name__}). Download it once with network access, or convert the official release "
            "yourself: `geolink convert official.pth <dir>` and pass `pretrained='<dir>'`.") from None
