"""PixArt-alpha / PixArt-Sigma (`PixArtTransformer2DModel`): DiT blocks with a true cross-attention to the caption.

Facts used here (diffusers 0.42, `models/transformers/pixart_transformer_2d.py`, `models/attention.py`
`BasicTransformerBlock` with `norm_type="ada_norm_single"`, `pipelines/pixart_alpha/`):
- Sites: the `attn2` (cross-attention) of every `transformer_blocks.{i}`. `attn1` is image self-attention and not a
  text site. Only one block kind, so the only preset is `"all"`.
- Cross-attention: the image tokens (not normed: `norm_hidden_states = hidden_states` for ada_norm_single) are the
  queries; the caption gives the keys/values through `attn2.to_k` / `attn2.to_v` (`AttnProcessor2_0`). There are no
  text queries, no per-block text pre-norm or modulation (the text path is the identity up to `to_k`/`to_v`, with
  `attn2.norm_cross` if a model sets it), and no RoPE or position embedding on caption tokens.
- Caption path (`embed`): `caption_projection` (`PixArtAlphaTextProjection`, Linear-GELU-Linear) when
  `caption_channels` is set (the released models), else the caption enters `attn2` as it is.
- Caption mask: the model turns `encoder_attention_mask` `[B, L]` into an additive bias `(1 - m) * -10000` before
  the blocks; the processor keeps it on the caption keys (padded keys stay masked) and gives the extra keys their
  own `log(strength)` (and `-inf` on padded extra tokens).
- Joint mode: the extra K/V join attn2's softmax over the caption keys. Decoupled: a second softmax over the extra
  keys alone, added (IP-Adapter's original UNet form).
- Position policy for extra tokens: none (caption tokens have no positions in PixArt).
- Timestep: the pipelines pass the DDPM timestep `t` in 0..999 (long). PixArt is trained with epsilon prediction
  (IDDPM, learned sigma: `out_channels = 2 * in_channels`, the pipeline keeps the first half) on the linear beta
  schedule 1e-4..0.02 over 1000 steps. `t` maps to the flow-matching `sigma` of equal signal-to-noise ratio:
  `sigma = s_t / (a_t + s_t)` with `a_t = sqrt(abar_t)`, `s_t = sqrt(1 - abar_t)` (a flow latent
  `(1 - sigma) x0 + sigma noise` is then `(a_t x0 + s_t noise) / (a_t + s_t)`), and progress = 1 - sigma. Between
  integer timesteps `log abar` is interpolated linearly, so the map and its inverse are exact inverses.
- Training objective (`prediction_and_target`): PixArt's own: `sigma` -> the timestep of equal SNR (continuous),
  `x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`, target the noise, compared with the first `in_channels` output
  channels (the learned-variance half and its VLB term are not trained).
- `velocity` (the Euler flow sampler): the flow latent is rescaled to the VP input of equal SNR, the epsilon
  prediction converted to `v = noise - x0 = (eps - x) / (1 - sigma)`. `sigma` is clamped to the range the model was
  trained on, [sigma(t=0), sigma(t=999)] = [0.0099, 0.9937]: the conversion divides by `1 - sigma`, which the first
  sampler step (sigma = 1) would make 0.
- Guidance: `PixArtAlphaPipeline` / `PixArtSigmaPipeline` batch `[uncond, cond]` (`torch.cat([negative, prompt])`).
  They keep `do_classifier_free_guidance` in a local variable (no pipeline attribute); `pipeline_guides` reads it
  from the call instead: under CFG the batch is `torch.cat([latents] * 2)`, two bit-identical halves (fresh noise
  per image otherwise never is).
- `PixArtSigmaPAGPipeline` is not listed: perturbed-attention guidance batches three branches.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn

from ..attention import BlockCall, attend_with_extras
from .base import DiTFamily, PromptEmbeds, Site, arg, register_family

# PixArt's training schedule (IDDPM "linear"): log of the cumulative alpha products, float64
_BETAS = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
_LOG_ABAR: list[float] = []
_acc = 0.0
for _b in _BETAS:
    _acc += math.log(1.0 - _b)
    _LOG_ABAR.append(_acc)
del _acc, _b
T_MAX = len(_LOG_ABAR) - 1  # 999


def _flow_sigma_of_log_abar(la: float) -> float:
    a, s = math.exp(0.5 * la), math.sqrt(-math.expm1(la))  # sqrt(abar), sqrt(1 - abar)
    return s / (a + s)


SIGMA_MIN = _flow_sigma_of_log_abar(_LOG_ABAR[0])  # t = 0
SIGMA_MAX = _flow_sigma_of_log_abar(_LOG_ABAR[-1])  # t = 999


_LOG_ABAR_T = torch.tensor(_LOG_ABAR, dtype=torch.float64)  # [1000]


def _table(like: torch.Tensor) -> torch.Tensor:
    return _LOG_ABAR_T.to(like.device)


def log_abar_at(t: torch.Tensor) -> torch.Tensor:
    """`log abar_t` at (continuous) timesteps `t`, linear between integer steps, `t` clamped to [0, 999]."""
    table = _table(t)
    t = t.double().clamp(0.0, float(T_MAX))
    i = t.floor().clamp(max=T_MAX - 1)
    frac = t - i
    i = i.long()
    return table[i] + frac * (table[i + 1] - table[i])


def timestep_of_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """The continuous timestep whose SNR equals that of flow `sigma` (the inverse of `log_abar_at` + the SNR map);
    `sigma` is clamped to [SIGMA_MIN, SIGMA_MAX]. float64, `sigma`'s shape."""
    s = sigma.double().clamp(SIGMA_MIN, SIGMA_MAX)
    la = 2.0 * torch.log1p(-s) - torch.log((1.0 - s) ** 2 + s ** 2)  # log abar of equal SNR
    table = _table(s)
    j = torch.searchsorted(-table, -la)  # first j with table[j] <= la
    i = (j - 1).clamp(0, T_MAX - 1)
    frac = (la - table[i]) / (table[i + 1] - table[i])
    return (i.double() + frac).clamp(0.0, float(T_MAX))


def _progress_of_timestep(t):
    if isinstance(t, torch.Tensor):
        la = log_abar_at(t)
        a, s = torch.exp(0.5 * la), torch.sqrt(-torch.expm1(la))
        return (1.0 - s / (a + s)).float()
    t = min(max(float(t), 0.0), float(T_MAX))
    i = min(int(math.floor(t)), T_MAX - 1)
    la = _LOG_ABAR[i] + (t - i) * (_LOG_ABAR[i + 1] - _LOG_ABAR[i])
    return 1.0 - _flow_sigma_of_log_abar(la)


class PixArtInjectionProcessor(AttnProcessor2_0):
    """`AttnProcessor2_0` (PixArt's `attn2`) that also attends to the extra K/V of the `block_call` its block hook
    passes. Without a call it calls the original processor, so inactive steps are bit-identical. With one, it runs
    `AttnProcessor2_0`'s own steps and hands q, k, v and the caption bias to `attend_with_extras`."""

    def __init__(self, base: Any):
        super().__init__()
        self.base = base

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        block_call: BlockCall | None = None,
        **kwargs,
    ) -> torch.Tensor:
        call = block_call
        if call is None or encoder_hidden_states is None:  # no extras (or self-attention): the original
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = encoder_hidden_states.shape
        if attention_mask is not None:  # the caption bias [B, 1, L] -> [B, H, 1, L], as the base builds it
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
            attention_mask = attention_mask[:, :1]  # [B, 1, 1, L]: equal over heads (extras join along L)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # [B, H, L_img, Dh]
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # [B, H, L, Dh]
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        def sdpa(q, k, v, mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)

        hidden_states = attend_with_extras(query, key, value, attention_mask, call, sdpa, seq_dim=2)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class PixArtFamily(DiTFamily):
    name = "pixart"
    batched_segments = True  # several references' tokens share one text-path call (no positions on extras)
    title = "PixArt-α / Σ"
    transformer_classes = ("PixArtTransformer2DModel",)
    batched_guidance = "uncond_first"  # torch.cat([negative_prompt_embeds, prompt_embeds])
    presets = {"all": r"transformer_blocks\.\d+"}
    pipeline_classes = ("PixArtSigmaPipeline", "PixArtAlphaPipeline")
    fsdp_children = {"cross": ("attn1", "attn2", "ff")}

    def sites(self, transformer):
        return [Site(f"transformer_blocks.{i}", i, "cross", "attn2")
                for i, block in enumerate(transformer.transformer_blocks) if block.attn2 is not None]

    def caption_width(self, transformer):
        if transformer.caption_projection is not None:
            return int(transformer.config.caption_channels)
        return self.hidden_width(transformer)

    def hidden_width(self, transformer):
        return int(transformer.transformer_blocks[0].attn2.to_k.in_features)  # what enters attn2's to_k

    # ------------------------------------------------------------------ calls
    def batch_size(self, args, kwargs):
        return int(arg(args, kwargs, "hidden_states", 0).shape[0])

    def image_grid(self, transformer, args, kwargs):
        latents = arg(args, kwargs, "hidden_states", 0)  # [B, C, H, W], patchified p x p
        p = int(transformer.config.patch_size)
        return int(latents.shape[-2]) // p, int(latents.shape[-1]) // p

    def image_span(self, site, block_args, block_kwargs, grid):
        return 0, grid[0] * grid[1]  # attn2's queries are the image tokens, in grid order

    def pipeline_guides(self, pipeline, args, kwargs):
        x = arg(args, kwargs, "hidden_states", 0)  # [B, C, H, W]
        half = x.shape[0] // 2
        return x.shape[0] % 2 == 0 and half > 0 and bool(torch.equal(x[:half], x[half:]))

    timestep_arg = ("timestep", 2)

    def to_progress(self, t):
        return _progress_of_timestep(t)  # DDPM t in 0..999 -> 1 - flow sigma of equal SNR

    # ------------------------------------------------------------------ text path
    def embed(self, transformer, tokens, mask, site, cache):
        if transformer.caption_projection is None:
            return tokens
        return transformer.caption_projection(tokens)  # [B, N, D]

    def text_input(self, call):
        attn = call.site.attention(call.transformer)
        x = call.pre_normed if call.pre_normed is not None else call.embedded  # [R, N, D]
        return attn.norm_encoder_hidden_states(x) if attn.norm_cross else x

    def kv_linears(self, transformer, site):
        attn = site.attention(transformer)
        return attn.to_k, attn.to_v

    def finish_kv(self, call, k, v):
        attn = call.site.attention(call.transformer)
        k = k.unflatten(-1, (attn.heads, -1))  # [R, N, H, Dh]
        v = v.unflatten(-1, (attn.heads, -1))
        if attn.norm_k is not None:
            k = attn.norm_k(k)  # over Dh: the base applies it in [B, H, N, Dh], the same values
        return k, v  # no positions

    # ------------------------------------------------------------------ training objective
    def _eps(self, transformer, x, t, caption, caption_mask):
        """The epsilon half of the output at VP input `x` `[B, C, H, W]` and timesteps `t` `[B]`."""
        added = {"resolution": None, "aspect_ratio": None}  # what PixArtSigmaPipeline passes
        if transformer.use_additional_conditions:  # PixArt-alpha 1024: the image size in pixels (VAE factor 8)
            B, _, H, W = x.shape
            res = torch.tensor([[H * 8.0, W * 8.0]], device=x.device, dtype=x.dtype).expand(B, -1)
            added = {"resolution": res, "aspect_ratio": torch.full((B, 1), H / W, device=x.device, dtype=x.dtype)}
        out = transformer(x, encoder_hidden_states=caption, timestep=t, added_cond_kwargs=added,
                          encoder_attention_mask=caption_mask, return_dict=False)[0]
        return out[:, : x.shape[1]]  # learned sigma: the first in_channels are epsilon

    def prediction_and_target(self, transformer, x0, noise, sigma, caption, caption_mask=None, pooled=None):
        t = timestep_of_sigma(sigma)  # [B] float64, continuous
        la = log_abar_at(t).view(-1, 1, 1, 1)
        x_t = torch.exp(0.5 * la).float() * x0 + torch.sqrt(-torch.expm1(la)).float() * noise  # VP at t
        dtype = next(transformer.parameters()).dtype
        pred = self._eps(transformer, x_t.to(dtype), t.to(dtype), caption, caption_mask)
        return pred, noise

    def velocity(self, transformer, latents, sigma, caption, caption_mask=None, pooled=None):
        # sigma clamped to [SIGMA_MIN, SIGMA_MAX] (the model's t = 0..999): v divides by 1 - sigma
        s = sigma.double().clamp(SIGMA_MIN, SIGMA_MAX)
        t = timestep_of_sigma(s)
        c = torch.sqrt((1.0 - s) ** 2 + s ** 2).view(-1, 1, 1, 1)  # flow latent = c * VP latent of equal SNR
        eps = self._eps(transformer, (latents / c.to(latents.dtype)), t.to(latents.dtype), caption, caption_mask)
        return (eps - latents) / (1.0 - s).view(-1, 1, 1, 1).to(latents.dtype)  # noise - x0

    def make_processor(self, site, base):
        return PixArtInjectionProcessor(base)

    # ------------------------------------------------------------------ pipeline
    def encode_prompt(self, pipe, prompts, device, max_sequence_length):
        embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                                max_sequence_length=max_sequence_length)  # [B, L, C], [B, L]
        # the real tokens only: the model masks the padding, and caption tokens have no positions
        return PromptEmbeds([e[m.bool()].float().cpu() for e, m in zip(embeds, mask)], None)

    def prompt_kwargs(self, embeds, pooled):
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)  # every token real
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}


register_family(PixArtFamily())
