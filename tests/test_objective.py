"""Each family's training objective uses the model's own conventions: one Euler step of `DiTFamily.velocity`
(what training fits) from sigma 1 to 0 equals the real diffusers pipeline's one-step output from the same noise.
A wrong timestep direction (Z-Image), sign (Z-Image negates), scale (SD3 x1000) or packing (Flux) breaks it."""

import pytest
import torch

import vlhooks as vh
from offline_pipelines import TEXT_LEN, build_flux_pipeline, build_sd3_pipeline, build_zimage_pipeline


@torch.no_grad()
@pytest.mark.parametrize("family", ["z_image", "flux", "sd3"])
def test_one_euler_step_matches_the_pipeline(family):
    if family == "z_image":
        pipe = build_zimage_pipeline()
        caption = pipe.encode_prompt("a photo of a cat", do_classifier_free_guidance=False,
                                     max_sequence_length=TEXT_LEN)[0][0][None]  # [1, L, C]
        lat = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
        ref = pipe(prompt_embeds=[caption[0]], latents=lat, height=32, width=32, num_inference_steps=1,
                   guidance_scale=0.0, output_type="latent").images
        pooled = None
    elif family == "flux":
        pipe = build_flux_pipeline()
        caption, pooled, _ = pipe.encode_prompt("a photo of a cat", prompt_2=None, max_sequence_length=TEXT_LEN)
        lat = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        packed = lat.view(1, 1, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, 16, 4)
        out = pipe(prompt_embeds=caption, pooled_prompt_embeds=pooled, latents=packed, height=32, width=32,
                   num_inference_steps=1, output_type="latent").images  # packed [1, 16, 4]
        ref = out.view(1, 4, 4, 1, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, 1, 8, 8)
    else:
        pipe = build_sd3_pipeline()
        caption, _, pooled, _ = pipe.encode_prompt("a photo of a cat", None, None, do_classifier_free_guidance=False,
                                                   max_sequence_length=TEXT_LEN)
        lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        ref = pipe(prompt_embeds=caption, pooled_prompt_embeds=pooled, latents=lat, height=32, width=32,
                   num_inference_steps=1, guidance_scale=1.0, output_type="latent").images
    sigmas = pipe.scheduler.sigmas
    assert float(sigmas[0]) == pytest.approx(1.0) and float(sigmas[-1]) == 0.0  # one step from noise to clean
    fam = vh.family_for(pipe.transformer)
    p = next(pipe.transformer.parameters())
    x = lat.to(p.dtype)
    v = fam.velocity(pipe.transformer, x, torch.ones(1), caption, None, pooled)
    ours = x - v  # x + (sigma_1 - sigma_0) * v with sigma 1 -> 0
    torch.testing.assert_close(ours.float(), ref.float(), atol=2e-5, rtol=0)
    assert (ref - lat).abs().max() > 1e-3  # the step did something
