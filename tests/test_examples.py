"""Smoke tests of the fine-tuning and feature-export examples, run in-process on tiny generated data and the shared
UFZ samples, plus hand-checked cases of each script's metric pipeline."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from geolink.finetune import paired_files, read_mask

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

segmentation = importlib.import_module("finetune_segmentation")
classification = importlib.import_module("finetune_classification")
change = importlib.import_module("finetune_change_detection")
multimodal = importlib.import_module("finetune_multimodal_segmentation")
extract = importlib.import_module("extract_features")

COMMON = ["--img-size", "32", "--batch-size", "2", "--workers", "0", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """geolink_tiny on timm's small ``test_vit`` trunk at 32 pixels (fast on a CPU; random weights)."""
    from geolink.registry import get_model_config

    config = get_model_config("geolink_tiny")
    config["image"].update(trunk="test_vit", img_size=32)
    config["fusion"]["out_indices"] = None  # the trunk's default_out_indices
    path = tmp_path_factory.mktemp("model") / "tiny.json"
    path.write_text(json.dumps(config))
    return str(path)


class FixedLogits(torch.nn.Module):
    """A stand-in model whose predictions are given: returns one-hot logits of ``pred`` whatever the input."""

    def __init__(self, pred: torch.Tensor, num_classes: int) -> None:
        super().__init__()
        self.logits = torch.nn.functional.one_hot(pred, num_classes).movedim(-1, 1).float()

    def forward(self, *inputs):
        return self.logits


def _seg_data(root: Path, n: int = 5, size: tuple[int, int] = (40, 48), classes: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for folder in ("img", "label"):
        (root / folder).mkdir(parents=True)
    for i in range(n):
        mask = rng.integers(0, classes, size).astype(np.uint8)
        image = (mask[..., None] * 80 + rng.integers(0, 30, (*size, 3))).astype(np.uint8)
        Image.fromarray(image).save(root / "img" / f"t{i}.png")
        Image.fromarray(mask).save(root / "label" / f"t{i}.jpg".replace(".jpg", ".png"))
    return root


# ------------------------------------------------------------------------------------------------ segmentation
def test_segmentation_metric_by_hand():
    # mask [[0, 1, ignore], [1, 1, 0]], prediction [[0, 0, 1], [1, 1, 1]]:
    # (t0, p0), (t1, p0), (t1, p1), (t1, p1), (t0, p1) -> confusion [[1, 1], [1, 2]]
    # IoU_0 = 1 / (1 + 1 + 1) = 1/3, IoU_1 = 2 / (2 + 1 + 1) = 1/2, mIoU = 5/12
    mask = torch.tensor([[[0, 1, 255], [1, 1, 0]]])
    pred = torch.tensor([[[0, 0, 1], [1, 1, 1]]])
    metrics = segmentation.evaluate_segmentation(FixedLogits(pred, 2), [(torch.zeros(1, 3, 2, 3), mask)], 2, 255)
    assert metrics["mIoU"] == pytest.approx(5 / 12)
    assert metrics["overall_accuracy"] == pytest.approx(3 / 5)


def test_segmentation_runs_writes_outputs_and_resumes_exactly(tmp_path, tiny_model):
    data = _seg_data(tmp_path / "data")
    args = ["--data", str(data), "--model", tiny_model, *COMMON, "--decoder-channels", "16",
            "--max-steps-per-epoch", "1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert segmentation.main([*args, "--epochs", "2", "--output-dir", str(straight)]) == 0  # default precision
    metrics = json.loads((straight / "metrics.json").read_text())
    assert metrics["primary_metric"] == "mIoU" and metrics["num_classes"] == 3 and len(metrics["history"]) == 2
    assert set(metrics["best"]["per_class_iou"]) == {"class_0", "class_1", "class_2"}
    # five tiles, 20 % held out: one whole 40 × 48 validation tile, every pixel labelled
    assert metrics["num_train"] == 4 and metrics["num_val"] == 1 and metrics["best"]["num_pixels"] == 40 * 48
    # best/ is the first epoch with the highest validation mIoU, re-evaluated with its weights
    scores = [record["mIoU"] for record in metrics["history"]]
    assert metrics["best_epoch"] == scores.index(max(scores)) + 1 and metrics["best"]["mIoU"] == max(scores)
    assert metrics["last"]["mIoU"] == scores[-1]
    for name in ("best/model.safetensors", "last/model.safetensors", "last/optimizer.safetensors", "last/state.json"):
        assert (straight / name).is_file()
    # one epoch, then resume to two (warm-up covers exactly epoch 1, so the schedule of a one-epoch run is the same
    # there): the same weights as the uninterrupted run
    assert segmentation.main([*args, "--epochs", "1", "--output-dir", str(resumed)]) == 0
    assert segmentation.main([*args, "--epochs", "2", "--output-dir", str(resumed)]) == 0
    a = safetensors.torch.load_file(str(straight / "last" / "model.safetensors"))
    b = safetensors.torch.load_file(str(resumed / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(json.loads((resumed / "metrics.json").read_text())["history"]) == 2


@pytest.mark.parametrize("script", [segmentation, classification, change, multimodal, extract])
def test_every_script_has_a_useful_help_and_an_offline_default_model(script, capsys):
    with pytest.raises(SystemExit):
        script.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert script.__doc__.splitlines()[0] in text and "--data" in text and "--model" in text
    assert "(default: geolink_tiny.demo)" in text  # the embedded demo model: works without a download


def test_segmentation_runs_offline_on_the_default_demo_model(tmp_path):
    data = _seg_data(tmp_path / "data")
    out = tmp_path / "run"
    assert segmentation.main(["--data", str(data), *COMMON, "--decoder-channels", "16", "--epochs", "1",
                              "--max-steps-per-epoch", "1", "--output-dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["model"] == "geolink_tiny.demo" and metrics["best"]["num_pixels"] == 40 * 48


def test_segmentation_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="no folder"):
        segmentation.main(["--data", str(tmp_path / "missing"), "--model", "geolink_tiny"])


# ---------------------------------------------------------------------------------------------- classification
def test_classification_metric_by_hand():
    # three samples, labels [0, 1, 2]; predictions [0, 2, 2] -> accuracy 2/3, class 1 accuracy 0
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 1.0, 2.0], [0.0, 1.0, 4.0]])
    model = lambda images: logits[: len(images)]  # noqa: E731
    metrics = classification.evaluate_classification(model, [(torch.zeros(3, 3, 4, 4), torch.tensor([0, 1, 2]))],
                                                     3, ["a", "b", "c"])
    assert metrics["accuracy"] == pytest.approx(2 / 3) and metrics["top1"] == pytest.approx(2 / 3)
    assert metrics["per_class_accuracy"] == {"a": 1.0, "b": 0.0, "c": 1.0}
    assert metrics["top5"] == 1.0


def test_classification_runs_with_given_splits(tmp_path, tiny_model):
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        for c, colour in enumerate([(220, 40, 40), (40, 40, 220)]):
            folder = tmp_path / "data" / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(np.array(colour)[None, None] + rng.normal(0, 10, (40, 40, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "run"
    argv = ["--data", str(tmp_path / "data"), "--model", tiny_model, *COMMON, "--epochs", "1", "--precision", "fp32",
            "--output-dir", str(out)]
    assert classification.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["class_names"] == ["c0", "c1"] and metrics["num_train"] == 8
    # the reported test accuracy is the best weights' on test/: recompute it from best/ by hand
    from geolink.cli import parse_config
    from geolink.eval.data import eval_transform, image_folder
    from geolink.finetune import Normalised, load_task_encoder
    from geolink.models.heads import ImageClassifier
    from geolink.train.checkpoint import load_weights

    config = parse_config(classification.ClassificationConfig, argv, None)
    loaded = load_task_encoder(config)
    model = Normalised(ImageClassifier(loaded.model, 2), loaded.mean, loaded.std)
    load_weights(out / "best", model)
    test = image_folder(tmp_path / "data" / "test", eval_transform(32))
    images, labels = torch.stack([test[i][0] for i in range(len(test))]), torch.tensor(test.targets)
    with torch.no_grad():
        correct = (model.eval()(images).argmax(1) == labels).sum().item()
    assert metrics["test"]["num_samples"] == 4 and metrics["test"]["accuracy"] == pytest.approx(correct / 4)


# ---------------------------------------------------------------------------------------------- change detection
def test_change_metric_by_hand():
    # change mask [[1, 1, 0, 0]], prediction [[1, 0, 1, 0]]: TP 1, FN 1, FP 1, TN 1 -> F1 1/2, IoU 1/3
    mask = torch.tensor([[[1, 1, 0, 0]]])
    pred = torch.tensor([[[1, 0, 1, 0]]])
    image = torch.zeros(1, 3, 1, 4)
    metrics = change.evaluate_change(FixedLogits(pred, 2), [(image, image, mask)])
    assert metrics["f1"] == pytest.approx(0.5) and metrics["iou"] == pytest.approx(1 / 3)


def test_change_detection_runs(tmp_path, tiny_model):
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for folder in ("A", "B", "label"):
        (root / folder).mkdir(parents=True)
    for i in range(4):
        before = rng.integers(0, 255, (32, 32, 3)).astype(np.uint8)
        mask = np.zeros((32, 32), np.uint8)
        mask[4 + i:20, 8:24] = 255  # LEVIR-CD style: 255 = change
        after = before.copy()
        after[mask > 0] = 250
        Image.fromarray(before).save(root / "A" / f"t{i}.png")
        Image.fromarray(after).save(root / "B" / f"t{i}.png")
        Image.fromarray(mask).save(root / "label" / f"t{i}.png")
    out = tmp_path / "run"
    assert change.main(["--data", str(root), "--model", tiny_model, *COMMON, "--epochs", "1", "--precision", "fp32",
                        "--decoder-channels", "16", "--output-dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["primary_metric"] == "f1" and metrics["best"]["num_pixels"] == 32 * 32
    samples = paired_files(root, ["A", "B", "label"])
    image_a, image_b, mask = change.ChangeFolder(samples)[0]
    assert set(mask.unique().tolist()) == {0, 1} and not torch.equal(image_a, image_b)
    # training crops and flips move both dates and the mask together: the changed pixels (set to 250 in B) stay
    # exactly where the mask says
    from geolink.data.transforms import Compose, RandomCrop, RandomFlip

    augmented = change.ChangeFolder(samples, Compose([RandomCrop(24), RandomFlip(1.0, 1.0)]))
    image_a, image_b, mask = augmented[0]
    assert image_a.shape == image_b.shape == (3, 24, 24) and mask.shape == (24, 24)
    assert torch.equal(mask.bool(), ((image_b * 255).round() == 250).all(0) & (image_a != image_b).any(0))


# ---------------------------------------------------------------------------------------------- multimodal
def test_multimodal_runs_on_the_ufz_samples(tmp_path, tiny_model, shared):
    ufz = shared("official_examples", "ufz")
    out = tmp_path / "run"
    assert multimodal.main(["--data", str(ufz), "--model", tiny_model, *COMMON, "--epochs", "1", "--precision",
                            "fp32", "--class-names", "ufz", "--decoder-channels", "16", "--val-fraction", "0.34",
                            "--max-steps-per-epoch", "1", "--output-dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["text_dim"] == 512 and metrics["num_train"] + metrics["num_val"] == 6
    assert list(metrics["best"]["per_class_iou"])[:9] == list(multimodal.UFZ_CLASSES)
    # the metric pipeline on real UFZ labels: a perfect prediction has mIoU 1 and ignores the 255 pixels
    label = read_mask(ufz / "label" / "shenzhen_21504_11200.png")[None]
    perfect = torch.where(label == 255, 0, label)
    metrics = multimodal.evaluate_multimodal(FixedLogits(perfect, 10), [(None, label, None)], 10, 255)
    assert metrics["mIoU"] == 1.0 and metrics["num_pixels"] == int((label != 255).sum())


# ---------------------------------------------------------------------------------------------- feature export
def test_extract_features_image_and_resume(tmp_path, tiny_model):
    data = _seg_data(tmp_path / "data", n=3)
    out = tmp_path / "features"
    args = ["--data", str(data / "img"), "--model", tiny_model, "--img-size", "32", "--output-dir", str(out),
            "--chunk-size", "2", "--batch-size", "2", "--device", "cpu", "--quiet"]
    assert extract.main(args) == 0
    ids = (out / "ids.txt").read_text().split()
    features = np.load(out / "features.npy")
    assert ids == ["t0", "t1", "t2"] and features.shape == (3, 64)  # embed_dim of test_vit
    with safetensors.safe_open(str(out / "features.safetensors"), framework="np") as handle:
        assert json.loads(handle.metadata()["ids"]) == ids
        np.testing.assert_array_equal(handle.get_tensor("features"), features)
    assert extract.main(args) == 0  # rerun: every chunk is already done
    assert json.loads((out / "metrics.json").read_text())["computed_now"] == 0
    np.testing.assert_array_equal(np.load(out / "features.npy"), features)


def test_extract_fused_features_on_the_ufz_samples(tmp_path, tiny_model, shared):
    ufz = shared("official_examples", "ufz")
    out = tmp_path / "features"
    assert extract.main(["--data", str(ufz / "img"), "--graph-dir", str(ufz / "graph"), "--model", tiny_model,
                         "--img-size", "32", "--output-dir", str(out), "--format", "safetensors", "--device", "cpu",
                         "--quiet"]) == 0
    with safetensors.safe_open(str(out / "features.safetensors"), framework="pt") as handle:
        assert handle.get_tensor("features").shape == (6, 128)  # fusion_dim of geolink_tiny
        assert handle.metadata()["kind"] == "fused"
