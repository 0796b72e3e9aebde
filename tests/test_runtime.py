"""geolink.runtime: one meaning for precision, devices, seeds, normalisation, schedule, parameter groups and the
use of CPU cores."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from geolink.errors import ConfigError, InputError
from geolink.runtime import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Precision,
    epoch_seed,
    normalise,
    param_groups,
    rank_and_world,
    rank_seed,
    resolve_device,
    resolve_precision,
    run_single_threaded,
    sample_seed,
    warmup_cosine,
)


def test_precision_auto_is_fp32_on_cpu_and_explicit_choices_map_to_dtypes():
    assert resolve_precision("auto", "cpu") is None
    assert resolve_precision(Precision.FP32, "cpu") is None
    assert resolve_precision("bf16", "cpu") is torch.bfloat16
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ConfigError, match="precision must be one of auto, fp32, bf16, fp16; got 'half'"):
        resolve_precision("half", "cpu")


def test_resolve_device_names_the_bad_device():
    assert resolve_device("auto") == resolve_device(None) == torch.device("cuda" if torch.cuda.is_available() else
                                                                          "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(InputError, match="'gpu0' is not a device name"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="asks for CUDA"):
            resolve_device("cuda:0")


def test_rank_and_world_read_torchrun_variables(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert rank_and_world() == (3, 8)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert rank_and_world() == (0, 1)


def test_seed_derivations_keep_the_formulas_that_exact_resume_depends_on():
    assert epoch_seed(2, 5) == 2 * 100_003 + 5
    assert rank_seed(2, 1) == 2 * 7_919 + 1
    assert sample_seed(1, 4, 2) == ((1 * 1_000_003 + 4) * 1_000_033 + 2) % (2**63 - 1)


def test_normalise_uint8_and_unit_float_give_the_same_result():
    pixels = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    reference = (pixels.float() / 255.0 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(
        IMAGENET_STD).view(3, 1, 1)
    for images in (pixels, pixels.float() / 255.0, pixels[0]):
        out = normalise(images)
        assert out.dtype == torch.float32 and out.shape == images.shape
        torch.testing.assert_close(out, reference if images.dim() == 4 else reference[0], rtol=0, atol=2e-6)
    assert normalise(pixels.double() / 255.0).dtype == torch.float64


def test_normalise_names_a_band_mismatch():
    with pytest.raises(InputError, match="3 mean and 3 std values but the images have 4 bands"):
        normalise(torch.zeros(1, 4, 2, 2))
    four_bands = normalise(torch.ones(4, 2, 2), mean=(0.5,) * 4, std=(0.25,) * 4)
    assert torch.equal(four_bands, torch.full((4, 2, 2), 2.0))


def test_warmup_cosine_rises_linearly_then_decays_to_the_floor():
    lrs = [warmup_cosine(step, 1.0, warmup_steps=4, total_steps=12, floor=0.1) for step in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and math.isclose(lrs[8], 0.55) and lrs[12] == lrs[13] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


class _Tokens(nn.Module):
    """A module declaring one token exempt from weight decay (timm's ``no_weight_decay`` convention)."""

    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 1, 4))
        self.proj = nn.Linear(4, 4)

    def no_weight_decay(self) -> set[str]:
        return {"token"}


def test_param_groups_exempt_1d_tensors_and_declared_names_and_scale_submodules():
    model = nn.Sequential(_Tokens(), nn.Linear(4, 2))
    model[1].weight.requires_grad_(False)  # frozen parameters are left out
    groups = param_groups(model, weight_decay=0.05, lr=1e-3, lr_scales={model[0]: 0.1})
    by_params = {tuple(id(p) for p in g["params"]): g for g in groups}
    assert by_params[(id(model[1].bias),)] == {"params": [model[1].bias], "weight_decay": 0.0, "lr": 1e-3,
                                                "base_lr": 1e-3}
    scaled_decay = by_params[(id(model[0].proj.weight),)]
    assert scaled_decay["weight_decay"] == 0.05 and scaled_decay["lr"] == pytest.approx(1e-4)
    scaled_exempt = by_params[(id(model[0].token), id(model[0].proj.bias))]
    assert scaled_exempt["weight_decay"] == 0.0 and scaled_exempt["lr"] == pytest.approx(1e-4)
    assert len(groups) == 3 and [g["lr"] for g in groups] == [1e-3, pytest.approx(1e-4), pytest.approx(1e-4)]


def test_run_single_threaded_runs_each_call_on_one_thread_and_restores_the_thread_count():
    import threading

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = run_single_threaded([lambda k=k: (k, torch.get_num_threads(), threading.get_ident()) for k in range(3)])
        assert [k for k, _, _ in seen] == [0, 1, 2] and {threads for _, threads, _ in seen} == {1}
        assert seen[0][2] == threading.get_ident() and threading.get_ident() not in {seen[1][2], seen[2][2]}
        assert torch.get_num_threads() == 2

        def fails() -> None:
            raise ValueError("share 2")

        with pytest.raises(ValueError, match="share 2"):
            run_single_threaded([lambda: 1, fails])
        assert torch.get_num_threads() == 2
        assert run_single_threaded([lambda: 7]) == [7]
    finally:
        torch.set_num_threads(before)
