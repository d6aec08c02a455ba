"""Scale 0, an excluded window and removal are bit-identical to the unpatched model (every family, both modes)."""

import pytest
import torch

import vlhooks as vh
from conftest import snapshot
from tiny import build, caption_width, inputs, output


def _feats(family, n=5, batch=1, seed=3):
    g = torch.Generator().manual_seed(seed)
    return vh.VLFeatures(torch.randn(batch, n, caption_width(family), generator=g))


@torch.no_grad()
def test_injection_changes_output_and_exact_controls(family, mode):
    model = build(family)
    kw = inputs(family, batch=2, progress=0.3)
    before = snapshot(model)
    base = output(model, kw)
    feats = _feats(family)

    with vh.inject(model, feats, vh.InjectionConfig(mode=mode)):
        patched = output(model, kw)
    assert (patched - base).abs().max() > 1e-4, "injection at scale 1 must change the output"

    with vh.inject(model, feats, vh.InjectionConfig(mode=mode, scale=0.0)):
        assert torch.equal(output(model, kw), base)
    with vh.inject(model, feats, vh.InjectionConfig(mode=mode, window=(0.5, 1.0))):  # progress 0.3 is outside
        assert torch.equal(output(model, kw), base)
    with vh.inject(model, feats, vh.InjectionConfig(mode=mode, scale={0: 0.0}, blocks=[0])):
        assert torch.equal(output(model, kw), base)

    handle = vh.apply_injection(model, feats, vh.InjectionConfig(mode=mode))
    assert torch.equal(output(model, kw), patched)
    handle.remove()
    assert torch.equal(output(model, kw), base)
    assert snapshot(model) == before, "removal must leave no hook, processor or attribute behind"
    assert vh.get_injection(model) is None


@torch.no_grad()
def test_exception_inside_with_leaves_model_unpatched(family):
    model = build(family)
    kw = inputs(family)
    before = snapshot(model)
    base = output(model, kw)
    with pytest.raises(RuntimeError, match="boom"):
        with vh.inject(model, _feats(family), vh.InjectionConfig()):
            output(model, kw)
            raise RuntimeError("boom")
    assert snapshot(model) == before
    assert torch.equal(output(model, kw), base)


@torch.no_grad()
def test_remove_injection_by_target_and_double_patch_refused(family):
    model = build(family)
    kw = inputs(family)
    base = output(model, kw)
    vh.apply_injection(model, _feats(family), vh.InjectionConfig())
    with pytest.raises(vh.TargetError, match="already patched"):
        vh.apply_injection(model, _feats(family), vh.InjectionConfig())
    assert vh.remove_injection(model) is True
    assert vh.remove_injection(model) is False
    assert torch.equal(output(model, kw), base)


@torch.no_grad()
def test_fractional_scale_lies_between(family):
    """Joint mode: scale s is a log(s) bias, so the output moves monotonically from unpatched (0) towards s=1."""
    model = build(family)
    kw = inputs(family)
    base = output(model, kw)
    feats = _feats(family)
    outs = {}
    for s in (0.25, 1.0, 4.0):
        with vh.inject(model, feats, vh.InjectionConfig(scale=s)):
            outs[s] = output(model, kw)
    d = {s: (o - base).norm().item() for s, o in outs.items()}
    assert 0 < d[0.25] < d[1.0] < d[4.0]


@torch.no_grad()
def test_set_scale_and_set_features_take_effect(family, mode):
    model = build(family)
    kw = inputs(family)
    f1, f2 = _feats(family, seed=1), _feats(family, seed=2)
    with vh.inject(model, f2, vh.InjectionConfig(mode=mode, scale=0.5)):
        ref_f2_half = output(model, kw)
    with vh.inject(model, f1, vh.InjectionConfig(mode=mode)) as h:
        output(model, kw)  # fills the per-generation cache with f1
        h.set_features(f2)
        h.set_scale(0.5)
        assert torch.equal(output(model, kw), ref_f2_half), "nothing stale after set_features / set_scale"
