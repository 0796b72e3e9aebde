"""Frozen-feature protocols: weighted kNN (hand-computed votes), linear probe, encoders, ``geolink eval``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import geolink
from geolink.cli import main as cli_main
from geolink.errors import ConfigError, InputError, MissingInputError
from geolink.eval import (
    EvalConfig,
    Pool,
    Protocol,
    encode_images,
    evaluate_image_folder,
    extract_features,
    format_table,
    image_folder_splits,
    knn_classify,
    knn_scores,
    linear_probe,
    stratified_split,
)
from geolink.runtime import Precision

# three training points on the unit circle: a = (1, 0) class 0, b and c at ±60° class 1; test point (2, 0)
TRAIN_X = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2], [0.5, -math.sqrt(3) / 2]])
TRAIN_Y = torch.tensor([0, 1, 1])
TEST_X = torch.tensor([[2.0, 0.0]])  # not unit length: kNN must L2-normalise


def test_knn_votes_by_hand():
    # cosines 1, 0.5, 0.5; vote weights exp(cos / T)
    scores = knn_scores(TRAIN_X, TRAIN_Y, TEST_X, k=3, temperature=0.07)
    assert scores[0].tolist() == pytest.approx([math.exp(1 / 0.07), 2 * math.exp(0.5 / 0.07)], rel=1e-5)
    assert int(scores.argmax()) == 0  # the close neighbour outweighs the majority
    # a hot temperature flattens the weights and the majority wins: e^0.1 < 2 e^0.05
    hot = knn_scores(TRAIN_X, TRAIN_Y, TEST_X, k=3, temperature=10.0)
    assert hot[0].tolist() == pytest.approx([math.exp(0.1), 2 * math.exp(0.05)], rel=1e-5)
    assert int(hot.argmax()) == 1
    # k = 2 keeps a and one of b/c
    assert knn_scores(TRAIN_X, TRAIN_Y, TEST_X, k=2, temperature=1.0)[0].tolist() == pytest.approx(
        [math.e, math.exp(0.5)], rel=1e-5)


def test_knn_classify_precomputed_and_errors():
    result = knn_classify(None, (TRAIN_X * 5, TRAIN_Y), (TEST_X, torch.tensor([0])), k=3)
    assert result["top1"] == 1.0 and result["num_train"] == 3 and result["k"] == 3
    with pytest.raises(ValueError, match="encoder"):
        knn_classify(None, [(torch.zeros(3, 8, 8), 0)], (TEST_X, torch.tensor([0])))
    with pytest.raises(ValueError, match="width"):
        knn_scores(TRAIN_X, TRAIN_Y, torch.zeros(1, 3))


def _separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    features = torch.randn(n, 4, generator=generator) * 0.2
    features[torch.arange(n), labels] += 5.0
    return features, labels


def test_linear_probe_separable_and_deterministic():
    train, test = _separable(90, 0), _separable(30, 1)
    first = linear_probe(None, train, test, epochs=15, lr=0.1, batch_size=30, seed=3, progress=False)
    second = linear_probe(None, train, test, epochs=15, lr=0.1, batch_size=30, seed=3, progress=False)
    assert first["top1"] == 1.0 and first["train_accuracy"] == 1.0
    assert first == second


def test_encode_images_same_rule_for_geolink_and_timm():
    images = torch.randn(2, 3, 32, 32)
    encoder = geolink.create_model("geolink_tiny", component="image", image={"img_size": 32}).eval()
    tokens = encoder.forward_features(images)
    torch.testing.assert_close(encode_images(encoder, images, "avg"), tokens[:, 1:].mean(1))
    torch.testing.assert_close(encode_images(encoder, images, "token"), tokens[:, 0])
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32).eval()
    tokens = vit.forward_features(images)
    torch.testing.assert_close(encode_images(vit, images, "avg"), tokens[:, 1:].mean(1))
    torch.testing.assert_close(encode_images(vit, images, "default"), vit(images))
    with pytest.raises(ValueError, match="pool"):
        encode_images(vit, images, "max")


def _image_folder(root, classes=3, per_class=6, size=24, seed=0):
    rng = np.random.default_rng(seed)
    colours = [(220, 40, 40), (40, 220, 40), (40, 40, 220), (200, 200, 40)]
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colours[c])[None, None] + rng.normal(0, 15, (size, size, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def test_stratified_split_and_image_folder(tmp_path):
    train_idx, test_idx = stratified_split([0] * 5 + [1] * 5 + [2], 0.4, seed=1)
    assert sorted(train_idx + test_idx) == list(range(11))
    assert len(test_idx) == 4  # two of each 5-sample class; the lone sample of class 2 stays in train
    assert 10 in train_idx
    root = _image_folder(tmp_path / "data")
    train, test, classes = image_folder_splits(root, img_size=32, test_fraction=0.5)
    assert classes == ["class_0", "class_1", "class_2"] and len(train) == 9 and len(test) == 9
    image, label = train[0]
    assert image.shape == (3, 32, 32) and float(image.min()) >= 0 and float(image.max()) <= 1


def test_knn_with_an_encoder_on_images(tmp_path):
    # three classes of flat, differently coloured images: even a random encoder separates them
    train, test, _ = image_folder_splits(_image_folder(tmp_path / "data"), img_size=32, test_fraction=0.34)
    torch.manual_seed(0)
    encoder = geolink.create_model("geolink_tiny", component="image", image={"img_size": 32})
    options = dict(mean=(0.5,) * 3, std=(0.5,) * 3, device="cpu", progress=False)
    features, labels = extract_features(encoder, train, batch_size=8, **options)
    assert features.shape == (len(train), 192) and labels.tolist() == sorted(labels.tolist())
    result = knn_classify(encoder, train, test, k=5, **options)
    assert result["num_test"] == len(test) == 6 and result["top1"] == 1.0
    # extracting inside knn_classify is the same as passing the extracted features
    precomputed = knn_classify(None, (features, labels), extract_features(encoder, test, **options), k=5)
    assert precomputed == result


def test_cli_eval_side_by_side(tmp_path, capsys):
    root = _image_folder(tmp_path / "data", per_class=5)
    output = tmp_path / "results.json"
    code = cli_main(["eval", "all", "--model", "geolink_tiny", "--data", str(root), "--compare-timm",
                     "vit_tiny_patch16_224", "--no-timm-pretrained", "--img-size", "32", "--probe-epochs", "5",
                     "--k", "3", "--device", "cpu", "--precision", "fp32", "--quiet", "--output", str(output)])
    assert code == 0
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("metric"))
    assert "geolink_tiny" in header and "vit_tiny_patch16_224" in header
    assert "knn top1 (k=3)" in printed and "linear top1" in printed and "top5" not in printed  # 3 classes
    report = json.loads(output.read_text())
    assert set(report["results"]) == {"geolink_tiny", "vit_tiny_patch16_224"}
    assert report["results"]["vit_tiny_patch16_224"]["knn"]["num_test"] == report["num_test"]


def _result(num_classes: int) -> dict:
    scores = {"top1": 0.5, "top5": 1.0, "mean_class_accuracy": 0.5, "k": 3,
              "per_class_accuracy": {str(c): 0.5 for c in range(num_classes)}}
    return {"m": {"feature_dim": 8, "pretrained": True, "knn": scores, "linear": scores}}


@pytest.mark.parametrize("num_classes", [2, 5, 6])
def test_the_table_shows_top5_only_with_more_than_5_classes(num_classes):
    table = format_table(_result(num_classes))
    assert "knn top1 (k=3)" in table and "linear top1" in table and "linear mean_class_accuracy" in table
    assert ("top5" in table) == (num_classes > 5)


def test_cli_eval_offline_without_cached_timm_weights_is_one_line(tmp_path):
    root = _image_folder(tmp_path / "data", classes=2, per_class=2)
    cache = tmp_path / "hf"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(cache), "HF_HUB_CACHE": str(cache / "hub")}
    result = subprocess.run([sys.executable, "-m", "geolink.cli", "eval", "knn", "--model", "geolink_tiny", "--data",
                             str(root), "--compare-timm", "vit_tiny_patch16_224", "--img-size", "32", "--quiet"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if not line.startswith("warning: geolink_tiny")]
    assert len(errors) == 1 and errors[0].startswith("error: timm model 'vit_tiny_patch16_224': its pretrained "
                                                     "weights are not in the local Hugging Face cache")
    assert errors[0].endswith("(geolink eval --no-timm-pretrained)")
    assert not (cache / "hub").exists() or not any((cache / "hub").rglob("*.safetensors"))


def test_timm_weights_in_the_local_cache_are_used_offline(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    cached = timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict()
    repo = tmp_path / "hub" / "models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k"  # timm's default tag
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(cached, repo / "snapshots" / ("0" * 40) / "model.safetensors")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hub")}
    script = ("from geolink.eval.encoders import load_encoder; e = load_encoder('timm:vit_tiny_patch16_224'); "
              "print(e.pretrained, float(e.model.patch_embed.proj.weight.double().sum()))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    pretrained, checksum = result.stdout.split()
    assert pretrained == "True"
    assert float(checksum) == pytest.approx(float(cached["patch_embed.proj.weight"].double().sum()), abs=1e-9)


def test_cli_eval_rejects_unknown_model(tmp_path, capsys):
    root = _image_folder(tmp_path / "data", classes=2, per_class=2)
    assert cli_main(["eval", "knn", "--model", "no_such_model", "--data", str(root), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: cannot resolve model 'no_such_model' (pass a geolink folder")
    assert error.count("\n") == 1
    with pytest.raises(InputError, match="cannot resolve model"):
        evaluate_image_folder(EvalConfig("knn", model="no_such_model", data=root, quiet=True))


def test_eval_config_types_and_validation(tmp_path):
    config = EvalConfig("all", model="geolink_tiny", data=str(tmp_path), pool="token", output=str(tmp_path / "r.json"))
    assert config.protocol is Protocol.ALL and config.protocol.protocols == ("knn", "linear")
    assert config.pool is Pool.TOKEN and config.data == tmp_path and config.output == tmp_path / "r.json"
    assert config.precision is Precision.AUTO and EvalConfig("knn", "m", tmp_path).protocol.protocols == ("knn",)
    with pytest.raises(ConfigError, match="test_fraction"):
        EvalConfig("knn", "m", tmp_path, test_fraction=1.0)
    with pytest.raises(ConfigError, match="protocol"):
        EvalConfig("knnn", "m", tmp_path)
    with pytest.raises(MissingInputError, match="data .* is not a folder"):
        evaluate_image_folder(EvalConfig("knn", "geolink_tiny", tmp_path / "missing"))
