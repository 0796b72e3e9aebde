"""geolink.finetune: a resumed run equals an uninterrupted one, ``best/`` is the best epoch, the encoder is frozen or
slowed as asked, checkpoints survive a kill mid-replacement, configs derive their flags, and the folder helpers of
dense tasks pair, split, read and collate as documented. All on a tiny synthetic task, in-process, on the CPU."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

from geolink.cli import parse_config
from geolink.errors import ConfigError, DataError, MissingInputError
from geolink.finetune import (
    FinetuneConfig,
    Normalised,
    class_names,
    fit,
    infer_num_classes,
    list_images,
    pad_collate,
    paired_files,
    read_image,
    read_mask,
    split_samples,
)
from geolink.runtime import IMAGENET_MEAN, IMAGENET_STD, Precision
from geolink.train.checkpoint import find_checkpoint, load_checkpoint, write_checkpoint


class Task(nn.Module):
    """An "encoder" with dropout (so the RNG matters) under a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3))
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def _data(n: int, seed: int) -> TensorDataset:
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long())


def _loss(model: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def _accuracy(model: nn.Module, loader) -> dict:
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return {"accuracy": correct / total, "num_samples": total}


def _config(out: Path, **changes) -> FinetuneConfig:
    values = {"output_dir": out, "epochs": 4, "batch_size": 8, "lr": 3e-2, "workers": 0, "device": "cpu",
              "quiet": True, "warmup_epochs": 1.0, **changes}
    return FinetuneConfig(**values)


def _fit(out: Path, evaluate=_accuracy, **changes):
    torch.manual_seed(0)
    model = Task()
    result = fit(model, _data(60, 1), _data(30, 2), _loss, evaluate, _config(out, **changes), "accuracy",
                 encoder=model.encoder, test_set=_data(20, 3))
    return model, result


def _killed_in_epoch(epoch: int):
    """An evaluation that kills the run at the end of ``epoch`` (1-based), before its checkpoint is written."""
    calls = []

    def evaluate(model, loader):
        calls.append(1)
        if len(calls) == epoch:
            raise KeyboardInterrupt("simulated kill")
        return _accuracy(model, loader)

    return evaluate


def _without_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


def test_a_resumed_run_ends_like_an_uninterrupted_one(tmp_path):
    straight, _ = _fit(tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "resumed", evaluate=_killed_in_epoch(3))
    assert json.loads((tmp_path / "resumed" / "last" / "state.json").read_text())["epoch"] == 1  # 0-based: epoch 2
    resumed, _ = _fit(tmp_path / "resumed")  # picks up last/ after epoch 2 and redoes epochs 3 and 4
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    a = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    b = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert _without_time(a["history"]) == _without_time(b["history"]) and len(b["history"]) == 4
    assert a["best"] == b["best"] and a["test"] == b["test"] and a["best_epoch"] == b["best_epoch"]
    # resuming without the optimizer state would change the result: the moments of AdamW are in last/
    assert (tmp_path / "resumed" / "last" / "optimizer.safetensors").is_file()
    assert b["config"]["epochs"] == 4 and b["config"]["precision"] == "auto"


def test_best_is_the_first_epoch_with_the_highest_score_and_its_weights_are_loaded(tmp_path):
    model, result = _fit(tmp_path / "run", epochs=5, lr=5e-2)
    scores = [record["accuracy"] for record in result.history]
    assert result.best_epoch == scores.index(max(scores)) + 1
    assert result.best["accuracy"] == max(scores)  # re-evaluated with the best weights, which fit leaves loaded
    model.eval()
    with torch.no_grad():
        x, y = _data(30, 2).tensors
        assert (model(x).argmax(1) == y).float().mean().item() == pytest.approx(max(scores))
    state = json.loads((tmp_path / "run" / "best" / "state.json").read_text())
    assert state["epoch"] == result.best_epoch and state["metrics"]["accuracy"] == max(scores)


def test_a_frozen_or_zero_rate_encoder_does_not_move_and_the_head_does(tmp_path):
    for name, changes in (("frozen", {"freeze_encoder": True}), ("scaled", {"encoder_lr_scale": 0.0})):
        torch.manual_seed(0)
        before = Task().state_dict()
        model, _ = _fit(tmp_path / name, epochs=1, **changes)
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("encoder")), name
        assert not torch.equal(before["head.weight"], after["head.weight"]), name


def test_empty_split_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="empty split"):
        fit(Task(), _data(0, 0), _data(4, 0), _loss, _accuracy, _config(tmp_path), "accuracy")


def test_a_kill_between_the_two_renames_keeps_the_previous_checkpoint(tmp_path):
    model = nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    write_checkpoint(tmp_path / "last", model, optimizer, {"epoch": 0})
    assert find_checkpoint(tmp_path / "last") == tmp_path / "last"
    (tmp_path / "last").rename(tmp_path / ".last.previous")  # the state between moving aside and renaming in
    assert find_checkpoint(tmp_path / "last") == tmp_path / ".last.previous"
    assert load_checkpoint(find_checkpoint(tmp_path / "last"), nn.Linear(2, 2), optimizer)["epoch"] == 0
    write_checkpoint(tmp_path / "last", model, None, {"epoch": 1})  # weights only: no optimizer, no RNG files
    assert sorted(p.name for p in (tmp_path / "last").iterdir()) == ["checksums.json", "model.safetensors",
                                                                   "state.json"]
    assert find_checkpoint(tmp_path / "missing") is None
    with pytest.raises(ValueError, match="missing keys"):
        load_checkpoint(tmp_path / "last", nn.Sequential(nn.Linear(2, 2)), None)


@dataclass(kw_only=True)
class _TaskConfig(FinetuneConfig):
    """A task config as the examples write them."""

    data: Path = field(metadata={"help": "dataset root"})
    dirs: tuple[str, str] = field(default=("img", "label"), metadata={"help": "sub-folders"})
    names: tuple[str, ...] = field(default=(), metadata={"help": "class names"})


def test_parse_config_derives_one_flag_per_field(capsys):
    config = parse_config(_TaskConfig, ["--data", "d", "--no-resume", "--freeze-encoder", "--precision", "bf16",
                                        "--dirs", "a", "b", "--names", "x", "y", "z", "--max-steps-per-epoch", "3"],
                          "description", {"epochs": 7})
    assert config.data == Path("d") and config.epochs == 7 and config.resume is False and config.freeze_encoder
    assert config.precision is Precision.BF16 and config.dirs == ("a", "b") and config.names == ("x", "y", "z")
    assert config.max_steps_per_epoch == 3 and config.output_dir == Path("runs/finetune")
    with pytest.raises(SystemExit):
        parse_config(_TaskConfig, ["--help"], "description", {"epochs": 7})
    help_text = capsys.readouterr().out
    assert "training epochs (default: 7)" in help_text and "--resume, --no-resume" in help_text
    with pytest.raises(SystemExit):  # data is required
        parse_config(_TaskConfig, [], None)
    with pytest.raises(ConfigError, match="batch_size"):
        parse_config(_TaskConfig, ["--data", "d", "--batch-size", "0"], None)


def test_normalised_normalises_image_arguments_only():
    seen = []
    model = Normalised(lambda *inputs: seen.extend(inputs), IMAGENET_MEAN, IMAGENET_STD)
    images, other = torch.full((1, 3, 2, 2), 0.5), torch.ones(1, 3)
    model(images, other)
    expected = (0.5 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(seen[0][0, :, 0, 0], expected)
    assert seen[1] is other


# ------------------------------------------------------------------------------------------ dense-task folders
def _folders(root: Path, stems: dict[str, list[str]]) -> Path:
    for folder, names in stems.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            Image.fromarray(np.full((4, 6), 2, np.uint8)).save(root / folder / f"{name}.png")
    return root


def test_paired_files_match_stems_and_split_is_seeded(tmp_path):
    root = _folders(tmp_path, {"img": ["a", "b", "c", "d", "e"], "label": ["a", "b", "c", "d", "x"]})
    pairs = paired_files(root, ["img", "label"])  # e and x lack a partner
    assert [stem for stem, _ in pairs] == ["a", "b", "c", "d"]
    assert pairs[0][1] == [root / "img" / "a.png", root / "label" / "a.png"]
    train, val = split_samples(root, ["img", "label"], 0.5, seed=3)
    assert len(train) == len(val) == 2 and {s for s, _ in train} | {s for s, _ in val} == {"a", "b", "c", "d"}
    assert split_samples(root, ["img", "label"], 0.5, seed=3) == (train, val)
    with pytest.raises(MissingInputError, match="no folder"):
        paired_files(root, ["img", "graph"])
    nested = _folders(tmp_path / "tiles", {"city": ["t1"], ".": ["t0"]})
    assert list(list_images(nested, recursive=True)) == ["city/t1", "t0"]


def test_given_splits_are_used_as_they_are(tmp_path):
    _folders(tmp_path / "train", {"img": ["a", "b"], "label": ["a", "b"]})
    _folders(tmp_path / "val", {"img": ["c"], "label": ["c"]})
    train, val = split_samples(tmp_path, ["img", "label"], 0.5, seed=0)
    assert [s for s, _ in train] == ["a", "b"] and [s for s, _ in val] == ["c"]


def test_readers_scale_by_bit_depth_and_infer_classes(tmp_path):
    Image.fromarray(np.full((2, 3), 65535 // 5, np.uint16)).save(tmp_path / "deep.png")
    assert read_image(tmp_path / "deep.png").shape == (1, 2, 3)
    assert read_image(tmp_path / "deep.png")[0, 0, 0].item() == pytest.approx((65535 // 5) / 65535)
    np.save(tmp_path / "hwc.npy", np.zeros((20, 30, 4), np.float32))
    assert read_image(tmp_path / "hwc.npy").shape == (4, 20, 30)
    Image.fromarray(np.array([[0, 4], [255, 1]], np.uint8)).save(tmp_path / "m.png")
    Image.fromarray(np.full((2, 2), 255, np.uint8)).save(tmp_path / "empty.png")
    assert read_mask(tmp_path / "m.png").dtype == torch.int64
    assert infer_num_classes([tmp_path / "m.png", tmp_path / "empty.png"], ignore_index=255) == 5
    with pytest.raises(DataError, match="num_classes"):
        infer_num_classes([tmp_path / "empty.png"], ignore_index=255)
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match="single-band"):
        read_mask(tmp_path / "rgb.png")


def test_pad_collate_pads_to_the_patch_multiple_and_batches_graphs():
    from geolink.graph.schema import empty_graph

    samples = [(torch.ones(3, 5, 7), torch.zeros(5, 7, dtype=torch.long), torch.tensor(1), empty_graph(4), "a"),
               (torch.ones(3, 9, 4), torch.ones(9, 4, dtype=torch.long), torch.tensor(2), empty_graph(4), "b")]
    images, masks, labels, graphs, names = pad_collate(8, ignore_index=255)(samples)
    assert images.shape == (2, 3, 16, 8) and masks.shape == (2, 16, 8)
    assert images[0, :, 5:].abs().sum() == 0 and images[0, :, :5, :7].min() == 1
    assert (masks[0, 5:] == 255).all() and (masks[0, :5, 7:] == 255).all() and (masks[0, :5, :7] == 0).all()
    assert labels.tolist() == [1, 2] and graphs.num_graphs == 2 and names == ["a", "b"]


def test_class_names_are_completed_and_checked():
    assert class_names(["water"], 3) == ["water", "class_1", "class_2"]
    with pytest.raises(ConfigError, match="num_classes"):
        class_names(["a", "b"], 1)
