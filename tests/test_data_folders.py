"""Graph folders (geolink build-graphs output) read only regular files inside the folder (issue 9)."""

from __future__ import annotations

import json
import os

import pytest

from geolink.data.folders import GraphFolder
from geolink.errors import DataError
from geolink.graph.build import OSMGraphBuilder
from geolink.graph.storage import save_graph, save_vocabulary
from geolink.graph.tags import TagVocabulary
from tests.data_helpers import BBOX, HashEncoder, random_features
from tests.test_data_shards import within


@pytest.fixture
def folder(tmp_path):
    """A graph folder laid out as build-graphs writes it: index.jsonl, vocab.json + vocab.safetensors, tiles/."""
    root = tmp_path / "graphs"
    vocabulary = TagVocabulary()
    graph = OSMGraphBuilder(None).build(random_features(0, 12), BBOX, vocabulary=vocabulary, materialize=False)
    save_graph(graph, root / "tiles" / "a.safetensors")
    save_vocabulary(root, vocabulary, "vocab", HashEncoder().embedding_table(vocabulary))
    write_index(root, "tiles/a.safetensors")
    return root


def write_index(root, file):
    (root / "index.jsonl").write_text(json.dumps({"name": "a", "file": file, "vocab": "vocab"}) + "\n")


def test_the_folder_reads(folder):
    graph = GraphFolder(folder)[0]
    assert graph.name == "a" and graph["polygon"].x.shape[1] == HashEncoder.dim


@pytest.mark.parametrize("escape", ["../../../etc/passwd", "absolute", "symlink"])
def test_index_entries_outside_the_folder_are_refused(folder, tmp_path, escape):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((folder / "tiles" / "a.safetensors").read_bytes())
    if escape == "symlink":
        (folder / "tiles" / "a.safetensors").unlink()
        (folder / "tiles" / "a.safetensors").symlink_to(outside)
    else:
        write_index(folder, str(outside) if escape == "absolute" else escape)
    with pytest.raises(DataError, match="index.jsonl line 1 'file' is .*outside the dataset folder"):
        GraphFolder(folder)


@pytest.mark.parametrize("name", ["index.jsonl", "vocab.safetensors", "tiles/a.safetensors"])
def test_fifos_and_devices_are_refused_quickly(folder, name):
    (folder / name).unlink()
    os.mkfifo(folder / name)
    with within(20), pytest.raises(DataError, match=f"{name} is not a regular file"):
        GraphFolder(folder)[0]
    (folder / name).unlink()
    (folder / name).symlink_to("/dev/zero")
    with within(20), pytest.raises(DataError, match=f"{name}.*(is not a regular file|a link to /dev/zero outside)"):
        GraphFolder(folder)[0]


def test_a_torn_last_index_line_is_skipped_with_a_warning(folder):
    """A kill in the middle of build-graphs' append leaves a torn last line: the finished tiles still read."""
    index = folder / "index.jsonl"
    whole = index.read_text()
    index.write_text(whole + whole[:len(whole) // 2])
    with pytest.warns(UserWarning, match=f"{index}: dropped a torn last line"):
        graphs = GraphFolder(folder)
    assert len(graphs) == 1 and graphs[0].name == "a"
    assert index.read_text() == whole + whole[:len(whole) // 2]  # reading never writes


def test_a_damaged_index_line_before_the_last_is_named(folder):
    index = folder / "index.jsonl"
    whole = index.read_text()
    index.write_text(whole[:10] + "\n" + whole)
    with pytest.raises(DataError, match=f"graph folder index {index} line 1 is not a JSON record;"):
        GraphFolder(folder)
    index.write_text("[1, 2]\n")
    with pytest.raises(DataError, match="line 1 is not a tile record"):
        GraphFolder(folder)
