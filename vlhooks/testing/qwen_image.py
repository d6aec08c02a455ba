"""Tiny Qwen-Image: `QwenImageTransformer2DModel` (2 dual-stream blocks, caption width 16, 2 heads x 16) and a
`QwenImagePipeline` with a tiny Qwen2.5-VL text encoder (width 16) and a tiny `AutoencoderKLQwenImage` (4 latent
channels, scale factor 4: 32x32 images, 8x8 latents, 4x4 packed tokens)."""

from __future__ import annotations

import torch

from . import NEGATIVE, TinyDiT, register_tiny
from .parts import qwen25_vl, qwen_image_tokenizer, qwen_image_vae

CONFIG = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
              joint_attention_dim=16, axes_dims_rope=(8, 4, 4))
IMG_SHAPE = (1, 4, 4)  # (frames, h, w) of the packed latent tokens: text positions start at max(4 // 2, 4 // 2) = 2


def inputs(batch: int = 1, progress: float = 0.3, seed: int = 1, cap_len: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 16, 16, generator=g),  # 4x4 tokens of 2x2x4 latents
                encoder_hidden_states=torch.randn(batch, cap_len, 16, generator=g),
                encoder_hidden_states_mask=None,  # the pipelines pass None when every caption token is real
                timestep=torch.full((batch,), 1.0 - progress),  # Qwen-Image takes sigma
                img_shapes=[[IMG_SHAPE]] * batch,
                return_dict=False)


def pipeline(seed: int = 0):
    """True CFG (a second transformer pass on the negative prompt, inside cache_context("uncond")) runs when
    true_cfg_scale > 1 and a negative_prompt is given."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    transformer = TINY.build(seed)
    tokenizer = qwen_image_tokenizer()
    text_encoder = qwen25_vl(tokenizer, hidden=16)
    vae = qwen_image_vae(4)
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                             tokenizer=tokenizer, transformer=transformer)


TINY = register_tiny(TinyDiT("qwen_image", "QwenImageTransformer2DModel", CONFIG, 16, inputs, pipeline,
                             guidance=lambda cfg: dict(true_cfg_scale=2.0 if cfg else 1.0,
                                                       negative_prompt=NEGATIVE if cfg else None)))
