"""Lumina 2 (`Lumina2Transformer2DModel`): single-stream DiT, caption and image tokens in one `[cap, img]` sequence.

Facts used here (diffusers 0.42, `models/transformers/transformer_lumina2.py`, `pipelines/lumina2/pipeline_lumina2.py`):
- Sites: `layers.{i}` (main, the default), `noise_refiner.{i}` (image tokens only, modulated) and
  `context_refiner.{i}` (caption tokens only, unmodulated), all `Lumina2TransformerBlock`s whose `attn` runs
  `Lumina2AttnProcessor2_0`. Presets: `"all"` / `"main"` (the main layers), `"refiners"`, `"context_refiner"`,
  `"noise_refiner"`.
- Timestep: the pipeline passes `1 - t / num_train_timesteps` = `1 - sigma` (0 = noise, 1 = clean; "Lumina uses t=0
  as the noise"), so progress is the timestep itself. `Timesteps` embeds it unscaled. The model predicts
  `x0 - noise`; the pipeline negates it before the flow-matching scheduler step.
- Caption path: `time_caption_embed.caption_embedder` (RMSNorm + Linear) on the padded caption, then the
  `context_refiner` blocks (unmodulated: `norm1` is a plain RMSNorm) with the caption mask as key mask, once per
  call. The main layers see `[cap[:len_i], img, pad]` per row (`len_i` = the mask's sum: the model assumes a
  right-padded mask; a bool mask over the joint sequence only when rows differ in length). In a main or
  noise-refiner block the whole sequence gets `norm1(x, temb)` (`LuminaRMSNormZero`:
  `norm(x) * (1 + scale_msa)`, `scale_msa` the first of 4 chunks of `norm1.linear(silu(temb))`; no shift),
  then `to_k` / `to_v`, `norm_k` (RMSNorm per head), complex RoPE (`apply_rotary_emb(use_real=False)`).
- Attention: GQA with `num_kv_heads` < heads: the processor repeats K/V after RoPE with
  `unsqueeze(3).repeat(1, 1, 1, n_rep, 1).flatten(2, 3)` (kv head `g` serves query heads `g*n_rep .. g*n_rep + n_rep-1`),
  and the extra K/V are repeated exactly so, in `finish_kv`. Softmax scale `attn.scale` (or the proportional
  `sqrt(log_base(L)) * scale` when a caller passes `base_sequence_length`; the model never does).
- Position policy for extra tokens: token `j` takes position `(j, 0, 0)`, the position caption token `j` takes
  (`Lumina2RotaryPosEmbed`: caption `(i, 0, 0)` from 0, image `(len, row, col)`), capped at `axes_lens[0] - 1`.
  Extra tokens run through the context refiner as their own sequence at those positions, with their mask.
- Guidance: `Lumina2Pipeline` makes separate calls per step, conditional first, then (when
  `guidance_scale > 1` and the step is before `cfg_trunc_ratio`) unconditional, WITHOUT `cache_context`, then
  renormalises the guided prediction to the conditional one's norm (`cfg_normalization`). `call_role` tells the
  unconditional call by its inputs: the same latents and timestep tensors as the conditional call just before.
"""

from __future__ import annotations

import math
from typing import Any, Hashable

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_lumina2 import Lumina2AttnProcessor2_0
from torch import nn

from ..attention import BlockCall, attend_with_extras
from ..errors import ConfigError
from .base import DiTFamily, PromptEmbeds, Site, arg, per_reference, register_family, rows_of


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Lumina 2's GQA head repeat: `[B, L, Hkv, Dh]` -> `[B, L, Hkv * n_rep, Dh]`, each kv head repeated in place
    (`Lumina2AttnProcessor2_0`'s own op; it runs it for `n_rep == 1` too, a copy)."""
    return x.unsqueeze(3).repeat(1, 1, 1, n_rep, 1).flatten(2, 3)


class Lumina2InjectionProcessor(Lumina2AttnProcessor2_0):
    """`Lumina2AttnProcessor2_0` that also attends to the extra K/V of the `block_call` its block hook passes.
    Without a call it calls the original processor, so inactive steps are bit-identical. The extras' K/V (already
    repeated over the head groups, `[R, N, H, Dh]`) are computed here, after the block's own modulation, which
    their text path reuses (`call.modulation`)."""

    def __init__(self, base: Any):
        super().__init__()
        self.base = base

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
        base_sequence_length: int | None = None,
        block_call: BlockCall | None = None,
    ) -> torch.Tensor:
        call = block_call
        if call is None:
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                             base_sequence_length)
        call.extra_kv()

        batch_size, sequence_length, _ = hidden_states.shape
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = query.shape[-1] // attn.heads
        kv_heads = key.shape[-1] // head_dim
        dtype = query.dtype
        query = query.view(batch_size, -1, attn.heads, head_dim)  # [B, L, H, Dh]
        key = key.view(batch_size, -1, kv_heads, head_dim)  # [B, L, Hkv, Dh]
        value = value.view(batch_size, -1, kv_heads, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, use_real=False)
            key = apply_rotary_emb(key, image_rotary_emb, use_real=False)
        query, key = query.to(dtype), key.to(dtype)
        if base_sequence_length is not None:
            softmax_scale = math.sqrt(math.log(sequence_length, base_sequence_length)) * attn.scale
        else:
            softmax_scale = attn.scale
        n_rep = attn.heads // kv_heads
        if n_rep >= 1:
            key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)  # [B, L, H, Dh]
        if attention_mask is not None:
            attention_mask = attention_mask.bool().view(batch_size, 1, 1, -1)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # [B, H, L, Dh]

        def sdpa(q, k, v, mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=softmax_scale)

        out = attend_with_extras(query, key, value, attention_mask, call, sdpa, seq_dim=2)  # [B, H, L, Dh]
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


class Lumina2Family(DiTFamily):
    name = "lumina2"
    caption_only_kinds = ("context_refiner",)  # caption tokens only: no image query for a mask
    batched_segments = True  # several references' tokens share one text-path call (positions: per_reference)
    title = "Lumina 2"
    transformer_classes = ("Lumina2Transformer2DModel",)
    # Lumina2Pipeline calls the transformer separately for cond and uncond (no batching) and without
    # `cache_context`, so every call's rows count as conditional.
    batched_guidance = None
    pipeline_classes = ("Lumina2Pipeline",)
    fsdp_children = {k: ("attn", "feed_forward") for k in ("main", "noise_refiner", "context_refiner")}
    presets = {
        "all": r"layers\.\d+",
        "main": r"layers\.\d+",
        "refiners": r"(noise|context)_refiner\.\d+",
        "context_refiner": r"context_refiner\.\d+",
        "noise_refiner": r"noise_refiner\.\d+",
    }

    def sites(self, transformer):
        out, i = [], 0
        for group, kind in (("layers", "main"), ("noise_refiner", "noise_refiner"), ("context_refiner", "context_refiner")):
            for j in range(len(getattr(transformer, group))):
                out.append(Site(f"{group}.{j}", i, kind, "attn"))
                i += 1
        return out

    def caption_width(self, transformer):
        return int(transformer.config.cap_feat_dim)

    def hidden_width(self, transformer):
        return int(transformer.config.hidden_size)

    # ------------------------------------------------------------------ calls
    def batch_size(self, args, kwargs):
        return int(arg(args, kwargs, "hidden_states", 0).shape[0])

    timestep_arg = ("timestep", 1)

    def call_role(self, args, kwargs, memo):
        # Lumina2Pipeline's unconditional call of a step takes the very `latents` and `current_timestep` tensors of
        # its conditional call (which comes first); the scheduler makes new latents for the next step, and a step
        # past `cfg_trunc_ratio` has one (conditional) call only
        x, t = arg(args, kwargs, "hidden_states", 0), arg(args, kwargs, "timestep", 1)
        prev = memo.get("lumina2.previous")
        role = "uncond" if prev is not None and prev[0] is x and prev[1] is t and prev[2] == "cond" else None
        memo["lumina2.previous"] = (x, t, role or "cond")
        return role

    def to_progress(self, t):
        return t  # the pipeline passes 1 - sigma already

    # ------------------------------------------------------------------ image tokens (spatial masks)
    def image_grid(self, transformer, args, kwargs):
        latents = arg(args, kwargs, "hidden_states", 0)  # [B, C, H, W], patchified p x p row-major
        p = int(transformer.config.patch_size)
        return int(latents.shape[-2]) // p, int(latents.shape[-1]) // p

    def image_span(self, site, block_args, block_kwargs, grid):
        n = grid[0] * grid[1]
        if site.kind == "context_refiner":
            return None  # caption tokens only
        if site.kind == "noise_refiner":
            return 0, n  # the image alone
        # main layers: [cap_i, img, pad] per row; the joint mask (only when rows differ in length) gives each
        # row's caption length
        hidden = arg(block_args, block_kwargs, "hidden_states", 0)
        mask = arg(block_args, block_kwargs, "attention_mask", 1)
        if mask is None:
            return int(hidden.shape[1]) - n, n
        starts = sorted(set((mask.sum(dim=1) - n).tolist()))
        if len(starts) > 1:
            raise ConfigError(
                "spatial masks on Lumina 2's main layers need every row of a call to have one caption length (its "
                f"image tokens start after each row's caption; here at {starts}); generate one prompt per call, "
                "or pass prompt_embeds of one length with an all-ones prompt_attention_mask.")
        return int(starts[0]), n

    # ------------------------------------------------------------------ text path
    def embed_key(self, site: Site) -> Hashable:
        if site.kind == "context_refiner":
            return ("context_refiner", int(site.name.split(".")[1]))  # the stream entering that refiner block
        return ("context_refiner", None)  # through every refiner block

    def _extra_freqs(self, transformer, n: int, device, cache: dict) -> torch.Tensor:
        """RoPE of extra tokens `0..n-1` at positions `(min(j, axes_lens[0] - 1), 0, 0)`: `[1, n, Dh/2]` complex,
        from the model's own table lookup (`rope_embedder._get_freqs_cis`)."""
        key = ("lumina2.freqs", n, str(device))
        if key not in cache:
            cap = int(transformer.config.axes_lens[0]) - 1
            pos = torch.zeros(1, n, 3, dtype=torch.int32, device=device)
            pos[0, :, 0] = torch.clamp(torch.arange(n, dtype=torch.int32, device=device), max=cap)
            cache[key] = transformer.rope_embedder._get_freqs_cis(pos)  # [1, n, Dh/2]
        return cache[key]

    def embed(self, transformer, tokens, mask, site, cache):
        h = transformer.time_caption_embed.caption_embedder(tokens)  # [B, N, D]
        _, depth = self.embed_key(site)
        layers = transformer.context_refiner if depth is None else transformer.context_refiner[:depth]
        if len(layers):
            freqs = self._extra_freqs(transformer, h.shape[1], h.device, cache).expand(h.shape[0], -1, -1)
            for layer in layers:
                h = layer(h, mask, freqs)  # unmodulated; mask [B, N] (True = real) or None
        return h

    def text_norm(self, transformer, site, hidden):
        block = site.block(transformer)
        return block.norm1.norm(hidden) if block.modulation else block.norm1(hidden)  # RMSNorm, [R, N, D]

    def modulation_module(self, transformer, site):
        block = site.block(transformer)
        return block.norm1.linear if block.modulation else None  # LuminaRMSNormZero's adaLN linear

    def text_input(self, call):
        block = call.site.block(call.transformer)
        if not block.modulation:
            return call.pre_normed if call.pre_normed is not None else block.norm1(call.embedded)
        x = call.pre_normed if call.pre_normed is not None else block.norm1.norm(call.embedded)  # [R, N, D]
        emb = call.modulation  # the block's own norm1.linear(silu(temb)), [B, 4D]
        if emb is None:
            temb = rows_of(arg(call.block_args, call.block_kwargs, "temb", 3), call.rows)
            emb = block.norm1.linear(block.norm1.silu(temb))
        else:
            emb = rows_of(emb, call.rows)
        scale_msa = emb.chunk(4, dim=1)[0]  # [R, D]
        return x * (1 + scale_msa[:, None])

    def kv_linears(self, transformer, site):
        attn = site.attention(transformer)
        return attn.to_k, attn.to_v

    def finish_kv(self, call, k, v):
        """`[R, N, Hkv*Dh]` -> `[R, N, H, Dh]`: heads, `norm_k`, RoPE at the extra positions, then the processor's
        GQA repeat (so the extras line up with the query heads exactly as the block's own keys do)."""
        attn = call.site.attention(call.transformer)
        head_dim = attn.inner_dim // attn.heads
        k = k.unflatten(-1, (-1, head_dim))  # [R, N, Hkv, Dh]
        v = v.unflatten(-1, (-1, head_dim))
        dtype = k.dtype
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        freqs = per_reference(call, k.shape[1], lambda n: self._extra_freqs(call.transformer, n, k.device, call.cache),
                              dim=1, key=("lumina2.freqs", str(k.device)))  # [1, N, Dh/2], positions per reference
        k = apply_rotary_emb(k, freqs, use_real=False).to(dtype)
        n_rep = attn.heads // k.shape[2]
        return repeat_kv(k, n_rep), repeat_kv(v, n_rep)

    def velocity(self, transformer, latents, sigma, caption, caption_mask=None, pooled=None):
        # timestep 1 - sigma (1 = clean); the model predicts x0 - noise, so the velocity is its negation
        if caption_mask is None:
            caption_mask = torch.ones(caption.shape[:2], dtype=torch.bool, device=caption.device)
        out = transformer(hidden_states=latents, timestep=1.0 - sigma, encoder_hidden_states=caption,
                          encoder_attention_mask=caption_mask, return_dict=False)[0]
        return -out  # [B, C, H, W]

    def make_processor(self, site, base):
        return Lumina2InjectionProcessor(base)

    # ------------------------------------------------------------------ pipeline
    def encode_prompt(self, pipe, prompts, device, max_sequence_length):
        embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                                max_sequence_length=max_sequence_length)  # [B, L, C], [B, L]
        return PromptEmbeds([e[m.bool()].float().cpu() for e, m in zip(embeds, mask)], None)

    def prompt_kwargs(self, embeds, pooled):
        # Lumina2Pipeline refuses prompt_embeds without their mask; the embedding route's rows are unpadded
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}


register_family(Lumina2Family())
