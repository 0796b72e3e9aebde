"""Pair datasets over shards: items, batching, worker/rank splitting, make-pairs, the bundled pairs, the trainer."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import geolink
from geolink.data.pairs import PairShards, StreamingPairShards, collate_pairs
from geolink.graph.schema import NODE_TYPES, validate_graph
from tests.data_helpers import HashEncoder, write_dataset

BUNDLED = Path(geolink.__file__).parent / "assets" / "pairs"


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    write_dataset(root, count=12, per_shard=2)  # 6 shards
    return root


def test_items_are_model_ready_pairs(pairs):
    dataset = PairShards(pairs, transform="train", img_size=32)
    assert len(dataset) == 12
    image, graph = dataset[3]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    validate_graph(graph, feature_dim=HashEncoder.dim)
    assert graph.name == "tile_3" and "tags" not in graph["polygon"]
    images, batch = collate_pairs([dataset[k] for k in range(4)])
    assert images.shape == (4, 3, 32, 32) and batch.num_graphs == 4
    assert batch["polygon"].x.shape[1] == HashEncoder.dim


def test_x_is_the_weighted_mean_of_the_table_rows(pairs):
    from geolink.data.shards import PairShardReader

    dataset = PairShards(pairs, transform=None)
    reader = PairShardReader(pairs)
    table = reader.table()
    image, graph = dataset[5]
    stored = reader.shard(2).graph(1)
    for t in NODE_TYPES:
        ids, weight = stored[t].tags, stored[t].tag_weight
        expected = (table[ids.clamp(min=0)] * (weight * (ids >= 0)).unsqueeze(-1)).sum(1)
        assert torch.allclose(graph[t].x, expected)
    mean, std = torch.tensor(reader.index["mean"]), torch.tensor(reader.index["std"])
    assert image.shape == (3, 48 + 20, 64 + 40)  # native size without a transform; normalised with the index
    with Image.open(io.BytesIO(bytes(reader.shard(2).image_bytes(1)))) as png:  # tile_5 is a PNG: lossless
        pixels = torch.from_numpy(np.array(png.convert("RGB"))).permute(2, 0, 1)
    assert torch.allclose(image, (pixels / 255 - mean.view(3, 1, 1)) / std.view(3, 1, 1), atol=1e-5)


def test_augmentation_is_seeded_by_sample_and_draw(pairs):
    a, b = PairShards(pairs, img_size=32, seed=3), PairShards(pairs, img_size=32, seed=3)
    assert torch.equal(a[4][0], b[4][0]) and torch.equal(a[4, 2][0], b[4, 2][0])
    assert not torch.equal(a[4, 0][0], a[4, 1][0])
    assert not torch.equal(a[4][0], PairShards(pairs, img_size=32, seed=4)[4][0])


def test_map_style_with_worker_processes(pairs):
    dataset = PairShards(pairs, img_size=32)
    loader = DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=collate_pairs)
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [4, 4, 4]
    assert torch.equal(batches[1][0][0], dataset[4][0])  # workers give the same seeded samples


def stream_names(root, world_size, workers, **kwargs):
    names = []
    for rank in range(world_size):
        dataset = StreamingPairShards(root, transform="eval", img_size=16, rank=rank, world_size=world_size, **kwargs)
        loader = DataLoader(dataset, batch_size=None, num_workers=workers)
        names.append([graph.name for _, graph in loader])
    return names


@pytest.mark.parametrize("per_shard", [2, 6])  # 6 shards: whole shards per reader; 2 shards: samples interleaved
def test_streaming_split_has_no_duplicates_across_ranks_and_workers(tmp_path, per_shard):
    write_dataset(tmp_path, count=12, per_shard=per_shard)
    per_rank = stream_names(tmp_path, world_size=2, workers=2, seed=1, buffer_size=4)
    flat = [n for names in per_rank for n in names]
    assert sorted(flat) == sorted(f"tile_{k}" for k in range(12))  # every sample exactly once
    assert all(len(names) >= 4 for names in per_rank)


def test_streaming_shuffle_is_seeded_and_epoch_dependent(pairs):
    def order(seed, epoch):
        dataset = StreamingPairShards(pairs, transform="eval", img_size=16, seed=seed, buffer_size=4, rank=0,
                                      world_size=1)
        dataset.set_epoch(epoch)
        return [graph.name for _, graph in dataset]

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert sorted(order(0, 1)) == sorted(f"tile_{k}" for k in range(12))
    plain = StreamingPairShards(pairs, transform="eval", img_size=16, shuffle=False, rank=0, world_size=1)
    assert [g.name for _, g in plain] == [f"tile_{k}" for k in range(12)]


def test_corrupt_shard_error_names_the_file_through_the_dataset(tmp_path):
    from geolink.data.shards import CorruptShardError

    write_dataset(tmp_path, count=4, per_shard=2)
    path = tmp_path / "shard-00001.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    dataset = PairShards(tmp_path)
    dataset[0]
    with pytest.raises(CorruptShardError, match="shard-00001.safetensors"):
        dataset[2]


def test_bundled_pairs_are_shipped_and_model_ready():
    index = json.loads((BUNDLED / "index.json").read_text())
    assert index["samples"] == 5 and index["text_dim"] == 384
    assert (BUNDLED / "README.md").is_file()
    dataset = PairShards(BUNDLED)
    for k in range(len(dataset)):
        image, graph = dataset[k]
        assert image.shape == (3, 224, 224)
        validate_graph(graph, feature_dim=384)


def test_bundled_pairs_are_declared_package_data():
    """Every bundled file matches a package-data pattern of pyproject.toml, so wheels ship it."""
    tomllib = pytest.importorskip("tomllib")
    package = BUNDLED.parents[1]
    patterns = tomllib.loads((package.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = {path for pattern in patterns["geolink"] for path in package.glob(pattern) if path.is_file()}
    bundled = {path for path in BUNDLED.iterdir() if path.is_file()}
    assert {p.name for p in bundled} == {"README.md", "index.json", "shard-00000.safetensors", "vocab.json",
                                         "vocab.safetensors"}
    assert bundled <= shipped


def test_trainer_open_dataset_detects_the_layout(pairs, shared):
    from geolink.data.folders import OfficialPairFolder
    from geolink.train.trainer import open_dataset

    bundled = open_dataset("bundled")
    assert isinstance(bundled, PairShards) and len(bundled) == 5 and bundled[0][0].shape == (3, 224, 224)
    assert isinstance(open_dataset(str(pairs)), PairShards)
    assert isinstance(open_dataset(str(shared("official_examples", "ufz"))), OfficialPairFolder)


def test_make_pairs_cli_on_the_official_tiles_and_append(shared, minilm_path, tmp_path, capsys):
    from geolink.cli import main

    tiles = shared("official_examples", "osm_tiles")
    out = tmp_path / "pairs"
    args = ["make-pairs", "--official-tiles", str(tiles), "--text-model", str(minilm_path), "--out", str(out),
            "--samples-per-shard", "3", "--quiet"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["added"] == 5 and summary["shards"] == 2
    dataset = PairShards(out, transform=None)
    names = sorted(p.name for p in tiles.iterdir())
    assert dataset.names == names
    for k, name in enumerate(names):
        image, graph = dataset[k]
        raw = (tiles / name / f"{name}.jpg").read_bytes()
        assert bytes(dataset.reader.shard(k // 3).image_bytes(k % 3)) == raw
        meta = json.loads((tiles / name / "meta.json").read_text())
        assert graph.bbox[0].tolist() == pytest.approx(meta["bbox_west_south_east_north"])
        validate_graph(graph, feature_dim=384)
    assert main(args) == 0  # rerun: nothing new, nothing rewritten
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["skipped"] == 5
    assert len(list(out.glob("shard-*.safetensors"))) == 2


def test_make_pairs_from_image_folder_footprints_and_vector(shared, tmp_path):
    import shutil

    from geolink.data.shards import MakePairsConfig, make_pairs
    from geolink.errors import ConfigError
    from geolink.graph.build import OSMGraphBuilder
    from geolink.graph.readers import read_geojson
    from geolink.graph.tags import TagVocabulary

    tiles = shared("official_examples", "osm_tiles")
    images, footprints = tmp_path / "images", {}
    images.mkdir()
    for name in ("a702502933_US_21", "n4503852781_DE_"):
        shutil.copy(tiles / name / f"{name}.jpg", images / f"{name}.jpg")
        footprints[name] = json.loads((tiles / name / "meta.json").read_text())["bbox_west_south_east_north"]
    (tmp_path / "footprints.json").write_text(json.dumps(footprints))
    vector = tiles / "a702502933_US_21" / "a702502933_US_21_polygon.geojson"  # polygons of the first tile only
    config = MakePairsConfig(out=tmp_path / "pairs", text_model="hash-encoder", images=images,
                             footprints=tmp_path / "footprints.json", vector=vector, quiet=True)
    summary = make_pairs(config, tag_encoder=HashEncoder())
    assert summary["added"] == 2
    dataset = PairShards(tmp_path / "pairs", transform=None)
    (_, first), (_, second) = dataset[0], dataset[1]
    direct = OSMGraphBuilder(None).build(read_geojson(vector)[0], footprints["a702502933_US_21"],
                                         vocabulary=TagVocabulary(), materialize=False)
    assert torch.equal(first["polygon"].pos, direct["polygon"].pos) and first["line"].num_nodes == 0
    assert second["polygon"].num_nodes + second["line"].num_nodes + second["point"].num_nodes == 0
    assert make_pairs(config, tag_encoder=HashEncoder())["skipped"] == 2  # rerun: both already stored
    with pytest.raises(ConfigError, match="images needs an OSM source: pass pbf .* or vector"):
        MakePairsConfig(out=tmp_path / "other", text_model="m", images=images, footprints=tmp_path / "footprints.json")


def test_make_pairs_config_validation(tmp_path):
    from geolink.data.shards import MakePairsConfig, make_pairs
    from geolink.errors import ConfigError, MissingInputError

    with pytest.raises(ConfigError, match="exactly one input: official_tiles .* or images"):
        MakePairsConfig(out=tmp_path, text_model="m")
    with pytest.raises(ConfigError, match="exactly one input"):
        MakePairsConfig(out=tmp_path, text_model="m", official_tiles=tmp_path, images=tmp_path, pbf=tmp_path)
    with pytest.raises(ConfigError, match="at most one OSM source: pbf or vector"):
        MakePairsConfig(out=tmp_path, text_model="m", images=tmp_path, pbf=tmp_path / "a.pbf", vector=tmp_path)
    with pytest.raises(ConfigError, match="footprints only go with images"):
        MakePairsConfig(out=tmp_path, text_model="m", official_tiles=tmp_path, footprints=tmp_path / "f.json")
    with pytest.raises(ConfigError, match="samples_per_shard"):
        MakePairsConfig(out=tmp_path, text_model="m", official_tiles=tmp_path, samples_per_shard=0)
    with pytest.raises(ConfigError, match="pooling"):
        MakePairsConfig(out=tmp_path, text_model="m", official_tiles=tmp_path, pooling="max")
    with pytest.raises(MissingInputError, match="official_tiles .*nowhere"):
        make_pairs(MakePairsConfig(out=tmp_path / "pairs", text_model="m", official_tiles=tmp_path / "nowhere"),
                   tag_encoder=HashEncoder())
    (tmp_path / "images").mkdir()
    with pytest.raises(MissingInputError, match="vector .*a.geojson not found"):  # before the text model loads
        make_pairs(MakePairsConfig(out=tmp_path / "pairs", text_model="m", images=tmp_path / "images",
                                   vector=tmp_path / "a.geojson"))
    (tmp_path / "a.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    with pytest.raises(MissingInputError, match="images .*no .jpg"):
        make_pairs(MakePairsConfig(out=tmp_path / "pairs", text_model="m", images=tmp_path / "images",
                                   vector=tmp_path / "a.geojson"), tag_encoder=HashEncoder())
