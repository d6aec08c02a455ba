"""Inside real diffusers pipelines (assembled offline from tiny parts): the timestep window fires on exactly the
steps it should, and with classifier-free guidance the unconditional branch is untouched."""

import copy

import pytest
import torch

import vlhooks as vh
from offline_pipelines import build_flux_pipeline, build_sd3_pipeline, build_zimage_pipeline, run
from tiny import caption_width

BUILDERS = {"z_image": build_zimage_pipeline, "flux": build_flux_pipeline,
            "sd3": lambda: build_sd3_pipeline(variant="sd3"), "sd35": lambda: build_sd3_pipeline(variant="sd35")}
WINDOWS = [(0.0, 1.0), (0.0, 0.45), (0.3, 0.62), (0.55, 1.0)]


def _feats(family):
    return vh.VLFeatures(torch.randn(1, 6, caption_width(family), generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("family", list(BUILDERS))
@torch.no_grad()
def test_window_fires_on_exactly_the_expected_steps(family):
    pipe = BUILDERS[family]()
    steps = 7
    for window in WINDOWS:
        with vh.inject(pipe, _feats(family), vh.InjectionConfig(window=window)) as handle:
            run(pipe, family, steps=steps, cfg=False)
            injector = handle.injector
            # independent count: the scheduler's own sigmas for the steps it just ran, progress = 1 - sigma
            sigmas = pipe.scheduler.sigmas[:steps].double()
            progress = (1.0 - sigmas).tolist()
            edges = [w for w in window if 0.0 < w < 1.0]  # 0.0 is the first step by definition
            assert all(abs(p - w) > 1e-4 for p in progress for w in edges), "window edge on a step: ambiguous"
            expected = sum(window[0] <= p <= window[1] for p in progress)
            assert injector.calls == steps
            assert injector.injected_calls == expected, (window, progress)
    assert 0 < sum(1 for p in progress if 0.0 <= p <= 0.45) < steps  # the windows really split the run


def _record_calls(transformer):
    calls = []

    def hook(module, args, kwargs, out):
        calls.append((copy.deepcopy(args), copy.deepcopy(kwargs), copy.deepcopy(out[0])))

    return calls, transformer.register_forward_hook(hook, with_kwargs=True)


def _as_tensor(x):
    return torch.stack(x) if isinstance(x, list) else x


@pytest.mark.parametrize("family,mode", [("z_image", "joint"), ("z_image", "decoupled"), ("sd3", "joint"),
                                         ("sd35", "decoupled"), ("flux", "joint")])
@torch.no_grad()
def test_guidance_leaves_the_unconditional_branch_untouched(family, mode):
    pipe = BUILDERS[family]()
    calls, h = _record_calls(pipe.transformer)
    with vh.inject(pipe, _feats(family), vh.InjectionConfig(mode=mode)):
        run(pipe, family, steps=3, cfg=True)
    h.remove()
    assert vh.get_injection(pipe) is None
    changed = 0
    for i, (args, kwargs, patched_out) in enumerate(calls):
        plain = _as_tensor(pipe.transformer(*args, **kwargs)[0])  # the same call, unpatched
        patched_out = _as_tensor(patched_out)
        if family == "flux":  # separate calls: cond first, then uncond, at every step
            assert len(calls) == 6
            if i % 2 == 1:
                assert torch.equal(patched_out, plain)
            else:
                changed += int(not torch.equal(patched_out, plain))
            continue
        assert patched_out.shape[0] == 2, "guidance must batch [cond, uncond] rows"
        uncond, cond = (1, 0) if family == "z_image" else (0, 1)
        assert torch.equal(patched_out[uncond], plain[uncond])
        changed += int(not torch.equal(patched_out[cond], plain[cond]))
    assert changed == 3, "every conditional branch must be injected"


@torch.no_grad()
def test_pipeline_and_transformer_targets_are_equivalent_and_removal_is_exact():
    pipe = build_zimage_pipeline()
    base = run(pipe, "z_image", cfg=True)
    with vh.inject(pipe, _feats("z_image"), vh.InjectionConfig()):
        a = run(pipe, "z_image", cfg=True)
    with vh.inject(pipe.transformer, _feats("z_image"), vh.InjectionConfig(guidance="cond_first")):
        b = run(pipe, "z_image", cfg=True)
    assert torch.equal(a, b)
    assert not torch.equal(a, base)
    assert torch.equal(run(pipe, "z_image", cfg=True), base)
