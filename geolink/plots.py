"""``geolink plot-metrics``: the training curves of a pretraining run, drawn from its ``metrics.jsonl`` into one PNG.

A run of :func:`geolink.train.run` leaves one JSON record per optimisation step in ``<out>/metrics.jsonl``
(``step``, the loss and its terms, ``lr``, ``grad_norm``, ``samples_per_s``). :func:`read_metrics` reads it,
tolerating the torn last line of a run killed while writing; :func:`curves_figure` draws the loss terms, the
learning rate and the throughput against the step; :func:`plot_metrics` writes them to a PNG. Drawing needs
matplotlib, an optional dependency (``pip install geolink[plot]``) imported only when a plot is made. The job is
:class:`PlotMetricsConfig` → :func:`plot_metrics`.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geolink.errors import DataError, MissingDependencyError, MissingInputError
from geolink.runtime import option

#: the panels of the figure: (title, y label, log scale, the record keys drawn in it)
PANELS = (("loss and its terms", "loss", True, ("loss", "loss_mae", "loss_contrastive", "loss_consistency")),
          ("learning rate", "lr", False, ("lr",)),
          ("throughput", "samples / s", False, ("samples_per_s",)))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``, in file order.

    A last line that is not valid JSON after valid records (a run killed while writing it) is skipped with a
    ``UserWarning``.

    Raises:
        MissingInputError: ``path`` does not exist.
        DataError: the file holds no record, or a line other than the last is not a JSON record with a ``step``.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"metrics {str(path)!r} does not exist (pass the metrics.jsonl a pretraining run "
                                "wrote into its out folder)")
    lines = [(number, line) for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if line.strip()]
    records = []
    for number, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number != lines[-1][0] or not records:
                raise DataError(f"line {number} of metrics {str(path)!r} is not JSON (pass the metrics.jsonl of a "
                                "pretraining run; only its last line may be cut short)") from None
            warnings.warn(f"skipped the torn last line {number} of {path} (the run stopped while writing it)",
                          UserWarning, stacklevel=2)
            continue
        if not isinstance(record, dict) or "step" not in record:
            raise DataError(f"line {number} of metrics {str(path)!r} is not a metrics record (no 'step'; pass the "
                            "metrics.jsonl of a pretraining run)")
        records.append(record)
    if not records:
        raise DataError(f"metrics {str(path)!r} holds no records (the run has not finished a step yet)")
    return records


@dataclass
class PlotMetricsConfig:
    """Draw the training curves of a pretraining run from its metrics.jsonl into one PNG: the loss and its terms
    (log scale), the learning rate and the throughput, against the optimisation step. Needs matplotlib (pip install
    geolink[plot]).

    The ``geolink plot-metrics`` job; :func:`plot_metrics` runs it.
    """

    metrics: Path = field(metadata={"help": "the run's metrics.jsonl (or the run's out folder)", "positional": True})
    out: Path | None = option(None, "output PNG (default: curves.png next to the metrics file)")

    def __post_init__(self) -> None:
        self.metrics = Path(self.metrics)
        if self.metrics.is_dir():
            self.metrics = self.metrics / "metrics.jsonl"
        self.out = self.metrics.with_name("curves.png") if self.out is None else Path(self.out)


def curves_figure(records: list[dict[str, Any]], title: str):
    """The matplotlib ``Figure`` of :data:`PANELS` drawn from metrics ``records`` (one line per key present).

    Raises:
        MissingDependencyError: matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import LogFormatter, MaxNLocator
    except ImportError:
        raise MissingDependencyError("plotting metrics needs matplotlib, which is not installed (pip install "
                                     "geolink[plot])") from None
    figure = Figure(figsize=(7, 8.5), layout="constrained")
    axes = figure.subplots(len(PANELS), 1, sharex=True)
    for ax, (panel, label, log, keys) in zip(axes, PANELS, strict=True):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, label=key, linewidth=2.2 if key == "loss" else 1.2,
                        marker="o" if len(points) < 20 else None, markersize=3)
        if log and ax.has_data():
            ax.set_yscale("log")  # plain numbers on the ticks (0.3, 2), not 3×10⁻¹
            ax.yaxis.set_major_formatter(LogFormatter())
            ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        ax.set_title(panel, loc="left", fontsize=10)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if len(keys) > 1 and ax.has_data():
            ax.legend(fontsize=8)
    axes[-1].set_xlabel("optimisation step")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.suptitle(title, fontsize=11)
    return figure


def plot_metrics(config: PlotMetricsConfig) -> Path:
    """Draw the curves of ``config.metrics`` into ``config.out`` and say where they are.

    Returns:
        The PNG written.

    Raises:
        MissingDependencyError: matplotlib is not installed.
        MissingInputError, DataError: see :func:`read_metrics`.
    """
    records = read_metrics(config.metrics)
    run = config.metrics.resolve().parent.name
    figure = curves_figure(records, f"{run}: {len(records)} steps, up to step {records[-1]['step']}")
    config.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(config.out, dpi=120)
    print(f"wrote {config.out.resolve()}")
    return config.out
