"""Chroma (`ChromaTransformer2DModel`): Flux.1's double and single blocks, modulated by one approximator network at
the top instead of per-block modulation layers, with no pooled CLIP embedding and a T5 padding mask.

Facts used here (diffusers 0.42, `transformer_chroma.py`, `pipeline_chroma.py`):
- Sites: `transformer_blocks.{i}` (double, indices 0..D-1, joint `[txt, img]` with separate text projections), then
  `single_transformer_blocks.{i}` (single, indices D..D+S-1, one `[txt, img]` sequence). Presets: `"all"`,
  `"double"`, `"single"`.
- Timestep: the pipeline passes sigma (`t / 1000`), x1000 inside the model, so progress is `1 - timestep`.
- Modulation: `time_text_embed(timestep)` -> `distilled_guidance_layer` (`ChromaApproximator`) gives `pooled_temb`
  `[B, 3S + 12D + 2, D]` once per call; the forward slices it and passes each block its rows as `temb`: a double
  block `[B, 12, D]` (rows 0..5 image, 6..11 text: shift, scale, gate, ...; argument 2), a single block `[B, 3, D]`
  (shift, scale, gate; argument 1). Blocks have no modulation layer (`modulation_module` is None): `text_input`
  reads `temb` from the block's own arguments (positional under gradient checkpointing).
- Caption path: `context_embedder` (Linear) once per call. Double block: `norm1_context` (LayerNorm without
  weights, eps 1e-6, `* (1 + scale) + shift` from `temb[:, 6:]`), `add_k_proj`/`add_v_proj`, `norm_added_k`.
  Single block: `norm` (the same LayerNorm and `temb`), `to_k`/`to_v`, `norm_k`.
- Attention mask: the pipeline passes `attention_mask` `[B, L_txt + L_img]`: its T5 mask (1 on a prompt's tokens
  and the first padding token, 0 on the rest) in the text encoder's float dtype, then ones for the image tokens;
  every block turns it into `m[:, None, None, :] * m[:, None, :, None]` (`[B, 1, S, S]`) and the processor hands
  that to SDPA as it is. SDPA adds a float mask to the logits (so real-to-real pairs get +1, pairs with padding 0:
  diffusers issues #12116 / #13619), and keeps / drops by a bool mask (a caller's own). Extra keys follow the same
  rule as a real text key: query `i` gets `m_i * 1` (the block's product with a real key, in the mask's own dtype;
  a bool mask as 0 / -inf), plus `log(strength)`, and `-inf` on padded extra tokens. So injecting a copy of the
  block's real text tokens equals a `log 2` bias on those keys, under either mask dtype. Decoupled mode's separate
  softmax over the extras does not take the block's mask: a float mask's query-side term is the same for every
  extra key of a query, so it cancels. Under gradient checkpointing diffusers calls single blocks without the mask.
- Position policy for extra tokens: position 0 on every axis, as the pipelines set `txt_ids = 0`; the rotation at
  position 0 is the identity, so extra keys are not rotated.
- Guidance: `ChromaPipeline` (and its img2img / inpaint pipelines) make separate conditional then unconditional
  calls, NOT inside `transformer.cache_context`; `call_role` tells the unconditional call by its input: the very
  `latents` tensor of the conditional call just before (the scheduler makes a new one for the next step). A call
  inside `transformer.cache_context("uncond")` (as the Flux pipeline makes) is unconditional as well.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections
from torch import nn

from ..attention import BlockCall, extra_bias, query_bias
from ..errors import TargetError
from .base import DoubleSingleStreamFamily, PromptEmbeds, Site, arg, register_family, rows_of
from .flux import FluxInjectionProcessor

_TEMB_ARG = {"double": 2, "single": 1}  # position of `temb` in the block's forward
_MASK_ARG = {"double": 4, "single": 3}  # position of `attention_mask` (the block's own 2-d mask)


class ChromaInjectionProcessor(FluxInjectionProcessor):
    """Flux's injection processor (Chroma's blocks use `FluxAttention` with `FluxAttnProcessor`) plus joint mode
    under Chroma's attention mask, whose `[B, 1, S, S]` form (query-dependent) the shared joint path does not
    take: the extra keys get the block's mask term of a real key for each query, then `log(strength)` and `-inf`
    on padding (see the module docstring). Without a mask, and in decoupled mode, it is Flux's processor."""

    def __init__(self, base: Any, site: Site):
        super().__init__(base)
        self.site = site

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
        if call is None or attention_mask is None or call.mode != "joint":
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                    block_call=call)

        # the base processor's projections, qk-norms, [txt, img] concatenation and RoPE
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))  # [B, L, H, Dh]
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)  # [txt, img]
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        mask_2d = arg(call.block_args, call.block_kwargs, "attention_mask", _MASK_ARG[self.site.kind])
        if mask_2d is None:
            raise TargetError(
                f"{self.site.name}'s attention received a mask its block was not given; pass the mask as the "
                "transformer's attention_mask ([B, L_txt + L_img]), as ChromaPipeline does."
            )
        hidden_states = self._masked_joint(query, key, value, attention_mask, mask_2d, call)
        return self._out(attn, hidden_states.flatten(2, 3).to(query.dtype), encoder_hidden_states)

    def _masked_joint(self, q, k, v, mask, mask_2d, call):
        """Joint attention over `[own keys, extra keys]` for the rows `call.rows`; other rows as the base computes
        them. `q, k, v` `[B, S, H, Dh]`, `mask` the block's `[B, 1, S, S]` (float or bool), `mask_2d` `[B, S]`."""
        B = q.shape[0]
        ek, ev = call.extra_kv()  # [R, N, H, Dh]
        rows = call.rows
        take = (lambda x: x) if rows is None else (lambda x: x if x.shape[0] == 1 else x[rows])
        q_a, k_a, v_a, m_a = take(q), take(k), take(v), take(mask)
        m2_a = take(mask_2d)
        R, N = q_a.shape[0], ek.shape[1]
        # the block's term between query i and a real key: m_i * 1 (its own product, in the mask's dtype)
        real = m2_a[:, None, :, None] * torch.ones(1, 1, 1, N, dtype=m2_a.dtype, device=m2_a.device)  # [R,1,S,N]
        extra = _as_bias(real, q) + extra_bias(call, q)[:, None, None, :]  # + log(strength), -inf on padding
        per_query = query_bias(call, q.shape[1], q)  # [R, S, N] spatial masks, or None
        if per_query is not None:
            extra = extra + per_query[:, None]
        bias = torch.cat([_as_bias(m_a, q).expand(R, -1, -1, -1), extra], dim=-1)  # [R, 1, S, S + N]
        k_cat = torch.cat([k_a, ek.to(k.dtype)], dim=1)
        v_cat = torch.cat([v_a, ev.to(v.dtype)], dim=1)
        out_a = self._sdpa(q_a, k_cat, v_cat, bias)
        if rows is None:
            return out_a
        others = [i for i in range(B) if i not in set(rows)]
        out = out_a.new_empty((B, *out_a.shape[1:]))
        out[rows] = out_a
        if others:
            out[others] = self._sdpa(q[others], k[others], v[others], mask if mask.shape[0] == 1 else mask[others])
        return out


def _as_bias(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """An SDPA mask as the additive bias SDPA applies: a float mask as it is, a bool mask as 0 / -inf."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(~mask, float("-inf"))
    return mask.to(like.dtype)


class ChromaFamily(DoubleSingleStreamFamily):
    name = "chroma"
    batched_segments = True  # several references' tokens share one text-path call (no positions on extras)
    title = "Chroma"
    transformer_classes = ("ChromaTransformer2DModel",)
    # Separate conditional / unconditional calls, with no cache_context: nothing marks the unconditional one.
    batched_guidance = None
    img_ids_arg = ("img_ids", 3)
    pipeline_classes = ("ChromaPipeline", "ChromaImg2ImgPipeline", "ChromaInpaintPipeline")
    fsdp_children = {"double": ("attn", "ff", "ff_context"), "single": ("attn", "proj_mlp", "proj_out")}







    def image_span(self, site, block_args, block_kwargs, grid):
        # both kinds attend over [txt, img]: the image tokens are the last ones (a single block gets them joined)
        n = grid[0] * grid[1]
        if site.kind == "double":
            return int(arg(block_args, block_kwargs, "encoder_hidden_states", 1).shape[1]), n
        return int(arg(block_args, block_kwargs, "hidden_states", 0).shape[1]) - n, n

    def call_role(self, args, kwargs, memo):
        x = arg(args, kwargs, "hidden_states", 0)
        prev = memo.get("chroma.previous")
        role = "uncond" if prev is not None and prev[0] is x and prev[1] == "cond" else None
        memo["chroma.previous"] = (x, role or "cond")
        return role

    # ------------------------------------------------------------------ text path
    def embed(self, transformer, tokens, mask, site, cache):
        return transformer.context_embedder(tokens)  # [B, N, D]

    @staticmethod
    def _norm(block, site):
        return block.norm1_context if site.kind == "double" else block.norm  # Chroma's pruned AdaLayerNormZero(Single)

    def text_norm(self, transformer, site, hidden):
        return self._norm(site.block(transformer), site).norm(hidden)  # [R, N, D]

    def norm_key(self, transformer, site):
        norm = self._norm(site.block(transformer), site).norm
        if type(norm) is nn.LayerNorm and norm.weight is None:  # no weights: one cached norm for all such blocks
            return ("chroma.layernorm", tuple(norm.normalized_shape), norm.eps)
        return site.name

    def text_input(self, call):
        norm = self._norm(call.site.block(call.transformer), call.site)
        temb = rows_of(arg(call.block_args, call.block_kwargs, "temb", _TEMB_ARG[call.site.kind]), call.rows)
        if call.site.kind == "double":  # [R, 12, D]: image rows, then the text rows norm1_context reads
            shift, scale = temb[:, 6:].flatten(1, 2).chunk(6, dim=1)[:2]
        else:  # [R, 3, D]
            shift, scale = temb.flatten(1, 2).chunk(3, dim=1)[:2]
        x = call.pre_normed if call.pre_normed is not None else norm.norm(call.embedded)
        return x * (1 + scale[:, None]) + shift[:, None]  # [R, N, D]

    def kv_linears(self, transformer, site):
        attn = site.attention(transformer)
        return (attn.add_k_proj, attn.add_v_proj) if site.kind == "double" else (attn.to_k, attn.to_v)

    def finish_kv(self, call, k, v):
        attn = call.site.attention(call.transformer)
        k = k.unflatten(-1, (-1, attn.head_dim))  # [R, N, H, Dh]
        v = v.unflatten(-1, (-1, attn.head_dim))
        k = attn.norm_added_k(k) if call.site.kind == "double" else attn.norm_k(k)
        return k, v  # position 0: the identity rotation

    def make_processor(self, site, base):
        return ChromaInjectionProcessor(base, site)

    # ------------------------------------------------------------------ training objective
    def velocity(self, transformer, latents, sigma, caption, caption_mask=None, pooled=None):
        # 2x2-packed latents and sigma in [0, 1], as the pipeline calls it; the caption mask enters as the pipeline's
        # attention mask (float in the model's dtype, ones for the image tokens); it predicts noise - x0 directly
        B, C, H, W = latents.shape
        packed = latents.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, H * W // 4, C * 4)
        ids = torch.zeros(H // 2, W // 2, 3, device=latents.device, dtype=latents.dtype)
        ids[..., 1] += torch.arange(H // 2, device=latents.device, dtype=latents.dtype)[:, None]
        ids[..., 2] += torch.arange(W // 2, device=latents.device, dtype=latents.dtype)[None, :]
        txt_ids = torch.zeros(caption.shape[1], 3, device=latents.device, dtype=latents.dtype)
        mask = None
        if caption_mask is not None:
            mask = torch.cat([caption_mask.to(latents.dtype),
                              torch.ones(B, H * W // 4, device=latents.device, dtype=torch.bool)], dim=1)
        out = transformer(hidden_states=packed, encoder_hidden_states=caption, timestep=sigma.to(latents.dtype),
                          img_ids=ids.reshape(-1, 3), txt_ids=txt_ids, attention_mask=mask,
                          return_dict=False)[0]  # [B, HW/4, 4C]
        return out.view(B, H // 2, W // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)

    # ------------------------------------------------------------------ pipeline
    def encode_prompt(self, pipe, prompts, device, max_sequence_length):
        embeds, _, mask, *_ = pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=False,
                                                 max_sequence_length=max_sequence_length)  # [B, L, C], [B, L]
        # the tokens the transformer's mask keeps: the prompt's and the first padding token (a prefix of each row)
        lengths = mask.sum(dim=1).long().tolist()
        return PromptEmbeds([e[:n].float().cpu() for e, n in zip(embeds, lengths)], None)

    def prompt_kwargs(self, embeds, pooled):
        # ChromaPipeline takes prompt_embeds only with their mask; every given token is kept (float, as its own)
        return {"prompt_embeds": embeds,
                "prompt_attention_mask": torch.ones(embeds.shape[:2], dtype=embeds.dtype, device=embeds.device)}


register_family(ChromaFamily())
