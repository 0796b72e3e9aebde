"""``geolink plot-metrics``: reading a run's metrics.jsonl (torn last line, bad files) and drawing its curves."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from PIL import Image

from geolink.cli import main
from geolink.errors import DataError, GeoLinkError, MissingInputError
from geolink.plots import PlotMetricsConfig, curves_figure, plot_metrics, read_metrics
from geolink.train import TrainConfig, run

TERMS = ["loss", "loss_mae", "loss_contrastive", "loss_consistency"]


def _record(step: int) -> dict:
    return {"step": step, "loss": 2.0 / step, "loss_mae": 1.0 / step, "loss_contrastive": 4.0 - step / 10,
            "loss_consistency": 3.0, "lr": 1e-3 * step, "grad_norm": 1.0, "samples_per_s": 40.0 + step}


def _write(path, lines: list[str]):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_a_real_run_is_drawn(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert run(TrainConfig(data="bundled", out=out, max_steps=3, batch_size=2, warmup_steps=1, save_every=3,
                           device="cpu", precision="fp32")) == 0
    records = read_metrics(out / "metrics.jsonl")
    figure = curves_figure(records, "tiny")
    losses, lr, throughput = figure.axes
    assert [line.get_label() for line in losses.get_lines()] == TERMS and losses.get_yscale() == "log"
    for line in losses.get_lines():
        assert list(line.get_xdata()) == [1, 2, 3]
        assert list(line.get_ydata()) == [r[line.get_label()] for r in records]
    assert list(lr.get_lines()[0].get_ydata()) == [r["lr"] for r in records]
    assert list(throughput.get_lines()[0].get_ydata()) == [r["samples_per_s"] for r in records]
    capsys.readouterr()
    assert main(["plot-metrics", str(out / "metrics.jsonl"), "--out", str(tmp_path / "curves.png")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {(tmp_path / 'curves.png').resolve()}"
    with Image.open(tmp_path / "curves.png") as picture:
        assert picture.size == (840, 1020)
        assert np.asarray(picture.convert("L")).std() > 10


def test_the_torn_last_line_of_a_killed_run_is_skipped_with_a_warning(tmp_path):
    path = _write(tmp_path / "metrics.jsonl", [json.dumps(_record(1)), "", json.dumps(_record(2)),
                                               json.dumps(_record(3))[:40]])
    with pytest.warns(UserWarning, match="skipped the torn last line 4 of"):
        records = read_metrics(path)
    assert records == [_record(1), _record(2)]
    config = PlotMetricsConfig(tmp_path)  # the run folder: its metrics.jsonl, curves.png beside it
    assert config.metrics == path and config.out == tmp_path / "curves.png"
    with pytest.warns(UserWarning):
        assert plot_metrics(config) == tmp_path / "curves.png"
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_a_file_with_missing_terms_draws_what_it_has(tmp_path):
    records = [{"step": s, "loss": 1.0 / s, "lr": 0.1} for s in (1, 2)]  # e.g. a run without the OSM terms
    losses, lr, throughput = curves_figure(records, "partial").axes
    assert [line.get_label() for line in losses.get_lines()] == ["loss"] and not throughput.has_data()


@pytest.mark.parametrize("lines, error, message", [
    ([], DataError, "holds no records"),
    (["", "  "], DataError, "holds no records"),
    (["{not json", json.dumps(_record(2))], DataError, "line 1 of metrics .* is not JSON"),
    ([json.dumps({"loss": 1.0})], DataError, "line 1 of metrics .* is not a metrics record"),
    (["not a metrics file"], DataError, "line 1 of metrics .* is not JSON"),  # nothing before it: not a torn run
])
def test_bad_metrics_files_are_named(tmp_path, lines, error, message):
    with pytest.raises(error, match=message):
        read_metrics(_write(tmp_path / "metrics.jsonl", lines))


def test_missing_and_empty_files_are_one_line_errors(tmp_path, capsys):
    assert main(["plot-metrics", str(tmp_path / "missing.jsonl")]) == 2
    assert capsys.readouterr().err.startswith("error: metrics '") and not (tmp_path / "curves.png").exists()
    with pytest.raises(MissingInputError, match="does not exist"):
        read_metrics(tmp_path / "missing.jsonl")
    assert main(["plot-metrics", str(_write(tmp_path / "metrics.jsonl", []))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no records" in err


def test_without_matplotlib_the_error_says_what_to_install(tmp_path, monkeypatch):
    path = _write(tmp_path / "metrics.jsonl", [json.dumps(_record(1))])
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(GeoLinkError, match=r"pip install geolink\[plot\]"):
        plot_metrics(PlotMetricsConfig(path))
