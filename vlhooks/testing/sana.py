"""Tiny Sana: `SanaTransformer2DModel` (2 blocks, caption width 16; `"sana_qk"`: Sana 1.5's RMS qk-norm across
heads) and a `SanaPipeline` with a tiny Gemma2 encoder, a scale-4 DC-AE and Sana's flow DPM-Solver."""

from __future__ import annotations

import torch

from . import NEGATIVE, PROMPT, TinyDiT, register_tiny
from .parts import dc_vae, gemma2, gemma_tokenizer

CONFIG = dict(patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
              num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
              sample_size=32)
CONFIG_QK = dict(CONFIG, qk_norm="rms_norm_across_heads")


def inputs(batch: int = 1, progress: float = 0.3, seed: int = 1, cap_len: int = 8) -> dict:
    """Rows after the first have their last 2 caption tokens padded (the model masks them)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, cap_len, dtype=torch.long)
    mask[1:, max(1, cap_len - 2):] = 0
    return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(batch, cap_len, 16, generator=g),
                timestep=torch.full((batch,), (1.0 - progress) * 1000.0),  # Sana takes 1000 sigma
                encoder_attention_mask=mask, return_dict=False)


def tokenizer():
    """Gemma's tokenizer with SanaPipeline's default complex human instruction and the tiny prompts as words, so
    that the instruction takes ~190 tokens (the tiny Gemma2 has 512 positions)."""
    import inspect

    from diffusers import SanaPipeline

    chi = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    return gemma_tokenizer(tuple(" ".join(chi).split()) + tuple(f"{PROMPT} {NEGATIVE}".split()))


def _pipeline(tiny: TinyDiT, seed: int):
    """CFG ([uncond, cond] batched) runs when guidance_scale > 1 (the pipeline default is 4.5)."""
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline

    transformer = tiny.build(seed)
    tok = tokenizer()
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    return SanaPipeline(tokenizer=tok, text_encoder=gemma2(tok, 16), vae=dc_vae(4), transformer=transformer,
                        scheduler=scheduler)


def _guidance(cfg: bool) -> dict:
    # resolution binning maps sizes to the bins of a 1024-4096 px model: off for 32x32 images
    return dict(guidance_scale=3.0 if cfg else 1.0, use_resolution_binning=False)


TINY = register_tiny(TinyDiT("sana", "SanaTransformer2DModel", CONFIG, 16, inputs, lambda seed: _pipeline(TINY, seed),
                             guidance=_guidance))
TINY_QK = register_tiny(TinyDiT("sana_qk", "SanaTransformer2DModel", CONFIG_QK, 16, inputs,
                                lambda seed: _pipeline(TINY_QK, seed), guidance=_guidance))
