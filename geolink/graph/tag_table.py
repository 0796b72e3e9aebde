"""Persistent tag-embedding tables: the ``geolink tag-table`` job.

Owns collecting a tag vocabulary from a source (an OSM extract or vector file, a folder of built graphs, or a JSON list
or frequency table of tag strings) and writing its embeddings, made once, to one safetensors file
(:func:`geolink.graph.text.save_tag_table`: embeddings, strings, and the text model's id, revision and settings) that
``TagEncoder(..., table=...)`` and ``geolink build-graphs --tag-table`` start warm from. The file format and the
model check live in :mod:`geolink.graph.text`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geolink.errors import ConfigError, DataError, InputError
from geolink.graph.build import OSMGraphBuilder
from geolink.graph.readers import read_features, require_file
from geolink.graph.storage import MAX_INDEX_BYTES, check_file
from geolink.graph.tags import TagVocabulary
from geolink.graph.text import POOLINGS


def strings_from_features(path: str | Path, tag_weights: str | Path | None = "official",
                          progress: bool = False) -> list[str]:
    """Every tag string the graph builder would give the features of an OSM extract (``.osm.pbf`` / ``.osm``) or
    vector file (GeoJSON, ...), with the keys of the key-frequency table ``tag_weights`` (as ``build-graphs``)."""
    builder = OSMGraphBuilder(None, tag_weights=tag_weights)
    name = Path(path).name.lower()
    osm = {"key_frequency": tag_weights, "progress": progress} if name.endswith((".pbf", ".osm", ".bz2", ".gz")) else {}
    features, _ = read_features(path, **osm)
    return _unique(s for _, tags in features for s in builder.tag_strings(tags))


def strings_from_graphs(folder: str | Path) -> list[str]:
    """The tag strings of a folder written by ``geolink build-graphs`` (every ``vocab*.json`` in it)."""
    vocabularies = sorted(Path(folder).glob("vocab*.json"))
    if not vocabularies:
        raise DataError(f"{folder} holds no vocab*.json: pass a folder written by `geolink build-graphs`")
    strings: list[str] = []
    for path in vocabularies:
        check_file(path, "vocabulary", MAX_INDEX_BYTES)
        strings += TagVocabulary.load(path).strings
    return _unique(strings)


def strings_from_json(path: str | Path, min_count: int = 1) -> list[str]:
    """Tag strings from a JSON file: a list of strings, or a frequency table ``{"key:value": count}`` (kept when the
    count is at least ``min_count``), e.g. the most common tags of the planet."""
    check_file(path, "tag-string file", MAX_INDEX_BYTES)
    with open(path, encoding="utf-8") as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} is not JSON ({err}): pass a JSON list of tag strings or a "
                            '{"key:value": count} table') from None
    if isinstance(data, dict) and all(isinstance(v, int | float) for v in data.values()):
        return _unique(k for k, v in data.items() if v >= min_count)
    if isinstance(data, list) and all(isinstance(v, str) for v in data):
        return _unique(data)
    raise DataError(f"{path} is neither a JSON list of tag strings nor a {{\"key:value\": count}} table")


def _unique(strings: Iterable[str]) -> list[str]:
    """Distinct non-empty strings, sorted (a table's rows do not depend on the order the source lists them in)."""
    return sorted({s for s in strings if s})


@dataclass
class TagTableConfig:
    """Embed a tag vocabulary once with a text model and write it as one table file (safetensors: embeddings,
    strings, model id and revision) that build-graphs --tag-table and TagEncoder(table=...) start warm from."""

    source: Path = field(metadata={
        "flag": "--from", "help": "where the tag strings come from: an OSM extract (.osm.pbf / .osm) or vector file "
                                  "(GeoJSON, ...), a folder written by build-graphs, or a JSON list or "
                                  '{"key:value": count} table of tag strings'})
    out: Path = field(metadata={"help": "output table file (.safetensors)"})
    text_model: str = field(metadata={"help": "text model: 'minilm' (offline), 'clip', a folder or a Hub id"})
    revision: str | None = field(default=None, metadata={"help": "Hub revision of text_model"})
    pooling: str = field(default="official", metadata={"help": f"tag pooling: {', '.join(POOLINGS)}"})
    text_dtype: str = field(default="float32", metadata={
        "help": "text model precision: float32, or bfloat16 (only where the hardware multiplies bf16 natively)"})
    tag_weights: str = field(default="official", metadata={
        "help": "key-frequency JSON whose keys are kept when reading OSM data (official: the table shipped)"})
    min_count: int = field(default=1, metadata={"help": "with a {tag string: count} table: drop rarer strings"})
    device: str = field(default="auto", metadata={"help": "text model device (auto: cuda if available)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing out file"})
    quiet: bool = field(default=False, metadata={"help": "no progress bars"})

    def __post_init__(self) -> None:
        self.source, self.out = Path(self.source), Path(self.out)
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.text_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"text_dtype must be float32 or bfloat16, got {self.text_dtype!r}")
        if self.min_count < 1:
            raise ConfigError(f"min_count must be at least 1, got {self.min_count}")
        if self.out.exists() and not self.overwrite:
            raise ConfigError(f"out {self.out} exists: pass overwrite (--overwrite) to replace it")


def collect_strings(source: str | Path, tag_weights: str | Path | None = "official", min_count: int = 1,
                    progress: bool = False) -> list[str]:
    """The sorted distinct tag strings of ``source`` (see :class:`TagTableConfig`'s ``source``).

    Raises:
        MissingInputError: ``source`` does not exist.
        DataError: it holds no tag string, or is not a source this reads.
    """
    path = Path(source)
    if path.is_dir():
        strings = strings_from_graphs(path)
    elif require_file(path, "tag source").name.lower().endswith(".json") and not path.name.lower().endswith(
            ".geojson"):
        strings = strings_from_json(path, min_count)
    else:
        strings = strings_from_features(path, tag_weights, progress)
    if not strings:
        raise DataError(f"{source} holds no tag string (with the keys of tag_weights={str(tag_weights)!r})")
    return strings


def build_tag_table(config: TagTableConfig) -> dict[str, Any]:
    """The ``geolink tag-table`` job: collect the strings of ``config.source``, embed them, write ``config.out``.

    Returns:
        ``{"out", "strings", "bytes", "model_id", "revision", "seconds"}``.
    """
    import torch

    from geolink.graph.text import TagEncoder

    start = time.perf_counter()
    strings = collect_strings(config.source, config.tag_weights, config.min_count, progress=not config.quiet)
    encoder = TagEncoder(config.text_model, pooling=config.pooling, device=config.device, revision=config.revision,
                         dtype=getattr(torch, config.text_dtype))
    encoder.encode(strings, progress=not config.quiet)
    if config.out.exists() and not config.overwrite:  # appeared while embedding
        raise InputError(f"out {config.out} exists: pass overwrite (--overwrite) to replace it")
    path = encoder.save_table(config.out, strings)
    return {"out": str(path), "strings": len(strings), "bytes": path.stat().st_size, "model_id": encoder.model_id,
            "revision": encoder.revision, "seconds": round(time.perf_counter() - start, 3)}
