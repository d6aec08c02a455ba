"""Flux.2 (`Flux2Transformer2DModel`): 8 double-stream blocks then 48 single-stream blocks at full size (FLUX.2-dev,
32B; the Klein models are smaller, same classes).

Facts used here (diffusers 0.42, `models/transformers/transformer_flux2.py`, `pipelines/flux2/`):
- Sites: `transformer_blocks.{i}` (double, indices 0..D-1, `Flux2Attention`) then `single_transformer_blocks.{i}`
  (single, indices D..D+S-1, `Flux2ParallelSelfAttention`). Presets: `"all"`, `"double"`, `"single"`.
- Timestep: every Flux.2 pipeline passes `timestep / 1000` = sigma in [0, 1] (x1000 inside the model), so progress
  is `1 - timestep`. `guidance` (FLUX.2-dev's embedded guidance, `Flux2Pipeline`'s `guidance_scale`, default 4) is
  passed raw, x1000 inside; the Klein pipelines pass `guidance=None`.
- Modulation is computed ONCE at the top of the transformer (`double_stream_modulation_txt(temb)`,
  `single_stream_modulation(temb)`) and handed to every block as an argument (`temb_mod_txt`, position 3, of a
  double block; `temb_mod`, position 2, of a single block). So there is no per-block modulation module
  (`modulation_module` is None) and the extras' text path reads the chunk its block applies from the block's own
  arguments: `(1 + scale) * LayerNorm(x) + shift` with `(shift, scale, gate) = Flux2Modulation.split(mod, n)[0]`.
- Caption path: `context_embedder` (Linear, no bias) once per call. Double block: `norm1_context` (LayerNorm, no
  affine) and the modulation above, `add_k_proj`/`add_v_proj`, `norm_added_k`; the joint sequence is `[txt, img]`.
  Single block: the stream is `[txt, img]` already; `norm` (LayerNorm, no affine) and the modulation above, then ONE
  fused `to_qkv_mlp_proj` computes q, k, v and the MLP input: the keys are rows `[inner:2*inner]` and the values rows
  `[2*inner:3*inner]` of its weight, and `kv_linears` returns two `FusedRows` modules computing exactly those rows
  (views of the fused weight, no copies). `norm_k` is the single block's key norm.
- Position policy for extra tokens: 4-axis RoPE `(t, h, w, l)`; the pipelines give caption token `l` the position
  `(0, 0, 0, l)` (`Flux2Pipeline._prepare_text_ids`), and extra token `j` takes the position caption token `j`
  takes, `(0, 0, 0, j)`. The extras are treated as a second caption: a copy of the caption gets exactly the
  caption's keys (so injecting it equals a log 2 bias on the caption's logits), and the extras' keys do not depend
  on the prompt's length (the cond and uncond calls, or two prompts, see the same extra keys).
- Guidance: `Flux2Pipeline` (dev) is guidance-distilled: one call per step, no unconditional branch. The Klein
  pipelines make separate conditional / unconditional calls inside `transformer.cache_context("cond"/"uncond")`
  (true CFG when `guidance_scale > 1` and not `is_distilled`); the injection reads that context. So
  `batched_guidance` is None.
- Training latents: the pipelines' own latent grid `[B, in_channels, H, W]` (the VAE latents patchified 2x2 and
  batch-norm normalised, `Flux2Pipeline._encode_vae_image` / `prepare_latents`); `velocity` packs them to tokens
  (`_pack_latents`) with the pipeline's `_prepare_latent_ids` positions `(0, h, w, 0)`. The model predicts
  `noise - x0`.
- Not served: the Klein-KV reference cache (`kv_cache_mode` "extract" / "cached", `Flux2KVAttnProcessor`): the
  injection refuses such calls (`check_call`); without a block call the processors pass those arguments on to the
  original processor, so an installed but inactive injection leaves KV-cache calls unchanged.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux2 import (
    Flux2AttnProcessor,
    Flux2Modulation,
    Flux2ParallelSelfAttnProcessor,
    _get_qkv_projections,
)
from torch import nn

from .. import fused_text
from ..attention import BlockCall, attend_with_extras, fused_joint, fused_serves
from ..errors import TargetError
from .base import DiTFamily, DoubleSingleStreamFamily, PromptEmbeds, arg, per_reference, register_family, rows_of

GUIDANCE = 4.0  # Flux2Pipeline's default guidance_scale (the embedded guidance of FLUX.2-dev), for `velocity`


class FusedRows(nn.Linear):
    """Rows `[start, stop)` of a fused `nn.Linear` as a Linear of its own: `weight` and `bias` are views of the fused
    layer's (no copy; they follow the fused layer through `.to()`, FSDP and in-place updates), and `forward` is
    `F.linear` with them: the fused projection's values in those output columns, up to the rounding of a GEMM of
    another output width (the BLAS may pick another kernel: bit-identical on the CPU in float32 and on an H200 in
    bf16 in the shapes tried; CPU bf16 differed by one bf16 ulp at one shape, H200 float32 by about 3e-6 relative).

    `state_dict()` holds compact copies of the rows (a view would drag the whole fused storage into a deep copy), so
    a `kv` adapter can copy it into a plain `nn.Linear`; peft's LoRA wraps it like any `nn.Linear`. It registers no
    parameters of its own (the DiT owns them) and holds the fused layer outside its module tree."""

    plain_linear = True  # `forward` is `F.linear(x, weight, bias)` (`fused_text.linear_pair` may stand in for it)

    def __init__(self, fused: nn.Linear, start: int, stop: int):
        nn.Module.__init__(self)
        self.__dict__["fused"] = fused  # not a submodule: the DiT's, not this module's
        self.start, self.stop = int(start), int(stop)
        self.in_features, self.out_features = fused.in_features, self.stop - self.start

    @property
    def weight(self) -> torch.Tensor:  # [out, in], a view
        return self.fused.weight[self.start:self.stop]

    @property
    def bias(self) -> torch.Tensor | None:
        b = self.fused.bias
        return None if b is None else b[self.start:self.stop]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach().clone()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach().clone()

    def extra_repr(self) -> str:
        return f"rows [{self.start}:{self.stop}] of a fused Linear({self.in_features}, {self.fused.out_features})"


def _single_kv_rows(attn: nn.Module) -> tuple[tuple[int, int], tuple[int, int]]:
    """The output rows of `to_qkv_mlp_proj` holding the keys and the values (q, k, v, then the MLP input)."""
    inner = attn.inner_dim
    return (inner, 2 * inner), (2 * inner, 3 * inner)


def _takes(processor: Any) -> frozenset[str]:
    """The keyword names `processor.__call__` accepts (the attention modules pass only those)."""
    try:
        return frozenset(inspect.signature(processor.__call__).parameters)
    except (TypeError, ValueError):
        return frozenset()


class _Extras:
    """What both Flux.2 injection processors share: the original processor, its backend, the attention call."""

    def _setup(self, base: Any) -> None:
        self.base = base
        self._attention_backend = getattr(base, "_attention_backend", None)
        self._parallel_config = getattr(base, "_parallel_config", None)
        self._base_takes = _takes(base)

    def _base_kwargs(self, **kw) -> dict[str, Any]:
        """The KV-cache arguments the original processor takes (as the attention module would have passed)."""
        return {k: v for k, v in kw.items() if k in self._base_takes}

    def _sdpa(self, q, k, v, mask):
        return dispatch_attention_fn(q, k, v, attn_mask=mask, backend=self._attention_backend,
                                     parallel_config=self._parallel_config)

    def _attend(self, query, key, value, attention_mask, call: BlockCall) -> torch.Tensor:
        """The block's attention over its own `[B, L, H, Dh]` q, k, v (after qk-norm and RoPE) plus the extras: two
        passes merged in one kernel where that serves (joint on every row, CUDA; see `attention.fused_serves`),
        otherwise `attend_with_extras`."""
        if fused_serves(call, self._attention_backend, query, key.shape[1], attention_mask):
            return fused_joint(query, key, value, call)
        return attend_with_extras(query, key, value, attention_mask, call, self._sdpa, seq_dim=1)


class Flux2InjectionProcessor(_Extras, Flux2AttnProcessor):
    """`Flux2AttnProcessor` (double blocks) that also attends to the extra K/V of the `block_call` its block hook
    passes: the queries of `[txt, img]` attend to `[txt, img]` keys and the extra keys. Without a call it calls the
    original processor (with the KV-cache arguments it takes), so inactive steps are bit-identical."""

    def __init__(self, base: Any):
        Flux2AttnProcessor.__init__(self)
        self._setup(base)

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
        kv_cache: Any = None,
        kv_cache_mode: str | None = None,
        num_ref_tokens: int = 0,
        block_call: BlockCall | None = None,
    ) -> torch.Tensor:
        call = block_call
        if call is None:
            kw = self._base_kwargs(kv_cache=kv_cache, kv_cache_mode=kv_cache_mode, num_ref_tokens=num_ref_tokens)
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **kw)

        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))  # [B, L_img, H, Dh]
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))  # [B, L_txt, H, Dh]
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)  # [txt, img]
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states = self._attend(query, key, value, attention_mask, call)  # [B, L, H, Dh]
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class Flux2SingleInjectionProcessor(_Extras, Flux2ParallelSelfAttnProcessor):
    """`Flux2ParallelSelfAttnProcessor` (single blocks) that also attends to the extra K/V of the `block_call`:
    the `[txt, img]` queries attend to their own keys and the extra keys; the parallel MLP is untouched. Without a
    call it calls the original processor, so inactive steps are bit-identical. `Flux2ParallelSelfAttention` calls
    its processor as `(attn, hidden_states, attention_mask, image_rotary_emb, **kwargs)`: the signature keeps that
    order."""

    def __init__(self, base: Any):
        Flux2ParallelSelfAttnProcessor.__init__(self)
        self._setup(base)

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
        kv_cache: Any = None,
        kv_cache_mode: str | None = None,
        num_txt_tokens: int = 0,
        num_ref_tokens: int = 0,
        block_call: BlockCall | None = None,
    ) -> torch.Tensor:
        call = block_call
        if call is None:
            kw = self._base_kwargs(kv_cache=kv_cache, kv_cache_mode=kv_cache_mode, num_txt_tokens=num_txt_tokens,
                                   num_ref_tokens=num_ref_tokens)
            return self.base(attn, hidden_states, attention_mask, image_rotary_emb, **kw)

        hidden_states = attn.to_qkv_mlp_proj(hidden_states)  # [B, L, 3 inner + 2 mlp]
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = hidden_states.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp_hidden_states = torch.split(hidden_states, [local_qkv, hidden_states.shape[-1] - local_qkv], dim=-1)
        query, key, value = qkv.chunk(3, dim=-1)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))  # [B, L, H, Dh]
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states = self._attend(query, key, value, attention_mask, call)  # [B, L, H, Dh]
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        mlp_hidden_states = attn.mlp_act_fn(mlp_hidden_states)
        hidden_states = torch.cat([hidden_states, mlp_hidden_states], dim=-1)
        return attn.to_out(hidden_states)


class Flux2Family(DoubleSingleStreamFamily):
    name = "flux2"
    batched_segments = True  # several references' tokens share one text-path call (positions: per_reference)
    title = "Flux.2"
    transformer_classes = ("Flux2Transformer2DModel",)
    batched_guidance = None  # dev: one (guidance-distilled) call; Klein: separate cond / uncond calls, cache_context
    img_ids_arg = ("img_ids", 3)
    pipeline_classes = ("Flux2Pipeline", "Flux2KleinPipeline", "Flux2KleinInpaintPipeline", "Flux2KleinKVPipeline")
    # a single block's norm has no weights and its modulation comes in as an argument: its attention is everything
    fsdp_children = {"double": ("attn", "ff", "ff_context"), "single": ("attn",)}
    timestep_arg = ("timestep", 2)




    # ------------------------------------------------------------------ calls



    def image_span(self, site, block_args, block_kwargs, grid):
        # both kinds attend over [txt, img]; a single block may get them joined already (then the image is last)
        n = grid[0] * grid[1]
        txt = arg(block_args, block_kwargs, "encoder_hidden_states", 1)
        if txt is not None:
            return int(txt.shape[1]), n
        return int(arg(block_args, block_kwargs, "hidden_states", 0).shape[1]) - n, n

    def check_call(self, args, kwargs):
        mode = arg(args, kwargs, "kv_cache_mode", 9)
        if mode is not None:
            raise TargetError(
                f"Flux.2's reference KV cache (kv_cache_mode={mode!r}, Flux2KleinKVPipeline with reference images) "
                "is not supported by vlhooks injection; call the pipeline without reference images, or use "
                "Flux2KleinPipeline."
            )

    # ------------------------------------------------------------------ text path
    def embed(self, transformer, tokens, mask, site, cache):
        return transformer.context_embedder(tokens)  # [B, N, D]

    @staticmethod
    def _norm(block, site) -> nn.Module:
        return block.norm1_context if site.kind == "double" else block.norm  # LayerNorm, no affine

    def text_norm(self, transformer, site, hidden):
        return self._norm(site.block(transformer), site)(hidden)

    def norm_key(self, transformer, site):
        norm = self._norm(site.block(transformer), site)
        if isinstance(norm, nn.LayerNorm) and norm.weight is None and norm.bias is None:
            return ("flux2.layernorm", tuple(norm.normalized_shape), norm.eps)  # weightless: one for all blocks
        return site.name

    def modulation_module(self, transformer, site):
        return None  # computed once at the top of the transformer; read from the block's arguments

    def modulation(self, call: BlockCall) -> tuple[torch.Tensor, torch.Tensor]:
        """`(shift, scale)` `[R or 1, 1, D]` the block applies to its text stream before attention, from the
        block's own arguments."""
        if call.site.kind == "double":
            mod, sets = arg(call.block_args, call.block_kwargs, "temb_mod_txt", 3), 2  # [B, 6D]
        else:
            mod, sets = arg(call.block_args, call.block_kwargs, "temb_mod", 2), 1  # [B, 3D]
        shift, scale, _ = Flux2Modulation.split(rows_of(mod, call.rows), sets)[0]
        return shift, scale

    def text_input(self, call):
        shift, scale = self.modulation(call)
        x = call.pre_normed
        if x is None:
            x = self.text_norm(call.transformer, call.site, call.embedded)  # [R, N, D]
        return fused_text.modulate(x, scale, shift)  # (1 + scale) * x + shift, the block's roundings

    def kv_linears(self, transformer, site):
        attn = site.attention(transformer)
        if site.kind == "double":
            return attn.add_k_proj, attn.add_v_proj
        (k0, k1), (v0, v1) = _single_kv_rows(attn)
        return FusedRows(attn.to_qkv_mlp_proj, k0, k1), FusedRows(attn.to_qkv_mlp_proj, v0, v1)

    def text_kv(self, call):
        """As `DiTFamily.text_kv`; a single block's K/V are `F.linear` with the fused weight's rows (what its
        `FusedRows` compute, without building them per call). A fused projection that is not a plain Linear (e.g.
        wrapped by a pipeline LoRA) runs whole and its K/V columns are taken."""
        x = self.text_input(call)  # [R, N, D]
        attn = call.site.attention(call.transformer)
        if call.site.kind == "double":
            kv = fused_text.linear_pair(x, attn.add_k_proj, attn.add_v_proj)  # one kernel where it serves
            return self.finish_kv(call, *(kv or (attn.add_k_proj(x), attn.add_v_proj(x))))
        fused = attn.to_qkv_mlp_proj
        (k0, k1), (v0, v1) = _single_kv_rows(attn)
        if type(fused) is nn.Linear:
            w, bias = fused.weight, fused.bias
            bk, bv = (None, None) if bias is None else (bias[k0:k1], bias[v0:v1])
            k, v = fused_text.matmul_pair(x, w[k0:k1], w[v0:v1], bk, bv) or (F.linear(x, w[k0:k1], bk),
                                                                             F.linear(x, w[v0:v1], bv))
        else:
            out = fused(x)
            k, v = out[..., k0:k1], out[..., v0:v1]
        return self.finish_kv(call, k, v)

    def _extra_rope(self, transformer, n: int, device, cache: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """`(cos, sin)` `[N, Dh]` of the extra tokens' positions `(0, 0, 0, j)` (see the module docstring)."""
        key = ("flux2.rope", n, str(device))
        if key in cache:
            return cache[key]
        ids = torch.zeros(n, len(transformer.config.axes_dims_rope), dtype=torch.long, device=device)
        ids[:, -1] = torch.arange(n, device=device)
        rope = transformer.pos_embed(ids)
        if not torch.compiler.is_compiling():
            cache[key] = rope
        return rope

    def finish_kv(self, call, k, v):
        attn = call.site.attention(call.transformer)
        k = k.unflatten(-1, (-1, attn.head_dim))  # [R, N, H, Dh]
        v = v.unflatten(-1, (-1, attn.head_dim))
        norm = attn.norm_added_k if call.site.kind == "double" else attn.norm_k
        rope = per_reference(call, k.shape[1], lambda n: self._extra_rope(call.transformer, n, k.device, call.cache),
                             key=("flux2.rope", str(k.device)))  # (cos, sin) [N, Dh], positions per reference
        fused = fused_text.norm_rope(norm, k, rope[0][:, ::2], rope[1][:, ::2])  # pairs share an angle
        if fused is not None:
            return fused, v
        return apply_rotary_emb(norm(k), rope, sequence_dim=1), v

    # ------------------------------------------------------------------ training objective
    def velocity(self, transformer, latents, sigma, caption, caption_mask=None, pooled=None):
        # the pipeline's latent grid [B, C, H, W] -> tokens [B, HW, C] at (0, h, w, 0); captions at (0, 0, 0, l);
        # Flux.2 has no text attention mask (the pipelines pass padded captions whole), so `caption_mask` is unused
        B, C, H, W = latents.shape
        dev = latents.device
        packed = latents.reshape(B, C, H * W).permute(0, 2, 1)  # Flux2Pipeline._pack_latents
        one = torch.arange(1, device=dev)
        img_ids = torch.cartesian_prod(one, torch.arange(H, device=dev), torch.arange(W, device=dev), one)
        txt_ids = torch.cartesian_prod(one, one, one, torch.arange(caption.shape[1], device=dev))
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((B,), GUIDANCE, device=dev, dtype=torch.float32)
        out = transformer(hidden_states=packed, encoder_hidden_states=caption, timestep=sigma.to(latents.dtype),
                          img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]  # [B, HW, C]
        return out.permute(0, 2, 1).reshape(B, C, H, W)

    def make_processor(self, site, base):
        return Flux2InjectionProcessor(base) if site.kind == "double" else Flux2SingleInjectionProcessor(base)

    # ------------------------------------------------------------------ pipeline
    def encode_latents(self, vae, pixels):
        # Flux2Pipeline._encode_vae_image: the mode, 2x2-patchified, normalised by the VAE's batch-norm statistics
        z = vae.encode(pixels).latent_dist.mode()  # [B, C, h, w]
        B, C, h, w = z.shape
        z = z.view(B, C, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(B, C * 4, h // 2, w // 2)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(z.device, z.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(z.device, z.dtype)
        return (z - mean) / std

    def text_guidance(self, call):
        """Flux2Pipeline's `guidance_scale` is the distilled guidance embedding: one prediction per step, no CFG."""
        return 1.0

    def encode_prompt(self, pipe, prompts, device, max_sequence_length):
        embeds, _ = pipe.encode_prompt(prompts, device=device, max_sequence_length=max_sequence_length)  # [B, L, C]
        return PromptEmbeds(list(embeds.float().cpu()), None)


register_family(Flux2Family())
