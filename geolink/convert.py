"""Conversion of the official GeoLink research checkpoints into geolink models (graphs: ``geolink.graph.official``).

Official checkpoints are ``.pth`` files holding ``{"model_config": {...}, "model_state_dict": {...}}`` (DESIGN §6).
They are read with ``torch.load(weights_only=True)``, which refuses any pickled object other than tensors and plain
containers, so a crafted file cannot run code. ``official_to_geolink`` is the single filter function that renames
official keys; every width is inferred from tensor shapes and checked against the timm architecture named in the
file, and loading is strict. The ``geolink convert`` job is :class:`ConvertConfig` → :func:`convert`;
:func:`converted_folder` converts on the fly into a cache (what ``create_model(..., pretrained="<file.pth>")`` uses).

The official release files are distributed by their authors outside the Hugging Face Hub (Google Drive and PKU Disk,
linked from the README of :data:`OFFICIAL_REPOSITORY`).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from geolink.errors import ConfigError, DataError, InputError, MissingInputError
from geolink.hub import CONFIG_NAME, WEIGHTS_NAME, check_finite_tensors, file_sha256, load_state_dict_checked
from geolink.models import COMPONENTS, Component, extract_component
from geolink.models.image import GeoLinkImageEncoder
from geolink.models.pretrain import GeoLinkForPretraining

OFFICIAL_REPOSITORY = "https://github.com/bailubin/GeoLink_NeurIPS2025"
"""The official GeoLink code; its README links the release checkpoints."""

CACHE_ENV = "GEOLINK_CACHE"
"""Environment variable naming geolink's cache folder (default ``$XDG_CACHE_HOME/geolink``, else
``~/.cache/geolink``)."""

# official prefix -> geolink prefix (GeoLinkForPretraining); the first match wins
_PREFIX_MAP: tuple[tuple[str, str], ...] = (
    ("cls_token", "fusion_encoder.image_encoder.trunk.cls_token"),
    ("img_pos_embed", "fusion_encoder.image_encoder.trunk.pos_embed"),
    ("img_norm.", "fusion_encoder.image_encoder.trunk.norm."),
    ("img_encoder.patch_embed.", "fusion_encoder.image_encoder.trunk.patch_embed."),
    ("img_encoder.blocks.", "fusion_encoder.image_encoder.trunk.blocks."),
    ("osm_encoder.convs.0.convs.", "fusion_encoder.osm_encoder.convs."),
    ("osm_norm.", "fusion_encoder.osm_encoder.norm."),
    ("osm_read_out.", "fusion_encoder.osm_encoder.readout."),
    ("osm_aggr_mlp.", "fusion_encoder.osm_encoder.readout_proj."),
    ("type_attention.", "fusion_encoder.osm_encoder.type_attention."),
    ("img_fusion_mlp.", "fusion_encoder.image_proj."),
    ("osm_node_fusion_mlp.", "fusion_encoder.node_proj."),
    ("osm_cross_modal_encoder.", "fusion_encoder.blocks."),
    ("img_decoder_mlp.", "decoder_embed."),
    ("img_mask_token", "mask_token"),
    ("img_cross_modal_decoder.", "decoder_blocks."),
    ("img_decoder_norm.", "decoder_norm."),
    ("img_decoder_pred.", "decoder_pred."),
    ("img_consistency_prj.", "image_projection."),
    ("osm_graph_consistency_prj.", "region_projection."),
    ("osm_mask_token.", "node_mask_token."),
    ("osm_node_pred.", "node_pred."),
)
# names inside each official two-way block -> geolink TwoWayFusionBlock
_FUSION_BLOCK_MAP = {
    "self_attn": "node_self_attn", "norm1": "node_self_norm",
    "cross_attn_token_to_image": "image_attn", "norm2": "image_norm",
    "cross_attn_image_to_token": "node_attn", "norm3": "node_attn_norm",
    "mlp": "node_mlp", "norm4": "node_mlp_norm",
}
# official tensors that geolink recomputes or that the official model never used
_DROPPED = ("img_encoder.cls_token", "img_encoder.pos_embed", "img_encoder.norm.", "patch_embed.",
            "rec_img_pos_embed", "fusion_img_pos_embed")

logger = logging.getLogger(__name__)


class OfficialCheckpointError(InputError):
    """An official checkpoint that geolink cannot convert (unsafe, corrupt or of an unknown layout)."""


def check_archive_crc(path: Path) -> None:
    """Verify the CRC-32 that a ``.pth`` zip archive stores for each record (torch's writer computes them; torch's
    reader does not check them): a flipped bit anywhere in a tensor is caught before the file is used. Files in the
    legacy non-zip format, and records stored without a CRC, are not checked.

    Raises:
        OfficialCheckpointError: a record fails its check (naming it) or the archive cannot be read.
    """
    import zipfile

    if not zipfile.is_zipfile(path):
        return
    where = ""
    try:
        with zipfile.ZipFile(path) as archive:
            for record in archive.infolist():
                if record.CRC == 0 and record.file_size:
                    continue  # written with torch's CRC computation switched off
                where = f" (record {record.filename})"
                with archive.open(record) as stream:
                    while stream.read(1 << 24):
                        pass  # zipfile checks the CRC-32 at the end of each record
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise OfficialCheckpointError(f"{path} is damaged{where}: {error}; re-download the official file") from None


def read_official_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read an official ``.pth`` safely: ``(model_config, state_dict)``.

    Raises:
        OfficialCheckpointError: the file holds pickled objects other than tensors (refused, never executed), is not
            a checkpoint, or is truncated.
        DataError: a tensor holds NaN or infinite values (a corrupt file), naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"no checkpoint at {path} (pass the official GeoLink .pth file)")
    check_archive_crc(path)
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise OfficialCheckpointError(
            f"{path} contains pickled Python objects that are not plain tensors; geolink refuses to unpickle them "
            f"(that could run arbitrary code). Official GeoLink checkpoints hold only tensors — re-download the file "
            f"from the official release. Detail: {str(error).splitlines()[0]}") from None
    except (RuntimeError, EOFError, OSError, KeyError, IndexError, ValueError) as error:  # torch's own errors
        raise OfficialCheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated, corrupt or not a .pth "
                                      f"file: {type(error).__name__}: {error}); pass the official GeoLink .pth file, "
                                      "re-downloaded if it is damaged") from None
    if isinstance(content, dict) and "model_state_dict" in content:
        config, state_dict = dict(content.get("model_config") or {}), content["model_state_dict"]
    elif isinstance(content, dict) and all(isinstance(v, torch.Tensor) for v in content.values()):
        config, state_dict = {}, content
    else:
        raise OfficialCheckpointError(f"{path} is neither an official GeoLink checkpoint "
                                      "({'model_config', 'model_state_dict'}) nor a plain state dict")
    if not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise OfficialCheckpointError(f"{path}: model_state_dict holds non-tensor values")
    check_finite_tensors(state_dict, source=str(path))
    return config, state_dict


def is_multimodal(state_dict: dict[str, torch.Tensor]) -> bool:
    """True for a full GeoLink (image + OSM) state dict, False for a timm ViT one."""
    return any(k.startswith("osm_encoder.") for k in state_dict)


def official_to_geolink(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint filter: official multimodal keys -> ``GeoLinkForPretraining`` keys.

    Tensors geolink recomputes (the fixed sin-cos tables of the decoder and the fusion block) and the official
    model's unused copies (``img_encoder.cls_token/pos_embed/norm``) are dropped; the patch embedding is taken from
    the top-level ``patch_embed`` alias (see below). Keys no rule covers are kept as they are, so strict loading
    reports them.
    """
    # The official model registers ``patch_embed`` as an alias of ``img_encoder.patch_embed`` *after* it, so
    # ``load_state_dict`` writes the alias last: when the two copies differ, the alias is what the model ran with.
    state_dict = dict(state_dict)
    for key in [k for k in state_dict if k.startswith("patch_embed.")]:
        state_dict["img_encoder." + key] = state_dict[key]
    converted = {}
    for key, tensor in state_dict.items():
        if key.startswith(_DROPPED):
            continue
        new_key = key
        for old, new in _PREFIX_MAP:
            if key.startswith(old):
                new_key = new + key[len(old):]
                break
        if new_key.startswith("fusion_encoder.osm_encoder.convs."):
            # PyG writes HeteroConv keys as "<src___to___dst>" (2.5+) or "src__to__dst" (older)
            new_key = re.sub(r"convs\.<?(\w+?)___?to___?(\w+?)>?\.", r"convs.\1__to__\2.", new_key)
        if new_key.startswith("fusion_encoder.blocks."):
            new_key = re.sub(r"^(fusion_encoder\.blocks\.\d+\.)([a-z_0-9]+)",
                             lambda m: m.group(1) + _FUSION_BLOCK_MAP.get(m.group(2), m.group(2)), new_key)
        converted[new_key] = tensor
    return converted


def _count_blocks(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def _require(state_dict: dict[str, torch.Tensor], keys: list[str], path: str | Path) -> None:
    missing = [k for k in keys if k not in state_dict]
    if missing:
        raise OfficialCheckpointError(f"{path} lacks the official keys {missing}; it is not a GeoLink checkpoint "
                                      "of a known layout")


def infer_official_config(model_config: dict[str, Any], state_dict: dict[str, torch.Tensor],
                          path: str | Path = "<state dict>") -> dict[str, Any]:
    """``GeoLinkForPretraining`` kwargs of an official multimodal checkpoint, widths read from tensor shapes.

    Returns:
        The nested form of an architecture JSON: ``{"image": {...}, "osm": {...}, "fusion": {...}, **pretraining}``
        (``GeoLinkForPretraining(**config)`` builds the model).

    Attention head counts are not visible in shapes; the official defaults (16 for the decoder and the fusion
    block) are used, and the ViT's come from the timm architecture named in ``model_config``.
    """
    _require(state_dict, ["cls_token", "img_pos_embed", "img_encoder.patch_embed.proj.weight", "img_fusion_mlp.weight",
                          "img_decoder_mlp.weight", "img_consistency_prj.weight", "osm_mask_token.point"], path)
    patch_weight = state_dict["img_encoder.patch_embed.proj.weight"]
    patch_size, in_chans = patch_weight.shape[-1], patch_weight.shape[1]
    grid = round((state_dict["img_pos_embed"].shape[1] - 1) ** 0.5)
    conv_key = next((k for k in state_dict if k.startswith("osm_encoder.convs.0.convs.") and k.endswith("lin.weight")),
                    None)
    if conv_key is None:
        raise OfficialCheckpointError(f"{path} has no osm_encoder GATConv weights (osm_encoder.convs.0.convs.*)")
    config = {
        "image": {
            "trunk": model_config.get("architecture") or _guess_trunk(state_dict, path),
            "img_size": grid * patch_size,
            "in_chans": in_chans,
        },
        "osm": {
            "text_dim": state_dict["osm_mask_token.point"].shape[1],
            "osm_dim": state_dict[conv_key].shape[0],
            "type_weighting": "sum",
        },
        "fusion": {
            "dim": state_dict["img_fusion_mlp.weight"].shape[0],
            "depth": _count_blocks(state_dict, "osm_cross_modal_encoder."),
        },
        "decoder_dim": state_dict["img_decoder_mlp.weight"].shape[0],
        "decoder_depth": _count_blocks(state_dict, "img_cross_modal_decoder."),
        "projection_dim": state_dict["img_consistency_prj.weight"].shape[0],
    }
    _check_trunk(config["image"]["trunk"], state_dict["cls_token"].shape[-1],
                 _count_blocks(state_dict, "img_encoder.blocks."), patch_size, path)
    return config


def _guess_trunk(state_dict: dict[str, torch.Tensor], path: str | Path) -> str:
    """timm ViT name from widths, for files whose model_config lacks ``architecture``."""
    widths = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}
    prefix = "img_encoder." if is_multimodal(state_dict) else ""
    dim = state_dict["cls_token"].shape[-1]
    patch = state_dict[prefix + "patch_embed.proj.weight"].shape[-1]
    if dim not in widths:
        raise OfficialCheckpointError(f"{path}: no model_config.architecture and no standard ViT of width {dim}")
    grid = round((state_dict["img_pos_embed" if prefix else "pos_embed"].shape[1] - 1) ** 0.5)
    return f"vit_{widths[dim]}_patch{patch}_{grid * patch}"


def _check_trunk(trunk: str, embed_dim: int, depth: int, patch_size: int, path: str | Path) -> None:
    import timm

    if trunk not in timm.list_models():
        raise OfficialCheckpointError(f"{path}: unknown timm architecture {trunk!r} in model_config")
    reference = timm.create_model(trunk, pretrained=False, num_classes=0)
    expected = (reference.embed_dim, len(reference.blocks), reference.patch_embed.patch_size[0])
    if expected != (embed_dim, depth, patch_size):
        raise OfficialCheckpointError(
            f"{path}: model_config names {trunk} (width {expected[0]}, {expected[1]} blocks, patch {expected[2]}) "
            f"but the tensors have width {embed_dim}, {depth} blocks, patch {patch_size}")


def load_official_checkpoint(path: str | Path) -> GeoLinkForPretraining | GeoLinkImageEncoder:
    """Load an official GeoLink release file.

    Returns:
        ``GeoLinkForPretraining`` (``type_weighting="sum"``, as trained) for a multimodal file,
        ``GeoLinkImageEncoder`` for a unimodal (timm ViT) file; in eval mode.

    Raises:
        OfficialCheckpointError: unsafe, corrupt or unknown files, or tensors that do not match the inferred
            architecture (the message names the keys).
    """
    model_config, state_dict = read_official_checkpoint(path)
    if is_multimodal(state_dict):
        model = GeoLinkForPretraining(**infer_official_config(model_config, state_dict, path))
        target, tensors = model, official_to_geolink(state_dict)
    else:
        _require(state_dict, ["cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight"], path)
        patch_weight = state_dict["patch_embed.proj.weight"]
        trunk = model_config.get("architecture") or _guess_trunk(state_dict, path)
        _check_trunk(trunk, state_dict["cls_token"].shape[-1], _count_blocks(state_dict, "blocks."),
                     patch_weight.shape[-1], path)
        grid = round((state_dict["pos_embed"].shape[1] - 1) ** 0.5)
        model = GeoLinkImageEncoder(trunk=trunk, img_size=grid * patch_weight.shape[-1], in_chans=patch_weight.shape[1])
        target, tensors = model.trunk, state_dict
    try:
        load_state_dict_checked(target, tensors, source=str(path))
    except ConfigError as error:
        raise OfficialCheckpointError(str(error)) from None
    return model.eval()


def _save_converted(model: torch.nn.Module, folder: Path, source: Path) -> None:
    """``model.save_pretrained(folder)`` with a model card saying where the weights come from and whose terms apply."""
    model.weights_description = (f"{model.weights_description} Converted by geolink from {source.name}, a file of the "
                                 "official GeoLink NeurIPS 2025 release.")
    model.weights_license = (f"the GeoLink authors' terms: the official repository ({OFFICIAL_REPOSITORY}) states the "
                             "MIT licence for the repository; check the terms given with the release files")
    model.save_pretrained(folder)


def cache_dir() -> Path:
    """geolink's cache folder: ``$GEOLINK_CACHE``, else ``$XDG_CACHE_HOME/geolink``, else ``~/.cache/geolink``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "geolink"


def converted_folder(checkpoint: str | Path) -> Path:
    """The geolink ``save_pretrained`` folder of an official ``.pth``: converted on first use, then read from the
    cache, ``<cache_dir()>/converted/<sha256 of the file>``.

    The conversion is written to a temporary folder next to its final place and renamed into it, so the cache
    never holds a half-written folder; when another process finishes first, its folder is used. A folder already
    at that place is never overwritten.

    Returns:
        The cached folder (``geolink.load_model`` loads it).

    Raises:
        MissingInputError: no file at ``checkpoint``.
        OfficialCheckpointError: see :func:`load_official_checkpoint`.
        DataError: the cache holds an incomplete folder for this file (delete it).
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise MissingInputError(f"no checkpoint at {path} (pass the official GeoLink .pth file; download links in "
                                f"the README of {OFFICIAL_REPOSITORY})")
    root = cache_dir() / "converted"
    folder = root / file_sha256(path)
    if not folder.exists():
        model = load_official_checkpoint(path)
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=root))
        staging.chmod(0o755)  # mkdtemp's 0o700 would hide the folder from the other users of a shared cache
        try:
            _save_converted(model, staging, path)
            staging.rename(folder)
            logger.info("converted %s into %s (once: later calls load the cached folder)", path, folder)
        except OSError:
            if not folder.is_dir():  # not another process having won the race: a real error
                raise
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    if not ((folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()):
        raise DataError(f"the cached conversion {folder} of {path} is incomplete; delete that folder and retry")
    return folder


@dataclass
class ConvertConfig:
    """Convert an official GeoLink release checkpoint (multimodal or unimodal ViT .pth; download links in the README
    of github.com/bailubin/GeoLink_NeurIPS2025) into a geolink folder that `from_pretrained`, `geolink.load_model` and
    (for image encoders) `timm.create_model('local-dir:<dir>', pretrained=True)` load, and optionally publish it. The
    file is read with torch.load(weights_only=True): pickled code is refused, never run.
    """

    checkpoint: Path = field(metadata={"help": "official .pth file", "positional": True})
    out_dir: Path = field(metadata={"help": "output folder (created)", "positional": True})
    component: Component | None = field(
        default=None, metadata={"help": "save only this component (default: everything the file holds)"})
    push_to_hub: str | None = field(
        default=None, metadata={"help": "also upload the folder to this Hugging Face Hub repo (needs network and a "
                                        "token)", "metavar": "REPO_ID"})


def convert(config: ConvertConfig) -> Path:
    """Run the ``geolink convert`` job: load the official file, keep the requested component, save it (and push it).

    Returns:
        The output folder.

    Raises:
        OfficialCheckpointError: see :func:`load_official_checkpoint`.
        InputError: the file holds no such component (e.g. ``osm`` from a unimodal ViT file).
    """
    model = load_official_checkpoint(config.checkpoint)
    if config.component is not None and not isinstance(model, COMPONENTS[config.component]):
        extracted = extract_component(model, config.component)
        if extracted is None:
            raise InputError(f"{config.checkpoint} holds a {type(model).__name__}, which has no "
                             f"{Component(config.component).value!r} component (choose another component)")
        model = extracted
    _save_converted(model, Path(config.out_dir), Path(config.checkpoint))
    print(f"converted {config.checkpoint} -> {config.out_dir} ({type(model).__name__})")
    if config.push_to_hub:
        print(f"pushed to {model.push_to_hub(config.push_to_hub)}")
    return Path(config.out_dir)

