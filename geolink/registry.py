"""Named architectures and pretrained tags: ``list_models``, ``list_pretrained``, ``create_model``, ``load_model``.

An **architecture** is a JSON file in ``geolink/configs/`` with one section per sub-model, each exactly one
constructor's kwargs (every parameter declared once)::

    {"image": {...}, "osm": {...}, "fusion": {...}, "pretraining": {...}}

    GeoLinkImageEncoder(**image)                  GeoLinkOSMEncoder(**osm)
    GeoLinkFusionEncoder(image=image, osm=osm, **fusion)
    GeoLinkForPretraining(image=image, osm=osm, fusion=fusion, **pretraining)

so every component (``"pretraining"``, ``"fusion"``, ``"image"``, ``"osm"``) is built from its own section and the
sections of the sub-models it holds. Overrides are section dicts merged into the sections
(``create_model("geolink_tiny", osm={"text_dim": 512})``; :func:`nest_overrides` turns ``{"osm.text_dim": 512}``
into that form); an unknown section or key is a :class:`~geolink.errors.ConfigError` naming it. A saved model's
``config.json`` holds the same sections (its constructor kwargs), so overrides work the same on ``load_model``.

A **pretrained tag** (``"<architecture>.<tag>"``, timm style) records where the weights live (a Hub repo id or a
local folder) and how to use them (normalisation, input size, bands, text model). Weights always load strictly.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from geolink.errors import ConfigError, InputError, MissingInputError, MissingWeightsError
from geolink.hub import CONFIG_NAME
from geolink.models import COMPONENTS, Component, extract_component
from geolink.runtime import IMAGENET_MEAN, IMAGENET_STD

CONFIG_DIR = Path(__file__).parent / "configs"


__all__ = ["COMPONENTS", "Component", "PretrainedTag", "create_model", "extract_component", "get_model_config",
           "get_pretrained_tag", "list_models", "list_pretrained", "load_model", "nest_overrides",
           "register_pretrained"]

SECTIONS = tuple(COMPONENTS)
#: the sections a component's constructor takes as dicts (the sub-models it holds)
NESTED_SECTIONS: dict[str, tuple[str, ...]] = {
    "image": (),
    "osm": (),
    "fusion": ("image", "osm"),
    "pretraining": ("image", "osm", "fusion"),
}
_CLASSES = {cls.__name__: name for name, cls in COMPONENTS.items()}


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
        holds="GeoLinkForPretraining",
        text_model="sentence-transformers/all-MiniLM-L6-v2",
        text_dim=384,
        origin="Pretrained by examples/make_demo_model.py (`geolink pretrain` on the five official GeoLink example "
               "tiles bundled with geolink, augmented, then exported in float16 with its heads); shipped inside the "
               "package for the offline demo and tests. A demonstration, not a useful remote-sensing model: see its "
               "model card.",
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
    """Register (or replace) a pretrained tag, e.g. for weights you published yourself.

    Raises:
        ConfigError: ``name`` is not ``<registered architecture>.<tag>``.
    """
    architecture, _, tag_name = name.partition(".")
    if not tag_name or architecture not in list_models():
        raise ConfigError(f"pretrained names are '<architecture>.<tag>' with a registered architecture "
                          f"({', '.join(list_models())}); got {name!r}")
    _PRETRAINED[name] = tag


def get_pretrained_tag(name: str) -> PretrainedTag:
    """The :class:`PretrainedTag` of ``architecture.tag``.

    Raises:
        ConfigError: no such tag.
    """
    if name not in _PRETRAINED:
        raise ConfigError(f"unknown pretrained model {name!r}; known: {', '.join(list_pretrained()) or 'none'}")
    return _PRETRAINED[name]


# ------------------------------------------------------------------------------------------------- config sections
def section_defaults(section: str) -> dict[str, Any]:
    """The kwargs a section may hold and their constructor defaults (``inspect.Parameter.empty`` when required)."""
    nested = NESTED_SECTIONS[section]
    return {name: parameter.default
            for name, parameter in inspect.signature(COMPONENTS[section].__init__).parameters.items()
            if name != "self" and name not in nested}


def _sections_holding(key: str) -> list[str]:
    return [section for section in SECTIONS if key in section_defaults(section)]


def _check_value(section: str, key: str, value: Any, default: Any, source: str) -> None:
    """Refuse a value whose type cannot be the parameter's (judged by the type of its default)."""
    if default is None or default is inspect.Parameter.empty:
        return
    if isinstance(default, bool):
        valid = isinstance(value, bool)
    elif isinstance(default, float):
        valid = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        valid = isinstance(value, type(default)) and not isinstance(value, bool)
    if not valid:
        raise ConfigError(f"{source}: {section}.{key} must be of type {type(default).__name__} (like its default "
                          f"{default!r}); got {value!r}")


def validate_sections(sections: Mapping[str, Any], source: str) -> None:
    """Check that ``sections`` has only known sections, each a dict of known keys with values of the right type.

    Raises:
        ConfigError: naming the section or key at fault and listing the valid ones.
    """
    for section, values in sections.items():
        if section not in SECTIONS:
            holders = _sections_holding(section)
            hint = f"; {section!r} is a key of the {holders[0]!r} section: {holders[0]}={{{section!r}: ...}}" \
                if holders else ""
            raise ConfigError(f"{source}: unknown config section {section!r}; valid sections: "
                              f"{', '.join(SECTIONS)}{hint}")
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source}: section {section!r} must be a dict of {COMPONENTS[section].__name__} "
                              f"kwargs; got {values!r}")
        defaults = section_defaults(section)
        for key, value in values.items():
            if key not in defaults:
                holders = _sections_holding(key)
                hint = f" ({key!r} belongs to the {' / '.join(holders)} section)" if holders else ""
                raise ConfigError(f"{source}: unknown key {key!r} in section {section!r}{hint}; valid keys: "
                                  f"{', '.join(defaults)}")
            _check_value(section, key, value, defaults[key], source)


def merge_sections(sections: Mapping[str, Mapping[str, Any]], overrides: Mapping[str, Any],
                   source: str = "overrides") -> dict[str, dict[str, Any]]:
    """``sections`` with each override section's keys replacing (or adding to) that section's; both validated.

    Args:
        sections: ``{section: {key: value}}``, e.g. from :func:`get_model_config`.
        overrides: ``{section: {key: value}}``, e.g. ``{"osm": {"text_dim": 512}}``.
        source: what the overrides are, for error messages.

    Returns:
        A new dict; the inputs are not modified.
    """
    validate_sections(overrides, source)
    unknown = sorted(set(overrides) - set(sections))
    if unknown:
        raise ConfigError(f"{source}: the model has no {', '.join(map(repr, unknown))} section; its sections are "
                          f"{', '.join(sections)}")
    merged = {section: dict(copy.deepcopy(values)) for section, values in sections.items()}
    for section, values in overrides.items():
        merged[section].update(copy.deepcopy(dict(values)))
    return merged


def nest_overrides(flat: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Dotted override keys to section dicts: ``{"osm.text_dim": 384} -> {"osm": {"text_dim": 384}}`` (the
    trainer's ``--set osm.text_dim=384``). Sections and keys are checked by :func:`create_model`.

    Raises:
        ConfigError: a key that is not ``<section>.<key>``.
    """
    nested: dict[str, dict[str, Any]] = {}
    for dotted, value in flat.items():
        section, dot, key = dotted.partition(".")
        if not (section and dot and key) or "." in key:
            holders = _sections_holding(dotted)
            hint = f" (did you mean {', '.join(f'{h}.{dotted}' for h in holders)}?)" if holders else ""
            raise ConfigError(f"override {dotted!r} is not '<section>.<key>' with a section among "
                              f"{', '.join(SECTIONS)}{hint}")
        nested.setdefault(section, {})[key] = value
    return nested


def get_model_config(name: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The sections of an architecture: a registered name (with or without ``.tag``) or the path of a JSON file.

    Returns:
        ``{"image": {...}, "osm": {...}, "fusion": {...}, "pretraining": {...}}`` (a copy); a JSON file may leave
        sections or keys out, which then take the constructors' defaults.

    Raises:
        ConfigError: an unknown architecture, a folder (use :func:`load_model`), or an invalid JSON.
        MissingInputError: a ``.json`` path that does not exist.
    """
    path = Path(name)
    architecture = str(name).partition(".")[0]
    if path.suffix == ".json":
        if not path.is_file():
            raise MissingInputError(f"no architecture JSON at {path}")
        config_path, source = path, str(path)
    elif architecture in list_models():
        config_path, source = CONFIG_DIR / f"{architecture}.json", f"architecture {architecture!r}"
    elif path.is_dir():
        raise ConfigError(f"{name} is a folder, not an architecture: load a saved model with "
                          f"geolink.load_model({str(name)!r}) or create_model('<architecture>', "
                          f"pretrained={str(name)!r})")
    else:
        raise ConfigError(f"unknown architecture {architecture!r}; known: {', '.join(list_models())} "
                          "(or pass the path of a config JSON)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{source} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{source} must hold a JSON object of sections ({', '.join(SECTIONS)})")
    validate_sections(config, source)
    return {section: dict(config.get(section, {})) for section in SECTIONS}


def component_arguments(component: str, sections: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Constructor kwargs of ``component``: its own section, plus the sections of the sub-models it holds as dicts."""
    return {**{name: dict(sections[name]) for name in NESTED_SECTIONS[component]}, **sections[component]}


def _check_component(component: str) -> None:
    if component not in COMPONENTS:
        raise ConfigError(f"component must be one of {', '.join(COMPONENTS)}; got {component!r}")


def create_model(name: str | os.PathLike, pretrained: bool | str | os.PathLike = False, component: str = "pretraining",
                 **overrides: dict[str, Any]) -> nn.Module:
    """Build a model by architecture name, optionally with pretrained weights.

    Args:
        name: ``"geolink_vit_large_patch16_224"``, ``"geolink_vit_large_patch16_224.neurips2025"`` (a pretrained
            tag) or the path of an architecture JSON. A saved model folder is not an architecture: use
            :func:`load_model` or ``pretrained=<folder>``.
        pretrained: ``True`` loads the tag's weights (from the Hub or the local Hugging Face cache; set
            ``HF_HUB_OFFLINE=1`` to stay offline); a folder path or Hub repo id loads from there instead.
        component: ``"pretraining"`` (everything), ``"fusion"``, ``"image"`` or ``"osm"``.
        **overrides: section dicts merged into the architecture's sections (or, with weights, into the saved
            config), e.g. ``image={"drop_path_rate": 0.1}``, ``osm={"text_dim": 384}``.

    Returns:
        The model; in eval mode when weights were loaded.

    Raises:
        ConfigError: an unknown architecture, tag, component, section or key (the message lists the valid ones).
        MissingWeightsError: ``pretrained`` weights that are neither local, cached nor reachable.
    """
    _check_component(component)
    if pretrained is True:
        tag = get_pretrained_tag(str(name))
        return load_model(tag.location, component=component, revision=tag.revision, **overrides)
    if pretrained:
        return load_model(pretrained, component=component, **overrides)
    sections = merge_sections(get_model_config(name), overrides)
    return COMPONENTS[component](**component_arguments(component, sections))


def load_model(location: str | os.PathLike, component: str | None = None, revision: str | None = None,
               **overrides: dict[str, Any]) -> nn.Module:
    """Load any geolink ``save_pretrained`` folder or Hub repo, whatever class it holds.

    Args:
        location: folder or Hub repo id.
        component: return this component (``"fusion"``, ``"image"``, ``"osm"``, ``"pretraining"``), extracted from a
            larger saved model when needed; ``None`` returns what the folder holds.
        revision: Hub revision.
        **overrides: section dicts merged into the saved config (the sections of the class the folder holds), e.g.
            ``image={"drop_path_rate": 0.1}``.

    Raises:
        InputError: the folder holds no geolink model, or a model without the requested component.
        ConfigError: an unknown override section or key, or a ``config.json`` that is not a geolink config.
        MissingWeightsError: the folder lacks ``config.json`` / weights, or the repo is not cached and the Hub cannot
            be reached.
    """
    if component is not None:
        _check_component(component)
    config = _read_config(location, revision)
    held = config.get("model_class", "GeoLinkImageEncoder" if "pretrained_cfg" in config else None)
    if held not in _CLASSES:
        raise InputError(f"{location} does not hold a geolink model (config.json has no known model_class)")
    own = _CLASSES[held]
    sections = merge_sections(saved_sections(own, config, f"{location}/{CONFIG_NAME}"), overrides)
    model = COMPONENTS[own].from_pretrained(str(location), revision=revision, **component_arguments(own, sections))
    if component is None or component == own:
        return model
    extracted = extract_component(model, component)
    if extracted is None:
        raise InputError(f"{location} holds a {held}, which has no {component!r} component")
    return extracted


def saved_sections(component: str, config: Mapping[str, Any], source: str) -> dict[str, dict[str, Any]]:
    """The sections of a saved ``config.json`` of ``component``: its nested sub-model sections and its own kwargs
    (an image folder's timm entries are left out).

    Raises:
        ConfigError: a key the constructor does not take (e.g. a flat config from before the nested format).
    """
    nested = NESTED_SECTIONS[component]
    own = {key: value for key, value in config.items() if key not in nested and key != "model_class"}
    if component == "image":  # a timm folder: timm's own entries sit next to geolink's kwargs
        own = {key: value for key, value in own.items() if key in section_defaults("image")}
    sections = {**{name: dict(config.get(name) or {}) for name in nested}, component: own}
    try:
        validate_sections(sections, source)
    except ConfigError as error:
        raise ConfigError(f"{error} (a config.json written before the nested config format? re-create the model "
                          "with the current geolink and save it again)") from None
    return sections


def _read_config(location: str | os.PathLike, revision: str | None) -> dict[str, Any]:
    if Path(location).is_dir():
        path = Path(location) / CONFIG_NAME
        if not path.is_file():
            raise MissingWeightsError(f"{location} has no {CONFIG_NAME}: not a geolink model folder "
                                      "(save one with `model.save_pretrained(dir)`)")
        return json.loads(path.read_text())
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return json.loads(Path(hf_hub_download(str(location), CONFIG_NAME, revision=revision)).read_text())
    except HFValidationError:
        raise MissingInputError(f"{location} is neither a model folder nor a Hub repo id ('org/name')") from None
    except LocalEntryNotFoundError as error:
        raise MissingWeightsError(
            f"{location} is neither a local folder nor in the Hugging Face cache, and the Hub cannot be reached "
            f"({type(error).__name__}). Download it once with network access, or convert the official release "
            "yourself: `geolink convert official.pth <dir>` and pass `pretrained='<dir>'`.") from None
    except (RepositoryNotFoundError, EntryNotFoundError) as error:
        raise MissingWeightsError(f"{location}: no geolink model on the Hugging Face Hub there "
                                  f"({type(error).__name__})") from None
