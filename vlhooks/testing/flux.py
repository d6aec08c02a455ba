"""Tiny Flux.1: `FluxTransformer2DModel` (2 double + 2 single blocks, caption width 32) and a `FluxPipeline` with
tiny CLIP (pooled 32) and T5 (32) encoders."""

from __future__ import annotations

import torch

from . import NEGATIVE, TinyDiT, register_tiny
from .parts import clip, clip_tokenizer, t5, t5_tokenizer, vae

CONFIG = dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
              num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])


def inputs(batch: int = 1, progress: float = 0.3, seed: int = 1, cap_len: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 16, 4, generator=g),
                encoder_hidden_states=torch.randn(batch, cap_len, 32, generator=g),
                pooled_projections=torch.randn(batch, 32, generator=g),
                timestep=torch.full((batch,), 1.0 - progress),  # Flux takes sigma
                img_ids=torch.randn(16, 3, generator=g), txt_ids=torch.zeros(cap_len, 3),
                return_dict=False)


def pipeline(seed: int = 0):
    """True CFG (a second transformer pass on the negative prompt) runs when true_cfg_scale > 1 and a
    negative_prompt is given; there is no guidance embedding."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    transformer = TINY.build(seed)
    ct, tt = clip_tokenizer(), t5_tokenizer()
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae(1, 0.3611, 0.1159),
                        text_encoder=clip(ct, 32, None), tokenizer=ct, text_encoder_2=t5(tt), tokenizer_2=tt,
                        transformer=transformer)


TINY = register_tiny(TinyDiT("flux", "FluxTransformer2DModel", CONFIG, 32, inputs, pipeline,
                             guidance=lambda cfg: dict(true_cfg_scale=2.0 if cfg else 1.0,
                                                       negative_prompt=NEGATIVE if cfg else None)))
