"""Tiny Flux.2: `Flux2Transformer2DModel` (2 double + 2 single blocks, caption width 48, with the guidance embedding
of FLUX.2-dev) and two pipelines around it, each with a tiny `AutoencoderKLFlux2` (4 latent channels, patchified to
the 16 input channels):
- `pipeline` (the registered one): `Flux2KleinPipeline` with a tiny Qwen3 causal LM (width 16, 27 layers: the
  pipeline stacks hidden states 9, 18, 27); true classifier-free guidance (separate cond / uncond calls).
- `dev_pipeline`: FLUX.2-dev's `Flux2Pipeline` with a tiny Mistral3 (width 16, 30 layers: hidden states 10, 20, 30)
  and a chat-template tokenizer in place of the Pixtral processor (text only); embedded guidance, one call a step.
Every Flux.2 pipeline takes `image` as its first positional argument: pass the prompt by keyword."""

from __future__ import annotations

import torch

from . import TinyDiT, register_tiny
from .parts import mistral3, mistral_tokenizer, qwen3_lm, qwen_tokenizer

CONFIG = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
              num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=32,
              axes_dims_rope=[4, 4, 4, 4], guidance_embeds=True)
LATENT_GRID = 4  # 32x32 images: VAE latents 8x8 (scale factor 4), patchified 2x2 to a 4x4 grid of 16 tokens


def ids(t: int, h: int, w: int, l: int) -> torch.Tensor:
    """Flux.2's 4-axis positions `(t, h, w, l)`, as the pipelines build them (`torch.cartesian_prod`). `[t h w l, 4]`"""
    return torch.cartesian_prod(torch.arange(t), torch.arange(h), torch.arange(w), torch.arange(l))


def inputs(batch: int = 1, progress: float = 0.3, seed: int = 1, cap_len: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = LATENT_GRID * LATENT_GRID
    return dict(hidden_states=torch.randn(batch, n, CONFIG["in_channels"], generator=g),
                encoder_hidden_states=torch.randn(batch, cap_len, CONFIG["joint_attention_dim"], generator=g),
                timestep=torch.full((batch,), 1.0 - progress),  # Flux.2 takes sigma
                img_ids=ids(1, LATENT_GRID, LATENT_GRID, 1),  # (0, h, w, 0)
                txt_ids=ids(1, 1, 1, cap_len),  # (0, 0, 0, l)
                guidance=torch.full((batch,), 4.0),  # Flux2Pipeline's default embedded guidance
                return_dict=False)


def vae(latent_channels: int = 4):
    """Three-block `AutoencoderKLFlux2` (scale factor 4) without quant convs; its batch norm starts at mean 0, var 1."""
    from diffusers import AutoencoderKLFlux2

    return AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                              block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4,
                              latent_channels=latent_channels, use_quant_conv=False,
                              use_post_quant_conv=False).eval()


def pipeline(seed: int = 0):
    """True CFG (a second, `cache_context("uncond")` call on the empty prompt) runs when guidance_scale > 1."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    transformer = TINY.build(seed)
    tokenizer = qwen_tokenizer()
    return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
                              vae=vae(CONFIG["in_channels"] // 4), text_encoder=qwen3_lm(tokenizer, 16, 27),
                              tokenizer=tokenizer, transformer=transformer)


def dev_pipeline(seed: int = 0):
    """`Flux2Pipeline` (FLUX.2-dev's): guidance-distilled, one transformer call a step with `guidance` embedded."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline

    transformer = TINY.build(seed)
    tokenizer = mistral_tokenizer()
    pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
                         vae=vae(CONFIG["in_channels"] // 4), text_encoder=mistral3(tokenizer, 16, 30),
                         tokenizer=tokenizer, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


TINY = register_tiny(TinyDiT("flux2", "Flux2Transformer2DModel", CONFIG, CONFIG["joint_attention_dim"], inputs,
                             pipeline, guidance=lambda cfg: dict(guidance_scale=2.0 if cfg else 1.0)))
