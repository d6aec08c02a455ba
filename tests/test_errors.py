"""Bad input raises an error that names the fix, and the model stays unpatched."""

import pytest
import torch

import vlhooks as vh
from conftest import snapshot
from tiny import build, caption_width, inputs, output


@pytest.fixture
def flux():
    model = build("flux")
    kw = inputs("flux")
    with torch.no_grad():
        base = output(model, kw)
    return model, snapshot(model), base, kw


def _assert_unpatched(model, before, base, kw):
    assert snapshot(model) == before
    assert vh.get_injection(model) is None
    with torch.no_grad():
        assert torch.equal(output(model, kw), base)


def _good():
    return vh.VLFeatures(torch.randn(1, 4, caption_width("flux")))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: (vh.VLFeatures(torch.randn(1, 4, 7)), vh.InjectionConfig()), r"width 7 .* caption width .* is 32"),
        (lambda: (vh.VLFeatures(torch.randn(1, 4, 32), space="hidden"), vh.InjectionConfig()),
         r"hidden width .* is 32|width"),
        (lambda: (_good(), vh.InjectionConfig(blocks="nothing_like_this")), r"matches no site.*list_sites"),
        (lambda: (_good(), vh.InjectionConfig(blocks=[0, 9])), r"out of range.*0\.\.3"),
        (lambda: (_good(), vh.InjectionConfig(blocks="double", scale={3: 0.5})), r"scale keys \[3\]"),
        (lambda: (vh.VLFeatures(torch.randn(1, 4, 32, device="meta")), vh.InjectionConfig()),
         r"on meta but the model is on cpu.*feats.to\('cpu'\)"),
        (lambda: (_good(), "not a config"), r"InjectionConfig"),
    ],
)
def test_bad_input_names_fix_and_leaves_model_unpatched(flux, make, match):
    model, before, base, kw = flux
    if "hidden" in match:  # hidden width of this tiny Flux is 32: use a wrong one
        feats, cfg = vh.VLFeatures(torch.randn(1, 4, 31), space="hidden"), vh.InjectionConfig()
        match = r"width 31 but the hidden width .* is 32"
    else:
        feats, cfg = make()
    with pytest.raises(vh.VLHooksError, match=match):
        vh.apply_injection(model, feats, cfg)
    _assert_unpatched(model, before, base, kw)


@pytest.mark.parametrize(
    "build_bad,match",
    [
        (lambda: vh.InjectionConfig(window=(-0.1, 0.5)), r"outside \[0, 1\]"),
        (lambda: vh.InjectionConfig(window=(0.2, 1.5)), r"outside \[0, 1\]"),
        (lambda: vh.InjectionConfig(window=(0.8, 0.2)), r"start > end"),
        (lambda: vh.InjectionConfig(mode="cross"), r"mode must be one of"),
        (lambda: vh.InjectionConfig(scale=-1.0), r"log\(scale\).*decoupled"),
        (lambda: vh.InjectionConfig(schedule="sawtooth"), r"schedule must be one of"),
        (lambda: vh.InjectionConfig(schedule="step", schedule_params={"end": 0.1}), r"not used by schedule"),
        (lambda: vh.VLFeatures(torch.randn(1, 4, 32), mask=torch.ones(1, 5, dtype=torch.bool)), r"mask has shape"),
        (lambda: vh.VLFeatures(torch.randn(1, 4, 32), mask=torch.ones(1, 4)), r"bool tensor"),
        (lambda: vh.VLFeatures(torch.full((1, 4, 32), float("nan"))), r"NaN or Inf.*nan_to_num"),
        (lambda: vh.VLFeatures(torch.randn(4, 32)), r"unsqueeze\(0\)"),
        (lambda: vh.VLFeatures(torch.ones(1, 4, 32, dtype=torch.long)), r"floating-point"),
        (lambda: vh.VLFeatures(torch.randn(1, 2, 32), mask=torch.tensor([[False, False]])), r"no real token"),
    ],
)
def test_bad_config_or_features_raise_before_patching(flux, build_bad, match):
    model, before, base, kw = flux
    with pytest.raises(vh.VLHooksError, match=match):
        build_bad()
    _assert_unpatched(model, before, base, kw)


def test_unknown_architecture():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(vh.TargetError, match=r"not a supported DiT.*register_family"):
        vh.apply_injection(model, _good(), vh.InjectionConfig())
    assert not hasattr(model, "_diffusers_hook")


def test_bad_set_features_keeps_previous_features(flux):
    model, before, base, kw = flux
    feats = _good()
    with vh.inject(model, feats, vh.InjectionConfig()) as h:
        with torch.no_grad():
            ref = output(model, kw)
        with pytest.raises(vh.FeatureError, match="width 5"):
            h.set_features(vh.VLFeatures(torch.randn(1, 4, 5)))
        with torch.no_grad():
            assert torch.equal(output(model, kw), ref)
    _assert_unpatched(model, before, base, kw)


def test_other_dtype_is_cast_to_the_model_dtype(flux):
    """Documented policy: floating features of another dtype are cast; the result equals passing them cast."""
    model, before, base, kw = flux
    t64 = torch.randn(1, 4, 32, dtype=torch.float64)
    with torch.no_grad():
        with vh.inject(model, vh.VLFeatures(t64), vh.InjectionConfig()):
            a = output(model, kw)
        with vh.inject(model, vh.VLFeatures(t64.float()), vh.InjectionConfig()):
            b = output(model, kw)
    assert torch.equal(a, b)


def test_batch_mismatch_at_call_time_names_fix(flux):
    model, before, base, kw = flux
    kw3 = inputs("flux", batch=3)
    with vh.inject(model, vh.VLFeatures(torch.randn(2, 4, 32)), vh.InjectionConfig()):
        with pytest.raises(vh.FeatureError, match=r"batch 2 but the model call has 3.*broadcast"):
            with torch.no_grad():
                output(model, kw3)
    _assert_unpatched(model, before, base, kw)


def test_removed_handle_refuses_use(flux):
    model, *_ = flux
    h = vh.apply_injection(model, _good(), vh.InjectionConfig())
    h.remove()
    h.remove()  # idempotent
    with pytest.raises(vh.TargetError, match="apply_injection"):
        h.set_scale(0.5)


def test_features_mutated_to_nan_after_patching_are_a_named_error():
    model = build("flux")
    feats = vh.VLFeatures(torch.randn(1, 3, 32))
    with vh.inject(model, feats):
        feats.tokens[0, 0, 0] = float("nan")  # after the checks at patch time
        with pytest.raises(vh.FeatureError, match="NaN or Inf once embedded"), torch.no_grad():
            output(model, inputs("flux"))


def test_a_module_named_like_a_dit_and_a_unet_pipeline_are_named_errors():
    class FluxTransformer2DModel(torch.nn.Module):  # the name of a DiT class, nothing else of it
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 2)

    with pytest.raises(vh.TargetError, match="not a supported DiT"):
        vh.apply_injection(FluxTransformer2DModel(), None)

    class StableDiffusionPipeline:  # a UNet pipeline: it has a .unet, no .transformer
        unet = torch.nn.Linear(2, 2)

    with pytest.raises(vh.TargetError, match="UNet"):
        vh.apply_injection(StableDiffusionPipeline(), None)
