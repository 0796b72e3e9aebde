"""The sharded pair format: round trip, append-only writes, fsspec URLs, clear errors for broken files."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import geolink
from geolink.data.pairs import PairShards, StreamingPairShards
from geolink.data.shards import FORMAT, CorruptShardError, PairShardReader, PairShardWriter, shard_sizes
from geolink.errors import ConfigError, DataError, InputError
from geolink.graph.schema import EDGE_TYPES, NODE_TYPES
from geolink.graph.storage import (
    MAX_INDEX_BYTES,
    graph_from_tensors,
    graph_tensors,
    load_graph,
    materialize_x,
    save_graph,
)
from tests.data_helpers import HashEncoder, build_graph, image_bytes, write_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    return root, write_dataset(root, count=7, per_shard=3)


def assert_same_graph(a, b):
    for t in NODE_TYPES:
        assert set(a[t].keys()) == set(b[t].keys()), t
        for key in a[t].keys():  # noqa: SIM118 (a PyG store iterates differently)
            va, vb = a[t][key], b[t][key]
            assert torch.equal(torch.as_tensor(va), torch.as_tensor(vb)), (t, key)
    for edge_type in EDGE_TYPES:
        assert torch.equal(a[edge_type].edge_index, b[edge_type].edge_index), edge_type
        assert torch.equal(a[edge_type].edge_attr, b[edge_type].edge_attr), edge_type
    assert torch.equal(a.bbox, b.bbox) and a.crs == b.crs


def test_round_trip_keeps_image_bytes_and_graph_tensors(dataset, tmp_path):
    root, written = dataset
    reader = PairShardReader(root)
    assert len(reader) == 7 and reader.names == [f"tile_{k}" for k in range(7)]
    assert [s["samples"] for s in reader.index["shards"]] == [3, 3, 1]
    assert reader.index["format"] == FORMAT and reader.index["image_formats"] == ["jpeg", "png"]
    assert reader.index["text_dim"] == HashEncoder.dim
    for k in range(7):
        data, graph = written[f"tile_{k}"]
        shard_no, j = reader.locate(k)
        shard = reader.shard(shard_no)
        assert bytes(shard.image_bytes(j)) == data
        stored = shard.graph_tensors(j)
        expected = {key: value.reshape(-1) for key, value in graph_tensors(graph).items()}
        assert stored.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(stored[key].to(value.dtype), value), key
        # the decoded graph is exactly what geolink.graph.storage.load_graph makes of the same graph
        assert_same_graph(shard.graph(j), load_graph(save_graph(graph, tmp_path / f"{k}.safetensors")))
    table = reader.table()
    assert table.shape == (len(reader.vocabulary().strings), HashEncoder.dim)
    assert torch.equal(table, HashEncoder().embedding_table(reader.vocabulary()))


def test_shards_are_plain_safetensors_without_pickle(dataset):
    from safetensors import safe_open

    root, _ = dataset
    with safe_open(str(root / "shard-00000.safetensors"), framework="pt") as handle:
        assert handle.metadata()["format"] == FORMAT
        assert json.loads(handle.metadata()["names"]) == ["tile_0", "tile_1", "tile_2"]
        assert handle.get_tensor("image.offsets").shape == (4,)
    for path in root.iterdir():
        assert b"\x80\x04\x95" not in path.read_bytes()[:64], f"{path} looks like a pickle"


def test_shards_store_exactly_the_tile_codec_bytes_plus_offsets(dataset):
    """A sample's graph costs what its tile file's tensors cost (no padding, no re-encoding), plus per key one
    int64 offset and one presence byte; a shard adds one closing offset per key."""
    root, written = dataset
    sizes = shard_sizes(root)
    assert sizes["samples"] == 7
    tile_bytes = sum(v.numel() * v.element_size() for _, graph in written.values()
                     for v in graph_tensors(graph).values())
    keys = {k for _, graph in written.values() for k in graph_tensors(graph)}
    per_shard = [3, 3, 1]
    bookkeeping = sum(len(keys) * (9 * n + 8) for n in per_shard)
    assert sizes["graph_bytes"] * 7 == tile_bytes + bookkeeping


def test_append_writes_new_shards_and_never_touches_old_ones(tmp_path):
    root = tmp_path / "pairs"
    write_dataset(root, count=4, per_shard=2)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.glob("shard-*.safetensors")}
    vocab_before = json.loads((root / "vocab.json").read_text())["strings"]
    write_dataset(root, count=3, per_shard=2, start=4)
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.glob("shard-*.safetensors")}
    assert all(after[name] == digest for name, digest in before.items())
    assert len(after) == len(before) + 2
    reader = PairShardReader(root)
    assert len(reader) == 7 and reader.names == [f"tile_{k}" for k in range(7)]
    strings = reader.vocabulary().strings
    assert strings[:len(vocab_before)] == vocab_before  # ids stay stable
    assert reader.table().shape[0] == len(strings)
    writer = PairShardWriter(root, tag_encoder=HashEncoder())
    with pytest.raises(InputError, match="tile_3.*already"):
        writer.add("tile_3", image_bytes(0), build_graph(0, writer.vocabulary))
    assert not list(root.glob("*.tmp"))


def test_append_refuses_another_text_model(tmp_path):
    root = tmp_path / "pairs"
    write_dataset(root, count=1, per_shard=2)

    class Other(HashEncoder):
        def info(self):
            return {"model_id": "another-model", "dim": 32, "pooling": "official"}

    with pytest.raises(ConfigError, match="text model"):
        PairShardWriter(root, tag_encoder=Other())


def test_graph_from_tensors_handles_materialised_graphs(minilm_encoder):
    from geolink.graph.build import OSMGraphBuilder
    from tests.data_helpers import BBOX, random_features

    graph = OSMGraphBuilder(minilm_encoder).build(random_features(3), BBOX)
    decoded = graph_from_tensors({k: v.reshape(-1) for k, v in graph_tensors(graph).items()}, graph.crs)
    for t in NODE_TYPES:
        assert torch.equal(decoded[t].x, graph[t].x) and torch.equal(decoded[t].pos, graph[t].pos)


def test_features_from_the_table_equal_the_materialised_compact_form(dataset):
    root, _ = dataset
    reader = PairShardReader(root)
    table = reader.table()
    for k in range(len(reader.index["shards"])):
        shard = reader.shard(k)
        for j in range(len(shard.names)):
            direct, compact = shard.graph(j, table), materialize_x(shard.graph(j), table)
            for t in NODE_TYPES:
                assert "tags" not in direct[t]
                assert torch.equal(direct[t].x, compact[t].x), (k, j, t)  # one kernel


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_fsspec_urls_read_the_same_samples(dataset, scheme):
    fsspec = pytest.importorskip("fsspec")
    from geolink.data.pairs import PairShards

    root, _ = dataset
    if scheme == "memory":
        fs = fsspec.filesystem("memory")
        for path in root.iterdir():
            fs.pipe_file(f"/pairs-test/{path.name}", path.read_bytes())
        url = "memory://pairs-test"
    else:
        url = root.as_uri()
    local, remote = PairShards(root, transform="eval", img_size=32), PairShards(url, transform="eval", img_size=32)
    assert len(remote) == len(local) == 7
    for k in (0, 4, 6):
        (image_a, graph_a), (image_b, graph_b) = local[k], remote[k]
        assert torch.equal(image_a, image_b)
        for t in NODE_TYPES:
            assert torch.equal(graph_a[t].x, graph_b[t].x)


def test_truncated_shard_error_names_the_file(tmp_path):
    root = tmp_path / "pairs"
    write_dataset(root, count=2, per_shard=2)
    shard = root / "shard-00000.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="shard-00000.safetensors.*truncated"):  # CorruptShardError is a DataError
        PairShardReader(root).shard(0)
    entry_free = json.loads((root / "index.json").read_text())
    for entry in entry_free["shards"]:
        entry.pop("bytes")  # without the recorded size the header/body check still catches it
    (root / "index.json").write_text(json.dumps(entry_free))
    with pytest.raises(CorruptShardError, match="shard-00000.safetensors.*truncated"):
        PairShardReader(root).shard(0)


def test_corrupt_header_and_versions_are_clear_errors(tmp_path):
    root = tmp_path / "pairs"
    write_dataset(root, count=2, per_shard=2)
    index = json.loads((root / "index.json").read_text())
    shard = root / "shard-00000.safetensors"
    shard.write_bytes(b"\xff" * 8 + shard.read_bytes()[8:])
    index["shards"][0].pop("bytes")
    (root / "index.json").write_text(json.dumps(index))
    with pytest.raises(CorruptShardError, match="shard-00000.safetensors.*corrupt"):
        PairShardReader(root).shard(0)
    index["format"] = "geolink-pairs/999"
    (root / "index.json").write_text(json.dumps(index))
    with pytest.raises(CorruptShardError, match="index.json.*geolink-pairs/999"):
        PairShardReader(root)
    (root / "index.json").write_text("{not json")
    with pytest.raises(CorruptShardError, match="index.json"):
        PairShardReader(root)
    (root / "index.json").unlink()
    with pytest.raises(FileNotFoundError, match="index.json"):
        PairShardReader(root)


def test_shard_of_another_version_is_refused(tmp_path):
    from safetensors.torch import save_file

    root = tmp_path / "pairs"
    write_dataset(root, count=2, per_shard=2)
    index = json.loads((root / "index.json").read_text())
    index["shards"][0].pop("bytes")
    (root / "index.json").write_text(json.dumps(index))
    save_file({"image": torch.zeros(1, dtype=torch.uint8)}, str(root / "shard-00000.safetensors"),
              metadata={"format": "geolink-pairs/0"})
    with pytest.raises(CorruptShardError, match="shard-00000.safetensors.*geolink-pairs/0"):
        PairShardReader(root).shard(0)


def test_missing_shard_and_url_writer_errors(tmp_path):
    root = tmp_path / "pairs"
    write_dataset(root, count=2, per_shard=1)
    (root / "shard-00001.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="shard-00001.safetensors"):
        PairShardReader(root).shard(1)
    with pytest.raises(InputError, match="local"):
        PairShardWriter("s3://bucket/pairs")


# ---------------------------------------------------------------------------------------------- hardening (issue 9)

BUNDLED = Path(geolink.__file__).parent / "assets" / "pairs"
SHARD = "shard-00000.safetensors"


@contextlib.contextmanager
def within(seconds: int):
    """Fail (instead of hanging) when the block runs longer than ``seconds`` (a blocked ``open`` of a FIFO too)."""
    def stop(*_):
        raise TimeoutError(f"still running after {seconds} s: the reader hangs")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def bundled(tmp_path):
    """A writable copy of the bundled pair dataset (geolink/assets/pairs)."""
    root = tmp_path / "pairs"
    shutil.copytree(BUNDLED, root)
    return root


def edit_index(root, edit):
    index = json.loads((root / "index.json").read_text())
    edit(index)
    (root / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("field", ["file", "vocabulary"])
@pytest.mark.parametrize("escape", ["../../../etc/passwd", "absolute"])
def test_index_paths_outside_the_dataset_are_refused(bundled, tmp_path, field, escape):
    other = tmp_path / "other"
    shutil.copytree(BUNDLED, other)  # another dataset: its files must not be used either
    target = str(other / (SHARD if field == "file" else "vocab")) if escape == "absolute" else escape
    if field == "file":
        edit_index(bundled, lambda index: index["shards"][0].update(file=target))
    else:
        edit_index(bundled, lambda index: index.update(vocabulary=target))
    where = "shards\\[0\\].file" if field == "file" else "vocabulary"
    with pytest.raises(CorruptShardError, match=f"index.json {where} is .*outside the dataset folder"):
        PairShardReader(bundled)


def test_symlinked_shard_leading_outside_is_refused(bundled, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(BUNDLED, other)
    (bundled / SHARD).unlink()
    (bundled / SHARD).symlink_to(other / SHARD)
    with pytest.raises(CorruptShardError, match=f"shards\\[0\\].file is '{SHARD}', a link to .*outside"):
        PairShardReader(bundled)


def test_url_index_paths_outside_the_root_are_refused(bundled):
    fsspec = pytest.importorskip("fsspec")
    edit_index(bundled, lambda index: index["shards"][0].update(file="../secret/" + SHARD))
    fs = fsspec.filesystem("memory")
    for path in bundled.iterdir():
        fs.pipe(f"/escape/{path.name}", path.read_bytes())
    with pytest.raises(CorruptShardError, match="shards\\[0\\].file is '../secret/"):
        PairShardReader("memory://escape")


@pytest.mark.parametrize("name", ["index.json", "vocab.safetensors", "vocab.json", SHARD])
@pytest.mark.parametrize("kind", ["/dev/zero", "fifo"])
def test_devices_and_fifos_are_refused_before_reading(bundled, name, kind):
    (bundled / name).unlink()
    if kind == "fifo":
        os.mkfifo(bundled / name)
    else:
        (bundled / name).symlink_to("/dev/zero")
    with within(20), pytest.raises(DataError, match=f"{name}.*(is not a regular file|a link to /dev/zero outside)"):
        reader = PairShardReader(bundled)
        reader.vocabulary() if name == "vocab.json" else reader.table() if name.startswith("vocab") else reader.shard(0)


def test_oversized_index_is_refused_before_reading(bundled):
    with open(bundled / "index.json", "r+b") as handle:
        handle.truncate(MAX_INDEX_BYTES + 1)  # sparse: nothing is written
    with within(20), pytest.raises(DataError, match="index.json has 268435457 bytes, more than"):
        PairShardReader(bundled)


def _column(path, key):
    """``(byte position of tensor key in the file, its array, its per-sample offsets)`` of a shard."""
    from safetensors.numpy import load_file

    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len])
    arrays = load_file(str(path))
    return 8 + header_len + header[key]["data_offsets"][0], arrays[key], arrays.get(key + ".offsets")


def poke(path, key, sample, value):
    """Overwrite element 0 of ``sample``'s slice of shard column ``key`` in place (the file size is unchanged)."""
    start, array, offsets = _column(path, key)
    element = 0 if offsets is None else int(offsets[sample])
    with open(path, "r+b") as handle:
        handle.seek(start + element * array.itemsize)
        handle.write(np.array([value], dtype=array.dtype).tobytes())


@pytest.mark.parametrize(("key", "value", "problem"), [
    ("polygon.tag_ids", 10**6, "polygon.tag_ids' holds ids from .* outside the vocabulary of 41"),
    ("polygon.tag_ids", -3, "polygon.tag_ids' holds ids from -3"),
    ("polygon__to__polygon.edge_index", 500, "polygon__to__polygon.edge_index' refers to nodes outside"),
    ("polygon__to__polygon.relation", 200, "polygon__to__polygon.relation' holds code 200"),
    ("polygon.tag_count", 7, "polygon.tag_count' does not match"),
    ("polygon.tag_count", -1, "polygon.tag_count' does not match"),
    ("polygon.pos", float("nan"), "polygon.pos' holds NaN"),
    ("polygon.tag_weight", float("nan"), "polygon.tag_weight' holds NaN"),
    ("bbox", float("inf"), "bbox' holds NaN or infinite"),
])
def test_corrupt_graph_columns_name_the_file_and_sample(bundled, key, value, problem):
    poke(bundled / SHARD, f"graph.{key}", 0, value)
    reader = PairShardReader(bundled)
    sample = f"{SHARD} sample 0 \\('{reader.names[0]}'\\): stored graph column '{problem}"
    with pytest.raises(CorruptShardError, match=sample):
        reader.shard(0).graph(0, reader.table())
    with pytest.raises(CorruptShardError, match=sample):  # the training path: PairShards and the stream
        PairShards(bundled, transform=None)[0]
    with pytest.raises(CorruptShardError, match=sample):
        next(iter(StreamingPairShards(bundled, shuffle=False, transform=None)))
    reader.shard(0).graph(1, reader.table())  # the other samples still decode


def test_inconsistent_offsets_are_refused_when_the_shard_opens(bundled):
    poke(bundled / SHARD, "graph.polygon.tag_ids.offsets", 0, 3)  # offsets must start at 0 ...
    with pytest.raises(CorruptShardError, match=f"{SHARD}: graph.polygon.tag_ids.offsets do not match"):
        PairShardReader(bundled).shard(0)
    shutil.copy(BUNDLED / SHARD, bundled / SHARD)
    poke(bundled / SHARD, "graph.polygon.tag_ids.offsets", 2, 10**9)  # ... and never decrease or overrun
    with pytest.raises(CorruptShardError, match="graph.polygon.tag_ids.offsets do not match"):
        PairShardReader(bundled).shard(0)


def test_nan_vocabulary_rows_are_refused(bundled):
    poke(bundled / "vocab.safetensors", "embeddings", 0, float("nan"))  # no offsets: row 0, element 0
    with pytest.raises(CorruptShardError, match="vocab.safetensors has NaN or infinite values in row 0"):
        PairShardReader(bundled).table()


def fuzz_byte_flips(path: Path, decode, errors: type[Exception] | tuple[type[Exception], ...],
                    max_examples: int) -> None:
    """The byte-flip fuzz harness of the stored formats: random byte flips (in the header's first KiB or anywhere)
    in a copy of the real file ``path`` either decode (``decode()`` reads the file and checks what it got) or raise
    one of ``errors`` naming the file; never another exception, never a hang (bounded examples, a deadline per
    example, an alarm per decode). ``path`` is rewritten per example and restored at the end."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    original = path.read_bytes()

    @hypothesis.settings(max_examples=max_examples, deadline=2000, database=None, derandomize=True,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(st.lists(st.tuples(st.one_of(st.integers(0, 1023), st.integers(0, len(original) - 1)),
                                         st.integers(1, 255)), min_size=1, max_size=8))
    def check(flips):
        data = bytearray(original)
        for position, mask in flips:
            data[position % len(data)] ^= mask
        path.write_bytes(bytes(data))
        with within(10):
            try:
                decode()
            except errors as err:
                assert path.name in str(err)

    try:
        check()
    finally:
        path.write_bytes(original)


def test_byte_flips_decode_or_raise_corrupt_shard_error(tmp_path_factory):
    """Fuzz: random byte flips anywhere in a copy of the bundled shard either decode or raise CorruptShardError
    naming the file."""
    root = tmp_path_factory.mktemp("fuzz") / "pairs"
    shutil.copytree(BUNDLED, root)
    table = PairShardReader(root).table()

    def decode():
        shard = PairShardReader(root).shard(0)
        for j in range(shard.num_samples):
            bytes(shard.image_bytes(j))
            shard.graph(j, table)

    fuzz_byte_flips(root / SHARD, decode, CorruptShardError, max_examples=150)
