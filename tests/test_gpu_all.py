"""benchmarks/gpu_all.py: the --smoke run measures every section on CPU and writes its JSON and Markdown table;
without CUDA a full run refuses with a message."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_all.py"


def run(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *arguments], capture_output=True, text=True, timeout=900)


def test_the_smoke_run_measures_every_section(tmp_path):
    result = run("--smoke", "--out", str(tmp_path), "--skip", "tags")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_all.json").read_text())
    rows = {(row["name"], row["setting"].split(", ")[-1]): row for row in results["rows"]}
    assert results["smoke"] and results["arch"] == "geolink_tiny"
    for key in [("pretraining step", "eager"), ("image encoder inference", "eager"),
                ("fusion encoder inference", "~50 nodes")]:
        row = rows[key]
        assert row["per_s_min"] <= row["per_s"] <= row["per_s_max"] and row["repeats"] == 2, key
    assert "skipped" in rows["pretraining step", "compiled"]
    table = (tmp_path / "gpu_all.md").read_text()
    fusion = rows["fusion encoder inference", "~50 nodes"]
    assert "| pretraining step | batch 2, fp32, eager |" in table and f"{fusion['per_s']:.1f} (" in table


def test_the_tag_section_uses_the_public_tag_encoder(tmp_path):
    result = run("--smoke", "--out", str(tmp_path), "--skip", "pretrain", "image", "fusion")
    assert result.returncode == 0, result.stderr[-3000:]
    (row, skipped) = json.loads((tmp_path / "gpu_all.json").read_text())["rows"]
    assert row["name"].startswith("tag embedding") and row["per_s"] > 0 and "skipped" in skipped


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine runs the full benchmark")
def test_a_full_run_without_cuda_stops_with_a_message(tmp_path):
    result = run("--out", str(tmp_path))
    assert result.returncode == 2 and "no CUDA device" in result.stderr and "--smoke" in result.stderr
    assert not (tmp_path / "gpu_all.json").exists()
