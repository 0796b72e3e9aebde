"""MkDocs hooks: the pages that are generated from the repository when the site is built.

- ``index.md`` is the README, ``results.md`` is ``benchmarks/RESULTS.md`` and ``changelog.md`` is ``CHANGELOG.md``
  (one source each; their repository-relative links are rewritten to site pages);
- ``model_zoo.md`` is written from the registry: every pretrained tag and every architecture with its parameter
  counts (models are built on the meta device, so the ViT-L costs no memory).

Registered in ``mkdocs.yml`` (``hooks: [docs/hooks.py]``); nothing here is imported by the package or its tests
except :func:`model_zoo_markdown` (``tests/test_docs_site.py``).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: generated page -> repository file it is copied from
COPIED = {"index.md": "README.md", "results.md": "benchmarks/RESULTS.md", "changelog.md": "CHANGELOG.md"}
#: site page of each copied repository file (links are written as the repository shows them)
PAGES = {source: page for page, source in COPIED.items()}
_LINK = re.compile(r"\]\((?:\.\./)?([^)#\s]+)(#[^)\s]*)?\)")
#: a docstring's Sphinx role as mkdocstrings renders it: :class:<code>~geolink.x.Y</code>
_ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj):<code>(~?)([^<]*)</code>")


def site_links(markdown: str) -> str:
    """``markdown`` with links to repository files (``docs/models.md``, ``../README.md#...``) pointing to pages."""

    def replace(match: re.Match) -> str:
        path = match.group(1)
        page = PAGES.get(path) or (path.removeprefix("docs/") if path.startswith("docs/") else None)
        return match.group(0) if page is None else f"]({page}{match.group(2) or ''})"

    return _LINK.sub(replace, markdown)


def _prose(text: str) -> str:
    """Plain text as Markdown: ``<`` outside code spans escaped, so that ``pretrained=<its .pth>`` stays visible."""
    parts = text.split("`")
    return "`".join(part if index % 2 else part.replace("<", "&lt;") for index, part in enumerate(parts))


def _millions(count: int) -> str:
    return f"{count / 1e6:.1f} M"


def model_zoo_markdown() -> str:
    """The model-zoo page: a table of the pretrained tags and one of the architectures, from the registry."""
    import torch

    import geolink
    from geolink.registry import AVAILABILITY

    lines = [
        "# Model zoo",
        "",
        "Generated from the registry (`geolink.list_pretrained()`, `geolink.list_models()`) when the site is built.",
        "`geolink info` prints the same tags. Load a tag with `geolink.create_model(tag, pretrained=True, "
        "component=...)`; see [Models](models.md) for the components and [Get the weights](models.md#get-the-weights)"
        " for the official release files.",
        "",
        "## Pretrained tags",
        "",
        "| tag | architecture | holds | input (bands × H × W) | bands | text model (width) | licence | availability |",
        "|---|---|---|---|---|---|---|---|",
    ]
    availability = geolink.list_pretrained(available=True)
    for name, where in availability.items():
        tag = geolink.get_pretrained_tag(name)
        text = f"`{tag.text_model}` ({tag.text_dim})" if tag.text_model else "none (image only)"
        size = " × ".join(str(n) for n in tag.input_size)
        lines.append(f"| `{name}` | `{name.partition('.')[0]}` | `{tag.holds}` | {size} | {', '.join(tag.bands)} | "
                     f"{text} | {tag.license} | {where} |")
    lines += ["", "Availability, as `geolink.list_pretrained(available=True)` says it on the machine that built this "
              "page (`cached` depends on your own Hugging Face cache):", ""]
    lines += [f"- **{where}**: {_prose(AVAILABILITY[where])}" for where in dict.fromkeys(availability.values())]
    lines += [
        "",
        "## Architectures",
        "",
        "Parameter counts of each component built with `geolink.create_model(name, component=...)` (the fusion "
        "encoder holds the image and OSM encoders; the pretraining model holds the fusion encoder, the MAE decoder "
        "and the projection heads).",
        "",
        "| architecture | image trunk | text width | image | osm | fusion | pretraining |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for name in geolink.list_models():
        config = geolink.get_model_config(name)
        counts = []
        for component in ("image", "osm", "fusion", "pretraining"):
            with torch.device("meta"):
                model = geolink.create_model(name, component=component)
            counts.append(_millions(sum(p.numel() for p in model.parameters())))
        lines.append(f"| `{name}` | `{config['image']['trunk']}` | {config['osm']['text_dim']} | "
                     + " | ".join(counts) + " |")
    return "\n".join(lines) + "\n"


def on_files(files, config):
    """Add the generated pages to the site."""
    from mkdocs.structure.files import File

    for page, source in COPIED.items():
        files.append(File.generated(config, page, content=site_links((ROOT / source).read_text())))
    files.append(File.generated(config, "model_zoo.md", content=model_zoo_markdown()))
    return files


def on_page_markdown(markdown, page, config, files):
    """Rewrite repository-relative links of the hand-written pages to site pages."""
    return site_links(markdown)


def plain_roles(html: str) -> str:
    """Docstrings' Sphinx roles as plain code: ``:class:`~geolink.x.Y``` shows ``Y``, ``:func:`f``` shows ``f``."""
    return _ROLE.sub(lambda m: f"<code>{m.group(2).rpartition('.')[2] if m.group(1) else m.group(2)}</code>", html)


def on_page_content(html, page, config, files):
    """The API pages without the roles' markup."""
    return plain_roles(html)
