"""The pretraining engine on real pairs (the official UFZ samples): outputs, learning, exact resume, DDP equivalence."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from geolink.cli import JOBS, config_from_args, job_parser
from geolink.cli import main as cli_main
from geolink.errors import ConfigError, DataError, MissingInputError
from geolink.models import GeoLinkForPretraining
from geolink.runtime import Precision
from geolink.train import TrainConfig, run
from geolink.train import trainer as trainer_module
from geolink.train.checkpoint import complete_checkpoints, latest_checkpoint, save_checkpoint


@pytest.fixture
def ufz_pairs(shared) -> Path:
    return shared("official_examples", "ufz")


def arguments(data: Path, out: Path, steps: int, batch: int = 2, *extra: str) -> list[str]:
    # UFZ graphs carry 512-wide CLIP features; no dropout so runs are comparable across process layouts
    return ["--data", str(data), "--out", str(out), "--max-steps", str(steps), "--batch-size", str(batch),
            "--save-every", "3", "--warmup-steps", "2", "--seed", "5", "--base-lr", "0.02",
            "--set", "osm.text_dim=512", "--set", "fusion.dropout=0.0", *extra]


def main(argv: list[str]) -> int:
    """``geolink pretrain <argv>``."""
    return cli_main(["pretrain", *argv])


def parse_config(argv: list[str]) -> TrainConfig:
    return config_from_args(TrainConfig, job_parser(JOBS["pretrain"]).parse_args(argv))


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_config_flags_and_schedule():
    config = parse_config(["--max-steps", "100", "--batch-size", "8", "--accum-steps", "2", "--warmup-steps", "10",
                           "--base-lr", "1e-3", "--set", "osm.text_dim=512", "--set",
                           "image.trunk=vit_small_patch16_224", "--out", "runs/x", "--precision", "bf16"])
    assert config.overrides == {"osm.text_dim": 512, "image.trunk": "vit_small_patch16_224"}
    assert config.out == Path("runs/x") and config.precision is Precision.BF16
    assert config.to_dict()["out"] == "runs/x" and config.to_dict()["precision"] == "bf16"
    assert config.global_batch(world_size=4) == 64 and config.peak_lr(4) == pytest.approx(1e-3 * 64 / 256)
    assert config.lr_at(0, 4) == pytest.approx(config.peak_lr(4) / 10)
    assert config.lr_at(9, 4) == pytest.approx(config.peak_lr(4))
    assert config.lr_at(99, 4) < config.lr_at(50, 4) < config.lr_at(10, 4)
    # cosine from step 10 to 100: halfway (step 55) is half the peak
    assert config.lr_at(55, 4) == pytest.approx(config.peak_lr(4) / 2)
    assert TrainConfig().precision is Precision.AUTO and TrainConfig().overrides == {}
    with pytest.raises(ConfigError, match="batch_size must be at least 1"):
        TrainConfig(batch_size=0)


def test_a_warmup_as_long_as_the_run_is_warned_about_once():
    with pytest.warns(UserWarning, match=r"warmup_steps=100 is not below max_steps=100: .* \(a tenth: 10\)$") as caught:
        config = TrainConfig(max_steps=100)
    assert len(caught) == 1 and config.warmup_steps == 100  # kept as given: the schedule is the user's
    assert config.lr_at(99, 1) == pytest.approx(config.peak_lr(1))  # the peak comes only with the last step
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TrainConfig(max_steps=101)


def test_a_missing_data_folder_names_the_parameter(tmp_path):
    with pytest.raises(MissingInputError, match="data .*missing.* is not a folder"):
        run(TrainConfig(data=str(tmp_path / "missing"), out=tmp_path / "run", max_steps=1, device="cpu"))


def test_pretrain_writes_metrics_checkpoints_and_a_loadable_model(ufz_pairs, tmp_path):
    out = tmp_path / "run"
    assert main(arguments(ufz_pairs, out, steps=4)) == 0
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert set(records[0]) >= {"step", "loss", "loss_mae", "loss_contrastive", "loss_consistency", "lr"}
    assert latest_checkpoint(out / "checkpoints").name == "step_00000004"
    model = GeoLinkForPretraining.from_pretrained(out / "final")
    assert model.osm_encoder.text_dim == 512


def test_pretrain_on_the_bundled_pairs_through_the_cli(tmp_path, capsys):
    out = tmp_path / "bundled"
    assert cli_main(["pretrain", "--data", "bundled", "--out", str(out), "--max-steps", "2", "--batch-size", "2",
                     "--save-every", "1", "--seed", "1", "--precision", "bf16"]) == 0
    assert f"final model: {out / 'final'}" in capsys.readouterr().out
    records = read_metrics(out)
    assert len(records) == 2 and all(r["loss"] > 0 for r in records)
    model = GeoLinkForPretraining.from_pretrained(out / "final")
    assert model.osm_encoder.text_dim == 384  # the bundled pairs carry MiniLM tag features


def test_loss_decreases_over_30_steps(ufz_pairs, tmp_path):
    out = tmp_path / "run"
    main(arguments(ufz_pairs, out, 30, 3))
    losses = [r["loss"] for r in read_metrics(out)]
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(ufz_pairs, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    main(arguments(ufz_pairs, reference, 7))

    killed = tmp_path / "killed"
    real_add = trainer_module.StepLog.add

    def die_at_step_5(self, step, *args):
        if step == 4:  # 0-based: the process dies during step 5, after the step-3 checkpoint
            raise KeyboardInterrupt("simulated kill")
        return real_add(self, step, *args)

    monkeypatch.setattr(trainer_module.StepLog, "add", die_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        main(arguments(ufz_pairs, killed, 7))
    monkeypatch.setattr(trainer_module.StepLog, "add", real_add)
    # records reach metrics.jsonl at each flush (log_every, checkpoint, end): step 4's was still on the device
    assert len(read_metrics(killed)) == 3 and latest_checkpoint(killed / "checkpoints").name == "step_00000003"

    main(arguments(ufz_pairs, killed, 7, 2, "--resume"))
    assert read_metrics(killed) == [{**r, "samples_per_s": k["samples_per_s"]}
                                    for r, k in zip(read_metrics(reference), read_metrics(killed))]


def test_a_kill_during_a_checkpoint_write_keeps_the_previous_checkpoint(ufz_pairs, tmp_path, monkeypatch):
    import geolink.train.checkpoint as checkpoint_module

    out = tmp_path / "run"
    real_save = checkpoint_module.safetensors.torch.save_file
    calls = {"count": 0}

    def die_while_writing_step_6(tensors, path, *args, **kwargs):
        if "step_00000006" in str(path) and "model" in str(path):
            Path(path).write_bytes(b"half a file")
            raise KeyboardInterrupt("simulated kill during checkpoint write")
        calls["count"] += 1
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.safetensors.torch, "save_file", die_while_writing_step_6)
    with pytest.raises(KeyboardInterrupt):
        main(arguments(ufz_pairs, out, 7))
    monkeypatch.setattr(checkpoint_module.safetensors.torch, "save_file", real_save)
    assert latest_checkpoint(out / "checkpoints").name == "step_00000003"
    assert main(arguments(ufz_pairs, out, 7, 2, "--resume")) == 0
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 8))


def test_resume_refuses_a_different_run(ufz_pairs, tmp_path, capsys):
    out = tmp_path / "run"
    main(arguments(ufz_pairs, out, 3))
    capsys.readouterr()
    assert main(arguments(ufz_pairs, out, 3, 3, "--resume")) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: resume from ") and "['batch_size'] changed" in error and error.count("\n") == 1
    # max_steps shapes the cosine schedule of every step: another value is refused, with how to train longer
    assert main(arguments(ufz_pairs, out, 6, 2, "--resume")) == 2
    error = capsys.readouterr().err
    assert "['max_steps'] changed (saved [3])" in error and "resume with max_steps=3" in error
    assert "overwrite=True" in error and error.count("\n") == 1
    with pytest.raises(ConfigError, match="resume=True and overwrite=True contradict"):
        TrainConfig(resume=True, overwrite=True, max_steps=200)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_rerun_into_a_run_folder_is_refused_and_overwrite_moves_the_old_run_aside(ufz_pairs, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(arguments(ufz_pairs, out, 12)) == 0  # --save-every 3
    first = snapshot(out)
    assert {"checkpoints/step_00000012/model.safetensors", "final/model.safetensors"} <= set(first)
    capsys.readouterr()
    assert main(arguments(ufz_pairs, out, 3)) == 2  # the rerun: no resume, fewer steps
    error = capsys.readouterr().err
    assert error == (f"error: out folder {out} already holds a run (metrics.jsonl, checkpoints, final); pass "
                     "resume=True to continue it, or overwrite=True to start again (the old run is moved to "
                     f"{out}/previous-<n>/), or choose another out folder\n")
    assert snapshot(out) == first  # nothing written, nothing lost

    assert main(arguments(ufz_pairs, out, 3, 2, "--overwrite")) == 0
    assert "the previous run in" in capsys.readouterr().err
    assert snapshot(out / "previous-1") == first  # the whole first run, byte for byte
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_00000003"]
    assert latest_checkpoint(out / "checkpoints").name == "step_00000003"
    assert main(arguments(ufz_pairs, out, 3, 2, "--overwrite")) == 0  # a second overwrite keeps both old runs
    assert snapshot(out / "previous-1") == first and (out / "previous-2" / "metrics.jsonl").is_file()


def test_pruning_keeps_the_newest_checkpoints_by_step(tmp_path):
    import torch

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    folder = tmp_path / "checkpoints"
    (folder / "step_00000012").mkdir(parents=True)  # older than the newest two by step: pruned
    for step in (3, 6, 9, 99_999_999, 100_000_000):  # the last sorts before the one above by name
        save_checkpoint(folder, step, model, optimizer, {}, {}, rank=0, world_size=1, keep=2)
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step_100000000", "step_99999999"]
    assert latest_checkpoint(folder).name == "step_100000000"
    assert [p.name for p in complete_checkpoints(folder)] == ["step_100000000", "step_99999999"]
    save_checkpoint(folder / "other", 3, model, optimizer, {}, {}, rank=0, world_size=1, keep=2)
    (folder / "other" / "step_00000012").mkdir()  # a later, damaged one a resume fell back from: replaced, not pruned
    save_checkpoint(folder / "other", 6, model, optimizer, {}, {}, rank=0, world_size=1, keep=1)
    assert sorted(p.name for p in (folder / "other").iterdir()) == ["latest", "step_00000006", "step_00000012"]


def test_resume_falls_back_from_a_damaged_latest_checkpoint(ufz_pairs, tmp_path, capsys):
    out = tmp_path / "run"
    main(arguments(ufz_pairs, out, 6))
    uninterrupted = read_metrics(out)
    latest = out / "checkpoints" / "step_00000006"

    def resumed_exactly() -> bool:
        return read_metrics(out) == [{**r, "samples_per_s": k["samples_per_s"]}
                                     for r, k in zip(uninterrupted, read_metrics(out))]

    (latest / "optimizer.json").write_text('{"param_groups": [')  # corrupt optimizer state
    capsys.readouterr()
    assert main(arguments(ufz_pairs, out, 6, 2, "--resume")) == 0
    warned = capsys.readouterr().err
    assert f"warning: checkpoint {latest} is damaged: optimizer.json cannot be read (JSONDecodeError" in warned
    assert f"resuming from {out / 'checkpoints' / 'step_00000003'} (damaged: step_00000006)" in warned
    assert len(read_metrics(out)) == 6 and resumed_exactly()  # steps 4-6 redone from step 3, bit for bit

    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated weights
    assert main(arguments(ufz_pairs, out, 6, 2, "--resume")) == 0
    assert f"warning: checkpoint {latest} is damaged: model.safetensors cannot be read (Safetensor" in (
        capsys.readouterr().err)
    assert resumed_exactly() and latest_checkpoint(out / "checkpoints") == latest

    # one flipped bit in the weights still decodes (finite values, valid header): caught by the checksum
    assert json.loads((latest / "checksums.json").read_text()).keys() >= {"model.safetensors", "optimizer.json",
                                                                         "state.json", "rng_rank0.safetensors"}
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    assert main(arguments(ufz_pairs, out, 6, 2, "--resume")) == 0
    assert f"warning: checkpoint {latest} is damaged: model.safetensors does not match its checksum in " \
        "checksums.json" in capsys.readouterr().err
    assert resumed_exactly() and latest_checkpoint(out / "checkpoints") == latest

    for checkpoint in ("step_00000003", "step_00000006"):  # nothing usable: one error naming the folder
        (out / "checkpoints" / checkpoint / "model.safetensors").write_bytes(b"")
    assert main(arguments(ufz_pairs, out, 6, 2, "--resume")) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: no checkpoint in {out / 'checkpoints'} can be read (damaged: step_00000006, step_00000003); restore "
        "one, or start again with overwrite=True instead of resume=True (the old run is moved aside)")


def test_resume_repairs_a_torn_last_metrics_line(ufz_pairs, tmp_path, capsys):
    out = tmp_path / "run"
    main(arguments(ufz_pairs, out, 6))
    uninterrupted = read_metrics(out)
    # the state of a kill while step 5's record was written: checkpoint 3, records 1-4 and half of record 5
    shutil.rmtree(out / "checkpoints" / "step_00000006")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("".join(line + "\n" for line in lines[:4]) + lines[4][:25])
    capsys.readouterr()
    assert main(arguments(ufz_pairs, out, 6, 2, "--resume")) == 0
    assert f"warning: {out / 'metrics.jsonl'}: dropped a torn last line" in capsys.readouterr().err
    assert read_metrics(out) == [{**r, "samples_per_s": k["samples_per_s"]}
                                 for r, k in zip(uninterrupted, read_metrics(out))]
    # a damaged line before the last is not a torn write: named, not dropped
    (out / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][:10] + "\n" + lines[2] + "\n")
    with pytest.raises(DataError, match=r"metrics.jsonl line 2 is not a JSON record; repair or delete that line"):
        trainer_module.keep_metrics_until(out / "metrics.jsonl", 3)


def test_non_finite_loss_stops_with_the_step_and_samples(ufz_pairs, tmp_path):
    with pytest.raises(trainer_module.NonFiniteLossError, match=r"step 0: loss.*dataset samples \[\d+, \d+\]"):
        main(arguments(ufz_pairs, tmp_path / "run", 2, 2, "--base-lr", "1e30", "--set", "pretraining.temperature=0.0"))


def test_two_processes_match_one_process_with_the_same_global_batch(ufz_pairs, tmp_path):
    one = tmp_path / "one"
    main(arguments(ufz_pairs, one, 3, 4))
    two = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
               "-m", "geolink.cli", "pretrain", *arguments(ufz_pairs, two, 3, 2), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for a, b in zip(read_metrics(one), read_metrics(two)):
        for key in ("loss", "loss_mae", "loss_contrastive", "loss_consistency", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
