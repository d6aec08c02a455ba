"""Tiny Z-Image: `ZImageTransformer2DModel` (caption width 16) and a `ZImagePipeline` with a tiny Qwen3 encoder."""

from __future__ import annotations

import torch

from . import TinyDiT, register_tiny
from .parts import qwen_tokenizer, vae

CONFIG = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
              n_heads=2, n_kv_heads=2, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
              axes_dims=[8, 4, 4], axes_lens=[256, 32, 32])


def inputs(batch: int = 1, progress: float = 0.3, seed: int = 1, cap_len: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(x=[torch.randn(16, 1, 8, 8, generator=g) for _ in range(batch)],
                t=torch.full((batch,), progress),  # Z-Image takes 1 - sigma
                cap_feats=[torch.randn(cap_len, 16, generator=g) for _ in range(batch)],
                return_dict=False)


def pipeline(seed: int = 0):
    """CFG (cond + uncond batched through the transformer) runs when guidance_scale > 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from transformers import Qwen3Config, Qwen3Model

    transformer = TINY.build(seed)
    tokenizer = qwen_tokenizer()
    text_encoder = Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                          head_dim=8, pad_token_id=tokenizer.pad_token_id)).eval()
    return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae(16, 0.3611, 0.1159),
                          text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)


TINY = register_tiny(TinyDiT("z_image", "ZImageTransformer2DModel", CONFIG, 16, inputs, pipeline,
                             guidance=lambda cfg: dict(guidance_scale=2.0 if cfg else 0.0)))
