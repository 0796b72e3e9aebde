"""OSM tags → tag strings, key frequencies, weights and the tag vocabulary (DESIGN §3).

Owns everything about tags that does not need a text model: turning OSM tag dicts and official ``label``
strings (``"k:v;k:v"``) into tag strings, the key-frequency table (the official one shipped in
``geolink/assets`` or one counted from any corpus with :func:`geolink.graph.readers.count_keys`), the
``log(frequency)`` weights, key filtering and the append-only :class:`TagVocabulary` that stored datasets index
into.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from geolink.errors import DataError, MissingInputError

OFFICIAL_KEY_FREQUENCY = Path(__file__).resolve().parents[1] / "assets" / "tag_key_frequency.json"
"""The official key-frequency table (MIT, from the official GeoLink repository)."""

_OFFICIAL_NAMES = ("tag_key_frequency.json", "all_tags30_frequency1.json")

Tags = Mapping[str, str] | str
"""A feature's tags: an OSM tag dict (``{"building": "yes"}``) or an official label (``"building:building"``)."""


def normalize_key(key: str) -> str:
    """OSM key → the key as written in tag strings and frequency tables (``roof:shape`` → ``roof shape``)."""
    return key.strip().replace(":", " ")


def tag_string(key: str, value: str) -> str:
    """One OSM tag → its tag string: ``roof:shape=gabled`` → ``roof shape:gabled``, ``building=yes`` →
    ``building:building`` (the value ``yes`` is replaced by the key)."""
    return _joined(normalize_key(key), str(value).strip())


def _joined(key: str, value: str) -> str:
    """The tag string of a normalised key and a stripped value (:func:`tag_string`)."""
    return f"{key}:{key if value == 'yes' else value}"


def tag_key(tag: str) -> str:
    """The key of a tag string: everything before the first ``:`` (as the official builder splits it)."""
    return tag.split(":", 1)[0]


def parse_label(label: str) -> list[str]:
    """An official ``label`` (``"k:v;k:v"``) → its tag strings, in order, empty items dropped."""
    return [item for item in (part.strip() for part in label.split(";")) if item]


@dataclass(frozen=True)
class TagFilter:
    """Which OSM keys become node tags.

    Args:
        allow: if given, only these keys are kept (raw OSM ``roof:shape`` or normalised ``roof shape`` spelling).
        deny: keys always dropped.
        known_only: keep only keys present in the key-frequency table (the default: a key missing from the table
            has weight 0 and mostly carries noise such as names and ids).
    """

    allow: frozenset[str] | None = None
    deny: frozenset[str] = field(default_factory=frozenset)
    known_only: bool = True

    def __post_init__(self) -> None:
        if self.allow is not None:
            object.__setattr__(self, "allow", frozenset(normalize_key(k) for k in self.allow))
        object.__setattr__(self, "deny", frozenset(normalize_key(k) for k in self.deny))

    def keeps(self, key: str, frequency: Mapping[str, float] | None) -> bool:
        """Whether the normalised ``key`` is kept, given the key-frequency table (None: no table)."""
        if key in self.deny:
            return False
        if self.allow is not None and key not in self.allow:
            return False
        return not (self.known_only and frequency is not None and key not in frequency)


KEEP_ALL = TagFilter(known_only=False)
"""A filter keeping every tag (unknown keys get weight 0, as in the official builder)."""


def tags_to_strings(tags: Tags | None, frequency: Mapping[str, float] | None = None,
                    tag_filter: TagFilter | None = None, memo: dict[tuple[Any, Any], str] | None = None) -> list[str]:
    """A feature's tags → its tag strings, in input order.

    Args:
        tags: an OSM tag dict or an official label string (``None``/empty → no tags).
        frequency: key-frequency table used by ``tag_filter.known_only``.
        tag_filter: which keys to keep; None keeps everything.
        memo: a dict to remember the tag string (``""``: dropped) of each ``(key, value)`` pair of an OSM dict, for
            repeated calls with the same ``frequency`` and ``tag_filter`` (tags repeat across features).
    """
    if memo and isinstance(tags, dict):
        try:  # every pair seen before: one pass at C speed
            return [string for string in map(memo.__getitem__, tags.items()) if string]
        except (KeyError, TypeError):  # a new pair, or an unhashable value
            pass
    if not tags:
        return []
    if isinstance(tags, str):
        strings = parse_label(tags)
        return strings if tag_filter is None else [s for s in strings if tag_filter.keeps(tag_key(s), frequency)]
    if not isinstance(tags, Mapping):
        raise TypeError(f"tags must be a dict of OSM tags or a 'k:v;k:v' label string, got {type(tags).__name__}")
    strings = []
    for pair in tags.items():
        try:
            string = memo[pair]  # type: ignore[index]
        except (KeyError, TypeError):  # not seen yet, no memo, or an unhashable value
            string = _kept_tag_string(*pair, frequency, tag_filter)
            if memo is not None and isinstance(pair[1], str | int | float | None):
                memo[pair] = string
        if string:
            strings.append(string)
    return strings


def _kept_tag_string(key: Any, value: Any, frequency: Mapping[str, float] | None, tag_filter: TagFilter | None
                     ) -> str:
    """The tag string of one OSM tag, or ``""`` when its value is empty or ``tag_filter`` drops its key. OSM keys
    are strings; other keys (e.g. ints) are taken as text."""
    value = "" if value is None else str(value).strip()
    if not value:
        return ""
    key = normalize_key(str(key))
    return _joined(key, value) if tag_filter is None or tag_filter.keeps(key, frequency) else ""


def load_key_frequency(source: str | Path | Mapping[str, float] | None = "official") -> dict[str, float] | None:
    """Load a key-frequency table.

    Args:
        source: ``"official"`` (the table shipped with geolink), a JSON file ``{key: count}``, a dict, or None
            (no table: every weight is 0, so node features are plain means of their tag embeddings). The bare
            names of the official file (``"tag_key_frequency.json"``, ``"all_tags30_frequency1.json"``) that do
            not exist as files also mean the shipped copy.

    Raises:
        MissingInputError: the JSON file does not exist.
        DataError: the file is not a ``{key: number}`` object.
    """
    if source is None:
        return None
    if isinstance(source, Mapping):
        return {str(k): float(v) for k, v in source.items()}
    path = OFFICIAL_KEY_FREQUENCY if str(source) == "official" else Path(source).expanduser()
    if not path.is_file() and str(source) in _OFFICIAL_NAMES:  # the official file's names mean the shipped copy
        path = OFFICIAL_KEY_FREQUENCY
    if not path.is_file():
        raise MissingInputError(f"key-frequency table {path} not found; pass 'official', a JSON file written by "
                                "`geolink tag-stats`, or a dict")
    with open(path, encoding="utf-8") as handle:
        table = json.load(handle)
    if not isinstance(table, dict) or not all(isinstance(v, int | float) for v in table.values()):
        raise DataError(f"{path} must hold a JSON object {{key: frequency}}")
    return {str(k): float(v) for k, v in table.items()}


def tag_weights(strings: Sequence[str], frequency: Mapping[str, float] | None,
                memo: dict[str, float] | None = None) -> np.ndarray:
    """``log(frequency(key))`` of each tag string (float64); a missing key (or no table) has frequency 1.

    Args:
        strings: tag strings.
        frequency: the key-frequency table.
        memo: a dict remembering each string's weight, for repeated calls with the same ``frequency``.
    """
    if frequency is None:
        return np.zeros(len(strings))
    if memo is None:
        return np.array([math.log(frequency.get(tag_key(s), 1.0)) for s in strings], dtype=np.float64)
    for string in {s for s in strings if s not in memo}:
        memo[string] = math.log(frequency.get(tag_key(string), 1.0))
    return np.fromiter(map(memo.__getitem__, strings), dtype=np.float64, count=len(strings))


def node_weights(nodes: Sequence[Sequence[str]], frequency: Mapping[str, float] | None,
                 memo: dict[str, float] | None = None) -> np.ndarray:
    """The tag-averaging weights of every node's tags, back to back (float64 ``[sum of the nodes' tag counts]``):
    each node's :func:`tag_weights` over their sum, or uniform when they sum to 0 (no table, or only keys of
    frequency 1), so each node's weights sum to 1. Every node has at least one tag. ``memo``: as in
    :func:`tag_weights`."""
    counts = np.fromiter(map(len, nodes), dtype=np.int64, count=len(nodes))
    raw = tag_weights([s for node in nodes for s in node], frequency, memo)
    if not len(raw):
        return raw
    totals = np.repeat(np.add.reduceat(raw, np.cumsum(counts) - counts), counts)
    return np.where(totals != 0, raw / np.where(totals != 0, totals, 1.0), np.repeat(1.0 / counts, counts))


class TagVocabulary:
    """Append-only list of unique tag strings; ids are positions, stable once given.

    Stored datasets keep tags as ids into one vocabulary and one embedding table ``[V, D]`` (DESIGN §3).
    """

    def __init__(self, strings: Iterable[str] = ()) -> None:
        self.strings: list[str] = []
        self._ids: dict[str, int] = {}
        self.add(strings)

    def __len__(self) -> int:
        return len(self.strings)

    def __contains__(self, item: object) -> bool:
        return item in self._ids

    def add(self, strings: Iterable[str]) -> np.ndarray:
        """Ids of ``strings`` (int64), adding the new ones at the end."""
        ids = []
        for s in strings:
            idx = self._ids.get(s)
            if idx is None:
                idx = self._ids[s] = len(self.strings)
                self.strings.append(s)
            ids.append(idx)
        return np.asarray(ids, dtype=np.int64)

    def ids(self, strings: Iterable[str]) -> np.ndarray:
        """Ids of known strings; raises ``KeyError`` naming the first unknown one."""
        try:
            return np.asarray([self._ids[s] for s in strings], dtype=np.int64)
        except KeyError as err:
            raise KeyError(f"tag string {err.args[0]!r} is not in the vocabulary") from None

    def save(self, path: str | Path, **info: object) -> None:
        """Write ``{"strings": [...], **info}`` as JSON (atomically)."""
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump({**info, "strings": self.strings}, handle, ensure_ascii=False)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> TagVocabulary:
        """Read a vocabulary written by :meth:`save`."""
        with open(path, encoding="utf-8") as handle:
            return cls(json.load(handle)["strings"])

