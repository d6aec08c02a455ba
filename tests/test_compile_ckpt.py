"""torch.compile of a patched transformer, and gradient checkpointing."""

import pytest
import torch
import torch._dynamo

import vlhooks as vh
from tiny import build, caption_width, inputs, output


def _feats(family, requires_grad=False):
    t = torch.randn(1, 5, caption_width(family), generator=torch.Generator().manual_seed(0))
    return vh.VLFeatures(t.requires_grad_(requires_grad))


def _breaks(model, kw) -> int:
    output(model, kw)  # warm lazy caches (Z-Image builds its RoPE table on the first call, a stock graph break)
    torch._dynamo.reset()
    return torch._dynamo.explain(model)(**kw).graph_break_count


@pytest.mark.slow
@pytest.mark.parametrize("family,mode", [("flux", "joint"), ("flux", "decoupled"), ("z_image", "joint"), ("sd3", "joint")])
@torch.no_grad()
def test_compiled_equals_eager_without_new_graph_breaks(family, mode):
    model = build(family)
    kw = inputs(family, batch=2)
    plain_breaks = _breaks(model, kw)
    with vh.inject(model, _feats(family), vh.InjectionConfig(mode=mode, scale={0: 0.5, 1: 1.0}, blocks=[0, 1])):
        eager = output(model, kw)
        patched_breaks = _breaks(model, kw)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager")
        got = output(compiled, kw)
    assert patched_breaks == plain_breaks
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=0)
    torch._dynamo.reset()


@pytest.mark.slow
@torch.no_grad()
def test_compiled_respects_the_window():
    model = build("flux")
    base_late = output(model, inputs("flux", progress=0.9))
    with vh.inject(model, _feats("flux"), vh.InjectionConfig(window=(0.0, 0.5))):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager")
        early = output(compiled, inputs("flux", progress=0.2))
        late = output(compiled, inputs("flux", progress=0.9))
        eager_early = output(model, inputs("flux", progress=0.2))
    torch.testing.assert_close(early, eager_early, atol=1e-5, rtol=0)
    torch.testing.assert_close(late, base_late, atol=1e-5, rtol=0)
    torch._dynamo.reset()


@pytest.mark.parametrize("family", ["z_image", "flux", "sd3"])
@pytest.mark.parametrize("mode", ["joint", "decoupled"])
def test_gradient_checkpointing_gives_the_same_feature_gradients(family, mode):
    grads = []
    for ckpt in (False, True):
        model = build(family)
        for p in model.parameters():
            p.requires_grad_(False)
        if ckpt:
            model.enable_gradient_checkpointing()
        feats = _feats(family, requires_grad=True)
        kw = inputs(family, batch=2)
        with vh.inject(model, feats, vh.InjectionConfig(mode=mode)):
            output(model, kw).square().mean().backward()
        grads.append(feats.tokens.grad.clone())
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-7, rtol=0)
