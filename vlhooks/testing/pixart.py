"""Tiny PixArt-Sigma: `PixArtTransformer2DModel` (2 blocks, caption width 16, learned sigma: 8 output channels for
4 latent channels) and a `PixArtSigmaPipeline` with a tiny T5 encoder, a scale-4 VAE and an epsilon DPM-Solver."""

from __future__ import annotations

import torch

from . import TinyDiT, register_tiny
from .parts import t5, t5_tokenizer, vae

CONFIG = dict(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
              out_channels=8, cross_attention_dim=16, caption_channels=16, attention_bias=True,
              activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
              norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False)


def inputs(batch: int = 1, progress: float = 0.3, seed: int = 1, cap_len: int = 8) -> dict:
    """Rows after the first have their last 2 caption tokens padded (the model masks them). The timestep is the
    (continuous) DDPM timestep whose SNR is that of flow sigma `1 - progress`."""
    from ..models.pixart import timestep_of_sigma

    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, cap_len, dtype=torch.long)
    mask[1:, max(1, cap_len - 2):] = 0
    t = timestep_of_sigma(torch.tensor(1.0 - progress)).float()
    return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(batch, cap_len, 16, generator=g),
                timestep=t.expand(batch), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                encoder_attention_mask=mask, return_dict=False)


def pipeline(seed: int = 0):
    """CFG ([uncond, cond] batched) runs when guidance_scale > 1 (the pipeline default is 4.5); the pipeline has
    no `do_classifier_free_guidance` attribute, so inject with `guidance="uncond_first"` when it guides."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    transformer = TINY.build(seed)
    tok = t5_tokenizer()
    scheduler = DPMSolverMultistepScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                                            prediction_type="epsilon")  # PixArt's training schedule
    return PixArtSigmaPipeline(tokenizer=tok, text_encoder=t5(tok, 16), vae=vae(4, 0.13025, None),
                               transformer=transformer, scheduler=scheduler)


def _guidance(cfg: bool) -> dict:
    # resolution binning maps sizes to the bins of a 256-2048 px model; clean_caption needs bs4 / ftfy: both off
    return dict(guidance_scale=3.0 if cfg else 1.0, use_resolution_binning=False, clean_caption=False)


TINY = register_tiny(TinyDiT("pixart", "PixArtTransformer2DModel", CONFIG, 16, inputs, pipeline, guidance=_guidance))
