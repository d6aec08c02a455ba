"""Training latents through each family's pipeline VAE, as that pipeline makes them, fit that family's objective."""

import numpy as np
import pytest
import torch

import vlhooks.testing as T
from vlhooks.train.encoders import VAELatents

IMAGE = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    def save(name):
        folder = tmp_path_factory.mktemp(name)
        pipe = T.pipeline(name)
        pipe.save_pretrained(folder)
        return pipe, folder
    return save


@pytest.mark.parametrize("name", ["z_image", "flux", "sd3", "qwen_image", "flux2", "chroma", "sana", "pixart", "lumina2"])
@torch.no_grad()
def test_vae_latents_fit_the_family_objective(saved, name):
    pipe, folder = saved(name)
    enc = VAELatents(str(folder), size=32)
    assert type(enc.vae).__name__ == type(pipe.vae).__name__
    z = enc([IMAGE])
    fam = enc.family
    v = fam.velocity(pipe.transformer, z, torch.tensor([0.5]), torch.randn(1, 5, T.caption_width(name)))
    assert v.shape == z.shape and torch.isfinite(v).all()


@torch.no_grad()
def test_flux2_latents_equal_its_pipelines_own(saved):
    pipe, folder = saved("flux2")
    x = torch.from_numpy(IMAGE).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    want = pipe._encode_vae_image(x, generator=None)  # argmax (the mode), patchified, batch-norm normalised
    torch.testing.assert_close(VAELatents(str(folder), size=32)([IMAGE]), want, rtol=0, atol=1e-5)


@torch.no_grad()
def test_qwen_image_latents_follow_its_img2img_pipeline(saved):
    """QwenImageImg2ImgPipeline._encode_vae_image: `(z - latents_mean) * (1 / latents_std)` over a one-frame video
    latent; with the distribution's mode in place of a sample."""
    pipe, folder = saved("qwen_image")
    x = torch.from_numpy(IMAGE).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    z = pipe.vae.encode(x[:, :, None]).latent_dist.mode()
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(VAELatents(str(folder), size=32)([IMAGE]), ((z - mean) * (1.0 / std))[:, :, 0],
                               rtol=0, atol=1e-6)
