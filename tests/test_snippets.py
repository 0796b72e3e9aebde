"""Every ```python block of README.md and docs/*.md runs offline, as written.

The blocks of one page run in order in one fresh namespace, in an empty folder laid out like a checkout (``../shared``
is the shared data next to the repository, as the docs assume). A block that cannot run offline (it needs the Hub,
a GPU, torchrun or a dataset that is not shipped) is exempted in the Markdown itself, by the comment
``<!-- no-test: <reason> -->`` on the line right before it, so the exemption is visible where the block is.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import shared_path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"(?:<!-- no-test: (?P<reason>[^>]+?) -->\n)?```python\n(?P<code>.*?)```", re.S)


def check_readme(namespace: dict) -> None:
    """The Quickstart builds the tile's graph with MiniLM features and gets the embedded model's four maps."""
    assert [tuple(m.shape) for m in namespace["maps"]] == [(1, 192, 14, 14)] * 3 + [(1, 128, 14, 14)]
    graph = namespace["graph"]
    assert [graph[t].num_nodes for t in ("polygon", "line", "point")] == [8, 9, 1] and graph["line"].x.shape[1] == 384


def check_osm_to_graphs(namespace: dict) -> None:
    """The Helsinki shard is built, merged and read back with materialised MiniLM features; the key table is written."""
    graph = namespace["graph"]
    assert graph["polygon"].x.shape[1] == 384 and graph["polygon"].tags.shape[0] == graph["polygon"].num_nodes > 0
    assert Path("my_key_frequency.json").is_file()


def check_pretraining(namespace: dict) -> None:
    """The pair written by the example is read back, and the short run leaves its metrics and final model."""
    image, graph = namespace["dataset"][0]
    assert image.shape == (3, 224, 224) and graph["polygon"].x.shape == (1, 384)
    assert len(Path("runs/tiny/metrics.jsonl").read_text().splitlines()) == 20
    assert (Path("runs/tiny/final") / "config.json").is_file()


def check_finetuning(namespace: dict) -> None:
    """The task of your own trains for its two epochs and writes metrics.json."""
    assert len(namespace["result"].history) == 2 and Path("runs/mine/metrics.json").is_file()


#: page -> what its blocks must have produced, beyond running without an error
CHECKS: dict[str, Callable[[dict], None]] = {
    "README.md": check_readme,
    "osm_to_graphs.md": check_osm_to_graphs,
    "pretraining.md": check_pretraining,
    "finetuning.md": check_finetuning,
}


def python_blocks(text: str) -> list[tuple[str, str | None, int]]:
    """``(code, no-test reason or None, line number)`` of each ```python block of a Markdown text."""
    return [(m["code"], m["reason"], text.count("\n", 0, m.start("code")) + 1) for m in _BLOCK.finditer(text)]


def test_python_blocks_finds_markers():
    text = "a\n```python\nx = 1\n```\n<!-- no-test: needs the Hub -->\n```python\ny = 2\n```\n```bash\nz\n```\n"
    assert python_blocks(text) == [("x = 1\n", None, 3), ("y = 2\n", "needs the Hub", 7)]


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_page_snippets_run(page, tmp_path, monkeypatch):
    blocks = python_blocks(page.read_text())
    checkout = tmp_path / "geolink"
    checkout.mkdir()
    if any("../shared" in code for code, reason, _ in blocks if reason is None):
        (tmp_path / "shared").symlink_to(shared_path().parent, target_is_directory=True)  # skips when absent
    monkeypatch.chdir(checkout)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a block that reaches for the Hub fails at once instead of retrying
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    namespace: dict = {"__name__": "__snippet__"}
    for code, reason, line in blocks:
        if reason is None:  # tracebacks give the page's line numbers
            exec(compile("\n" * (line - 1) + code, str(page), "exec"), namespace)
    CHECKS.get(page.name, lambda namespace: None)(namespace)
