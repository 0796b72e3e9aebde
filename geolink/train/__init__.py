"""GeoLink pretraining: the run configuration, the training engine, checkpoints and process groups.

From Python: ``geolink.train.run(TrainConfig(data="bundled", out="runs/tiny", max_steps=200))``; from a shell:
``geolink pretrain --data bundled --out runs/tiny --max-steps 200`` (flags derived from :class:`TrainConfig`).
The engine (:mod:`geolink.train.trainer`) is imported on first use of ``run`` / ``train``.
"""

from __future__ import annotations

import importlib
from typing import Any

from geolink.train.config import TrainConfig

__all__ = ["TrainConfig", "run", "train"]


def __getattr__(name: str) -> Any:
    if name in ("run", "train"):
        return getattr(importlib.import_module("geolink.train.trainer"), name)
    raise AttributeError(f"module 'geolink.train' has no attribute {name!r}")
