"""Sana (`SanaTransformer2DModel`): linear-attention DiT blocks with a true cross-attention to the caption.

Facts used here (diffusers 0.42, `models/transformers/sana_transformer.py`, `pipelines/sana/`):
- Sites: the `attn2` (cross-attention, `SanaAttnProcessor2_0`) of every `transformer_blocks.{i}`. `attn1` is
  linear self-attention over the image (`SanaLinearAttnProcessor2_0`) and not a text site. One block kind, so the
  only preset is `"all"`.
- Cross-attention: the image tokens (the block's residual stream, not normed) are the queries; the caption gives
  the keys/values through `attn2.to_k` / `attn2.to_v`, then `attn2.norm_k` on the flattened keys when the model
  has qk-norm (`qk_norm="rms_norm_across_heads"`, Sana 1.5), before the heads are split. No text queries, no
  per-block text pre-norm or modulation, no RoPE or position embedding on caption tokens.
- Caption path (`embed`): `caption_projection` (`PixArtAlphaTextProjection`) then `caption_norm` (RMSNorm), once
  per call, before the blocks.
- Caption mask: the model turns `encoder_attention_mask` `[B, L]` into an additive bias `(1 - m) * -10000` before
  the blocks; the processor keeps it on the caption keys and gives the extra keys their own `log(strength)`
  (`-inf` on padded extra tokens).
- Joint mode: the extra K/V join attn2's softmax over the caption keys. Decoupled: a second softmax over the extra
  keys alone, added (IP-Adapter's original UNet form).
- Position policy for extra tokens: none (caption tokens have no positions in Sana).
- Timestep: `SanaPipeline` passes `t * config.timestep_scale` with `t = 1000 sigma` from its flow-matching
  scheduler (`DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=..., prediction_type=
  "flow_prediction")`); the transformer itself ignores `timestep_scale`, which is 1 for the released Sana /
  Sana 1.5 models, so progress is `1 - timestep / 1000`. `SanaSprintPipeline` (guidance-embedded Sprint models)
  passes the flow sigma itself (`sin t / (sin t + cos t)` of its TrigFlow time) with a `guidance` argument; a call
  with `guidance` is read that way.
- Objective: flow matching; the model predicts `noise - x0` (the scheduler's `flow_prediction`:
  `x0 = x - sigma * output`) at `timestep = 1000 sigma`. Sprint models (TrigFlow consistency distillation) have no
  `velocity` here.
- Guidance: `SanaPipeline` / `SanaControlNetPipeline` batch `[uncond, cond]` (`torch.cat([negative, prompt])`) and
  expose `do_classifier_free_guidance`; the Sprint pipelines do not guide (guidance is embedded).
- Prompt embeddings (`encode_prompt`, `prompt_kwargs`): through the pipeline's own `encode_prompt` with the
  complex human instruction its `__call__` prepends by default, keeping the real tokens only; passed back with an
  all-ones mask and `max_sequence_length` = their length (the length the pipeline pads its negative prompt to).
- `SanaPAGPipeline` is not listed: perturbed-attention guidance batches three branches.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0
from torch import nn

from ..attention import BlockCall, attend_with_extras
from ..errors import TargetError
from .base import DiTFamily, PromptEmbeds, Site, arg, register_family


class SanaInjectionProcessor(SanaAttnProcessor2_0):
    """`SanaAttnProcessor2_0` (Sana's `attn2`) that also attends to the extra K/V of the `block_call` its block hook
    passes. Without a call it calls the original processor, so inactive steps are bit-identical. With one, it runs
    `SanaAttnProcessor2_0`'s own steps and hands q, k, v and the caption bias to `attend_with_extras`."""

    def __init__(self, base: Any):
        super().__init__()
        self.base = base

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        block_call: BlockCall | None = None,
    ) -> torch.Tensor:
        call = block_call
        if call is None or encoder_hidden_states is None:  # no extras (or self-attention): the original
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask)

        batch_size, sequence_length, _ = encoder_hidden_states.shape
        if attention_mask is not None:  # the caption bias [B, 1, L] -> [B, H, 1, L], as the base builds it
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
            attention_mask = attention_mask[:, :1]  # [B, 1, 1, L]: equal over heads (extras join along L)
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        if attn.norm_q is not None:
            query = attn.norm_q(query)  # over all heads at once
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # [B, H, L_img, Dh]
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # [B, H, L, Dh]
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        def sdpa(q, k, v, mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)

        hidden_states = attend_with_extras(query, key, value, attention_mask, call, sdpa, seq_dim=2)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states / attn.rescale_output_factor


class SanaFamily(DiTFamily):
    name = "sana"
    batched_segments = True  # several references' tokens share one text-path call (no positions on extras)
    title = "Sana"
    transformer_classes = ("SanaTransformer2DModel",)
    batched_guidance = "uncond_first"  # torch.cat([negative_prompt_embeds, prompt_embeds])
    presets = {"all": r"transformer_blocks\.\d+"}
    pipeline_classes = ("SanaPipeline", "SanaControlNetPipeline", "SanaSprintPipeline", "SanaSprintImg2ImgPipeline")
    fsdp_children = {"cross": ("attn1", "attn2", "ff")}

    def sites(self, transformer):
        return [Site(f"transformer_blocks.{i}", i, "cross", "attn2")
                for i, block in enumerate(transformer.transformer_blocks) if getattr(block, "attn2", None) is not None]

    def caption_width(self, transformer):
        return int(transformer.config.caption_channels)

    def hidden_width(self, transformer):
        return int(transformer.transformer_blocks[0].attn2.to_k.in_features)  # the caption stream entering attn2

    # ------------------------------------------------------------------ calls
    def batch_size(self, args, kwargs):
        return int(arg(args, kwargs, "hidden_states", 0).shape[0])

    def image_grid(self, transformer, args, kwargs):
        latents = arg(args, kwargs, "hidden_states", 0)  # [B, C, H, W], patchified p x p
        p = int(transformer.config.patch_size)
        return int(latents.shape[-2]) // p, int(latents.shape[-1]) // p

    def image_span(self, site, block_args, block_kwargs, grid):
        return 0, grid[0] * grid[1]  # attn2's queries are the image tokens, in grid order

    timestep_arg = ("timestep", 2)

    def read_timestep(self, args, kwargs):
        t = super().read_timestep(args, kwargs)
        if arg(args, kwargs, "guidance", 3) is not None:  # SanaSprintPipeline: the flow sigma in [0, 1]
            return t * 1000.0
        return t

    def to_progress(self, t):
        return 1.0 - t / 1000.0  # 1000 sigma

    # ------------------------------------------------------------------ text path
    def embed(self, transformer, tokens, mask, site, cache):
        return transformer.caption_norm(transformer.caption_projection(tokens))  # [B, N, D]

    def text_input(self, call):
        return call.pre_normed if call.pre_normed is not None else call.embedded  # no per-block text norm

    def kv_linears(self, transformer, site):
        attn = site.attention(transformer)
        return attn.to_k, attn.to_v

    def finish_kv(self, call, k, v):
        attn = call.site.attention(call.transformer)
        if attn.norm_k is not None:
            k = attn.norm_k(k)  # on [R, N, H*Dh], before the heads are split (as the processor does)
        return k.unflatten(-1, (attn.heads, -1)), v.unflatten(-1, (attn.heads, -1))  # [R, N, H, Dh]; no positions

    # ------------------------------------------------------------------ training objective
    def velocity(self, transformer, latents, sigma, caption, caption_mask=None, pooled=None):
        if transformer.config.guidance_embeds:
            raise TargetError("this Sana model embeds guidance (Sana-Sprint, TrigFlow consistency distillation); "
                              "vlhooks trains and samples Sana's flow-matching models only: use a SanaPipeline "
                              "checkpoint (e.g. Sana 1.0 / 1.5) for training and the Euler sampler.")
        out = transformer(latents, encoder_hidden_states=caption, timestep=sigma.to(latents.dtype) * 1000.0,
                          encoder_attention_mask=caption_mask, return_dict=False)[0]
        return out[:, : latents.shape[1]]  # noise - x0 (the first half if a model has learned sigma)

    def make_processor(self, site, base):
        return SanaInjectionProcessor(base)

    # ------------------------------------------------------------------ pipeline
    def encode_latents(self, vae, pixels):
        return vae.encode(pixels).latent * vae.config.scaling_factor  # AutoencoderDC: deterministic latents

    def encode_prompt(self, pipe, prompts, device, max_sequence_length):
        kwargs = {}
        default = inspect.signature(type(pipe).__call__).parameters.get("complex_human_instruction")
        if default is not None and "complex_human_instruction" in inspect.signature(pipe.encode_prompt).parameters:
            kwargs["complex_human_instruction"] = default.default  # the instruction __call__ prepends by default
        embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                                max_sequence_length=max_sequence_length, **kwargs)  # [B, L, C]
        # the real tokens only: the model masks the padding, and caption tokens have no positions
        return PromptEmbeds([e[m.bool()].float().cpu() for e, m in zip(embeds, mask)], None)

    def prompt_kwargs(self, embeds, pooled):
        # every token real; the pipeline pads its negative prompt to `max_sequence_length` and concatenates it with
        # the prompt for guidance, so that length is the prompt's (Gemma2 is causal: right padding changes nothing)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask, "max_sequence_length": int(embeds.shape[1])}


register_family(SanaFamily())
