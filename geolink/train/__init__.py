"""GeoLink pretraining: run configuration, the training engine, checkpoints and process groups.

Only ``geolink.cli`` imports this package; use ``geolink.train.main(argv)`` from Python.
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """``geolink pretrain`` as a Python call, e.g. ``main(["--data", "bundled", "--out", "runs/tiny"])``."""
    from geolink.train.trainer import main as trainer_main

    return trainer_main(argv)


__all__ = ["main"]
