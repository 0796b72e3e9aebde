"""Training checkpoints: safetensors + JSON only, written atomically, resumable exactly.

A checkpoint is a folder holding ``model.safetensors``, ``state.json`` (whatever the job needs to continue: step or
epoch, run config, gradient-scaler state, history, ...) and, when it carries training state, ``optimizer.safetensors``
+ ``optimizer.json`` (the optimizer state flattened to tensors + structure) and ``rng_rank<r>.safetensors`` (every
process's torch RNG states). :func:`write_checkpoint` writes it under a temporary name and renames it into place, so
a run killed at any moment leaves either the previous checkpoint or the new one, never a half-written one:

- pretraining (:func:`save_checkpoint`) keeps ``checkpoints/step_00000100/`` folders and a ``checkpoints/latest``
  pointer replaced atomically (:func:`latest_checkpoint`); a resume tries them newest first
  (:func:`complete_checkpoints`), so a damaged latest one falls back to the previous one;
- fine-tuning (``geolink.finetune``) rewrites fixed folders (``last/``, ``best/``): the previous one is moved aside
  before the new one is renamed in, and :func:`find_checkpoint` falls back to it if a kill came in between.

Every file's sha256 is recorded in ``checksums.json`` (the convention of ``save_pretrained`` folders) and verified
when the checkpoint is read, so a bit flip on disk is caught like a truncation: a resume falls back to the previous
checkpoint. Weights load strictly (:func:`geolink.hub.load_state_dict_checked`); nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from geolink.errors import DataError
from geolink.hub import CHECKSUM_NAME, file_sha256

LATEST = "latest"
STATE_NAME = "state.json"
WEIGHTS_NAME = "model.safetensors"


def _flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, structure = {}, {"param_groups": state_dict["param_groups"], "state": {}}
    for param_id, entries in state_dict["state"].items():
        structure["state"][str(param_id)] = {}
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param_id}.{name}"] = value.detach().contiguous().cpu()
                structure["state"][str(param_id)][name] = {"tensor": f"{param_id}.{name}"}
            else:
                structure["state"][str(param_id)][name] = {"value": value}
    return tensors, structure


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], structure: dict[str, Any]) -> dict[str, Any]:
    state = {int(param_id): {name: tensors[item["tensor"]] if "tensor" in item else item["value"]
                             for name, item in entries.items()}
             for param_id, entries in structure["state"].items()}
    return {"state": state, "param_groups": structure["param_groups"]}


def _write_json(path: Path, content: Any) -> None:
    path.write_text(json.dumps(content, indent=2, sort_keys=True))


def _rng_state() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def _aside(final: Path) -> Path:
    """Where :func:`write_checkpoint` keeps the previous content of ``final`` while replacing it."""
    return final.with_name(f".{final.name}.previous")


def write_checkpoint(final: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                     state: dict[str, Any], rank: int = 0, world_size: int = 1) -> Path:
    """Write a checkpoint folder ``final`` atomically (every rank calls this; rank 0 writes the shared files).

    Args:
        final: the checkpoint folder; an existing one is replaced.
        model: its ``state_dict`` becomes ``model.safetensors``.
        optimizer: saved with every rank's RNG states; None writes weights and ``state.json`` only.
        state: JSON content of ``state.json``.
        rank, world_size: this process in a distributed run.

    Returns:
        ``final``.
    """
    import torch.distributed as dist

    final = Path(final)
    staging = final.with_name(f".{final.name}.partial")
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    if world_size > 1:
        dist.barrier()
    if optimizer is not None:
        safetensors.torch.save_file(_rng_state(), str(staging / f"rng_rank{rank}.safetensors"))
    if rank == 0:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        safetensors.torch.save_file(weights, str(staging / WEIGHTS_NAME))
        if optimizer is not None:
            tensors, structure = _flatten_optimizer(optimizer.state_dict())
            safetensors.torch.save_file(tensors, str(staging / "optimizer.safetensors"))
            _write_json(staging / "optimizer.json", structure)
    if world_size > 1:
        dist.barrier()
    if rank == 0:
        _write_json(staging / STATE_NAME, state)
        _write_json(staging / CHECKSUM_NAME, {path.name: {"sha256": file_sha256(path)}
                                              for path in sorted(staging.iterdir())})
        for path in staging.iterdir():  # make the bytes durable before the rename publishes them
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        aside = _aside(final)
        shutil.rmtree(aside, ignore_errors=True)
        if final.exists():
            os.replace(final, aside)
        os.replace(staging, final)
        shutil.rmtree(aside, ignore_errors=True)
    if world_size > 1:
        dist.barrier()
    return final


def find_checkpoint(final: str | Path) -> Path | None:
    """The complete checkpoint written to ``final`` by :func:`write_checkpoint` (the previous one when a kill
    interrupted its replacement), or None when there is none."""
    for path in (Path(final), _aside(Path(final))):
        if (path / STATE_NAME).is_file():
            return path
    return None


def save_checkpoint(folder: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scaler_state: dict[str, Any], config: dict[str, Any], rank: int, world_size: int,
                    keep: int = 2) -> Path:
    """Write the pretraining checkpoint of ``step`` as ``folder/step_<step>`` and point ``folder/latest`` at it,
    keeping the ``keep`` newest step folders.

    Returns:
        The checkpoint folder.
    """
    folder = Path(folder)
    final = write_checkpoint(folder / f"step_{step:08d}", model, optimizer,
                             {"step": step, "world_size": world_size, "config": config, "scaler": scaler_state},
                             rank, world_size)
    if rank == 0:
        pointer = folder / f".{LATEST}.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, folder / LATEST)
        # the newest ``keep`` of this run by step; folders of later steps (a damaged checkpoint a resume fell back
        # from) are left alone: this run replaces them when it gets there
        for old in [p for p in _step_folders(folder) if _step_of(p) <= step][keep:]:
            shutil.rmtree(old, ignore_errors=True)
    if world_size > 1:
        torch.distributed.barrier()
    return final


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def _step_folders(folder: Path) -> list[Path]:
    """The ``step_<n>`` folders of ``folder``, newest step first."""
    folders = [p for p in folder.glob("step_*") if p.is_dir() and p.name.removeprefix("step_").isdigit()]
    return sorted(folders, key=_step_of, reverse=True)


def complete_checkpoints(folder: str | Path) -> list[Path]:
    """The pretraining checkpoints in ``folder`` that were completely written (they have ``state.json``, which
    :func:`write_checkpoint` writes last), newest step first: what a resume tries, in order."""
    return [p for p in _step_folders(Path(folder)) if (p / STATE_NAME).is_file()]


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint ``checkpoints/latest`` points to, or None when the run has none yet."""
    pointer = Path(folder) / LATEST
    if not pointer.is_file():
        return None
    path = Path(folder) / pointer.read_text().strip()
    if not (path / STATE_NAME).is_file():
        raise FileNotFoundError(f"{pointer} points to {path}, which is not a complete checkpoint; delete the "
                                "pointer to resume from the previous one")
    return path


def verify_checksums(path: str | Path, names: list[str]) -> None:
    """Compare the files ``names`` of the checkpoint ``path`` with the sha256 recorded in its ``checksums.json``; a
    checkpoint without that file (written by an older geolink) or a file it does not list is accepted unchecked.

    Raises:
        DataError: a file differs from its checksum (a bit flip, or a change after writing), or ``checksums.json``
            is unreadable; the message names the file.
    """
    path = Path(path)
    record = path / CHECKSUM_NAME
    if not record.is_file():
        return
    try:
        expected = {name: entry["sha256"] for name, entry in json.loads(record.read_text()).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise DataError(f"checkpoint {path} is damaged: {CHECKSUM_NAME} cannot be read ({type(error).__name__}: "
                        f"{error}); resume from an earlier checkpoint or restore the folder") from None
    for name in names:
        if name in expected and (path / name).is_file() and file_sha256(path / name) != expected[name]:
            raise DataError(f"checkpoint {path} is damaged: {name} does not match its checksum in {CHECKSUM_NAME} "
                            "(changed on disk since it was written); resume from an earlier checkpoint or restore "
                            "the folder")


def load_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Strictly load ``path/model.safetensors`` into ``model`` (a key or shape mismatch is an error naming it), after
    checking it against its checksum."""
    from geolink.hub import load_state_dict_checked

    verify_checksums(path, [WEIGHTS_NAME])
    weights = Path(path) / WEIGHTS_NAME
    load_state_dict_checked(model, safetensors.torch.load_file(str(weights)), source=str(weights))


def read_checkpoint(path: str | Path, optimizer: bool = True, rank: int = 0, verify: bool = True) -> dict[str, Any]:
    """Read every file of the checkpoint ``path`` that a resume needs, changing nothing.

    Args:
        path: a checkpoint folder written by :func:`write_checkpoint`.
        optimizer: also read the optimizer state and this rank's RNG states.
        rank: whose RNG states to read.
        verify: first compare the files with their checksums (:func:`verify_checksums`); False skips it (faster
            for very large checkpoints, but a bit flip then goes unnoticed).

    Returns:
        ``state`` (``state.json``), ``weights`` and, with ``optimizer``, ``optimizer`` (a state dict) and ``rng``
        (None when the checkpoint has no RNG file for ``rank``).

    Raises:
        DataError: a file is missing, truncated, corrupt or differs from its checksum (a kill or a full disk while
            it was copied, a bit flip on disk); the message names it.
    """
    path = Path(path)
    current = path / STATE_NAME
    try:
        content: dict[str, Any] = {"state": json.loads(current.read_text())}
        if not isinstance(content["state"], dict):
            raise ValueError("not a JSON object")
        current = path / WEIGHTS_NAME
        content["weights"] = safetensors.torch.load_file(str(current))
        if optimizer:
            current = path / "optimizer.json"
            structure = json.loads(current.read_text())
            current = path / "optimizer.safetensors"
            content["optimizer"] = _unflatten_optimizer(safetensors.torch.load_file(str(current)), structure)
            current = path / f"rng_rank{rank}.safetensors"
            content["rng"] = safetensors.torch.load_file(str(current)) if current.is_file() else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, safetensors.SafetensorError) as error:
        raise DataError(f"checkpoint {path} is damaged: {current.name} cannot be read ({type(error).__name__}: "
                        f"{error}); resume from an earlier checkpoint or restore the folder") from error
    if verify:  # after decoding, so a truncation is named as such; a flip that still decodes is caught here
        verify_checksums(path, [STATE_NAME, WEIGHTS_NAME] + (["optimizer.json", "optimizer.safetensors",
                                                              f"rng_rank{rank}.safetensors"] if optimizer else []))
    return content


def apply_checkpoint(content: dict[str, Any], path: str | Path, model: torch.nn.Module,
                     optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Load what :func:`read_checkpoint` read from ``path`` into ``model``, ``optimizer`` and the RNGs (weights only
    when ``optimizer`` is None); returns ``state.json``.

    Raises:
        ConfigError: the weights belong to another architecture (strict load, naming the keys).
        DataError: the optimizer state does not fit the optimizer.
    """
    from geolink.hub import load_state_dict_checked

    path = Path(path)
    load_state_dict_checked(model, content["weights"], source=str(path / WEIGHTS_NAME))
    if optimizer is None:
        return content["state"]
    try:
        optimizer.load_state_dict(content["optimizer"])
    except (ValueError, KeyError, TypeError) as error:
        raise DataError(f"checkpoint {path} is damaged: optimizer.json does not fit the optimizer ({error}); resume "
                        "from an earlier checkpoint or restore the folder") from error
    rng = content.get("rng")
    if rng is not None:
        torch.set_rng_state(rng["cpu"])
        cuda_states = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states)
    return content["state"]


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, rank: int = 0
                    ) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG states from ``path`` (weights only when ``optimizer`` is None);
    returns ``state.json``. Every file is read before anything is changed.

    Raises:
        DataError: a file of the checkpoint is missing, truncated or corrupt (see :func:`read_checkpoint`).
    """
    return apply_checkpoint(read_checkpoint(path, optimizer is not None, rank), path, model, optimizer)
