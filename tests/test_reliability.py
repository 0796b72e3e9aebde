"""Regression tests of the hardening issue's remaining reproductions: a text-model folder whose weights do not match
its config, torn ``index.jsonl`` lines, user files that are FIFOs / devices / oversized, bit-flipped training
checkpoints, registered tags versus same-named local folders and uncached user tags offline."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from geolink.errors import MissingWeightsError


def _mismatched_minilm(source: Path, target: Path, change) -> Path:
    """A copy of the MiniLM folder whose ``model.safetensors`` went through ``change(dict of tensors)``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    change(tensors)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


@pytest.mark.parametrize("change, expected", [
    (lambda t: t.pop("encoder.layer.0.attention.self.query.weight"), "1 missing"),
    (lambda t: t.__setitem__("encoder.layer.0.attention.self.quary.weight",
                             t.pop("encoder.layer.0.attention.self.query.weight")), "1 unexpected"),
    (lambda t: t.__setitem__("encoder.layer.9.output.dense.weight", t["encoder.layer.0.output.dense.weight"].clone()),
     "encoder.layer.9.output.dense.weight"),
], ids=["deleted", "renamed", "extra"])
def test_text_model_folder_whose_weights_do_not_match_its_config_is_refused(minilm_path, tmp_path, change, expected):
    from geolink.graph.text import TagEncoder

    folder = _mismatched_minilm(minilm_path, tmp_path / "minilm_broken", change)
    with pytest.raises(MissingWeightsError) as caught:
        TagEncoder(folder)
    message = str(caught.value)
    assert str(folder) in message and expected in message and "do not match" in message


def test_intact_text_model_folder_copy_still_loads(minilm_path, tmp_path, minilm_encoder):
    import torch

    from geolink.graph.text import TagEncoder

    folder = _mismatched_minilm(minilm_path, tmp_path / "minilm_copy", lambda t: None)
    torch.testing.assert_close(TagEncoder(folder).encode(["building:yes"]), minilm_encoder.encode(["building:yes"]))


def test_read_jsonl_repairs_only_a_torn_last_line(tmp_path):
    import json

    from geolink.errors import DataError
    from geolink.graph.storage import read_jsonl

    path = tmp_path / "index.jsonl"
    records = [{"name": "a", "n": 1}, {"name": "b", "n": 2}]
    whole = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(whole + '{"name": "c", "n')
    with pytest.warns(UserWarning, match=f"{path}: dropped a torn last line \\(line 3 of this graph folder index"):
        assert read_jsonl(path, "graph folder index") == records
    assert path.read_text() == whole + '{"name": "c", "n'  # no repair asked: unchanged
    with pytest.warns(UserWarning):
        assert read_jsonl(path, "graph folder index", repair=True) == records
    assert path.read_text() == whole
    path.write_text(whole.rstrip("\n"))  # a whole record whose newline was cut off: kept, the newline restored
    assert read_jsonl(path, "graph folder index", repair=True) == records and path.read_text() == whole
    path.write_text("not json\n" + whole)
    with pytest.raises(DataError, match=f"graph folder index {path} line 1 is not a JSON record;"):
        read_jsonl(path, "graph folder index", repair=True)
    assert path.read_text() == "not json\n" + whole


# ------------------------------------------------------------------------------ user files that are not regular files

def _bad_file(kind: str, path: Path, original: Path) -> Path:
    """``path`` made into a FIFO, a link to /dev/zero, a file over the size limit or a truncated copy."""
    import os

    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "oversized":
        with open(path, "wb") as handle:
            handle.truncate(2**40 + 1)  # sparse: no disk used
    else:
        path.write_bytes(original.read_bytes()[:200])
    return path


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "oversized", "truncated"])
def test_official_graph_files_are_checked_before_reading(shared, tmp_path, kind):
    from geolink.errors import DataError
    from geolink.graph.official import load_official_graph
    from tests.test_data_shards import within

    original = sorted(shared("official_examples", "ufz", "graph").glob("*.safetensors"))[0]
    path = _bad_file(kind, tmp_path / original.name, original)
    with within(10), pytest.raises(DataError, match=f"official graph {path}"):
        load_official_graph(path)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "oversized"])
@pytest.mark.parametrize("reader", ["geojson", "osm", "image", "footprints"])
def test_input_files_are_checked_before_reading(shared, tmp_path, kind, reader):
    from geolink.data.folders import image_to_tensor
    from geolink.errors import DataError
    from geolink.graph.readers import read_geojson, read_osm
    from geolink.graph.tiles import BuildGraphsConfig, build_graphs
    from tests.test_data_shards import within

    original = shared("osm", "test.osm.pbf")
    path = _bad_file(kind, tmp_path / {"geojson": "a.geojson", "osm": "a.osm.pbf", "image": "a.png",
                                       "footprints": "f.json"}[reader], original)
    read = {"geojson": read_geojson, "osm": lambda p: list(read_osm(p)), "image": image_to_tensor,
            "footprints": lambda p: build_graphs(BuildGraphsConfig(out=tmp_path / "out", pbf=original,
                                                                   footprints=(p,), quiet=True))}[reader]
    with within(10), pytest.raises(DataError, match=str(path)):
        read(path)


@pytest.mark.parametrize("text", ['{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": ',
                                  '{"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}, '
                                  '"geometry": {"type": "Point", "coordinates": ["a"]}}]}',
                                  "[1, 2, 3]", '{"type": "FeatureCollection", "features": 3}'],
                         ids=["truncated", "bad-coordinates", "list", "features-not-a-list"])
def test_malformed_geojson_names_the_file(tmp_path, text):
    from geolink.errors import DataError
    from geolink.graph.readers import read_geojson

    path = tmp_path / "bad.geojson"
    path.write_text(text)
    with pytest.raises(DataError, match=f"GeoJSON file {path}"):
        read_geojson(path)


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty"])
def test_unreadable_osm_extracts_name_the_file(shared, tmp_path, kind):
    pytest.importorskip("osmium")
    from geolink.errors import DataError
    from geolink.graph.readers import read_osm

    data = shared("osm", "test.osm.pbf").read_bytes()
    path = tmp_path / "bad.osm.pbf"
    path.write_bytes({"truncated": data[:len(data) // 2], "garbage": bytes(range(256)) * 16, "empty": b""}[kind])
    with pytest.raises(DataError, match=f"OSM file {path} cannot be read"):
        list(read_osm(path))


@pytest.mark.parametrize("change", [{"num_heads": 8}, {"out_indices": [2, 5, 7, 11]}], ids=["num_heads", "out_indices"])
def test_a_config_edited_after_saving_is_refused(tmp_path, change):
    """Another head count or other out_indices load the same tensors and compute something else: the saved config's
    checksum catches the edit (verify_checksum=False loads it anyway; an override is the way to change it)."""
    import json

    import geolink
    from geolink.errors import DataError

    folder = tmp_path / "model"
    geolink.create_model("geolink_tiny", component="fusion").save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config, indent=4))  # reformatting is not a change
    geolink.load_model(folder)
    config.update(change)  # a fusion folder's config.json holds the fusion kwargs at the top
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match=f"{folder / 'config.json'} differs from the config saved with these weights"):
        geolink.load_model(folder)
    assert type(geolink.load_model(folder, verify_checksum=False)).__name__ == "GeoLinkFusionEncoder"
