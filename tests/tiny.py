"""Tiny random-config DiTs and their inputs (configs from diffusers' own tests; build in milliseconds)."""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, ZImageTransformer2DModel

ZIMAGE = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
              n_heads=2, n_kv_heads=2, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
              axes_dims=[8, 4, 4], axes_lens=[256, 32, 32])
FLUX = dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
SD3 = dict(sample_size=32, patch_size=1, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=4,
           caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
           pos_embed_max_size=96, dual_attention_layers=(), qk_norm=None)
SD35 = dict(SD3, dual_attention_layers=(0,), qk_norm="rms_norm")


def build(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cls, cfg = {"z_image": (ZImageTransformer2DModel, ZIMAGE), "flux": (FluxTransformer2DModel, FLUX),
                "sd3": (SD3Transformer2DModel, SD3), "sd35": (SD3Transformer2DModel, SD35)}[family]
    return cls(**cfg).eval()


def caption_width(family: str) -> int:
    return {"z_image": 16, "flux": 32, "sd3": 32, "sd35": 32}[family]


def inputs(family: str, batch: int = 1, progress: float = 0.3, seed: int = 1, cap_len: int = 8) -> dict:
    """Keyword inputs for one denoiser call at `progress` (= 1 - sigma)."""
    g = torch.Generator().manual_seed(seed)
    sigma = 1.0 - progress
    if family == "z_image":
        return dict(x=[torch.randn(16, 1, 8, 8, generator=g) for _ in range(batch)],
                    t=torch.full((batch,), progress),
                    cap_feats=[torch.randn(cap_len, 16, generator=g) for _ in range(batch)],
                    return_dict=False)
    if family == "flux":
        return dict(hidden_states=torch.randn(batch, 16, 4, generator=g),
                    encoder_hidden_states=torch.randn(batch, cap_len, 32, generator=g),
                    pooled_projections=torch.randn(batch, 32, generator=g),
                    timestep=torch.full((batch,), sigma),
                    img_ids=torch.randn(16, 3, generator=g), txt_ids=torch.zeros(cap_len, 3),
                    return_dict=False)
    return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(batch, cap_len, 32, generator=g),
                pooled_projections=torch.randn(batch, 64, generator=g),
                timestep=torch.full((batch,), sigma * 1000.0), return_dict=False)


def output(model, kwargs) -> torch.Tensor:
    out = model(**kwargs)[0]
    return torch.stack(out) if isinstance(out, list) else out
