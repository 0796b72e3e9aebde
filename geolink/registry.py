"""Named architectures and pretrained tags: ``list_models``, ``list_pretrained``, ``create_model``, ``load_model``,
``tag_encoder_for``.

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
local folder) and how to use them (normalisation, input size, bands, text model: :func:`tag_encoder_for` gives its
:class:`~geolink.graph.text.TagEncoder`). A registered tag name always means the registry's tag, never a folder of
the same name. Each tag's availability (:data:`AVAILABILITY`) is explicit: ``list_pretrained(available=True)``.
The official release is convert-only: ``pretrained="<official .pth>"`` converts it once into a cached folder
(:func:`geolink.convert.converted_folder`). Weights always load strictly.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

import torch
from torch import nn

from geolink.convert import OFFICIAL_REPOSITORY, converted_folder
from geolink.data.transforms import Preprocess, model_data_config
from geolink.errors import ConfigError, InputError, MissingInputError, MissingWeightsError
from geolink.graph.text import TagEncoder, check_hub_repo
from geolink.hub import CONFIG_NAME, read_config
from geolink.models import COMPONENTS, Component, extract_component
from geolink.runtime import IMAGENET_MEAN, IMAGENET_STD

CONFIG_DIR = Path(__file__).parent / "configs"


__all__ = ["AVAILABILITY", "COMPONENTS", "Component", "PretrainedTag", "create_model", "extract_component",
           "get_model_config", "get_pretrained_tag", "list_models", "list_pretrained", "load_model", "nest_overrides",
           "pretrained_availability", "register_pretrained", "tag_encoder_for",
           "create_model_and_transforms", "resolve_data_config"]

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
        text_model: the text model the OSM tag features must come from (a short name of
            :data:`geolink.graph.text.TEXT_MODELS`, a Hub id or a folder), and its width; None for an image encoder.
        license: weight licence, as stated by the weights' source.
        paper: reference.
        origin: how the weights were produced.
        published: whether ``location`` is a Hub repo that exists; False for the official release, which its
            authors distribute outside the Hub (convert-only: pass ``pretrained=<its .pth>``).
    """

    location: str
    revision: str = "main"
    holds: str = "GeoLinkForPretraining"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    input_size: tuple[int, int, int] = (3, 224, 224)
    bands: tuple[str, ...] = ("red", "green", "blue")
    text_model: str | None = "clip"
    text_dim: int | None = 512
    license: str = "mit"
    paper: str = "arXiv:2509.26016"
    origin: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    published: bool = True


ASSETS_DIR = Path(__file__).parent / "assets"

_PRETRAINED: dict[str, PretrainedTag] = {
    "geolink_tiny.demo": PretrainedTag(
        location=str(ASSETS_DIR / "geolink_tiny_demo"),
        holds="GeoLinkForPretraining",
        text_model="minilm",
        text_dim=384,
        origin="Pretrained by examples/make_demo_model.py (`geolink pretrain` on the five official GeoLink example "
               "tiles bundled with geolink, augmented, then exported in float16 with its heads); shipped inside the "
               "package for the offline demo and tests. A demonstration, not a useful remote-sensing model: see its "
               "model card.",
    ),
    "geolink_vit_large_patch16_224.neurips2025": PretrainedTag(
        location="geolink/geolink_vit_large_patch16_224.neurips2025",
        origin="The official GeoLink NeurIPS 2025 multimodal release (ViT-L + OSM encoder), distributed by its "
               f"authors outside the Hub (links in the README of {OFFICIAL_REPOSITORY}); converted on the fly by "
               "`pretrained=<its .pth>`, or once by `geolink convert`.",
        published=False,
    ),
    "geolink_vit_large_patch16_224.neurips2025_unimodal": PretrainedTag(
        location="geolink/geolink_vit_large_patch16_224.neurips2025_unimodal",
        holds="GeoLinkImageEncoder",
        text_model=None,
        text_dim=None,
        origin="The official GeoLink NeurIPS 2025 unimodal ViT-L release, distributed by its authors outside the "
               f"Hub (links in the README of {OFFICIAL_REPOSITORY}); converted on the fly by `pretrained=<its .pth>`, "
               "or once by `geolink convert` (a timm folder: `timm.create_model('local-dir:<dir>', pretrained=True)` "
               "loads it too).",
        published=False,
    ),
}


def list_models() -> list[str]:
    """Registered architecture names, sorted."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.json"))


AVAILABILITY: dict[str, str] = {
    "bundled": "ships inside the geolink package",
    "local": "a local folder (registered with register_pretrained)",
    "cached": "in the local Hugging Face cache: loads offline",
    "published": "on the Hugging Face Hub: downloaded on first use, then cached",
    "convert-only": f"the official release, distributed by its authors outside the Hub (links in the README of "
                    f"{OFFICIAL_REPOSITORY}): pass pretrained=<its .pth> (--model <its .pth>), converted on the fly, "
                    "or convert it with `geolink convert`",
    "missing": "a local folder that does not exist",
}
"""What :func:`pretrained_availability` can say about a tag, and what it means."""


@overload
def list_pretrained(available: Literal[False] = False) -> list[str]: ...


@overload
def list_pretrained(available: Literal[True]) -> dict[str, str]: ...


def list_pretrained(available: bool = False) -> list[str] | dict[str, str]:
    """Registered ``architecture.tag`` names, sorted.

    Args:
        available: return ``{name: availability}`` instead (see :func:`pretrained_availability`; offline).
    """
    names = sorted(_PRETRAINED)
    return {name: pretrained_availability(name) for name in names} if available else names


def pretrained_availability(name: str) -> str:
    """Where the weights of a tag can come from now, without using the network: a key of :data:`AVAILABILITY`.

    ``bundled`` (a folder inside the package), ``local`` (another folder), ``cached`` (its ``config.json`` is in
    the local Hugging Face cache), ``published`` (a Hub repo, not cached yet), ``convert-only`` (the official
    release: not on the Hub, see :attr:`PretrainedTag.published`) or ``missing`` (a folder that is gone).

    Raises:
        ConfigError: no such tag.
    """
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    tag = get_pretrained_tag(name)
    location = Path(tag.location)
    if location.is_dir():
        return "bundled" if location.resolve().is_relative_to(Path(__file__).resolve().parent) else "local"
    try:
        cached = try_to_load_from_cache(tag.location, CONFIG_NAME, revision=tag.revision)
    except HFValidationError:  # not a repo id: a folder path
        return "missing"
    if isinstance(cached, str):
        return "cached"
    return "published" if tag.published else "convert-only"


def tag_encoder_for(name: str, **kwargs: Any) -> TagEncoder:
    """The :class:`~geolink.graph.text.TagEncoder` of the text model a pretrained tag was trained with, so graphs
    built with it carry the tag features the model expects (``tag_encoder_for("geolink_tiny.demo")``: the offline
    MiniLM).

    Args:
        name: a pretrained tag.
        **kwargs: :class:`~geolink.graph.text.TagEncoder` options (``device``, ``batch_size``, ``cache_dir``, ...).

    Raises:
        ConfigError: no such tag, a tag of an image encoder (it reads no OSM tags), or a text model whose width is
            not the tag's ``text_dim``.
        MissingWeightsError: the text model is neither installed, cached nor reachable (the message says how to get
            it).
    """
    tag = get_pretrained_tag(name)
    if tag.text_model is None:
        raise ConfigError(f"{name} holds a {tag.holds} that reads no OSM tags, so it has no text model")
    encoder = TagEncoder(tag.text_model, **kwargs)
    if tag.text_dim is not None and encoder.dim != tag.text_dim:
        raise ConfigError(f"{name}: its text model {tag.text_model!r} embeds {encoder.dim}-wide tag features, but the "
                          f"model reads {tag.text_dim}-wide ones")
    return encoder


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


#: numeric parameters that are fractions, in [0, 1]; every other number must be finite and >= 0
_FRACTIONS = frozenset({"drop_path_rate", "dropout", "mask_ratio", "node_mask_ratio"})


def _check_value(section: str, key: str, value: Any, default: Any, source: str) -> None:
    """Refuse a value whose type cannot be the parameter's (judged by the type of its default), or a number out of
    range (negative, not finite, or a fraction above 1)."""
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
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    upper = 1 if key in _FRACTIONS else math.inf
    if not (math.isfinite(value) and 0 <= value <= upper):
        bounds = "in [0, 1]" if key in _FRACTIONS else "finite and >= 0"
        raise ConfigError(f"{source}: {section}.{key} must be {bounds}; got {value!r}")


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
        pretrained: ``True`` loads the tag's weights (bundled, or from the local Hugging Face cache or the Hub; set
            ``HF_HUB_OFFLINE=1`` to stay offline); a folder path or Hub repo id loads from there instead, and the
            path of an official GeoLink ``.pth`` is converted on the fly (once: the converted folder is cached, see
            :func:`geolink.convert.converted_folder`).
        component: ``"pretraining"`` (everything), ``"fusion"``, ``"image"`` or ``"osm"``.
        **overrides: section dicts merged into the architecture's sections (or, with weights, into the saved
            config), e.g. ``image={"drop_path_rate": 0.1}``, ``osm={"text_dim": 384}``.

    Returns:
        The model; in eval mode when weights were loaded.

    Raises:
        ConfigError: an unknown architecture, tag, component, section or key (the message lists the valid ones).
        MissingWeightsError: ``pretrained`` weights that are neither local, cached nor reachable, or a convert-only
            tag (the message says where to get the official file).
    """
    _check_component(component)
    if pretrained is True:
        get_pretrained_tag(str(name))
        return load_model(str(name), component=component, **overrides)
    if pretrained:
        return load_model(pretrained, component=component, **overrides)
    sections = merge_sections(get_model_config(name), overrides)
    return COMPONENTS[component](**component_arguments(component, sections))


def load_model(location: str | os.PathLike, component: str | None = None, revision: str | None = None,
               check_finite: bool = True, verify_checksum: bool = True, **overrides: dict[str, Any]) -> nn.Module:
    """Load any geolink ``save_pretrained`` folder or Hub repo, a pretrained tag or an official checkpoint, whatever
    class it holds.

    Args:
        location: a pretrained tag (always the registry's tag, even when a folder of that name exists), a folder, a
            Hub repo id, or the path of an official GeoLink ``.pth`` (converted once into a cached folder, see
            :func:`geolink.convert.converted_folder`).
        component: return this component (``"fusion"``, ``"image"``, ``"osm"``, ``"pretraining"``), extracted from a
            larger saved model when needed; ``None`` returns what the folder holds.
        revision: Hub revision (a tag's own revision by default).
        check_finite: refuse weights holding NaN or infinity, naming the first such tensor (``False`` skips the
            check, for speed).
        verify_checksum: compare the weights with the sha256 a ``save_pretrained`` folder records in
            ``checksums.json`` (a folder without one loads unchecked; ``False`` skips hashing, for speed).
        **overrides: section dicts merged into the saved config (the sections of the class the folder holds), e.g.
            ``image={"drop_path_rate": 0.1}``.

    Raises:
        InputError: the folder holds no geolink model, or a model without the requested component; an official
            checkpoint geolink cannot convert.
        ConfigError: an unknown override section or key, or a ``config.json`` that is not a geolink config (not a
            JSON object, or a value of the wrong type).
        DataError: weights that are empty, truncated, corrupt, non-finite or differ from their checksum.
        MissingWeightsError: the folder lacks ``config.json`` / weights, the repo is not cached and the Hub cannot
            be reached, or the tag is convert-only (the message says where to get the official file).
    """
    if component is not None:
        _check_component(component)
    label = str(location)
    location, revision = _weights_location(location, revision)
    config = _read_config(location, revision, label if label != str(location) else None)
    held = config.get("model_class", "GeoLinkImageEncoder" if "pretrained_cfg" in config else None)
    if held not in _CLASSES:
        raise InputError(f"{location} does not hold a geolink model (config.json has no known model_class)")
    own = _CLASSES[held]
    sections = merge_sections(saved_sections(own, config, f"{location}/{CONFIG_NAME}"), overrides)
    model = COMPONENTS[own].from_pretrained(str(location), revision=revision, check_finite=check_finite,
                                            verify_checksum=verify_checksum, **component_arguments(own, sections))
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


def _weights_location(location: str | os.PathLike, revision: str | None) -> tuple[str | os.PathLike, str | None]:
    """``(folder or Hub repo id, revision)`` of what :func:`load_model` was given: a tag resolves to its location
    (refused when convert-only), an official ``.pth`` to its converted folder, anything else stays."""
    name = str(location)
    if name in _PRETRAINED:
        tag = _PRETRAINED[name]
        if pretrained_availability(name) == "convert-only":
            raise MissingWeightsError(
                f"{name} is convert-only: its weights are the official GeoLink release, which the authors distribute "
                f"outside the Hugging Face Hub (download links in the README of {OFFICIAL_REPOSITORY}). Get the "
                "official .pth file and pass pretrained='<file.pth>' (converted on the fly and cached), or convert it "
                "once with `geolink convert <file.pth> <dir>` and pass pretrained='<dir>' (on the command line: "
                "--model <file.pth> or <dir>)")
        return tag.location, revision or tag.revision
    if Path(name).suffix == ".pth":
        return converted_folder(name), None
    return location, revision


def _read_config(location: str | os.PathLike, revision: str | None, tag: str | None = None) -> dict[str, Any]:
    """The ``config.json`` of a folder or Hub repo (``tag``: the pretrained tag that named it, for messages); a repo
    that is neither cached nor reachable fails at once (:func:`~geolink.graph.text.check_hub_repo`), not after the
    Hub client's retries."""
    if Path(location).is_dir():
        return read_config(Path(location))
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    what = f"pretrained model {tag} ({location})" if tag else str(location)
    try:
        check_hub_repo(str(location), revision, what, "download it once with network access (it is cached then), "
                       "or pass a local folder", "check the repo id and your Hub token")
        return read_config(Path(hf_hub_download(str(location), CONFIG_NAME, revision=revision)).parent)
    except HFValidationError:
        raise MissingInputError(f"{location} is neither a model folder nor a Hub repo id ('org/name'): pass an "
                               "existing save_pretrained folder, a Hub repo id or a pretrained tag (list_pretrained())"
                               ) from None
    except LocalEntryNotFoundError as error:
        raise MissingWeightsError(
            f"{location} is neither a local folder nor in the Hugging Face cache, and the Hub cannot be reached "
            f"({type(error).__name__}): download it once with network access (it is cached then), or pass a local "
            "folder") from None
    except (RepositoryNotFoundError, EntryNotFoundError) as error:
        raise MissingWeightsError(f"{location}: no geolink model on the Hugging Face Hub there "
                                  f"({type(error).__name__})") from None


# ------------------------------------------------------------------------------------------------- preprocessing
def resolve_data_config(model_or_name: nn.Module | str | os.PathLike) -> dict[str, Any]:
    """How to feed a model images (timm's ``resolve_data_config``): input size, normalisation and resize policy.

    Args:
        model_or_name: a model that reads images (a geolink image, fusion or pretraining model, a task model holding
            one, a timm model): its image encoder's ``pretrained_cfg``; a pretrained tag (``"geolink_tiny.demo"``):
            the tag's ``input_size``, ``mean`` and ``std`` with its architecture's resize policy; an architecture name
            or JSON path: the bands and size of the image encoder it builds, with ImageNet statistics (repeated over
            the bands when there are more than three).

    Returns:
        ``{"input_size": (bands, H, W), "mean": (...), "std": (...), "interpolation": "bicubic", "crop_pct": 1.0,
        "crop_mode": "center"}``: the keywords of :class:`~geolink.data.transforms.Preprocess` (and of timm's
        ``create_transform``), so ``Preprocess(**config)`` is the model's preprocessing.

    Raises:
        InputError: a model that takes no images (an OSM encoder).
        ConfigError: an unknown architecture or tag, or a saved model folder (load it, then pass the model).
    """
    if isinstance(model_or_name, nn.Module):
        return model_data_config(model_or_name)
    name = str(model_or_name)
    architecture, dot, _ = name.partition(".")
    tag = get_pretrained_tag(name) if dot and architecture in list_models() and Path(name).suffix != ".json" else None
    with torch.device("meta"):  # only the encoder's config is read: no memory, no initialisation
        image = create_model(name, component="image")
    config = model_data_config(image)
    if tag is not None:
        config.update(input_size=tuple(tag.input_size), mean=tuple(tag.mean), std=tuple(tag.std))
    return config


def create_model_and_transforms(name: str | os.PathLike, pretrained: bool | str | os.PathLike = False,
                                component: str = "pretraining", **overrides: dict[str, Any]
                                ) -> tuple[nn.Module, Preprocess]:
    """A model and the preprocessing of its images, as in open_clip: ``model, preprocess = ...``.

    ``preprocess`` turns one image (PIL, numpy ``[H, W, C]`` or tensor ``[C, H, W]``, uint8 or floats in ``[0, 1]``)
    into the normalised ``[C, H, W]`` tensor the model expects (see :class:`~geolink.data.transforms.Preprocess`);
    a batch is ``torch.stack([preprocess(image) for image in images])``.

    Args:
        name, pretrained, component, **overrides: as for :func:`create_model`; ``component`` must read images
            (``"pretraining"``, ``"fusion"`` or ``"image"``).

    Returns:
        ``(model, preprocess)``: the preprocessing follows the model's image encoder (its bands and input size, with
        overrides applied) and, with ``pretrained=True``, the tag's ``mean`` and ``std``.

    Raises:
        ConfigError: ``component="osm"`` (it takes graphs, not images), or what :func:`create_model` raises.
    """
    if component == "osm":
        raise ConfigError("component 'osm' takes graphs, not images, so it has no image preprocessing: use "
                          "create_model(name, component='osm'), or component='image', 'fusion' or 'pretraining'")
    model = create_model(name, pretrained=pretrained, component=component, **overrides)
    config = resolve_data_config(model)
    if pretrained is True:
        tag = get_pretrained_tag(str(name))
        config.update(mean=tuple(tag.mean), std=tuple(tag.std))
    return model, Preprocess(**config)
