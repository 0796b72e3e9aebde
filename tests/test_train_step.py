"""The GPU-ready training step on CPU: no unused parameters for DDP, gradient checkpointing, torch.compile, the
non-finite check of a log window, the optimizer choice."""

from __future__ import annotations

import json

import pytest
import torch
from torch_geometric.data import Batch

from geolink.graph.schema import empty_graph
from geolink.models import GeoLinkForPretraining
from geolink.registry import create_model
from geolink.train import TrainConfig
from geolink.train import trainer as trainer_module
from geolink.train.trainer import StreamDataset, collate_stream, ddp_ignored_parameters, make_optimizer, open_dataset


@pytest.fixture(scope="module")
def ufz_batch(shared_data):
    data = StreamDataset(open_dataset(str(shared_data / "official_examples" / "ufz")), seed=0)
    return collate_stream([data[0], data[1], data[2]])


def tiny(type_weighting: str = "softmax", dropout: float = 0.0):
    torch.manual_seed(0)
    return create_model("geolink_tiny", osm={"text_dim": 512, "type_weighting": type_weighting},
                        fusion={"dropout": dropout}).train()


def parameters_without_gradient(model, images, graphs, seeds) -> list[str]:
    model.zero_grad(set_to_none=True)
    model(images, graphs, sample_seeds=seeds)["loss"].backward()
    return sorted(name for name, p in model.named_parameters() if p.requires_grad and p.grad is None)


@pytest.mark.parametrize("type_weighting", ["softmax", "sum"])
def test_ddp_ignores_exactly_the_parameters_the_loss_never_reads(ufz_batch, type_weighting):
    images, graphs, positions = ufz_batch
    model = tiny(type_weighting)
    unused = parameters_without_gradient(model, images, graphs, positions)
    assert unused == sorted(ddp_ignored_parameters(model))
    assert bool(unused) == (type_weighting == "sum")


def test_a_batch_without_masked_nodes_still_reaches_every_parameter(ufz_batch):
    images = ufz_batch[0][:2]
    model = tiny()
    graphs = Batch.from_data_list([empty_graph(512), empty_graph(512)])
    assert parameters_without_gradient(model, images, graphs, torch.tensor([0, 1])) == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_gradient_checkpointing_gives_the_same_gradients(ufz_batch):
    images, graphs, positions = ufz_batch
    model = tiny()
    model(images, graphs, sample_seeds=positions)["loss"].backward()
    plain = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(True)
    assert model.image_encoder.trunk.grad_checkpointing
    model(images, graphs, sample_seeds=positions)["loss"].backward()
    checkpointed = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_compiled_step_matches_eager(ufz_batch):
    images, graphs, positions = ufz_batch
    model = tiny()
    eager = model(images, graphs, sample_seeds=positions)
    compiled = torch.compile(model)(images, graphs, sample_seeds=positions)
    for key in trainer_module.LOSS_TERMS:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-5, msg=key)
    compiled["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_the_optimizer_is_fused_only_when_every_parameter_is_on_a_gpu():
    optimizer = make_optimizer(tiny(), weight_decay=0.05)
    assert not optimizer.defaults["fused"]
    assert optimizer.defaults["betas"] == (0.9, 0.95)


def test_a_non_finite_loss_in_a_later_window_names_its_step_and_samples(tmp_path, monkeypatch, shared):
    real_forward = GeoLinkForPretraining.forward
    calls = []

    def nan_at_step_4(self, images, graph, **kwargs):
        out = real_forward(self, images, graph, **kwargs)
        calls.append(1)
        if len(calls) == 5:  # 0-based step 4, inside the second window of log_every=3
            out["loss_mae"] = out["loss_mae"] * float("nan")
            out["loss"] = out["loss"] + out["loss_mae"]
        return out

    monkeypatch.setattr(GeoLinkForPretraining, "forward", nan_at_step_4)
    out = tmp_path / "run"
    out.mkdir()
    config = TrainConfig(data=str(shared("official_examples", "ufz")), out=out, max_steps=8, batch_size=2,
                         log_every=3, save_every=100, warmup_steps=1, overrides={"osm.text_dim": 512})
    with pytest.raises(trainer_module.NonFiniteLossError, match=r"step 4: loss, loss_mae = .*dataset samples "
                                                               r"\[\d+, \d+\]"):
        trainer_module.train(config)
    # the first window was written, the bad one never reaches the file or a checkpoint
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
    assert len(calls) == 6  # the step ran to the end of its window (no sync inside the step), not further
