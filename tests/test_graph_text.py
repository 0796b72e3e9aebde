"""TagEncoder: official pooling under padding, unique-string caching, the on-disk cache, CLIP text towers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from geolink.errors import InputError, MissingWeightsError
from geolink.graph.text import TagEncoder

STRINGS = ["building:building", "roof shape:gabled", "highway:residential", "addr street:Pohjoisesplanadi",
           "a:b", "building:building"]


def unpadded(encoder: TagEncoder, text: str) -> torch.Tensor:
    batch = encoder.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder.model(**{k: v for k, v in batch.items() if k != "token_type_ids"}).last_hidden_state
    return hidden[0, 1:].mean(0)


def test_official_pooling_ignores_padding(minilm_encoder):
    got = minilm_encoder.encode(STRINGS)
    assert got.shape == (len(STRINGS), 384) and got.dtype == torch.float32
    for k, text in enumerate(STRINGS):
        torch.testing.assert_close(got[k], unpadded(minilm_encoder, text), atol=1e-5, rtol=1e-4)


def test_each_unique_string_embedded_once(minilm_path, tmp_path):
    encoder = TagEncoder(minilm_path, batch_size=2, cache_dir=tmp_path)
    first = encoder.encode(STRINGS + STRINGS)
    assert encoder.strings_encoded == len(set(STRINGS)) and encoder.forward_calls == 3
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


def test_bfloat16_option(tiny_clip):
    exact = TagEncoder(tiny_clip).encode(STRINGS)
    fast = TagEncoder(tiny_clip, dtype=torch.bfloat16)
    got = fast.encode(STRINGS)
    assert got.dtype == torch.float32 and fast.info()["dtype"] == "bfloat16"
    assert torch.nn.functional.cosine_similarity(got, exact).min() > 0.99
