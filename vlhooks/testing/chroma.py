"""Tiny Chroma: `ChromaTransformer2DModel` (2 double + 2 single blocks, caption width 32, a one-layer approximator of
width 32) and a `ChromaPipeline` with a tiny T5 (32) and the in-memory T5 tokenizer."""

from __future__ import annotations

import torch

from . import NEGATIVE, TinyDiT, register_tiny
from .parts import t5, t5_tokenizer, vae

CONFIG = dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
              num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 4, 8], approximator_num_channels=16,
              approximator_hidden_dim=32, approximator_layers=1)
IMAGE_TOKENS = 16  # 8x8 latents packed 2x2, the pipeline's 32x32 images


def text_mask(batch: int, cap_len: int) -> torch.Tensor:
    """Chroma's text mask as `ChromaPipeline._get_t5_prompt_embeds` makes it: 1.0 on a prompt's tokens and on the
    first padding token, 0.0 on the other padding, in the embeddings' float dtype. Row `b` has
    `cap_len - 3 - b % 2` tokens (so rows differ and every row has padding). `[B, cap_len]`."""
    lengths = torch.tensor([max(cap_len - 3 - b % 2, 0) for b in range(batch)])
    return (torch.arange(cap_len)[None] <= lengths[:, None]).float()


def inputs(batch: int = 1, progress: float = 0.3, seed: int = 1, cap_len: int = 8) -> dict:
    """The pipeline's call: sigma as the timestep, `txt_ids` 0, and its attention mask (`text_mask` then ones
    for the image tokens, float as `ChromaPipeline._prepare_attention_mask` concatenates it)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.cat([text_mask(batch, cap_len), torch.ones(batch, IMAGE_TOKENS, dtype=torch.bool)], dim=1)
    return dict(hidden_states=torch.randn(batch, IMAGE_TOKENS, 4, generator=g),
                encoder_hidden_states=torch.randn(batch, cap_len, 32, generator=g),
                timestep=torch.full((batch,), 1.0 - progress),  # Chroma takes sigma
                img_ids=torch.randn(IMAGE_TOKENS, 3, generator=g), txt_ids=torch.zeros(cap_len, 3),
                attention_mask=mask, return_dict=False)


def pipeline(seed: int = 0):
    """CFG (a second transformer pass on the negative prompt) runs when guidance_scale > 1 (the default is 5)."""
    from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler

    transformer = TINY.build(seed)
    tokenizer = t5_tokenizer()
    return ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae(1, 0.3611, 0.1159),
                          text_encoder=t5(tokenizer), tokenizer=tokenizer, transformer=transformer)


TINY = register_tiny(TinyDiT("chroma", "ChromaTransformer2DModel", CONFIG, 32, inputs, pipeline,
                             guidance=lambda cfg: dict(guidance_scale=2.0 if cfg else 1.0,
                                                       negative_prompt=NEGATIVE if cfg else None)))
