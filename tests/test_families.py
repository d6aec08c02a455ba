"""Every family, every mode it supports, on its tiny model (`vlhooks.testing`): exactness against the unpatched
model, strength that moves the output, and bad widths refused with the model left unpatched."""

import ast
import subprocess
import sys

import pytest
import torch

import vlhooks as vh
from conftest import snapshot
from vlhooks.testing import build, caption_width, inputs, names, output

CASES = [(name, mode) for name in names() for mode in vh.family_for(build(name)).modes]


def _feats(name, n=5, seed=4, width=None):
    g = torch.Generator().manual_seed(seed)
    return vh.VLFeatures(torch.randn(1, n, width or caption_width(name), generator=g))


@pytest.mark.parametrize("name,mode", CASES)
@torch.no_grad()
def test_exact_when_off_and_after_removal(name, mode):
    model = build(name)
    kw = inputs(name, batch=2, progress=0.3)
    base = output(model, kw)
    before = snapshot(model)
    feats = _feats(name)
    with vh.inject(model, feats, vh.InjectionConfig(mode=mode, scale=0.0)):
        assert torch.equal(output(model, kw), base), "scale 0"
    with vh.inject(model, feats, vh.InjectionConfig(mode=mode, window=(0.5, 1.0))):
        assert torch.equal(output(model, kw), base), "a window that excludes the step"
    with vh.inject(model, feats, vh.InjectionConfig(mode=mode)):
        patched = output(model, kw)
    assert not torch.equal(patched, base), "scale 1 changes the output"
    assert torch.equal(output(model, kw), base), "removal"
    assert snapshot(model) == before


@pytest.mark.parametrize("name,mode", CASES)
@torch.no_grad()
def test_more_strength_moves_the_output_further(name, mode):
    model = build(name)
    kw = inputs(name, batch=1, progress=0.3)
    base = output(model, kw)
    moved = []
    for scale in (0.25, 1.0, 4.0):
        with vh.inject(model, _feats(name), vh.InjectionConfig(mode=mode, scale=scale)):
            moved.append(float((output(model, kw) - base).norm()))
    assert 0.0 < moved[0] < moved[1] < moved[2], moved


@pytest.mark.parametrize("name", names())
def test_wrong_width_is_refused_naming_the_width(name):
    model = build(name)
    before = snapshot(model)
    want = caption_width(name)
    with pytest.raises(vh.FeatureError, match=f"is {want}"):
        vh.apply_injection(model, _feats(name, width=want + 3))
    assert snapshot(model) == before
    assert vh.get_injection(model) is None


@pytest.mark.parametrize("name", names())
def test_presets_list_sites_of_the_model(name):
    model = build(name)
    sites = vh.list_sites(model)
    presets = vh.list_presets(model)
    assert "all" in presets and presets["all"]
    assert all(set(v) <= set(sites) and v for v in presets.values())


MASKED = [(name, mode) for name, mode in CASES if vh.family_for(build(name)).supports_masks()]


@pytest.mark.parametrize("name,mode", MASKED)
@torch.no_grad()
def test_spatial_masks_on_every_family_that_has_them(name, mode):
    """A mask over the whole image-token grid equals no mask; half a grid acts, and differently from no mask."""
    model = build(name)
    kw = inputs(name, batch=1)
    fam = vh.family_for(model)
    h, w = fam.image_grid(model, (), kw)
    feats = _feats(name)
    cfg = vh.InjectionConfig(mode=mode, guidance="none")
    base = output(model, kw)
    with vh.inject(model, feats, cfg):
        unmasked = output(model, kw)
    with vh.inject(model, [vh.Reference(feats, mask=torch.ones(h, w, dtype=torch.bool))], cfg):
        torch.testing.assert_close(output(model, kw), unmasked, rtol=0, atol=1e-5)
    half = torch.zeros(h, w, dtype=torch.bool)
    half[:, : max(1, w // 2)] = True
    with vh.inject(model, [vh.Reference(feats, mask=half)], cfg):
        masked = output(model, kw)
    assert (masked - base).abs().max() > 1e-6 and (masked - unmasked).abs().max() > 1e-6


def test_text_guidance_follows_each_pipelines_convention():
    """`DiTFamily.text_guidance(call)` is the `s` of `v_u + s (v_c - v_u)` each pipeline runs: ZImagePipeline
    `v_c + w (v_c - v_u)` (s = 1 + w); FluxPipeline true CFG only with `true_cfg_scale > 1` and a negative prompt
    (its `guidance_scale` is an embedding), QwenImagePipeline likewise; Flux2Pipeline none (distilled); diffusers'
    `guidance_scale` above 1 elsewhere; None where the call has no guidance argument."""
    from vlhooks.models import family_named

    assert family_named("z_image").text_guidance({"guidance_scale": 4.0}) == 5.0
    assert family_named("z_image").text_guidance({"guidance_scale": 0.0}) == 1.0
    flux = family_named("flux")
    assert flux.text_guidance({"guidance_scale": 3.5, "true_cfg_scale": 4.0, "negative_prompt": "blurry"}) == 4.0
    assert flux.text_guidance({"guidance_scale": 3.5, "true_cfg_scale": 4.0, "negative_prompt": None}) == 1.0
    assert family_named("flux2").text_guidance({"guidance_scale": 4.0}) == 1.0
    qwen = family_named("qwen_image")  # QwenImagePipeline: true CFG as Flux's, here with negative embeddings
    assert qwen.text_guidance({"true_cfg_scale": 4.0, "negative_prompt": None, "guidance_scale": None}) == 1.0
    assert qwen.text_guidance({"true_cfg_scale": 4.0, "negative_prompt_embeds": torch.zeros(1)}) == 4.0
    for name in ("sd3", "sana", "pixart", "chroma", "lumina2"):
        assert family_named(name).text_guidance({"guidance_scale": 7.0}) == 7.0, name
        assert family_named(name).text_guidance({"guidance_scale": 0.5}) == 1.0, name
    assert family_named("sd3").text_guidance({"num_inference_steps": 4}) is None


def test_every_tiny_model_is_known_after_one_family_file_was_imported_alone():
    """Importing one tiny family file first (as a test module does at collection) registers that one; the
    registry must still load every other family file when asked."""
    code = ("import vlhooks.testing.flux2\nfrom vlhooks.testing import names\nprint(sorted(names()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert {"flux", "z_image", "sd3", "qwen_image", "flux2"} <= set(ast.literal_eval(out))
