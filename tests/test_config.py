"""InjectionConfig: schedules against their formulas, windows, block selection per family."""

import math

import pytest
import torch

import vlhooks as vh
from tiny import build


@pytest.mark.parametrize("p", [0.0, 0.1, 0.25, 0.4, 0.5, 0.55, 0.7, 0.9, 1.0])
def test_schedules_follow_their_formulas(p):
    w0, w1 = 0.1, 0.7
    inside = w0 <= p <= w1
    u = (p - w0) / (w1 - w0)
    expected = {
        "constant": 1.0,
        "linear_decay": 1.0 - u,
        "cosine_decay": 0.5 * (1 + math.cos(math.pi * u)),
        "step": 1.0 if u < 0.5 else 0.0,
    }
    for name, value in expected.items():
        cfg = vh.InjectionConfig(window=(w0, w1), schedule=name)
        want = value if inside else 0.0
        assert cfg.strength_at(p) == pytest.approx(want, abs=1e-12)
        assert cfg.strength_tensor(torch.tensor([p]))[0].item() == pytest.approx(want, abs=1e-6)
    cfg = vh.InjectionConfig(window=(w0, w1), schedule=lambda u: u * u)
    assert cfg.strength_at(p) == pytest.approx(u * u if inside else 0.0)
    cfg = vh.InjectionConfig(window=(w0, w1), schedule="linear_decay", schedule_params={"end": 0.5})
    assert cfg.strength_at(p) == pytest.approx((1.0 - 0.5 * u) if inside else 0.0)
    cfg = vh.InjectionConfig(window=(w0, w1), schedule="step", schedule_params={"at": 0.25, "after": 0.3})
    assert cfg.strength_at(p) == pytest.approx((1.0 if u < 0.25 else 0.3) if inside else 0.0)


def test_config_round_trip():
    cfg = vh.InjectionConfig(blocks=[0, 2], window=(0.2, 0.8), schedule="cosine_decay", scale={0: 0.5, 2: 1.5},
                             mode="decoupled")
    assert vh.InjectionConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "family,selector,expected",
    [
        ("flux", "all", ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
                         "single_transformer_blocks.1"]),
        ("flux", "double", ["transformer_blocks.0", "transformer_blocks.1"]),
        ("flux", "single", ["single_transformer_blocks.0", "single_transformer_blocks.1"]),
        ("flux", [1, 2], ["transformer_blocks.1", "single_transformer_blocks.0"]),
        ("flux", r"single_transformer_blocks\.1", ["single_transformer_blocks.1"]),
        ("z_image", "all", ["layers.0", "layers.1"]),
        ("z_image", "refiners", ["noise_refiner.0", "context_refiner.0"]),
        ("z_image", "context_refiner", ["context_refiner.0"]),
        ("z_image", [0, 3], ["layers.0", "context_refiner.0"]),
        ("sd3", "joint", ["transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2"]),
        ("sd3", r"transformer_blocks\.[12]", ["transformer_blocks.1", "transformer_blocks.2"]),
    ],
)
def test_block_selection(family, selector, expected):
    model = build(family)
    with vh.inject(model, None, vh.InjectionConfig(blocks=selector)) as h:
        assert h.sites == expected
    assert vh.list_presets(model)["all"] == [s for s in vh.list_sites(model) if s in vh.list_presets(model)["all"]]


def test_list_sites_order():
    assert vh.list_sites(build("flux")) == [
        "transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.1"]
    assert vh.list_sites(build("z_image")) == ["layers.0", "layers.1", "noise_refiner.0", "context_refiner.0"]
