"""Persistent tag-embedding tables: `geolink tag-table` from each kind of source, warm starts, refusals of another
model, overwriting only on request."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from geolink.cli import main
from geolink.demo import TILES
from geolink.errors import DataError
from geolink.graph.build import OSMGraphBuilder
from geolink.graph.readers import read_geojson
from geolink.graph.tag_table import collect_strings
from geolink.graph.tags import TagVocabulary
from geolink.graph.text import TagEncoder, load_tag_table, save_tag_table

TILE = "a472140250_FI_21"


@pytest.fixture(scope="module")
def polygons():
    return TILES / TILE / f"{TILE}_polygon.geojson"


@pytest.fixture(scope="module")
def table(polygons, tmp_path_factory):
    out = tmp_path_factory.mktemp("table") / "minilm.safetensors"
    assert main(["tag-table", "--from", str(polygons), "--text-model", "minilm", "--out", str(out), "--quiet"]) == 0
    return out


def test_table_holds_the_builders_strings_and_their_embeddings(table, polygons, minilm_path):
    strings, embeddings, metadata = load_tag_table(table)
    builder = OSMGraphBuilder(None)
    wanted = sorted({s for _, tags in read_geojson(polygons)[0] for s in builder.tag_strings(tags)})
    assert strings == wanted and embeddings.shape == (len(wanted), 384)
    cold = TagEncoder(minilm_path)
    assert metadata["model_id"] == cold.model_id and metadata["revision"] == cold.revision
    assert np.array_equal(embeddings, cold.encode(strings).numpy())  # bit-identical: embeddings ignore their batch
    assert not list(table.parent.glob("*.tmp"))


def test_encoder_starts_warm_from_a_table(table, polygons, minilm_path):
    warm = TagEncoder("minilm", table=table)
    strings = load_tag_table(table)[0]
    assert warm.cache_size == len(strings) and warm.table_path == table
    graph = OSMGraphBuilder(warm).build(read_geojson(polygons)[0], bbox=json.loads(
        (TILES / TILE / "meta.json").read_text())["bbox_west_south_east_north"])
    assert warm.strings_encoded == 0 and graph["polygon"].x.shape[1] == 384  # no string went through the model
    assert torch.equal(warm.encode(strings[:3]), TagEncoder(minilm_path).encode(strings[:3]))


def test_table_of_another_model_or_setting_is_refused_naming_both(table, tmp_path):
    with pytest.raises(DataError, match=r"pooling 'official' \(this encoder: 'mean'\)"):
        TagEncoder("minilm", pooling="mean", table=table)
    strings, embeddings, metadata = load_tag_table(table)
    metadata.update(model_id="other/model", revision="abc")
    other = save_tag_table(tmp_path / "other.safetensors", strings, embeddings, **metadata)
    mine = TagEncoder("minilm")
    with pytest.raises(DataError, match=rf"model_id 'other/model' \(this encoder: '{mine.model_id}'\), revision 'abc' "
                                        rf"\(this encoder: '{mine.revision}'\)"):
        mine.load_table(other)
    (tmp_path / "junk.safetensors").write_bytes(b"not a table")
    with pytest.raises(DataError, match="junk.safetensors is not readable"):
        TagEncoder("minilm", table=tmp_path / "junk.safetensors")


def test_table_file_bytes_do_not_depend_on_the_run(table, polygons, tmp_path):
    again = tmp_path / "again.safetensors"
    assert main(["tag-table", "--from", str(polygons), "--text-model", "minilm", "--out", str(again), "--quiet"]) == 0
    assert again.read_bytes() == table.read_bytes()


def test_existing_table_is_replaced_only_with_overwrite(table, polygons, capsys):
    args = ["tag-table", "--from", str(polygons), "--text-model", "minilm", "--out", str(table), "--quiet"]
    before = table.read_bytes()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists: pass overwrite (--overwrite)" in err
    assert main([*args, "--overwrite"]) == 0 and table.read_bytes() == before


def test_strings_from_graph_folders_and_frequency_tables(tmp_path):
    TagVocabulary(["highway:residential", "building:yes"]).save(tmp_path / "vocab.json")
    TagVocabulary(["building:yes", "amenity:cafe"]).save(tmp_path / "vocab.shard-1-of-2.json")
    assert collect_strings(tmp_path) == ["amenity:cafe", "building:yes", "highway:residential"]
    counts = tmp_path / "counts.json"
    counts.write_text(json.dumps({"building:yes": 900, "amenity:cafe": 3, "shop:bakery": 12}))
    assert collect_strings(counts, min_count=10) == ["building:yes", "shop:bakery"]
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(["b:c", "a:b", "b:c"]))
    assert collect_strings(listed) == ["a:b", "b:c"]
    listed.write_text(json.dumps({"a": "b"}))
    with pytest.raises(DataError, match="neither a JSON list of tag strings"):
        collect_strings(listed)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no vocab"):
        collect_strings(tmp_path / "empty")
