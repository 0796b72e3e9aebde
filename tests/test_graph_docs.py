"""The Python examples of docs/osm_to_graphs.md run as written."""

from __future__ import annotations

import os
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "osm_to_graphs.md"


def test_docs_examples_run(shared_data, minilm_path):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) >= 3
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(DOC.parents[1])  # the examples use ../shared relative to the repository root
    try:
        exec(compile("\n".join(blocks[:2]), str(DOC), "exec"), namespace)
    finally:
        os.chdir(cwd)
    assert namespace["graph"]["polygon"].x.shape == (36, 384)
    assert namespace["report"].nodes == {"polygon": 1, "line": 1, "point": 1}
