"""What every benchmark script shares: which geolink tree is measured, timing statistics, and the shared inputs.

The scripts import ``geolink`` from the running interpreter, so one script measures either tree:
``python benchmarks/bench_x.py`` measures the installed (editable) checkout and
``PYTHONPATH=/tmp/geolink_head python benchmarks/bench_x.py`` the tree at ``/tmp/geolink_head``
(``benchmarks/run_all.sh`` runs both back to back). Where a module moved between the trees, :func:`import_first`
takes the new home and falls back to the old one.
"""

from __future__ import annotations

import importlib
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import geolink

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
PARITY_INPUTS = SHARED / "parity" / "official_tiny" / "inputs.safetensors"


def geolink_tree() -> Path:
    """Root of the source tree the running ``geolink`` was imported from."""
    return Path(geolink.__file__).resolve().parents[1]


def describe_run() -> str:
    """One line naming the measured tree (path, commit, uncommitted changes) and the machine's state."""
    tree = geolink_tree()

    def git(*args: str) -> str:
        result = subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True, check=False)
        return result.stdout.strip() if result.returncode == 0 else "?"

    dirty = " + uncommitted changes" if git("status", "--porcelain", "--", "geolink") not in ("", "?") else ""
    return (f"geolink {tree} (commit {git('rev-parse', '--short', 'HEAD')}{dirty}); torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {load_average()}")


def load_average() -> str:
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def import_first(*candidates: str) -> Any:
    """The first importable ``"module:attribute"`` of ``candidates`` (new home first, then the pre-refactor one)."""
    errors = []
    for candidate in candidates:
        module, _, attribute = candidate.partition(":")
        try:
            return getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as error:
            errors.append(f"{candidate}: {error}")
    raise ImportError("none of these imports works in this tree:\n  " + "\n  ".join(errors))


def timings(fn: Callable[[], Any], runs: int) -> tuple[list[float], Any]:
    """Wall times of ``runs`` calls of ``fn`` and the last result."""
    times, out = [], None
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return times, out


def spread(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    """``median (min–max)`` of ``values`` times ``scale``, e.g. seconds as ``7.63 (7.36–8.10)``."""
    lo, mid, hi = (scale * v for v in (min(values), statistics.median(values), max(values)))
    return f"{mid:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def create_model(arch: str, text_dim: int, component: str | None = None) -> torch.nn.Module:
    """``geolink.create_model`` with the OSM text width overridden, in the nested (new) or flat (old) config form."""
    kwargs = {"component": component} if component else {}
    try:
        return geolink.create_model(arch, osm={"text_dim": text_dim}, **kwargs)
    except (TypeError, ValueError):  # the pre-refactor registry takes flat overrides
        return geolink.create_model(arch, text_dim=text_dim, **kwargs)


def parity_graphs() -> tuple[torch.Tensor, list]:
    """The three images and official-layout UFZ graphs of the parity fixture, converted to the graph schema."""
    import safetensors.torch

    graph_from_official = import_first("geolink.graph.official:graph_from_official",
                                       "geolink.convert:graph_from_official")
    official_graph_from_tensors = import_first("geolink.graph.official:official_graph_from_tensors",
                                               "geolink.convert:official_graph_from_tensors")
    inputs = safetensors.torch.load_file(str(PARITY_INPUTS))
    return inputs["images"], [graph_from_official(official_graph_from_tensors(inputs, f"graph{i}.")) for i in range(3)]


class Patched:
    """Replace ``owner.name`` by a counting wrapper of ``replacement`` while in the ``with`` block.

    Raises when ``owner`` has no such attribute or when the wrapper was never called, so a benchmark cannot silently
    time the unpatched code after a refactor moved the function it swaps.
    """

    def __init__(self, owner: Any, name: str, replacement: Callable[..., Any]) -> None:
        if not hasattr(owner, name):
            raise AttributeError(f"{owner!r} has no {name!r} to replace: the benchmark needs updating")
        self.owner, self.name, self.replacement, self.calls = owner, name, replacement, 0

    def __enter__(self) -> Patched:
        self.original = getattr(self.owner, self.name)

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return self.replacement(*args, **kwargs)

        setattr(self.owner, self.name, counting)
        return self

    def __exit__(self, *exc: object) -> None:
        setattr(self.owner, self.name, self.original)
        if exc[0] is None and not self.calls:
            raise RuntimeError(f"{self.owner!r}.{self.name} was replaced but never called: the code under test no "
                               "longer goes through it, update the benchmark")
