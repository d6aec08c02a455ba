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

from ..attention import BlockCall, add_rows, attend_with_extras
from .base import DiTFamily, PromptEmbeds, Site, arg, register_family, rows_of


class SD3InjectionProcessor(JointAttnProcessor2_0):
    """`JointAttnProcessor2_0` that also attends to the extra K/V of the `block_call` its block hook passes.
    Without a call it calls the original processor, so inactive steps are bit-identical.

    Placement `"image_joint"` (diffusers' `SD3IPAdapterJointAttnProcessor2_0`): the block's own attention is
    untouched; its raw image queries and keys (before the block's qk-norm), normed by the projector's
    `image_attention_norms(call)` (an IP-Adapter's own `norm_q` / `norm_k`; else the block's), attend in a
    separate softmax to `[the block's image keys; the extra keys]` (values `[image values; extra values]`), and
    the result times the strength joins the image stream's attention output before `to_out`."""

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
        raw = (query, key, value)  # the image stream's, before the block's qk-norm (placement "image_joint")
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

        if call.placement == "image_joint":
            hidden_states = sdpa(query, key, value, None)  # the block's own, as the base computes it
        else:
            hidden_states = attend_with_extras(query, key, value, None, call, sdpa, seq_dim=2)
        hidden_states = hidden_states.transpose(1, 2).reshape(B, -1, attn.heads * head_dim).to(query.dtype)

        hidden_states, encoder_hidden_states = hidden_states[:, :residual_len], hidden_states[:, residual_len:]
        if call.placement == "image_joint":
            hidden_states = add_rows(hidden_states, _image_joint(attn, *raw, call, sdpa), call.rows)
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states, encoder_hidden_states


def _image_joint(attn, q, k, v, call: BlockCall, sdpa) -> torch.Tensor:
    """Placement `"image_joint"`: the image queries `q` (`[B, H, L, Dh]`, raw) over `[image keys; extra keys]`,
    times the strength, for the rows `call.rows`. `[R, L, H * Dh]`."""
    ek, ev = call.extra_kv()  # [R, N, H, Dh]
    norms = getattr(call.projector, "image_attention_norms", None)
    norm_q, norm_k = norms(call) if norms is not None else (attn.norm_q, attn.norm_k)
    q, k, v = rows_of(q, call.rows), rows_of(k, call.rows), rows_of(v, call.rows)
    dtype = q.dtype
    q = q if norm_q is None else norm_q(q).to(dtype)
    k = k if norm_k is None else norm_k(k).to(dtype)
    R = ek.shape[0]
    q, k, v = q.expand(R, *q.shape[1:]), k.expand(R, *k.shape[1:]), v.expand(R, *v.shape[1:])
    k = torch.cat([k, ek.transpose(1, 2).to(dtype)], dim=2)  # [R, H, L + N, Dh]
    v = torch.cat([v, ev.transpose(1, 2).to(dtype)], dim=2)
    bias = None
    if call.key_mask is not None:  # padded extra tokens: -inf
        ext = torch.zeros(call.key_mask.shape, dtype=dtype, device=q.device).masked_fill(~call.key_mask, float("-inf"))
        bias = torch.cat([ext.new_zeros(R, q.shape[2]), ext], dim=1)[:, None, None, :]  # [R, 1, 1, L + N]
    out = sdpa(q, k, v, bias)
    out = out.transpose(1, 2).reshape(R, -1, out.shape[1] * out.shape[3]).to(dtype)  # [R, L, H Dh]
    s = call.strength
    if isinstance(s, list) and len(set(s)) == 1:
        return out if s[0] == 1.0 else out * s[0]
    s = s if isinstance(s, torch.Tensor) else torch.tensor(s)
    return out * s.to(device=out.device, dtype=out.dtype).view(-1, 1, 1)


class SD3Family(DiTFamily):
    name = "sd3"
    batched_segments = True  # several references' tokens share one text-path call (no positions on extras)
    title = "SD3 / SD3.5"
    transformer_classes = ("SD3Transformer2DModel",)
    batched_guidance = "uncond_first"  # StableDiffusion3Pipeline: cat([negative, positive])
    presets = {"all": r"transformer_blocks\.\d+", "joint": r"transformer_blocks\.\d+"}
    placements = ("attention", "image_joint")
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

    def image_grid(self, transformer, args, kwargs):
        latents = arg(args, kwargs, "hidden_states", 0)  # [B, C, H, W], patchified p x p
        p = int(transformer.config.patch_size)
        return int(latents.shape[-2]) // p, int(latents.shape[-1]) // p

    def image_span(self, site, block_args, block_kwargs, grid):
        # joint attention over [img, txt]
        return 0, int(arg(block_args, block_kwargs, "hidden_states", 0).shape[1])

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
