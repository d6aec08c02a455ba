"""Qwen-Image (`QwenImageTransformer2DModel`): 60 dual-stream (MMDiT) blocks at full size, no single-stream blocks.

Facts used here (diffusers 0.42, `models/transformers/transformer_qwenimage.py`, `pipelines/qwenimage/`):
- Sites: `transformer_blocks.{i}` (kind `"double"`), their `attn`. Presets: `"all"` and its alias `"double"`.
- Timestep: the pipelines pass `timestep / 1000 = sigma` in [0, 1] (`Timesteps(scale=1000)` inside), so progress is
  `1 - timestep`. The model predicts `noise - x0` (the scheduler steps with it directly).
- Caption path: `txt_norm` (RMSNorm) + `txt_in` (Linear) once per call. In a block: `txt_norm1` (LayerNorm without
  weights), then `x * (1 + scale) + shift` with `shift, scale` the first two of the three chunks of the first half
  of `txt_mod(temb)` (SiLU + Linear; with `zero_cond_t`, of the first half of `temb`'s rows); `add_k_proj` /
  `add_v_proj`, `norm_added_k` (RMSNorm over the head dim), complex RoPE. Joint attention order `[txt, img]`.
- Mask: `encoder_hidden_states_mask` (`[B, L]`, made bool by the model; the pipelines pass None when every caption
  token is real). `QwenDoubleStreamAttnProcessor2_0` builds the bool key mask `[txt mask, ones(img)]` itself and
  rejects an `attention_mask`; the injection processor here keeps that and adds the extras' `log(strength)` /
  padding as an additive bias only when one is needed (`attend_with_extras`).
- Position policy for extra tokens: extra token `j` takes the position caption token `j` takes, `m + j` on all
  three axes, where `m` is where the model starts its text (`QwenEmbedRope`: `txt_freqs = pos_freqs[m : m + L]`,
  `m = max(h // 2, w // 2)` over the call's images, as the pipelines' `img_shapes` give them); tokens past the
  caption's length continue the same way (the positions a longer caption's tokens take), capped at the table's
  last row. This is what the model does for its own text tokens, which always start at `m` whatever their number;
  it also makes a copy of the caption injected as extra tokens carry exactly the caption's keys (the log-2 oracle).
  With several references, each one's tokens start at `m` (each is read like a caption of its own).
  `m` is read off the call's own `txt_freqs` (the row of the model's table it starts at), so edit pipelines with
  several images per call get their `m` too.
- Spatial masks: the image tokens are the packed 2x2 latent patches, row-major over the first `img_shapes` entry's
  `(h, w)` (the generated image; edit pipelines' condition images follow it and see every reference fully).
- Guidance: every Qwen-Image pipeline makes separate conditional / unconditional calls inside
  `transformer.cache_context("cond"/"uncond")` (true CFG); the injection reads that context.
- Caption space: the text encoder is Qwen2.5-VL-7B (`joint_attention_dim` 3584), and the caption tokens are its last
  hidden states, so hidden states of Qwen2.5-VL for a reference image are natively in the caption space: zero-shot
  injection of Qwen2.5-VL-7B features needs no projection.
"""

from __future__ import annotations

from typing import Any, Hashable

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_qwenimage import (
    QwenDoubleStreamAttnProcessor2_0,
    apply_rotary_emb_qwen,
)
from torch import nn

from ..attention import BlockCall, attend_with_extras, fused_joint, fused_serves
from ..errors import ConfigError, TargetError
from .base import DiTFamily, PromptEmbeds, Site, arg, grid_of, per_reference, register_family, rows_of, true_cfg_guidance


class QwenImageInjectionProcessor(QwenDoubleStreamAttnProcessor2_0):
    """`QwenDoubleStreamAttnProcessor2_0` that also attends to the extra K/V of the `block_call` its block hook
    passes. Without a call it calls the original processor, so inactive steps are bit-identical. With one it runs
    the original's arithmetic op for op up to the joint `[txt, img]` q/k/v and its bool mask, then
    `attend_with_extras` (keys `[txt, img, extra]`; a float bias only where strength, padding or the caption mask
    needs one)."""

    def __init__(self, base: Any):
        super().__init__()
        self.base = base
        self._attention_backend = getattr(base, "_attention_backend", None)
        self._parallel_config = getattr(base, "_parallel_config", None)

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.FloatTensor,  # image stream [B, L_img, D]
        encoder_hidden_states: torch.FloatTensor = None,  # text stream [B, L_txt, D]
        encoder_hidden_states_mask: torch.FloatTensor = None,  # [B, L_txt] bool
        attention_mask: torch.FloatTensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
        block_call: BlockCall | None = None,
    ) -> torch.FloatTensor:
        call = block_call
        if call is None:
            return self.base(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                             encoder_hidden_states_mask=encoder_hidden_states_mask, attention_mask=attention_mask,
                             image_rotary_emb=image_rotary_emb)
        if encoder_hidden_states is None:
            raise TargetError("Qwen-Image attention needs encoder_hidden_states (the text stream); call the block "
                              "as QwenImageTransformerBlock does.")
        if attention_mask is not None:
            raise TargetError("Qwen-Image attention takes no attention_mask; pass encoder_hidden_states_mask "
                              "([B, L_txt], True = real token) as QwenImageTransformer2DModel does.")

        mask = None
        if encoder_hidden_states_mask is not None:  # as the original: [txt mask, image all True], [B, 1, 1, L]
            image_mask = torch.ones((hidden_states.shape[0], hidden_states.shape[1]), dtype=torch.bool,
                                    device=hidden_states.device)
            mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]
        seq_txt = encoder_hidden_states.shape[1]

        head_dim = attn.inner_dim // attn.heads
        img_query = attn.to_q(hidden_states).unflatten(-1, (-1, head_dim))  # [B, L_img, H, Dh]
        img_key = attn.to_k(hidden_states).unflatten(-1, (-1, head_dim))
        img_value = attn.to_v(hidden_states).unflatten(-1, (-1, head_dim))
        txt_query = attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))  # [B, L_txt, H, Dh]
        txt_key = attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        txt_value = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        if attn.norm_q is not None:
            img_query = attn.norm_q(img_query)
        if attn.norm_k is not None:
            img_key = attn.norm_k(img_key)
        if attn.norm_added_q is not None:
            txt_query = attn.norm_added_q(txt_query)
        if attn.norm_added_k is not None:
            txt_key = attn.norm_added_k(txt_key)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img_query = apply_rotary_emb_qwen(img_query, img_freqs, use_real=False)
            img_key = apply_rotary_emb_qwen(img_key, img_freqs, use_real=False)
            txt_query = apply_rotary_emb_qwen(txt_query, txt_freqs, use_real=False)
            txt_key = apply_rotary_emb_qwen(txt_key, txt_freqs, use_real=False)
        query = torch.cat([txt_query, img_query], dim=1)  # [B, L, H, Dh], L = L_txt + L_img
        key = torch.cat([txt_key, img_key], dim=1)
        value = torch.cat([txt_value, img_value], dim=1)

        if fused_serves(call, self._attention_backend, query, key.shape[1], mask):  # two passes (fused_attention)
            out = fused_joint(query, key, value, call)
        else:
            out = attend_with_extras(query, key, value, mask, call, self._sdpa, seq_dim=1)
        out = out.flatten(2, 3).to(query.dtype)  # [B, L, H * Dh]
        txt_out, img_out = out[:, :seq_txt, :], out[:, seq_txt:, :]
        img_out = attn.to_out[0](img_out.contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)  # dropout
        txt_out = attn.to_add_out(txt_out.contiguous())
        return img_out, txt_out

    def _sdpa(self, q, k, v, mask):
        return dispatch_attention_fn(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                     backend=self._attention_backend, parallel_config=self._parallel_config)


class QwenImageFamily(DiTFamily):
    name = "qwen_image"
    batched_segments = True  # several references' tokens share one text-path call (positions: per_reference)
    title = "Qwen-Image"
    transformer_classes = ("QwenImageTransformer2DModel",)
    batched_guidance = None  # separate cond / uncond calls, marked by cache_context
    presets = {"all": r"transformer_blocks\.\d+", "double": r"transformer_blocks\.\d+"}
    pipeline_classes = ("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline",
                        "QwenImageEditPipeline", "QwenImageEditInpaintPipeline", "QwenImageEditPlusPipeline",
                        "QwenImageControlNetPipeline", "QwenImageControlNetInpaintPipeline",
                        "QwenImageLayeredPipeline")
    fsdp_children = {"double": ("attn", "img_mlp", "txt_mlp")}

    def sites(self, transformer):
        blocks = transformer.transformer_blocks
        return [Site(f"transformer_blocks.{i}", i, "double", "attn") for i in range(len(blocks))]

    def caption_width(self, transformer):
        return int(transformer.config.joint_attention_dim)

    def hidden_width(self, transformer):
        return int(transformer.inner_dim)

    # ------------------------------------------------------------------ calls
    def batch_size(self, args, kwargs):
        return int(arg(args, kwargs, "hidden_states", 0).shape[0])

    timestep_arg = ("timestep", 3)

    def to_progress(self, t):
        return 1.0 - t  # sigma in [0, 1]

    # ------------------------------------------------------------------ image tokens (spatial masks)
    def image_grid(self, transformer, args, kwargs):
        # `img_shapes` as QwenEmbedRope reads it: the first sample's (frames, h, w), one per image of the call; the
        # generated image comes first in the image stream (edit pipelines append their condition images after it)
        n = int(arg(args, kwargs, "hidden_states", 0).shape[1])
        shapes = arg(args, kwargs, "img_shapes", 4)
        if shapes is None:
            return grid_of(n)
        images = shapes[0] if isinstance(shapes, list) else shapes
        images = images if isinstance(images, list) else [images]
        f, h, w = images[0]
        if f != 1 or sum(a * b * c for a, b, c in images) != n:
            raise ConfigError(f"spatial masks on Qwen-Image need a single-frame first image in img_shapes covering "
                              f"the image tokens with the others; this call has img_shapes {images} for {n} image "
                              "tokens; drop the mask.")
        return int(h), int(w)

    def image_span(self, site, block_args, block_kwargs, grid):
        # joint attention over [txt, img]: the generated image's tokens right after the text (condition images'
        # tokens after them see every reference fully)
        txt = int(arg(block_args, block_kwargs, "encoder_hidden_states", 1).shape[1])
        return txt, int(grid[0]) * int(grid[1])

    # ------------------------------------------------------------------ text path
    def embed(self, transformer, tokens, mask, site, cache):
        return transformer.txt_in(transformer.txt_norm(tokens))  # [B, N, D]

    def text_norm(self, transformer, site, hidden):
        return site.block(transformer).txt_norm1(hidden)  # LayerNorm, no weights

    def norm_key(self, transformer, site) -> Hashable:
        norm = site.block(transformer).txt_norm1
        if isinstance(norm, nn.LayerNorm) and norm.weight is None and norm.bias is None:
            return ("qwen_image.txt_norm1", tuple(norm.normalized_shape), norm.eps)  # one cached norm for all blocks
        return site.name

    def modulation_module(self, transformer, site):
        return site.block(transformer).txt_mod  # [B, 6D]: (shift, scale, gate) for norm1, then for norm2

    def text_input(self, call):
        block = call.site.block(call.transformer)
        mod = call.modulation  # the block's own txt_mod(temb)
        if mod is None:
            temb = arg(call.block_args, call.block_kwargs, "temb", 3)  # [B, D] ([2B, D] with zero_cond_t)
            if block.zero_cond_t:
                temb = torch.chunk(temb, 2, dim=0)[0]
            mod = block.txt_mod(rows_of(temb, call.rows))
        else:
            mod = rows_of(mod, call.rows)
        shift, scale, _ = mod.chunk(2, dim=-1)[0].chunk(3, dim=-1)  # [R, D] each
        x = call.pre_normed if call.pre_normed is not None else block.txt_norm1(call.embedded)  # [R, N, D]
        return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    def kv_linears(self, transformer, site):
        attn = site.attention(transformer)
        return attn.add_k_proj, attn.add_v_proj

    def finish_kv(self, call, k, v):
        attn = call.site.attention(call.transformer)
        head_dim = attn.inner_dim // attn.heads
        k = k.unflatten(-1, (-1, head_dim))  # [R, N, H, Dh]
        v = v.unflatten(-1, (-1, head_dim))
        if attn.norm_added_k is not None:
            k = attn.norm_added_k(k)
        freqs = per_reference(call, k.shape[1], lambda n: self._extra_freqs(call, n))  # [N, Dh/2] or None
        if freqs is not None:
            k = apply_rotary_emb_qwen(k, freqs, use_real=False)
        return k, v

    def _extra_freqs(self, call: BlockCall, n: int) -> torch.Tensor | None:
        """The RoPE of `n` extra tokens, `[N, Dh/2]` complex: rows `m .. m + n - 1` of the model's own table, `m`
        the row the call's caption starts at (see the module docstring); None when the call has no RoPE."""
        rope = arg(call.block_args, call.block_kwargs, "image_rotary_emb", 4)
        if rope is None:
            return None
        txt_freqs = rope[1]  # [L_txt, Dh/2]: rows m .. m + L_txt - 1 of pos_embed.pos_freqs
        if txt_freqs.shape[0] == 0:
            raise TargetError("Qwen-Image call with an empty caption: the extra tokens' positions follow the "
                              "caption's; pass at least one caption token.")
        scratch = None if torch.compiler.is_compiling() else call.scratch
        key = ("qwen_image.extra_freqs", n)
        if scratch is not None:
            hit = scratch.get(key)
            if hit is not None and hit[0] is txt_freqs:
                return hit[1]
        device = txt_freqs.device
        table_key = ("qwen_image.pos_freqs", str(device))
        table = call.cache.get(table_key)
        if table is None:
            table = call.cache[table_key] = call.transformer.pos_embed.pos_freqs.to(device)  # [4096, Dh/2]
        # m: the table row equal to the caption's first position (an exact copy, so exact equality finds it);
        # a tensor op, so no host sync and no graph break under torch.compile
        start = (table == txt_freqs[:1]).all(dim=-1).int().argmax()
        pos = (start + torch.arange(n, device=device)).clamp(max=table.shape[0] - 1)
        out = table[pos]  # [N, Dh/2]
        if scratch is not None:
            scratch[key] = (txt_freqs, out)
        return out

    # ------------------------------------------------------------------ training objective
    def velocity(self, transformer, latents, sigma, caption, caption_mask=None, pooled=None):
        # the pipeline packs 2x2 latent patches into tokens ([B, HW/4, 4C]) and passes sigma; the model predicts
        # noise - x0 directly
        B, C, H, W = latents.shape
        packed = latents.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, H * W // 4, C * 4)
        mask = caption_mask
        if mask is not None and bool(mask.all()):
            mask = None  # as the pipelines' encode_prompt: an all-real mask is dropped
        out = transformer(hidden_states=packed, encoder_hidden_states=caption, encoder_hidden_states_mask=mask,
                          timestep=sigma.to(latents.dtype), img_shapes=[[(1, H // 2, W // 2)]] * B,
                          return_dict=False)[0]  # [B, HW/4, 4C]
        return out.view(B, H // 2, W // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)

    def make_processor(self, site, base):
        return QwenImageInjectionProcessor(base)

    # ------------------------------------------------------------------ pipeline
    def text_guidance(self, call):
        """QwenImagePipeline: true CFG (`true_cfg_guidance`); its `guidance_scale` is for guidance-distilled models."""
        return true_cfg_guidance(call)

    def encode_prompt(self, pipe, prompts, device, max_sequence_length):
        embeds, mask = pipe.encode_prompt(prompts, device=device,
                                          max_sequence_length=max_sequence_length)  # [B, L, C], [B, L] or None
        lengths = [embeds.shape[1]] * len(embeds) if mask is None else mask.sum(1).tolist()  # real tokens first
        return PromptEmbeds([e[: int(n)].float().cpu() for e, n in zip(embeds, lengths)], None)

    def encode_latents(self, vae, pixels):
        # AutoencoderKLQwenImage is a video VAE: one frame, per-channel mean / std (the img2img pipeline's
        # `_encode_vae_image`, mode instead of a sample)
        z = vae.encode(pixels[:, :, None]).latent_dist.mode()  # [B, C, 1, h, w]
        mean = torch.tensor(vae.config.latents_mean, dtype=z.dtype, device=z.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, dtype=z.dtype, device=z.device).view(1, -1, 1, 1, 1)
        return ((z - mean) * (1.0 / std))[:, :, 0]  # [B, C, h, w]

    def prompt_kwargs(self, embeds, pooled):
        # every token of `embeds` is real: an all-ones mask (the pipeline then drops it, as for its own prompts)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}


register_family(QwenImageFamily())
