"""GeoLink pretraining: run configuration, the training engine, checkpoints and process groups.

Only ``geolink.cli`` imports this package; use ``geolink.train.main(argv)`` from Python.
"""

from geolink.train.trainer import main

__all__ = ["main"]
