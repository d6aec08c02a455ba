"""Tiny SD3 and SD3.5: `SD3Transformer2DModel` (3 joint blocks, caption width 32; `"sd35"`: dual attention in block
0 and RMS qk-norm) and a `StableDiffusion3Pipeline` with two tiny CLIPs (16 + 16, pooled 64) and a tiny T5 (32)."""

from __future__ import annotations

import torch

from . import TinyDiT, register_tiny
from .parts import clip, clip_tokenizer, t5, t5_tokenizer, vae

CONFIG = dict(sample_size=32, patch_size=1, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=4,
              caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
              pos_embed_max_size=96, dual_attention_layers=(), qk_norm=None)
CONFIG_35 = dict(CONFIG, dual_attention_layers=(0,), qk_norm="rms_norm")


def inputs(batch: int = 1, progress: float = 0.3, seed: int = 1, cap_len: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(batch, cap_len, 32, generator=g),
                pooled_projections=torch.randn(batch, 64, generator=g),
                timestep=torch.full((batch,), (1.0 - progress) * 1000.0),  # SD3 takes 1000 sigma
                return_dict=False)


def _pipeline(tiny: TinyDiT, seed: int):
    """CFG ([uncond, cond] batched) runs when guidance_scale > 1 (the pipeline default is 7)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    transformer = tiny.build(seed)
    t1, t2, t3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae(4, 1.5305, 0.0609),
        text_encoder=clip(t1, 16, 32), tokenizer=t1, text_encoder_2=clip(t2, 16, 32), tokenizer_2=t2,
        text_encoder_3=t5(t3), tokenizer_3=t3, transformer=transformer)


def _guidance(cfg: bool) -> dict:
    return dict(guidance_scale=3.0 if cfg else 1.0)


TINY = register_tiny(TinyDiT("sd3", "SD3Transformer2DModel", CONFIG, 32, inputs, lambda seed: _pipeline(TINY, seed),
                             guidance=_guidance))
TINY_35 = register_tiny(TinyDiT("sd35", "SD3Transformer2DModel", CONFIG_35, 32, inputs,
                                lambda seed: _pipeline(TINY_35, seed), guidance=_guidance))
