"""Hugging Face Hub glue: the save/load mixin every geolink model uses, strict loading, model cards.

Every model saves ``config.json`` (its constructor kwargs, nested sub-model sections complete) +
``model.safetensors`` + ``README.md`` (model card) and loads strictly: a missing, unexpected or mis-shaped tensor is
an error naming the keys, never a silent partial load. Weights are only ever read with safetensors, never unpickled.
The image encoder overrides the file layout so its folder is also a plain timm folder (see ``geolink.models.image``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from huggingface_hub import ModelCard, PyTorchModelHubMixin, hf_hub_download

from geolink.errors import ConfigError, DataError, MissingWeightsError

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
#: the sidecar of a ``save_pretrained`` folder recording the sha256 of its weight file (verified on load)
CHECKSUM_NAME = "checksums.json"

PAPER_URL = "https://arxiv.org/abs/2509.26016"
PROJECT_URL = "https://pypi.org/project/geolink/"

CITATION = """@inproceedings{bai2025geolink,
  title     = {GeoLink: Empowering Remote Sensing Foundation Model with OpenStreetMap Data},
  author    = {Bai, Lubin and others},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2025},
  url       = {https://arxiv.org/abs/2509.26016}
}"""

ODBL_ATTRIBUTION = ("Contains information from OpenStreetMap, © OpenStreetMap contributors, available under the "
                    "Open Database License (ODbL) — https://www.openstreetmap.org/copyright")

MODEL_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

{{ summary }}

This is a [geolink]({{ repo_url }}) model: the GeoLink remote-sensing foundation model
([paper]({{ paper_url }})), a ViT image encoder pretrained together with OpenStreetMap data encoded as a
heterogeneous graph.

## Usage

```python
{{ usage }}
```

## Weights

{{ weights }}

## Licence and attribution

Weights licence: {{ weights_license }}.

{{ odbl }}

## Citation

```bibtex
{{ citation }}
```
"""


class GeoLinkHubMixin(
    PyTorchModelHubMixin,
    library_name="geolink",
    license="mit",
    repo_url=PROJECT_URL,
    paper_url=PAPER_URL,
    tags=["geolink", "remote-sensing", "openstreetmap", "earth-observation"],
    model_card_template=MODEL_CARD_TEMPLATE,
):
    """``PyTorchModelHubMixin`` with strict safetensors-only loading and the geolink model card.

    Subclasses are ``nn.Module``s whose constructor kwargs are their whole config. ``save_pretrained(dir)``,
    ``from_pretrained(dir_or_repo_id)`` and ``push_to_hub(repo_id)`` come from the mixin.
    """

    weights_license: str = "MIT (weights you trained yourself: your choice)"
    weights_description: str = "Weights as saved by `save_pretrained`; see the training run that produced them."

    def weights_module(self) -> torch.nn.Module:
        """The module whose ``state_dict`` is the weight file (the image encoder stores its timm trunk)."""
        return self  # type: ignore[return-value]

    def init_kwargs(self) -> dict[str, Any]:
        """The constructor kwargs that rebuild this model (defaults included); a copy the caller may change.
        Models holding sub-models replace their sections by the sub-models' own complete kwargs."""
        return copy.deepcopy(dict(self._hub_mixin_config or {}))

    def hub_config(self) -> dict[str, Any]:
        """``config.json``: the constructor kwargs plus ``model_class``, which tells ``geolink.load_model`` (and
        the component extraction of ``create_model``) what the folder holds."""
        return {**self.init_kwargs(), "model_class": type(self).__name__}

    def _save_pretrained(self, save_directory: Path) -> None:
        state_dict = {k: v.detach().contiguous() for k, v in self.weights_module().state_dict().items()}
        safetensors.torch.save_file(state_dict, str(save_directory / WEIGHTS_NAME), metadata={"format": "pt"})
        (save_directory / CONFIG_NAME).write_text(json.dumps(self.hub_config(), indent=2, sort_keys=True))
        checksums = {WEIGHTS_NAME: {"sha256": file_sha256(save_directory / WEIGHTS_NAME)},
                     CONFIG_NAME: {"content_sha256": config_sha256(self.hub_config())}}
        (save_directory / CHECKSUM_NAME).write_text(json.dumps(checksums, indent=2, sort_keys=True))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args: Any, **kwargs: Any):
        """Load a ``save_pretrained`` folder or Hub repo (the mixin's ``from_pretrained``, a local folder checked
        first: its ``config.json`` must be a JSON object and its weights present, else an error naming the path).

        Keyword Args:
            check_finite: refuse weights holding NaN or infinity, naming the first such tensor (default True;
                ``False`` skips this pass over the weights).
            verify_checksum: compare ``model.safetensors`` with the sha256 recorded in ``checksums.json`` when the
                folder has one (default True; ``False`` skips hashing the file).

        Raises:
            MissingWeightsError: a folder without ``config.json`` or ``model.safetensors``.
            ConfigError: a ``config.json`` that is not a JSON object.
            DataError: a weight file that is empty, truncated, corrupt, non-finite or differs from its checksum.
        """
        if os.path.isdir(pretrained_model_name_or_path):
            read_config(Path(pretrained_model_name_or_path))
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str = "cpu",
        strict: bool = True,
        check_finite: bool = True,
        verify_checksum: bool = True,
        **model_kwargs: Any,
    ):
        if os.path.isdir(model_id):
            weights_file = os.path.join(model_id, WEIGHTS_NAME)
            if not os.path.isfile(weights_file):
                raise MissingWeightsError(f"{model_id} has no {WEIGHTS_NAME}: not a geolink model folder "
                                        "(save one with `model.save_pretrained(dir)`)")
            if verify_checksum:
                verify_weights_checksum(Path(model_id))
        else:
            weights_file = hf_hub_download(repo_id=model_id, filename=WEIGHTS_NAME, revision=revision,
                                           cache_dir=cache_dir, force_download=force_download, token=token,
                                           local_files_only=local_files_only)
        model = cls(**model_kwargs)
        state_dict = read_weights(weights_file, device=str(map_location))
        if check_finite:
            check_finite_tensors(state_dict, source=weights_file)
        load_state_dict_checked(model.weights_module(), state_dict, source=weights_file, strict=strict)
        model.eval()
        return model

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        fields = {
            "model_name": type(self).__name__,
            "summary": (type(self).__doc__ or "").strip().split("\n\n")[0],
            "usage": f"from geolink.models import {type(self).__name__}\n"
                     f"model = {type(self).__name__}.from_pretrained(\"<this repo id or folder>\")",
            "weights": self.weights_description,
            "weights_license": self.weights_license,
            "odbl": ODBL_ATTRIBUTION,
            "citation": CITATION,
        }
        fields.update(kwargs)
        return super().generate_model_card(*args, **fields)


def file_sha256(path: str | Path) -> str:
    """The sha256 hex digest of a file, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_config(folder: Path) -> dict[str, Any]:
    """The ``config.json`` of a saved model folder, which must exist and hold a JSON object.

    Raises:
        MissingWeightsError: the folder has no ``config.json``.
        ConfigError: the file is not valid JSON, or not a JSON object.
    """
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise MissingWeightsError(f"{folder} has no {CONFIG_NAME}: not a geolink model folder (save one with "
                                  "`model.save_pretrained(dir)`, or pass the folder that holds config.json)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path} is not valid JSON ({error}): restore it from the saved model, or save the model "
                          "again with `model.save_pretrained(dir)`") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a JSON object (the model's constructor kwargs), not a "
                          f"{type(config).__name__}: restore it, or save the model again with "
                          "`model.save_pretrained(dir)`")
    return config


def config_sha256(config: dict[str, Any]) -> str:
    """The sha256 of a config's content (canonical JSON: key order and whitespace do not count)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def verify_weights_checksum(folder: Path) -> None:
    """Compare ``folder/model.safetensors`` with the sha256 in ``folder/checksums.json``, and the content of
    ``config.json`` with the one saved with those weights (when recorded); a folder without ``checksums.json``
    (saved by an older geolink, or by timm) is accepted unchecked.

    The config check catches the edits the weights cannot reveal: another ``num_heads`` or ``out_indices`` loads the
    same tensors and computes something else.

    Raises:
        DataError: the weights differ from the recorded checksum, ``config.json`` differs from the saved config, or
            ``checksums.json`` is unreadable.
    """
    path = folder / CHECKSUM_NAME
    if not path.is_file():
        return
    try:
        recorded = json.loads(path.read_text())
        expected = recorded[WEIGHTS_NAME]["sha256"]
        expected_config = recorded.get(CONFIG_NAME, {}).get("content_sha256")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
        raise DataError(f"{path} is not a checksum file of {WEIGHTS_NAME} ({type(error).__name__}: {error}): "
                        f"delete it to load unchecked, or save the model again") from None
    if expected_config is not None and config_sha256(read_config(folder)) != expected_config:
        raise DataError(f"{folder / CONFIG_NAME} differs from the config saved with these weights (recorded in "
                        f"{CHECKSUM_NAME}): changed settings such as num_heads or out_indices load the same tensors "
                        "but compute something else; restore config.json, pass the change as an override "
                        "(load_model(folder, fusion={...})), or verify_checksum=False to load it anyway")
    actual = file_sha256(folder / WEIGHTS_NAME)
    if actual != expected:
        raise DataError(f"{folder / WEIGHTS_NAME} does not match its checksum in {CHECKSUM_NAME} (sha256 {actual}, "
                        f"recorded {expected}): the weights are corrupt or were changed after saving; restore or "
                        "re-download the folder (verify_checksum=False loads it anyway)")


def read_weights(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file.

    Raises:
        DataError: the file is empty, truncated or not a safetensors file (naming it).
    """
    try:
        return safetensors.torch.load_file(str(path), device=device)
    except safetensors.SafetensorError as error:
        raise DataError(f"{path} is not a readable safetensors file (empty, truncated or corrupt: {error}); restore "
                        "or re-download it, or save the model again with `model.save_pretrained(dir)`") from None


def check_finite_tensors(state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Refuse floating-point tensors holding NaN or infinity, naming the first one.

    Raises:
        DataError: naming the file and the tensor.
    """
    for key, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise DataError(f"{source}: tensor {key!r} holds {bad} NaN or infinite values (corrupt weights, or a "
                            "diverged training run); restore the file, or pass check_finite=False to load it anyway")


def load_state_dict_checked(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str,
                            strict: bool = True) -> None:
    """Load ``state_dict`` into ``module``; with ``strict`` any key or shape mismatch is an error naming the keys.

    Args:
        module: the model (or sub-module) to load into.
        state_dict: tensors by key.
        source: where the tensors came from, for the error message.
        strict: refuse missing and unexpected keys (shape mismatches are always refused).

    Raises:
        ConfigError: the tensors do not fit the module built from the config.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
                        for k in set(expected) & set(state_dict) if state_dict[k].shape != expected[k].shape)
    problems = []
    if strict and missing:
        problems.append(f"missing keys ({len(missing)}): {_preview(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_preview(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_preview(mismatched)}")
    if problems:
        raise ConfigError(f"weights in {source} do not match {type(module).__name__}'s config: " + "; ".join(problems)
                         + ". Check that config.json and the weights come from the same model.")
    module.load_state_dict(state_dict, strict=strict)


def _preview(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", … (+{len(items) - limit} more)" if len(items) > limit else "")
