"""The documentation site's generated parts: the pages the MkDocs hook writes, the gallery script and its page.

``mkdocs build --strict`` itself runs in ``.ci/run`` (it needs the ``[docs]`` extra).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from PIL import Image

import geolink

DOCS = Path(__file__).resolve().parents[1] / "docs"


def load(name: str):
    """A script of ``docs/`` as a module."""
    spec = importlib.util.spec_from_file_location(f"docs_{name}", DOCS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def hooks():
    return load("hooks")


@pytest.fixture(scope="module")
def gallery():
    return load("make_gallery")


def test_repository_links_become_site_links(hooks):
    text = ("[a](docs/models.md) [b](../README.md#the-graph-contract) [c](benchmarks/RESULTS.md) "
            "[d](docs/reproduce.md#status) [e](https://example.org/docs/x.md) [f](models.md)")
    assert hooks.site_links(text) == ("[a](models.md) [b](index.md#the-graph-contract) [c](results.md) "
                                      "[d](reproduce.md#status) [e](https://example.org/docs/x.md) [f](models.md)")


def test_docstring_roles_render_as_code(hooks):
    html = ":class:<code>~geolink.errors.ConfigError</code> or :func:<code>geolink.create_model</code>,<code>a:b</code>"
    assert hooks.plain_roles(html) == "<code>ConfigError</code> or <code>geolink.create_model</code>,<code>a:b</code>"


def test_model_zoo_lists_every_tag_and_architecture(hooks):
    page = hooks.model_zoo_markdown()
    rows = {line.split("|")[1].strip(" `"): line for line in page.splitlines() if line.startswith("| `")}
    assert set(rows) == set(geolink.list_pretrained()) | set(geolink.list_models())
    for name, where in geolink.list_pretrained(available=True).items():
        assert rows[name].rstrip(" |").endswith(where)
    # counts on the meta device are those of the real model
    image = geolink.create_model("geolink_tiny", component="image")
    assert f"| {sum(p.numel() for p in image.parameters()) / 1e6:.1f} M |" in rows["geolink_tiny"]


def test_every_nav_page_exists_or_is_generated(hooks):
    nav = re.findall(r":\s*(\S+\.md)\s*$", (DOCS.parent / "mkdocs.yml").read_text(), re.M)
    missing = [page for page in nav if not (DOCS / page).is_file() and page not in {*hooks.COPIED, "model_zoo.md"}]
    assert len(nav) > 10 and missing == []


def test_gallery_page_shows_what_the_script_makes(gallery):
    shown = re.findall(r"!\[[^\]]*\]\(gallery/([^)]+)\)", (DOCS / "gallery.md").read_text())
    assert sorted(shown) == sorted(gallery.FIGURES)
    for name in shown:
        assert (DOCS / "gallery" / name).is_file(), f"run python docs/make_gallery.py {name}"


def test_gallery_script_makes_a_figure(gallery, tmp_path, capsys):
    gallery.main(["osm_graphs.png", "--out", str(tmp_path)])
    with Image.open(tmp_path / "osm_graphs.png") as image:
        assert image.mode == "P" and image.width > 5 * gallery.CELL
    assert "osm_graphs.png" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        gallery.main(["nope.png"])
