"""The README quickstart runs as written (with the offline MiniLM folder in place of its Hub id)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs(minilm_path):
    code = re.search(r"## Quickstart\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    code = code.replace('"sentence-transformers/all-MiniLM-L6-v2"', repr(str(minilm_path)))
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert [tuple(m.shape) for m in namespace["maps"]] == [(1, 192, 14, 14)] * 3 + [(1, 128, 14, 14)]
    assert namespace["graph"]["polygon"].num_nodes == 1 and namespace["graph"]["line"].num_nodes == 1
