"""SD3 / SD3.5 (`SD3Transformer2DModel`): MMDiT joint blocks, image tokens first.

Facts used here (diffusers 0.42):
- Sites: `transformer_blocks.{i}` (their joint `attn`; SD3.5's image-only `attn2` is not a text site).
- Timestep: the raw scheduler timestep in 0..1000 (sigma x 1000), so progress is `1 - timestep / 1000`.
- Caption path: `context_embedder` (Linear) once per call; in a block `norm1_context(x, temb)`
  (AdaLayerNormZero, or AdaLayerNormContinuous in the last block), `add_k_proj`/`add_v_proj`, `norm_added_k`
  when the model has qk-norm (SD3.5).
- No RoPE (absolute position embeddings on image patches only), so extra tokens need no position.
- Guidance: `StableDiffusion3Pipeline` batches `[uncond, cond]`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import JointAttnProcessor2_0
from torch import nn

from ..attention import BlockCall, attend_with_extras
from .base import DiTFamily, PromptEmbeds, Site, arg, register_family, rows_of


class SD3InjectionProcessor(JointAttnProcessor2_0):
    """`JointAttnProcessor2_0` that also attends to the extra K/V of the `block_call` its block hook passes.
    Without a call it calls the original processor, so inactive steps are bit-identical."""

    def __init__(self, base: Any):
        super().__init__()
        self.base = base

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.FloatTensor,
        encoder_hidden_states: torch.FloatTensor = None,
        attention_mask: torch.FloatTensor | None = None,
        *args,
        block_call: BlockCall | None = None,
        **kwargs,
    ) -> torch.FloatTensor:
        call = block_call
        if call is None or encoder_hidden_states is None:
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        call.extra_kv()

        residual_len = hidden_states.shape[1]
        B = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(B, -1, attn.heads, head_dim).transpose(1, 2)  # [B, H, L, Dh]
        key = key.view(B, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(B, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        eq = attn.add_q_proj(encoder_hidden_states).view(B, -1, attn.heads, head_dim).transpose(1, 2)
        ek = attn.add_k_proj(encoder_hidden_states).view(B, -1, attn.heads, head_dim).transpose(1, 2)
        ev = attn.add_v_proj(encoder_hidden_states).view(B, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_added_q is not None:
            eq = attn.norm_added_q(eq)
        if attn.norm_added_k is not None:
            ek = attn.norm_added_k(ek)
        query = torch.cat([query, eq], dim=2)  # [img, txt]
        key = torch.cat([key, ek], dim=2)
        value = torch.cat([value, ev], dim=2)

        def sdpa(q, k, v, mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)

        hidden_states = attend_with_extras(query, key, value, None, call, sdpa, seq_dim=2)
        hidden_states = hidden_states.transpose(1, 2).reshape(B, -1, attn.heads * head_dim).to(query.dtype)

        hidden_states, encoder_hidden_states = hidden_states[:, :residual_len], hidden_states[:, residual_len:]
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states, encoder_hidden_states


class SD3Family(DiTFamily):
    name = "sd3"
    transformer_classes = ("SD3Transformer2DModel",)
    batched_guidance = "uncond_first"  # StableDiffusion3Pipeline: cat([negative, positive])
    presets = {"all": r"transformer_blocks\.\d+", "joint": r"transformer_blocks\.\d+"}
    pipeline_classes = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline",
                        "StableDiffusion3ControlNetPipeline")
    fsdp_children = {"joint": ("attn", "attn2", "ff", "ff_context")}

    def sites(self, transformer):
        return [Site(f"transformer_blocks.{i}", i, "joint", "attn") for i in range(len(transformer.transformer_blocks))]

    def caption_width(self, transformer):
        return int(transformer.config.joint_attention_dim)

    def hidden_width(self, transformer):
        return int(transformer.inner_dim)

    def batch_size(self, args, kwargs):
        return int(arg(args, kwargs, "hidden_states", 0).shape[0])

    def to_progress(self, t):
        return 1.0 - t / 1000.0  # 1000 * sigma

    def embed(self, transformer, tokens, mask, site, cache):
        return transformer.context_embedder(tokens)  # [B, N, D]

    def text_input(self, call):
        block = call.site.block(call.transformer)
        temb = rows_of(arg(call.block_args, call.block_kwargs, "temb", 2), call.rows)  # [R, D]
        if block.context_pre_only:
            return block.norm1_context(call.embedded, temb)  # AdaLayerNormContinuous, [R, N, D]
        return block.norm1_context(call.embedded, emb=temb)[0]  # AdaLayerNormZero

    def kv_linears(self, transformer, site):
        attn = site.attention(transformer)
        return attn.add_k_proj, attn.add_v_proj

    def finish_kv(self, call, k, v):
        attn = call.site.attention(call.transformer)
        k = k.unflatten(-1, (attn.heads, -1))  # [R, N, H, Dh]
        v = v.unflatten(-1, (attn.heads, -1))
        if attn.norm_added_k is not None:
            k = attn.norm_added_k(k)  # RMSNorm over Dh, layout-independent
        return k, v

    def velocity(self, transformer, latents, sigma, caption, caption_mask=None, pooled=None):
        # SD3 takes the raw timestep 1000 * sigma and predicts noise - x0
        if pooled is None:
            pooled = latents.new_zeros(latents.shape[0], transformer.config.pooled_projection_dim)
        return transformer(hidden_states=latents, encoder_hidden_states=caption, pooled_projections=pooled,
                           timestep=sigma.to(latents.dtype) * 1000.0, return_dict=False)[0]

    def make_processor(self, site, base):
        return SD3InjectionProcessor(base)

    # ------------------------------------------------------------------ pipeline
    def encode_prompt(self, pipe, prompts, device, max_sequence_length):
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=device, do_classifier_free_guidance=False,
                                                  max_sequence_length=max_sequence_length)  # [B, L, C], [B, P]
        return PromptEmbeds(list(embeds.float().cpu()), pooled.float().cpu())


register_family(SD3Family())
