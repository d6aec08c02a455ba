"""Property tests (hypothesis) of `InjectionConfig`: every valid config round-trips through an adapter folder's
`adapter_config.json`; schedule strengths stay within [0, scale]; every invalid config raises `ConfigError`.
Derandomized, so CI draws the same examples every run (a failure found once stays reproducible)."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vlhooks as vh
from tiny import build

unit = st.floats(0.0, 1.0, allow_nan=False)
windows = st.tuples(unit, unit).map(lambda w: (min(w), max(w)))
schedules = st.sampled_from(["constant", "linear_decay", "cosine_decay", "step"])
modes = st.sampled_from(["joint", "decoupled"])


@st.composite
def configs(draw):
    schedule = draw(schedules)
    params = {}
    if schedule in ("linear_decay", "cosine_decay") and draw(st.booleans()):
        params["end"] = draw(unit)
    if schedule == "step":
        params = draw(st.fixed_dictionaries({}, optional={"at": unit, "after": unit}))
    mode = draw(modes)
    lo = 0.0 if mode == "joint" else -10.0
    scalar = st.floats(lo, 10.0, allow_nan=False)
    scale = draw(st.one_of(scalar, st.dictionaries(st.integers(0, 3), scalar, min_size=1)))
    blocks = draw(st.one_of(st.sampled_from(["all", "double", "single", r"transformer_blocks\.\d+"]),
                            st.lists(st.integers(0, 3), min_size=1, unique=True)))
    placement = "block_output" if mode == "decoupled" and draw(st.booleans()) else "attention"
    return vh.InjectionConfig(blocks=blocks, window=draw(windows), schedule=schedule, schedule_params=params,
                              scale=scale, mode=mode, guidance=draw(st.sampled_from(["auto", "none", "cond_first",
                                                                                     "uncond_first"])),
                              placement=placement)


@pytest.fixture(scope="module")
def adapter():
    return vh.ProjectionAdapter.create(build("flux"), 24)


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cfg=configs())
def test_every_valid_config_round_trips_through_adapter_config_json(cfg, adapter, tmp_path_factory):
    folder = tmp_path_factory.mktemp("a") / "adapter"
    adapter.config.injection = cfg.to_dict()
    adapter.save(folder)
    loaded = vh.InjectionConfig.from_dict(vh.load_adapter(folder).config.injection)
    assert loaded == cfg


@settings(max_examples=200, deadline=None, derandomize=True)
@given(cfg=configs(), progress=unit)
def test_strengths_stay_within_zero_and_the_scale(cfg, progress):
    s = cfg.strength_at(progress)
    assert 0.0 <= s <= 1.0 + 1e-12
    if not cfg.in_window(progress):
        assert s == 0.0
    t = float(cfg.strength_tensor(torch.tensor([progress], dtype=torch.float64))[0])
    assert t == pytest.approx(s, abs=1e-9)
    for index in range(4):
        scale = cfg.block_scale(index)
        assert min(0.0, scale) <= s * scale <= max(0.0, scale)


bad_fields = st.one_of(
    st.tuples(unit, unit).filter(lambda w: w[0] > w[1]).map(lambda w: {"window": w}),
    st.floats(1.0001, 1e6).map(lambda x: {"window": (0.0, x)}),
    st.floats(-1e6, -1e-6).map(lambda x: {"window": (x, 0.5)}),
    st.just({"window": (float("nan"), 0.5)}),
    st.text(max_size=8).filter(lambda m: m not in ("joint", "decoupled")).map(lambda m: {"mode": m}),
    st.text(max_size=8).filter(lambda g: g not in ("auto", "none", "cond_first", "uncond_first")).map(
        lambda g: {"guidance": g}),
    st.floats(-1e6, -1e-6).map(lambda s: {"scale": s}),  # joint mode: a log(scale) bias needs scale >= 0
    st.sampled_from([float("nan"), float("inf"), -float("inf")]).map(lambda s: {"scale": s}),
    st.one_of(st.floats(1.0001, 10.0), st.floats(-10.0, -1e-6), st.text(max_size=3)).map(
        lambda e: {"schedule": "linear_decay", "schedule_params": {"end": e}}),
    st.just({"schedule": "constant", "schedule_params": {"end": 0.5}}),
    st.just({"schedule": lambda: 1.0}),
    st.just({"schedule": lambda u: "high"}),
    st.just({"schedule": lambda u: -1.0}),
    st.just({"schedule": lambda u: math.nan}),
    st.just({"schedule": lambda u: 1 / 0}),
    st.just({"blocks": []}),
    st.just({"blocks": [True]}),
    st.just({"placement": "block_output"}),  # joint mode has no separate output to place
    st.just({"mode": "decoupled", "scale": 1e300}),
)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(fields=bad_fields)
def test_every_invalid_config_raises_config_error(fields):
    with pytest.raises(vh.ConfigError):
        vh.InjectionConfig(**fields)
