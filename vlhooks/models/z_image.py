"""Z-Image (`ZImageTransformer2DModel`): single-stream DiT, caption and image tokens in one sequence.

Facts used here (diffusers 0.42):
- Sites: `layers.{i}` (main, the default), `noise_refiner.{i}` and `context_refiner.{i}` (targetable).
- Timestep: the pipeline passes `t = (1000 - T) / 1000 = 1 - sigma` (1 = clean), so progress is `t` itself; the
  model predicts `x0 - noise` and the pipeline negates it.
- Caption path: `cap_embedder` (RMSNorm + Linear) then the `context_refiner` blocks (unmodulated), once per call;
  in a main block: `attention_norm1(x) * (1 + scale_msa(adaln_input))`, `to_k`/`to_v`, `norm_k`, complex RoPE.
- Position policy for extra tokens: token `j` takes position `(1 + j, 0, 0)`, the position a caption token `j`
  takes (capped at `axes_lens[0] - 1`). Extra tokens run through the context refiner as their own sequence.
"""

from __future__ import annotations

from typing import Any, Hashable

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor
from torch import nn

from .. import fused_text
from ..attention import (BlockCall, attend_with_extras, can_write_into, fused_joint, fused_serves, joint_buffers,
                         linear_into, plain_joint)
from ..errors import TargetError
from .base import DiTFamily, PromptEmbeds, Site, arg, per_reference, register_family, rows_of


def _rope(x: torch.Tensor, freqs_cis: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Z-Image's complex RoPE. `x` `[B, L, H, Dh]`, `freqs_cis` `[B or 1, L, Dh/2]` complex. With `out`, the
    result is converted into `out` (the same rounding as `type_as`) instead of a new tensor."""
    with torch.amp.autocast("cuda", enabled=False):
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        res = torch.view_as_real(xc * freqs_cis.unsqueeze(2)).flatten(3)
        return res.type_as(x) if out is None else out.copy_(res)


class ZImageInjectionProcessor(ZSingleStreamAttnProcessor):
    """`ZSingleStreamAttnProcessor` that also attends to the extra K/V of the `block_call` its block hook passes.
    Without a call it calls the original processor, so inactive steps are bit-identical. The extras' K/V are
    computed here, after the block's own modulation, which their text path reuses (`call.modulation`)."""

    def __init__(self, base: Any):
        super().__init__()
        self.base = base
        self._attention_backend = getattr(base, "_attention_backend", None)
        self._parallel_config = getattr(base, "_parallel_config", None)

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        freqs_cis: torch.Tensor | None = None,
        block_call: BlockCall | None = None,
    ) -> torch.Tensor:
        call = block_call
        if call is None:
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, freqs_cis)

        L = hidden_states.shape[1]
        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))  # [B, L, H, Dh]
        key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        # joint on every row: two passes merged in one kernel on CUDA where that pays (strengths and spatial masks
        # as its bias; see attention.fused_serves); otherwise, with nothing to gate, the block writes its own K/V
        # straight into [1, L + N] buffers (no concat)
        fused = freqs_cis is not None and fused_serves(call, self._attention_backend, query, L, attention_mask)
        plain = not fused and plain_joint(call, hidden_states.shape[0], attention_mask) and freqs_cis is not None
        bufs = None
        if plain and not fused and can_write_into(attn.to_v, hidden_states):
            bufs = joint_buffers(key, L, call)
            linear_into(bufs[1][:, :L].flatten(2), hidden_states, attn.to_v)
        value = bufs[1][:, :L] if bufs else attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if freqs_cis is not None:
            query = _rope(query, freqs_cis)
            key = _rope(key, freqs_cis, out=bufs[0][:, :L] if bufs else None)
        dtype = query.dtype
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]

        def sdpa(q, k, v, mask):
            return dispatch_attention_fn(
                q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False,
                backend=self._attention_backend, parallel_config=self._parallel_config,
            )

        if fused:
            out = fused_joint(query, key, value, call)  # [B, L, H, Dh]
        elif bufs:
            out = sdpa(query, bufs[0], bufs[1], None)  # = attend_with_extras' concatenation, without the copies
        else:
            out = attend_with_extras(query, key, value, attention_mask, call, sdpa, seq_dim=1)
        out = out.flatten(2, 3).to(dtype)
        out = attn.to_out[0](out)
        if len(attn.to_out) > 1:
            out = attn.to_out[1](out)
        return out


class ZImageFamily(DiTFamily):
    name = "z_image"
    caption_only_kinds = ("context_refiner",)  # caption tokens only: no image query for a mask
    batched_segments = True  # several references' tokens share one text-path call (positions: per_reference)
    title = "Z-Image"
    transformer_classes = ("ZImageTransformer2DModel",)
    batched_guidance = "cond_first"  # ZImagePipeline: prompt_embeds + negative_prompt_embeds
    pipeline_classes = ("ZImagePipeline", "ZImageImg2ImgPipeline", "ZImageInpaintPipeline", "ZImageControlNetPipeline",
                        "ZImageControlNetInpaintPipeline", "ZImageOmniPipeline")
    fsdp_children = {k: ("attention", "feed_forward") for k in ("main", "noise_refiner", "context_refiner")}
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
                out.append(Site(f"{group}.{j}", i, kind, "attention"))
                i += 1
        return out

    def caption_width(self, transformer):
        return int(transformer.config.cap_feat_dim)

    def hidden_width(self, transformer):
        return int(transformer.config.dim)

    # ------------------------------------------------------------------ calls
    def batch_size(self, args, kwargs):
        return len(arg(args, kwargs, "x", 0))

    timestep_arg = ("t", 1)

    def to_progress(self, t):
        return t  # the pipeline passes 1 - sigma already

    def image_grid(self, transformer, args, kwargs):
        x = arg(args, kwargs, "x", 0)[0]  # [C, F, H, W], patchified f x p x p
        p, fp = int(transformer.config.all_patch_size[0]), int(transformer.config.all_f_patch_size[0])
        return int(x.shape[1]) // fp * int(x.shape[2]) // p, int(x.shape[3]) // p

    def image_span(self, site, block_args, block_kwargs, grid):
        if site.kind == "context_refiner":
            return None  # caption tokens only
        # main layers: [image (padded to a multiple of 32), caption]; noise refiner: the image alone; the image
        # tokens come first
        return 0, grid[0] * grid[1]

    def check_call(self, args, kwargs):
        x = arg(args, kwargs, "x", 0)
        if len(x) and isinstance(x[0], (list, tuple)):
            raise TargetError(
                "Z-Image omni mode (a list of images per batch item) is not supported by vlhooks injection; "
                "call the model with one image tensor per batch item."
            )

    # ------------------------------------------------------------------ text path
    def embed_key(self, site: Site) -> Hashable:
        if site.kind == "context_refiner":
            return ("context_refiner", int(site.name.split(".")[1]))
        return ("context_refiner", None)  # through every refiner layer

    def _extra_freqs(self, transformer, n: int, device, cache: dict) -> torch.Tensor:
        key = ("z_image.freqs", n, str(device))
        if key in cache:
            return cache[key]
        cap = int(transformer.config.axes_lens[0]) - 1
        pos = torch.zeros(n, len(transformer.config.axes_dims), dtype=torch.long, device=device)
        pos[:, 0] = torch.clamp(torch.arange(1, n + 1, device=device), max=cap)
        cache[key] = transformer.rope_embedder(pos)  # [N, Dh/2] complex
        return cache[key]

    def embed(self, transformer, tokens, mask, site, cache):
        h = transformer.cap_embedder(tokens)  # [B, N, D]
        _, depth = self.embed_key(site)
        layers = transformer.context_refiner if depth is None else transformer.context_refiner[:depth]
        if len(layers):
            freqs = self._extra_freqs(transformer, h.shape[1], h.device, cache)[None].expand(h.shape[0], -1, -1)
            for layer in layers:
                h = layer(h, mask, freqs)
        return h

    def text_norm(self, transformer, site, hidden):
        return site.block(transformer).attention_norm1(hidden)

    def modulation_module(self, transformer, site):
        block = site.block(transformer)
        return block.adaLN_modulation if block.modulation else None

    def text_input(self, call):
        block = call.site.block(call.transformer)
        x = call.pre_normed if call.pre_normed is not None else block.attention_norm1(call.embedded)  # [R, N, D]
        if block.modulation:
            mod = call.modulation  # the block's own adaLN output, [B or 1, 4D]
            if mod is None:
                mod = block.adaLN_modulation(rows_of(arg(call.block_args, call.block_kwargs, "adaln_input", 3),
                                                     call.rows))
            else:
                mod = rows_of(mod, call.rows)
            x = fused_text.modulate(x, mod.unsqueeze(1).chunk(4, dim=2)[0])  # x * (1 + scale_msa [R, 1, D])
        return x

    def kv_linears(self, transformer, site):
        attn = site.attention(transformer)
        return attn.to_k, attn.to_v

    def finish_kv(self, call, k, v):
        attn = call.site.attention(call.transformer)
        k = k.unflatten(-1, (attn.heads, -1))  # [R, N, H, Dh]
        v = v.unflatten(-1, (attn.heads, -1))
        # each reference's tokens at positions 1..N_s, also when several go through one call (`batched`)
        freqs = per_reference(call, k.shape[1], lambda n: self._extra_freqs(call.transformer, n, k.device, call.cache),
                              key=("z_image.freqs", str(k.device)))  # [N, Dh/2] complex
        if attn.norm_k is not None:
            cos_sin = torch.view_as_real(freqs)  # [N, Dh/2, 2]
            fused = fused_text.norm_rope(attn.norm_k, k, cos_sin[..., 0], cos_sin[..., 1])
            if fused is not None:
                return fused, v
            k = attn.norm_k(k)
        return _rope(k, freqs[None]), v  # freqs [1, N, Dh/2]

    def velocity(self, transformer, latents, sigma, caption, caption_mask=None, pooled=None):
        # t = 1 - sigma (1 = clean); the model predicts x0 - noise, so the velocity is its negation
        lengths = [caption.shape[1]] * caption.shape[0] if caption_mask is None else caption_mask.sum(1).tolist()
        caps = [caption[i, : int(n)] for i, n in enumerate(lengths)]
        x = list(latents.unsqueeze(2).unbind(0))  # B x [C, 1, H, W]
        out = transformer(x, 1.0 - sigma, caps, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)  # [B, C, H, W]

    def make_processor(self, site, base):
        return ZImageInjectionProcessor(base)

    # ------------------------------------------------------------------ pipeline
    def text_guidance(self, call):
        """ZImagePipeline guides with `v_c + w (v_c - v_u)`, i.e. `s = 1 + guidance_scale`."""
        w = float(call.get("guidance_scale") or 0.0)
        return 1.0 + w if w > 0 else 1.0

    def encode_prompt(self, pipe, prompts, device, max_sequence_length):
        embeds, _ = pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=False,
                                       max_sequence_length=max_sequence_length)  # one [L_i, C] per prompt
        return PromptEmbeds([e.float().cpu() for e in embeds], None)

    def prompt_kwargs(self, embeds, pooled):
        return {"prompt_embeds": list(embeds)}  # ZImagePipeline takes one [L_i, C] per prompt


register_family(ZImageFamily())
