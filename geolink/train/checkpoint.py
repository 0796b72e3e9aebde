"""Training checkpoints: safetensors + JSON only, written atomically, resumable exactly.

A checkpoint is a folder ``checkpoints/step_00000100/`` holding ``model.safetensors``, ``optimizer.safetensors`` +
``optimizer.json`` (the optimizer state flattened to tensors + structure), ``rng_rank<r>.safetensors`` (every
process's torch RNG states) and ``state.json`` (step, run config, gradient-scaler state). It is written under a
temporary name and renamed into place, then ``checkpoints/latest`` is replaced atomically: a run killed at any moment
leaves the previous checkpoint intact and never a half-written one that ``--resume`` would pick up.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

LATEST = "latest"


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


def save_checkpoint(folder: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scaler_state: dict[str, Any], config: dict[str, Any], rank: int, world_size: int,
                    keep: int = 2) -> Path:
    """Write the checkpoint of ``step`` under ``folder`` (every rank calls this; rank 0 writes the shared files).

    Returns:
        The checkpoint folder.
    """
    import torch.distributed as dist

    folder = Path(folder)
    final = folder / f"step_{step:08d}"
    staging = folder / f".step_{step:08d}.partial"
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    if world_size > 1:
        dist.barrier()
    safetensors.torch.save_file(_rng_state(), str(staging / f"rng_rank{rank}.safetensors"))
    if rank == 0:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        safetensors.torch.save_file(weights, str(staging / "model.safetensors"))
        tensors, structure = _flatten_optimizer(optimizer.state_dict())
        safetensors.torch.save_file(tensors, str(staging / "optimizer.safetensors"))
        _write_json(staging / "optimizer.json", structure)
    if world_size > 1:
        dist.barrier()
    if rank == 0:
        _write_json(staging / "state.json", {"step": step, "world_size": world_size, "config": config,
                                             "scaler": scaler_state})
        for path in staging.iterdir():  # make the bytes durable before the rename publishes them
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        pointer = folder / f".{LATEST}.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, folder / LATEST)
        for old in sorted(p for p in folder.glob("step_*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if world_size > 1:
        dist.barrier()
    return final


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint ``checkpoints/latest`` points to, or None when the run has none yet."""
    pointer = Path(folder) / LATEST
    if not pointer.is_file():
        return None
    path = Path(folder) / pointer.read_text().strip()
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{pointer} points to {path}, which is not a complete checkpoint; delete the "
                                "pointer to resume from the previous one")
    return path


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int
                    ) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG states from ``path``; returns ``state.json``."""
    from geolink.hub import load_state_dict_checked

    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    load_state_dict_checked(model, safetensors.torch.load_file(str(path / "model.safetensors")),
                            source=str(path / "model.safetensors"))
    structure = json.loads((path / "optimizer.json").read_text())
    optimizer.load_state_dict(_unflatten_optimizer(safetensors.torch.load_file(str(path / "optimizer.safetensors")),
                                                   structure))
    rng_file = path / f"rng_rank{rank}.safetensors"
    if rng_file.is_file():
        rng = safetensors.torch.load_file(str(rng_file))
        torch.set_rng_state(rng["cpu"])
        cuda_states = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states)
    return state
