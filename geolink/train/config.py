"""Pretraining run configuration: one dataclass, its command line, and the learning-rate schedule.

Every field is a ``geolink pretrain`` flag (``max_steps`` → ``--max-steps``); the field's metadata holds its help.
The configuration of a run is saved next to its checkpoints, and ``--resume`` checks that the new command agrees
with it on everything that shapes the run.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any


def _option(default: Any, help: str, **kwargs: Any) -> Any:
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainConfig:
    """Everything that defines a pretraining run."""

    arch: str = _option("geolink_tiny", "architecture name (geolink info lists them) or a config JSON path")
    data: str = _option("bundled", "training pairs: 'bundled' (the real pairs shipped with geolink) or a folder")
    out: str = _option("runs/pretrain", "output folder: metrics.jsonl, checkpoints/, final/")
    max_steps: int = _option(1000, "optimisation steps")
    batch_size: int = _option(32, "samples per process and micro-step; the global batch is "
                                  "batch_size × processes × accum_steps")
    accum_steps: int = _option(1, "gradient accumulation micro-steps per optimisation step")
    base_lr: float = _option(1.5e-4, "learning rate for a global batch of 256 (lr = base_lr × global_batch / 256)")
    min_lr: float = _option(0.0, "learning rate at the end of the cosine schedule")
    warmup_steps: int = _option(100, "linear warmup steps")
    weight_decay: float = _option(0.05, "AdamW weight decay (never applied to norms, biases and tokens)")
    clip_grad: float = _option(1.0, "clip the global gradient norm to this value (0 disables)")
    precision: str = _option("auto", "autocast precision: bf16, fp16, fp32, or auto (bf16 on GPU, fp32 on CPU)",
                             choices=("auto", "bf16", "fp16", "fp32"))
    save_every: int = _option(500, "write a checkpoint every N steps (and always at the end)")
    keep_checkpoints: int = _option(2, "how many recent checkpoints to keep")
    log_every: int = _option(10, "progress-bar refresh period in steps (metrics.jsonl gets every step)")
    seed: int = _option(0, "seed of the model init, data order and masks")
    resume: bool = _option(False, "continue from the latest checkpoint in --out")
    num_workers: int = _option(0, "data-loading worker processes per rank")
    device: str = _option("auto", "cpu, cuda, or auto")
    compile: bool = _option(False, "torch.compile the model")
    tensorboard: bool = _option(False, "also log to TensorBoard (needs the tensorboard package)")
    push_to_hub: str = _option("", "upload the final model to this Hugging Face Hub repo id")
    overrides: dict = _option(None, "architecture overrides as KEY=VALUE (JSON values), e.g. text_dim=512",
                              flag="--set")

    def global_batch(self, world_size: int) -> int:
        return self.batch_size * world_size * self.accum_steps

    def peak_lr(self, world_size: int) -> float:
        """``base_lr × global_batch / 256`` (the MAE scaling rule)."""
        return self.base_lr * self.global_batch(world_size) / 256

    def lr_at(self, step: int, world_size: int) -> float:
        """Learning rate of optimisation step ``step`` (0-based): linear warmup, then cosine to ``min_lr``."""
        peak = self.peak_lr(world_size)
        if step < self.warmup_steps:
            return peak * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)
        return self.min_lr + (peak - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# fields that may differ between a run and its resumption
RESUMABLE_CHANGES = frozenset({"max_steps", "save_every", "keep_checkpoints", "log_every", "resume", "num_workers",
                               "tensorboard", "push_to_hub", "out"})


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Add one flag per :class:`TrainConfig` field to ``parser`` (or a new one)."""
    parser = parser or argparse.ArgumentParser(prog="geolink pretrain")
    for item in fields(TrainConfig):
        flag = item.metadata.get("flag", "--" + item.name.replace("_", "-"))
        default = item.default if item.default is not MISSING else None
        if item.type in ("bool", bool):
            parser.add_argument(flag, dest=item.name, action="store_true", help=item.metadata["help"])
        elif item.name == "overrides":
            parser.add_argument(flag, dest=item.name, action="append", metavar="KEY=VALUE",
                                help=item.metadata["help"])
        else:
            kind = {"int": int, "float": float}.get(str(item.type), str)
            parser.add_argument(flag, dest=item.name, type=kind, default=default, choices=item.metadata.get("choices"),
                                help=f"{item.metadata['help']} (default: {default})")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A :class:`TrainConfig` from parsed flags (``--set KEY=VALUE`` values are read as JSON, else as strings)."""
    import json

    values = {item.name: getattr(args, item.name) for item in fields(TrainConfig)}
    overrides = {}
    for pair in values.pop("overrides") or []:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    return TrainConfig(**values, overrides=overrides)


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse ``geolink pretrain`` arguments."""
    return config_from_args(build_parser().parse_args(argv))
