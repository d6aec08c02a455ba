"""Batches: per-row features, broadcast, padded-token masks, guidance rows, negative features, per-row timesteps."""

import pytest
import torch

import vlhooks as vh
from tiny import build, caption_width, inputs, output


def _rows(family, kw, i):
    """The batch-1 inputs of row i of a batch-2 input dict."""
    out = {}
    for k, v in kw.items():
        if isinstance(v, list):
            out[k] = [v[i]]
        elif isinstance(v, torch.Tensor) and k not in ("img_ids", "txt_ids"):
            out[k] = v[i : i + 1]
        else:
            out[k] = v
    return out


def _tokens(family, batch, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, caption_width(family), generator=g)


@torch.no_grad()
def test_features_per_row_equal_separate_calls(family, mode):
    model = build(family)
    kw = inputs(family, batch=2)
    tokens = _tokens(family, 2)
    with vh.inject(model, vh.VLFeatures(tokens), vh.InjectionConfig(mode=mode)):
        both = output(model, kw)
    for i in range(2):
        with vh.inject(model, vh.VLFeatures(tokens[i : i + 1]), vh.InjectionConfig(mode=mode)):
            single = output(model, _rows(family, kw, i))
        torch.testing.assert_close(both[i : i + 1], single, atol=1e-5, rtol=0)


@torch.no_grad()
def test_batch_of_one_broadcasts(family):
    model = build(family)
    kw = inputs(family, batch=2)
    tokens = _tokens(family, 1)
    with vh.inject(model, vh.VLFeatures(tokens), vh.InjectionConfig()):
        a = output(model, kw)
    with vh.inject(model, vh.VLFeatures(tokens.expand(2, -1, -1).clone()), vh.InjectionConfig()):
        b = output(model, kw)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@torch.no_grad()
def test_masked_padding_equals_dropping_the_tokens(family, mode):
    model = build(family)
    kw = inputs(family, batch=2)
    real = _tokens(family, 2, n=4)
    padded = torch.cat([real, 100.0 * _tokens(family, 2, n=3, seed=9)], dim=1)  # garbage in the padding
    mask = torch.tensor([[True] * 4 + [False] * 3] * 2)
    with vh.inject(model, vh.VLFeatures(padded, mask=mask), vh.InjectionConfig(mode=mode)):
        got = output(model, kw)
    with vh.inject(model, vh.VLFeatures(real), vh.InjectionConfig(mode=mode)):
        expected = output(model, kw)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["cond_first", "uncond_first"])
@torch.no_grad()
def test_guidance_rows(family, mode, layout):
    """Unconditional rows are bit-identical to the unpatched model; conditional rows equal a lone injection."""
    model = build(family)
    kw = inputs(family, batch=2)
    base = output(model, kw)
    tokens = _tokens(family, 1)
    cond, uncond = (0, 1) if layout == "cond_first" else (1, 0)
    with vh.inject(model, vh.VLFeatures(tokens), vh.InjectionConfig(mode=mode, guidance=layout)):
        got = output(model, kw)
    assert torch.equal(got[uncond], base[uncond])
    with vh.inject(model, vh.VLFeatures(tokens), vh.InjectionConfig(mode=mode, guidance="none")):
        lone = output(model, _rows(family, kw, cond))
    torch.testing.assert_close(got[cond : cond + 1], lone, atol=1e-5, rtol=0)
    assert (got[cond] - base[cond]).abs().max() > 1e-5


@torch.no_grad()
def test_negative_features_go_to_unconditional_rows(family):
    model = build(family)
    kw = inputs(family, batch=2)
    pos, neg = _tokens(family, 1, seed=1), _tokens(family, 1, seed=2)
    with vh.inject(model, vh.VLFeatures(pos), vh.InjectionConfig(guidance="cond_first"),
                   negative_features=vh.VLFeatures(neg)):
        got = output(model, kw)
    with vh.inject(model, vh.VLFeatures(neg), vh.InjectionConfig(guidance="none")):
        lone_neg = output(model, _rows(family, kw, 1))
    torch.testing.assert_close(got[1:2], lone_neg, atol=1e-5, rtol=0)


@torch.no_grad()
def test_flux_uncond_cache_context_is_not_injected():
    model = build("flux")
    kw = inputs("flux")
    base = output(model, kw)
    with vh.inject(model, vh.VLFeatures(_tokens("flux", 1)), vh.InjectionConfig()):
        with model.cache_context("uncond"):
            assert torch.equal(output(model, kw), base)
        with model.cache_context("cond"):
            assert not torch.equal(output(model, kw), base)


@torch.no_grad()
def test_per_row_timesteps_gate_rows_separately(family, mode):
    """Training batches mix timesteps: a row outside the window is exactly unpatched."""
    model = build(family)
    kw = inputs(family, batch=2)
    key = {"z_image": "t", "flux": "timestep", "sd3": "timestep", "sd35": "timestep"}[family]
    progress = torch.tensor([0.2, 0.8])
    kw[key] = {"z_image": progress, "flux": 1 - progress}.get(family, (1 - progress) * 1000)
    base = output(model, kw)
    with vh.inject(model, vh.VLFeatures(_tokens(family, 1)), vh.InjectionConfig(mode=mode, window=(0.0, 0.5))):
        got = output(model, kw)
    assert torch.equal(got[1], base[1])
    assert (got[0] - base[0]).abs().max() > 1e-5


@torch.no_grad()
def test_embedding_cached_once_per_generation():
    """The timestep-independent caption path runs once per set of features, not once per step or block."""

    class Counting(vh.ZeroShotProjector):
        calls = 0

        def embed(self, *a, **k):
            Counting.calls += 1
            return super().embed(*a, **k)

    model = build("z_image")
    with vh.inject(model, vh.VLFeatures(_tokens("z_image", 1)), vh.InjectionConfig(), adapter=Counting()) as h:
        for p in (0.1, 0.4, 0.7):
            output(model, inputs("z_image", progress=p))
        assert Counting.calls == 1  # two main layers share one embedding
        h.set_features(vh.VLFeatures(_tokens("z_image", 1, seed=5)))
        output(model, inputs("z_image"))
        assert Counting.calls == 2
