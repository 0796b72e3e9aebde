"""Runnable examples of the model documentation execute as written (offline ones only)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

DOCS = Path(__file__).resolve().parents[1] / "docs"


def python_block(page: str, heading: str) -> str:
    """The first ```python block after ``heading`` in ``docs/<page>``."""
    text = (DOCS / page).read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_models_page_preprocessing_example():
    namespace: dict = {}
    exec(compile(python_block("models.md", "## Preprocessing images"), "docs/models.md", "exec"), namespace)
    assert namespace["batch"].shape == (5, 3, 224, 224) and namespace["features"].shape == (5, 192)
    assert torch.isfinite(namespace["features"]).all()


def test_models_page_running_the_encoders():
    namespace: dict = {}
    exec(compile(python_block("models.md", "## Running the encoders"), "docs/models.md", "exec"), namespace)
    assert [tuple(m.shape) for m in namespace["maps"]] == [(2, 192, 14, 14)] * 3 + [(2, 128, 14, 14)]
    assert namespace["images"].shape == (2, 3, 224, 224) and namespace["tokens"].shape == (2, 197, 192)
    region = namespace["region"]  # two real tiles with OSM nodes: distinct, non-zero region embeddings
    assert region.shape == (2, 128) and torch.isfinite(region).all() and not torch.allclose(region[0], region[1])


def test_models_page_registry_example():
    namespace: dict = {}
    exec(compile(python_block("models.md", "## Architectures and pretrained tags"), "docs/models.md", "exec"),
         namespace)
    assert namespace["image"].in_chans == 4 and namespace["fusion"].out_indices == [7, 11, 15, 23]
