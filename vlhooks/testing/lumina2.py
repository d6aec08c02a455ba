"""Tiny Lumina 2: `Lumina2Transformer2DModel` (2 main layers, 2 noise- and 2 context-refiner blocks, 4 query heads
over 2 K/V heads, caption width 16) and a `Lumina2Pipeline` with a tiny Gemma2 encoder and a scale-8 VAE."""

from __future__ import annotations

import torch

from . import TinyDiT, register_tiny
from .parts import gemma2, gemma_tokenizer, vae8

CONFIG = dict(sample_size=16, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_refiner_layers=2,
              num_attention_heads=4, num_kv_heads=2, multiple_of=16, axes_dim_rope=(4, 2, 2), axes_lens=(128, 32, 32),
              cap_feat_dim=16)


def inputs(batch: int = 1, progress: float = 0.3, seed: int = 1, cap_len: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
                timestep=torch.full((batch,), progress),  # Lumina 2 takes 1 - sigma
                encoder_hidden_states=torch.randn(batch, cap_len, 16, generator=g),
                encoder_attention_mask=torch.ones(batch, cap_len, dtype=torch.long),
                return_dict=False)


def pipeline(seed: int = 0):
    """CFG (a separate unconditional call after the conditional one, at each step before `cfg_trunc_ratio`) runs
    when guidance_scale > 1 (the pipeline default is 4)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline

    transformer = TINY.build(seed)
    tokenizer = gemma_tokenizer()
    return Lumina2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae8(4, 0.3611, 0.1159),
                           text_encoder=gemma2(tokenizer, 16), tokenizer=tokenizer, transformer=transformer)


TINY = register_tiny(TinyDiT("lumina2", "Lumina2Transformer2DModel", CONFIG, 16, inputs, pipeline,
                             guidance=lambda cfg: dict(guidance_scale=2.0 if cfg else 1.0)))
