"""Flux.1 (`FluxTransformer2DModel`): 19 double-stream blocks then 38 single-stream blocks at full size.

Facts used here (diffusers 0.42):
- Sites: `transformer_blocks.{i}` (double, indices 0..D-1) then `single_transformer_blocks.{i}` (single,
  indices D..D+S-1). Presets: `"all"`, `"double"`, `"single"`.
- Timestep: the pipeline passes sigma in [0, 1] (x1000 inside the model), so progress is `1 - timestep`.
- Caption path: `context_embedder` (Linear) once per call. Double block: `norm1_context(x, temb)`
  (AdaLayerNormZero), `add_k_proj`/`add_v_proj`, `norm_added_k`. Single block: `norm(x, temb)`
  (AdaLayerNormZeroSingle), `to_k`/`to_v`, `norm_k`.
- Position policy for extra tokens: position 0 on every axis, as the pipelines set `txt_ids = 0`; the rotation
  at position 0 is the identity, so extra keys are not rotated.
- Guidance: the Flux pipeline makes separate conditional / unconditional calls inside
  `transformer.cache_context("cond"/"uncond")`; the injection reads that context.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections
from torch import nn

from .. import fused_attention, fused_text
from ..attention import (
    BlockCall,
    add_rows,
    appendable,
    attend_with_extras,
    can_write_into,
    decoupled_output,
    fused_joint,
    fused_serves,
    joint_buffers,
    linear_into,
    plain_joint,
)
from .base import DoubleSingleStreamFamily, PromptEmbeds, arg, register_family, rows_of, true_cfg_guidance


class FluxInjectionProcessor(FluxAttnProcessor):
    """`FluxAttnProcessor` that also attends to the extra K/V of the `block_call` its block hook passes.
    Without a call it calls the original processor, so inactive steps are bit-identical. The extras' K/V are
    computed here, after the block's own modulation, which their text path reuses (`call.modulation`).

    Joint mode with nothing to gate appends the extra K/V without a second copy of the block's K/V: double blocks
    join them in the concatenation of text and image K/V the block makes anyway (RoPE's identity rows at the
    extra keys); single blocks write their own K/V straight into `[1, L + N]` buffers.

    Placement `"block_output"` (diffusers' `FluxIPAdapterAttnProcessor`): the block's own attention is untouched;
    the image tokens' queries after qk-norm and before RoPE attend to the extra K/V, and the result is left in
    `call.block_output` for the block hook, which adds it to the block's image-stream output
    (`FluxFamily.add_to_block_output`).

    Placement `"pre_rope"` (InstantX's Flux IP-Adapter): the block's own attention is untouched; its queries after
    qk-norm and before RoPE (a double block's image queries, a single block's every query) attend to the extra
    K/V alone, and the result times the strength joins the attention output before the output projection: a
    double block's image stream before `to_out`, a single block's attention half of `proj_out`'s input."""

    def __init__(self, base: Any):
        super().__init__()
        self.base = base
        self._attention_backend = getattr(base, "_attention_backend", None)
        self._parallel_config = getattr(base, "_parallel_config", None)

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
        block_call: BlockCall | None = None,
    ) -> torch.Tensor:
        call = block_call
        if call is None:
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        ek, ev = call.extra_kv()  # [R, N, H, Dh]
        own = call.placement == "attention"  # the extras join the block's own attention (else a separate one)
        if (own and encoder_hidden_states is None and not attn.fused_projections and image_rotary_emb is not None
                and can_write_into(attn.to_v, hidden_states)
                and plain_joint(call, hidden_states.shape[0], attention_mask)):
            return self._single_joint(attn, hidden_states, image_rotary_emb, call)
        one_concat = (own and encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
                      and appendable(call, attention_mask))
        fused = one_concat and self._fused(hidden_states, encoder_hidden_states.shape[1] + hidden_states.shape[1],
                                           ek)
        one_concat = one_concat and not fused

        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))  # [B, L, H, Dh]
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if call.placement == "block_output":  # image queries, before RoPE (and before a double block's [txt, img])
            added = decoupled_output(query[:, query.shape[1] - call.image_len:], call, self._sdpa,
                                     image_span=(0, call.image_len))
            call.block_output = (added.flatten(2, 3).to(query.dtype), call.rows)  # [R, L_img, D]
        pre_rope = None
        if call.placement == "pre_rope":  # these queries (double: image; single: every token), before RoPE
            span = (0, query.shape[1]) if encoder_hidden_states is not None else None  # double: image queries only
            pre_rope = decoupled_output(query, call, self._sdpa, image_span=span).flatten(2, 3).to(query.dtype)
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)  # [txt, img]
            if one_concat:  # [txt, img, extra]: what attend_with_extras builds, with one copy instead of two
                key = torch.cat([encoder_key, key, ek.to(key.dtype)], dim=1)
                value = torch.cat([encoder_value, value, ev.to(value.dtype)], dim=1)
            else:
                key = torch.cat([encoder_key, key], dim=1)
                value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            if one_concat:
                rope = _with_identity_rows(image_rotary_emb, ek.shape[1], call)
                key = apply_rotary_emb(key, rope, sequence_dim=1)
            else:
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if fused:  # two passes merged in one kernel (see fused_attention)
            hidden_states = fused_attention.joint_attention(query, key, value, ek, ev)
        elif one_concat:
            hidden_states = self._sdpa(query, key, value, None)
        elif not own:
            hidden_states = self._sdpa(query, key, value, attention_mask)  # the block's own, as the base computes it
        elif fused_serves(call, self._attention_backend, query, key.shape[1], attention_mask):  # biased, 2 passes
            hidden_states = fused_joint(query, key, value, call)
        else:
            hidden_states = attend_with_extras(query, key, value, attention_mask, call, self._sdpa, seq_dim=1)
        return self._out(attn, hidden_states.flatten(2, 3).to(query.dtype), encoder_hidden_states, pre_rope, call.rows)

    def _single_joint(self, attn, hidden_states, image_rotary_emb, call):
        """Single block, joint, nothing to gate: `[txt + img, extra]` keys as `attend_with_extras` builds them, the
        block's own K/V written in place (RoPE converted into the key buffer, `to_v`'s GEMM into the value
        buffer)."""
        L = hidden_states.shape[1]
        query = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, (-1, attn.head_dim)))
        ek, ev = call.extra_kv()
        if self._fused(hidden_states, L, ek):  # two passes merged in one kernel (see fused_attention)
            value = attn.to_v(hidden_states).unflatten(-1, (-1, attn.head_dim))
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
            out = fused_attention.joint_attention(query, key, value, ek, ev)
            return out.flatten(2, 3).to(query.dtype)
        kbuf, vbuf = joint_buffers(key, L, call)
        linear_into(vbuf[:, :L].flatten(2), hidden_states, attn.to_v)
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        _rope_into(kbuf[:, :L], key, image_rotary_emb)
        out = self._sdpa(query, kbuf, vbuf, None)
        return out.flatten(2, 3).to(query.dtype)

    def _fused(self, like, length, extra_k) -> bool:
        """Whether the two-pass kernel serves this call (joint, nothing to gate; `length` keys of the block's own)."""
        return fused_attention.applies(self._attention_backend, like, length, extra_k)

    def _sdpa(self, q, k, v, mask):
        return dispatch_attention_fn(
            q, k, v, attn_mask=mask, backend=self._attention_backend, parallel_config=self._parallel_config
        )

    @staticmethod
    def _out(attn, hidden_states, encoder_hidden_states, added=None, rows=None):
        """The output projections; `added` (`[R, L, D]`, placement `"pre_rope"`) joins the image stream's (double)
        or the whole (single) attention output first."""
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            if added is not None:
                hidden_states = add_rows(hidden_states, added, rows)
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states if added is None else add_rows(hidden_states, added, rows)


def _rope_into(out: torch.Tensor, x: torch.Tensor, rope) -> torch.Tensor:
    """`apply_rotary_emb(x, rope, sequence_dim=1)` (diffusers' real form, pairs interleaved) converted into `out`
    instead of a new tensor: the same float arithmetic and the same final rounding."""
    cos, sin = rope
    cos, sin = cos[None, :, None, :].to(x.device), sin[None, :, None, :].to(x.device)
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return out.copy_(x.float() * cos + x_rotated.float() * sin)


def _with_identity_rows(rope, n: int, call):
    """Flux's `(cos, sin)` tables followed by `n` identity rows (cos 1, sin 0), built once per forward call. The
    identity rotation returns the extra keys exactly (`x * 1 + x_rot * 0 = x`), as the extra keys sit at position 0
    (see the module docstring), so the result equals rotating the block's keys alone and appending the extras."""
    cos, sin = rope
    scratch = None if torch.compiler.is_compiling() else call.scratch
    key = ("flux.identity_rows", n)
    if scratch is not None:
        hit = scratch.get(key)
        if hit is not None and hit[0] is cos and hit[1] is sin:
            return hit[2]
    one = torch.ones(n, cos.shape[1], dtype=cos.dtype, device=cos.device)
    out = (torch.cat([cos, one]), torch.cat([sin, torch.zeros_like(one)]))
    if scratch is not None:
        scratch[key] = (cos, sin, out)
    return out


class FluxFamily(DoubleSingleStreamFamily):
    name = "flux"
    batched_segments = True  # several references' tokens share one text-path call (no positions on extras)
    title = "Flux.1"
    transformer_classes = ("FluxTransformer2DModel",)
    batched_guidance = None  # separate cond / uncond calls, marked by cache_context
    placements = ("attention", "block_output", "pre_rope")
    pipeline_classes = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxControlPipeline",
                        "FluxControlNetPipeline", "FluxFillPipeline", "FluxKontextPipeline", "FluxPriorReduxPipeline")
    fsdp_children = {"double": ("attn", "ff", "ff_context"), "single": ("attn", "proj_mlp", "proj_out")}
    # cuDNN's SDPA backward fails on Flux.1's training step (512^2, batch 4, checkpointing, torch 2.11 on an H200:
    # `mha_graph.execute(...).is_good()`, then an illegal memory access; BENCHMARKS.md), the Z-Image step does not
    cudnn_attention_training = False






    def embed(self, transformer, tokens, mask, site, cache):
        return transformer.context_embedder(tokens)  # [B, N, D]


    def image_span(self, site, block_args, block_kwargs, grid):
        # both kinds attend over [txt, img]
        txt = int(arg(block_args, block_kwargs, "encoder_hidden_states", 1).shape[1])
        return txt, int(arg(block_args, block_kwargs, "hidden_states", 0).shape[1])

    def image_tokens(self, block_args, block_kwargs):
        return int(arg(block_args, block_kwargs, "hidden_states", 0).shape[1])  # both kinds: [txt, img] inside

    def add_to_block_output(self, site, output, added, rows):
        encoder_hidden_states, hidden_states = output  # both kinds return (text stream, image stream)
        return encoder_hidden_states, add_rows(hidden_states, added, rows)

    @staticmethod
    def _norm(block, site):
        return block.norm1_context if site.kind == "double" else block.norm  # AdaLayerNormZero(Single)

    def _plain_adaln(self, norm) -> bool:
        """`norm(x, emb)` is `norm.norm(x) * (1 + scale) + shift` with `shift, scale` the first two chunks of
        `norm.linear(silu(emb))` (Flux's own AdaLayerNormZero / AdaLayerNormZeroSingle)."""
        return (getattr(norm, "emb", None) is None and isinstance(getattr(norm, "linear", None), nn.Linear)
                and isinstance(getattr(norm, "norm", None), nn.LayerNorm))

    def text_norm(self, transformer, site, hidden):
        norm = self._norm(site.block(transformer), site)
        return norm.norm(hidden) if self._plain_adaln(norm) else hidden

    def norm_key(self, transformer, site):
        norm = self._norm(site.block(transformer), site)
        if self._plain_adaln(norm) and norm.norm.weight is None:
            return ("flux.layernorm", site.kind, norm.norm.eps)  # no weights: one cached norm for all such blocks
        return site.name

    def modulation_module(self, transformer, site):
        norm = self._norm(site.block(transformer), site)
        return norm.linear if self._plain_adaln(norm) else None

    def text_input(self, call):
        block = call.site.block(call.transformer)
        norm = self._norm(block, call.site)
        temb = arg(call.block_args, call.block_kwargs, "temb", 2)
        if not self._plain_adaln(norm):
            return norm(call.embedded, emb=rows_of(temb, call.rows))[0]  # [R, N, D]
        emb = call.modulation  # the block's own norm.linear(silu(temb))
        emb = norm.linear(norm.silu(rows_of(temb, call.rows))) if emb is None else rows_of(emb, call.rows)
        shift, scale = emb.chunk(6 if call.site.kind == "double" else 3, dim=1)[:2]
        x = call.pre_normed if call.pre_normed is not None else norm.norm(call.embedded)
        return fused_text.modulate(x, scale[:, None], shift[:, None])  # x * (1 + scale) + shift

    def kv_linears(self, transformer, site):
        attn = site.attention(transformer)
        return (attn.add_k_proj, attn.add_v_proj) if site.kind == "double" else (attn.to_k, attn.to_v)

    def finish_kv(self, call, k, v):
        attn = call.site.attention(call.transformer)
        k = k.unflatten(-1, (-1, attn.head_dim))  # [R, N, H, Dh]
        v = v.unflatten(-1, (-1, attn.head_dim))
        norm = attn.norm_added_k if call.site.kind == "double" else attn.norm_k
        fused = fused_text.norm_rope(norm, k)
        return (norm(k) if fused is None else fused), v  # position 0: the identity rotation

    def velocity(self, transformer, latents, sigma, caption, caption_mask=None, pooled=None):
        # Flux sees 2x2-packed latents and sigma in [0, 1]; it predicts noise - x0 directly
        B, C, H, W = latents.shape
        packed = latents.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, H * W // 4, C * 4)
        ids = torch.zeros(H // 2, W // 2, 3, device=latents.device, dtype=latents.dtype)
        ids[..., 1] += torch.arange(H // 2, device=latents.device, dtype=latents.dtype)[:, None]
        ids[..., 2] += torch.arange(W // 2, device=latents.device, dtype=latents.dtype)[None, :]
        txt_ids = torch.zeros(caption.shape[1], 3, device=latents.device, dtype=latents.dtype)
        if pooled is None:
            pooled = latents.new_zeros(B, transformer.config.pooled_projection_dim)
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((B,), 3.5, device=latents.device, dtype=latents.dtype)
        out = transformer(hidden_states=packed, encoder_hidden_states=caption, pooled_projections=pooled,
                          timestep=sigma.to(latents.dtype), img_ids=ids.reshape(-1, 3), txt_ids=txt_ids,
                          guidance=guidance, return_dict=False)[0]  # [B, HW/4, 4C]
        return out.view(B, H // 2, W // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)

    def make_processor(self, site, base):
        return FluxInjectionProcessor(base)

    # ------------------------------------------------------------------ pipeline
    def text_guidance(self, call):
        """FluxPipeline's `guidance_scale` is the distilled guidance embedding, not CFG (`true_cfg_guidance`)."""
        return true_cfg_guidance(call)

    def encode_prompt(self, pipe, prompts, device, max_sequence_length):
        embeds, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, device=device,
                                               max_sequence_length=max_sequence_length)  # [B, L, C], [B, P]
        return PromptEmbeds(list(embeds.float().cpu()), pooled.float().cpu())


register_family(FluxFamily())
