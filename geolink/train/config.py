"""Pretraining run configuration: :class:`TrainConfig`, the one declaration of every ``geolink pretrain`` option.

Each field is one flag (``max_steps`` → ``--max-steps``, help from the field's metadata; ``geolink.cli`` derives
them). The configuration of a run is saved next to its checkpoints, and ``resume`` checks that the new run agrees
with it on everything that shapes the run (all fields but :data:`RESUMABLE_CHANGES`).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from geolink.errors import ConfigError
from geolink.runtime import Precision, option, warmup_cosine


@dataclass
class TrainConfig:
    """GeoLink pretraining (MAE + image-OSM contrastive + masked-node consistency) on one CPU/GPU or many with
    torchrun. Writes <out>/metrics.jsonl, checkpoints under <out>/checkpoints/ and the final from_pretrained folder
    <out>/final/.

    Everything that defines a run; ``geolink.train.run(TrainConfig(...))`` runs it from Python.
    """

    arch: str = option("geolink_tiny", "architecture name (geolink info lists them) or a config JSON path")
    data: str = option("bundled", "training pairs: 'bundled' (the real pairs shipped with geolink), a pair-dataset "
                                   "folder or URL (index.json), or the official layout img/ + graph/")
    out: Path = option(Path("runs/pretrain"), "output folder: metrics.jsonl, checkpoints/, final/")
    max_steps: int = option(1000, "optimisation steps")
    batch_size: int = option(32, "samples per process and micro-step; the global batch is this × processes × "
                                  "accum_steps")
    accum_steps: int = option(1, "gradient accumulation micro-steps per optimisation step")
    base_lr: float = option(1.5e-4, "learning rate for a global batch of 256 (lr = base_lr × global_batch / 256)")
    min_lr: float = option(0.0, "learning rate at the end of the cosine schedule")
    warmup_steps: int = option(100, "linear warmup steps; keep it below max_steps (a longer warmup is kept as given, "
                                     "with a warning: the learning rate would only rise)")
    weight_decay: float = option(0.05, "AdamW weight decay (never applied to norms, biases and tokens)")
    clip_grad: float = option(1.0, "clip the global gradient norm to this value (0 disables)")
    precision: Precision = option(Precision.AUTO, "autocast precision; auto: bf16 on GPUs that support it, fp16 on "
                                                   "other GPUs, fp32 on CPU")
    save_every: int = option(500, "write a checkpoint every N steps (and always at the end)")
    keep_checkpoints: int = option(2, "how many recent checkpoints to keep")
    log_every: int = option(10, "every N steps: check the losses are finite, write the window's records to "
                                 "metrics.jsonl (one per step) and refresh the progress bar; the only host sync")
    seed: int = option(0, "seed of the model init, data order and masks")
    resume: bool = option(False, "continue the run in the output folder from its latest complete checkpoint")
    overwrite: bool = option(False, "start again in an output folder that holds a run: the old run is moved to "
                                    "<out>/previous-<n>/, never deleted")
    num_workers: int = option(0, "data-loading worker processes per rank")
    device: str = option("auto", "cpu, cuda, or auto")
    compile: bool = option(False, "torch.compile the model")
    grad_checkpointing: bool = option(False, "recompute the ViT blocks' activations in the backward pass instead of "
                                             "storing them (less memory for ViT-L at large batch, ~30 % more compute)")
    tensorboard: bool = option(False, "also log to TensorBoard (needs the tensorboard package)")
    push_to_hub: str | None = option(None, "upload the final model to this Hugging Face Hub repo id")
    overrides: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "architecture overrides SECTION.KEY=VALUE (JSON values; sections image, osm, fusion, pretraining), "
                "e.g. osm.text_dim=512", "flag": "--set", "metavar": "SECTION.KEY=VALUE"})

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        for name in ("max_steps", "batch_size", "accum_steps", "save_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1; got {getattr(self, name)}")
        for name in ("warmup_steps", "num_workers", "base_lr", "min_lr", "weight_decay", "clip_grad"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative; got {getattr(self, name)}")
        if self.resume and self.overwrite:
            raise ConfigError("resume=True and overwrite=True contradict each other: pass resume=True to continue the "
                              f"run in {self.out}, or overwrite=True to move it aside and start again")
        if self.warmup_steps >= self.max_steps:
            warnings.warn(f"warmup_steps={self.warmup_steps} is not below max_steps={self.max_steps}: the learning "
                          "rate would rise for the whole run and its cosine decay from the peak (base_lr × "
                          "global_batch / 256) never start; set warmup_steps to a fraction of max_steps (a tenth: "
                          f"{self.max_steps // 10})", UserWarning, stacklevel=3)

    def global_batch(self, world_size: int) -> int:
        """Samples per optimisation step over all processes."""
        return self.batch_size * world_size * self.accum_steps

    def peak_lr(self, world_size: int) -> float:
        """``base_lr × global_batch / 256`` (the MAE scaling rule)."""
        return self.base_lr * self.global_batch(world_size) / 256

    def lr_at(self, step: int, world_size: int) -> float:
        """Learning rate of optimisation step ``step`` (0-based): linear warmup, then cosine to ``min_lr``."""
        return warmup_cosine(step, self.peak_lr(world_size), self.warmup_steps, self.max_steps, self.min_lr)

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON values (paths and enums as text), as saved with each checkpoint."""
        return {key: value.value if isinstance(value, Enum) else str(value) if isinstance(value, Path) else value
                for key, value in asdict(self).items()}


# fields that may differ between a run and its resumption; not max_steps: it sets the cosine schedule of every step
RESUMABLE_CHANGES = frozenset({"save_every", "keep_checkpoints", "log_every", "resume", "overwrite", "num_workers",
                               "tensorboard", "push_to_hub", "out", "grad_checkpointing"})
