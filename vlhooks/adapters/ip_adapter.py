"""`IPAdapter`: the IP-Adapters people already have for Flux.1 and SD3 / SD3.5, as vlhooks adapters.

`vh.import_ip_adapter(target, weights=None, remove=True)` reads one
- from the transformer, where diffusers installed it (`pipe.load_ip_adapter(...)`, or offline
  `transformer._load_ip_adapter_weights(state_dict, low_cpu_mem_usage=False)`): Flux.1's
  `FluxIPAdapterAttnProcessor` on the double blocks with `transformer.encoder_hid_proj`, SD3's
  `SD3IPAdapterJointAttnProcessor2_0` with `transformer.image_proj`; `remove=True` then takes them out again
  (the original processors back, the projection deleted, as diffusers' `unload_ip_adapter` does);
- or from weights as their authors publish them (`weights=` a `.safetensors` file or a state dict; never pickle):
  XLabs' Flux layout (`ip_adapter_proj_model.*`, `double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj.*`),
  diffusers' own `{"image_proj": {...}, "ip_adapter": {...}}` dicts (or the same flattened with those prefixes),
  InstantX's SD3.5 layout (resampler keys `layers.{i}.0.norm1`, ... renamed as diffusers'
  `_convert_ip_adapter_image_proj_to_diffusers` does), and InstantX's Flux layout (`image_proj.proj.{0,2}`,
  `image_proj.norm`, `ip_adapter.{i}.to_{k,v}_ip.weight` for the 19 double then the 38 single blocks).

Kinds (`IPAdapterOptions.kind`) and the placement (`InjectionConfig.placement`) each was trained with:
- `"flux"` (XLabs; diffusers' Flux IP-Adapter): per image, `ImageProjection` (Linear to `T * C`, reshape to `T`
  tokens, LayerNorm); per double block `k = to_k_ip(c)`, `v = to_v_ip(c)` (with bias). Placement
  `"block_output"`, strength = the processor's scale (diffusers loads it at 1.0).
- `"flux_instantx"`: per image, InstantX's `MLPProjModel` (Linear, GELU, Linear to `T * C`, reshape, LayerNorm);
  per block, double and single, `k = RMS(to_k_ip(c))`, `v = RMS(to_v_ip(c))` (no bias; RMSNorm over each head,
  no affine, eps 1e-5). Placement `"pre_rope"`, strength 1.0 (the ComfyUI node's default weight).
- `"sd3"` (InstantX SD3.5-Large): `IPAdapterTimeImageProjection`, a resampler conditioned on the denoiser's own
  timestep (`call.timestep`), so it runs once per denoiser call (shared by the blocks of that call), not once per
  generation; per block `c' = norm_ip(c, t_emb)` (AdaLayerNorm on the resampler's time embedding),
  `k = norm_ip_k(to_k_ip(c'))`, `v = to_v_ip(c')`, and the adapter's own `norm_q` / `norm_k` for the block's raw
  image queries and keys (`image_attention_norms`). Placement `"image_joint"`, strength = the processor's scale
  (diffusers loads it at 0.5).

Features are the image embeddings diffusers takes as `ip_adapter_image_embeds`: Flux `[B, num_images, D_img]`
(`pipe.encode_image(images, device, 1)[None]`; each image becomes `T` tokens and a mask is repeated over them),
SD3 `[B, N, D_img]` (`pipe.encode_image(image, device)`, patch embeddings; no padding: the resampler attends to
every token).

Folder: the image projection's weights under `image_proj.` and each block's under `blocks.<site>.` (diffusers'
own module names below those prefixes) in `adapter_model.safetensors`; the architecture in `IPAdapterOptions`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AdapterError, FeatureError, TargetError
from ..models.base import DiTFamily, Site, rows_of
from .base import Adapter, AdapterConfig, Options, check_state, register_adapter

PLACEMENT = {"flux": "block_output", "flux_instantx": "pre_rope", "sd3": "image_joint"}
FAMILY = {"flux": "flux", "flux_instantx": "flux", "sd3": "sd3"}
PROJ_FIELDS = {
    "flux": ("image_embed_dim", "cross_attention_dim", "num_tokens"),
    "flux_instantx": ("embed_dim", "hidden_dim", "output_dim", "num_tokens"),
    "sd3": ("embed_dim", "output_dim", "hidden_dim", "depth", "dim_head", "heads", "num_queries", "ffn_ratio",
            "timestep_in_dim", "timestep_flip_sin_to_cos", "timestep_freq_shift"),
}
SOURCES = ("diffusers", "xlabs", "instantx")
DEFAULT_SCALE = {"flux": 1.0, "flux_instantx": 1.0, "sd3": 0.5}  # what diffusers / the ComfyUI node load with
LAYOUTS = ("XLabs' Flux ip_adapter.safetensors (ip_adapter_proj_model.*, double_blocks.{i}.processor.*); "
           "diffusers' {'image_proj': ..., 'ip_adapter': ...} (nested, or flat with those prefixes); InstantX's "
           "SD3.5 and Flux layouts (image_proj.* + ip_adapter.{i}.*)")


def _key(site_name: str) -> str:
    return site_name.replace(".", "_")


# ---------------------------------------------------------------------------------------------------- options
@dataclass
class IPAdapterOptions(Options):
    """`kind`: `"flux"` | `"flux_instantx"` | `"sd3"` (see the module docstring). `image_proj`: the image
    projection's architecture (`PROJ_FIELDS[kind]`). `blocks`: per site `[in_features, out_features]` of its
    `to_k_ip` / `to_v_ip`. `head_dim`: the DiT's attention head width. `time_dim` (sd3): the width of the
    resampler's time embedding that `norm_ip` reads. `source`: the layout the weights were read from."""

    kind: str
    image_proj: dict
    blocks: dict
    head_dim: int
    time_dim: int | None = None
    source: str = "diffusers"

    def __post_init__(self) -> None:
        if self.kind not in PLACEMENT:
            raise AdapterError(f"ip_adapter kind must be one of {sorted(PLACEMENT)}, got {self.kind!r}.")
        if self.source not in SOURCES:
            raise AdapterError(f"ip_adapter source must be one of {SOURCES}, got {self.source!r}.")
        want = set(PROJ_FIELDS[self.kind])
        if not isinstance(self.image_proj, dict) or set(self.image_proj) != want:
            raise AdapterError(f"ip_adapter option image_proj for kind {self.kind!r} needs exactly {sorted(want)}, "
                               f"got {self.image_proj!r}.")
        for k, v in self.image_proj.items():
            ok = isinstance(v, bool) if k == "timestep_flip_sin_to_cos" else (
                isinstance(v, int) and not isinstance(v, bool) and (v >= 0 if k == "timestep_freq_shift" else v > 0))
            if not ok:
                raise AdapterError(f"ip_adapter option image_proj[{k!r}] = {v!r} is not valid.")
        if not isinstance(self.blocks, dict) or not self.blocks or not all(
                isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and x > 0 for x in v)
                for v in self.blocks.values()):
            raise AdapterError(f"ip_adapter option blocks must map sites to [in, out], got {self.blocks!r}.")
        if not isinstance(self.head_dim, int) or self.head_dim < 1:
            raise AdapterError(f"ip_adapter option head_dim must be a positive int, got {self.head_dim!r}.")
        if (self.kind == "sd3") != (self.time_dim is not None):
            raise AdapterError("ip_adapter option time_dim is set for (and only for) kind 'sd3'.")


# ---------------------------------------------------------------------------------------------------- modules
class MLPProjection(nn.Module):
    """InstantX's Flux `MLPProjModel`: `[M, D]` -> `[M, T, C]` = LayerNorm(reshape(Linear(GELU(Linear(x)))))."""

    def __init__(self, embed_dim: int, hidden_dim: int, output_dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens, self.output_dim = num_tokens, output_dim
        self.proj = nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.GELU(),
                                  nn.Linear(hidden_dim, output_dim * num_tokens))
        self.norm = nn.LayerNorm(output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return self.norm(x.reshape(-1, self.num_tokens, self.output_dim))


class KVBlock(nn.Module):
    """One Flux block's IP K/V: `to_k_ip` / `to_v_ip` (XLabs: with bias; InstantX: without, then an RMSNorm over
    each head with no affine, eps 1e-5)."""

    def __init__(self, in_features: int, out_features: int, head_dim: int, instantx: bool):
        super().__init__()
        from diffusers.models.normalization import RMSNorm

        self.to_k_ip = nn.Linear(in_features, out_features, bias=not instantx)
        self.to_v_ip = nn.Linear(in_features, out_features, bias=not instantx)
        self.norm_k = RMSNorm(head_dim, eps=1e-5, elementwise_affine=False) if instantx else None
        self.norm_v = RMSNorm(head_dim, eps=1e-5, elementwise_affine=False) if instantx else None


class SD3Block(nn.Module):
    """One SD3 block's IP-Adapter weights, named as in diffusers' `SD3IPAdapterJointAttnProcessor2_0`."""

    def __init__(self, ip_dim: int, out_features: int, head_dim: int, time_dim: int):
        super().__init__()
        from diffusers.models.normalization import AdaLayerNorm, RMSNorm

        self.norm_ip = AdaLayerNorm(time_dim, output_dim=ip_dim * 2, norm_eps=1e-6, chunk_dim=1)
        self.to_k_ip = nn.Linear(ip_dim, out_features, bias=False)
        self.to_v_ip = nn.Linear(ip_dim, out_features, bias=False)
        self.norm_q = RMSNorm(head_dim, 1e-6)
        self.norm_k = RMSNorm(head_dim, 1e-6)
        self.norm_ip_k = RMSNorm(head_dim, 1e-6)


def _image_projection(kind: str, arch: dict) -> nn.Module:
    from diffusers.models.embeddings import ImageProjection, IPAdapterTimeImageProjection

    if kind == "flux":
        return ImageProjection(image_embed_dim=arch["image_embed_dim"], cross_attention_dim=arch["cross_attention_dim"],
                               num_image_text_embeds=arch["num_tokens"])
    if kind == "flux_instantx":
        return MLPProjection(**arch)
    return IPAdapterTimeImageProjection(**arch)


# ---------------------------------------------------------------------------------------------------- adapter
@register_adapter("ip_adapter")
class IPAdapter(Adapter):
    """An imported IP-Adapter: its image projection (`embed`, or per call for SD3's timestep-conditioned
    resampler) and its per-block IP K/V (`kv`), for the placement it was trained with."""

    options_class = IPAdapterOptions
    text_path = False  # its K/V come from its own projections, never the block's text path
    tokenwise = False  # the SD3.5 layout resamples the image tokens together

    def __init__(self, config: AdapterConfig):
        super().__init__(config)
        o: IPAdapterOptions = config.options
        self.kind = o.kind
        self.image_proj = _image_projection(o.kind, o.image_proj)
        if o.kind == "sd3":
            blocks = {_key(s): SD3Block(i, out, o.head_dim, o.time_dim) for s, (i, out) in o.blocks.items()}
        else:
            instantx = o.kind == "flux_instantx"
            blocks = {_key(s): KVBlock(i, out, o.head_dim, instantx) for s, (i, out) in o.blocks.items()}
        self.blocks = nn.ModuleDict(blocks)

    @property
    def placement(self) -> str:
        """The `InjectionConfig.placement` these weights were trained for."""
        return PLACEMENT[self.kind]

    @classmethod
    def create(cls, transformer, feature_width=None, blocks="all", weights=None) -> "IPAdapter":
        """An IP-Adapter is imported, not initialised: `weights` (a `.safetensors` path or a state dict in a
        published layout) are read as `import_ip_adapter(transformer, weights=weights)` reads them, e.g. to
        fine-tune them (`model.adapter: {type: ip_adapter, weights: ...}`); `blocks` is the injection's business."""
        if weights is None:
            raise AdapterError("an ip_adapter adapter is imported, not created from nothing: give its weights "
                               "(create_adapter('ip_adapter', transformer, weights='ip_adapter.safetensors')), or use "
                               "vh.import_ip_adapter(pipe) for the IP-Adapter diffusers installed.")
        adapter = import_ip_adapter(transformer, weights=weights)
        if feature_width is not None and int(feature_width) != adapter.config.feature_width:
            raise AdapterError(f"these IP-Adapter weights take features of width {adapter.config.feature_width}, not "
                               f"{feature_width}; drop feature_width or give features of that width.")
        return adapter

    @classmethod
    def from_config(cls, config: AdapterConfig) -> "IPAdapter":
        with torch.device("meta"):  # the weights come next (`load_weights` assigns them): no allocation twice
            return cls(config)

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        own = self.state_dict()
        check_state(state, {k: tuple(v.shape) for k, v in own.items()}, self.adapter_type)
        self.load_state_dict(state, strict=True, assign=True)

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # ------------------------------------------------------------------ projector protocol
    def check_target(self, family: DiTFamily, transformer: nn.Module, sites: list[Site]) -> None:
        super().check_target(family, transformer, sites)
        o: IPAdapterOptions = self.config.options
        for s in sites:
            attn = s.attention(transformer)
            width = attn.to_q.out_features
            if o.blocks[s.name][1] != width or width // attn.heads != o.head_dim:
                raise AdapterError(
                    f"this IP-Adapter's {s.name} weights are {o.blocks[s.name][1]} wide with heads of {o.head_dim}, "
                    f"but the model's attention there is {width} wide with heads of {width // attn.heads}; it was "
                    "made for another model size.")

    def embed_key(self, family, site):
        # Flux layouts: the K/V are timestep-free, so a site's embedding is its K/V, cached per generation like
        # every embedding (diffusers' processors recompute them at every step); SD3: one embedding for every site
        return family.embed_key(site) if self.kind == "sd3" else ("ip_adapter.kv", site.name)

    def embed(self, family, transformer, tokens, mask, site, cache):
        """SD3: the image tokens as they are. Flux layouts: `site`'s IP K/V `[B, n T, 2 H Dh]` (K then V)."""
        if self.kind == "sd3":
            return tokens  # [B, N, D_img]: the resampler needs the call's timestep, so it runs in `kv`
        B, n = tokens.shape[:2]
        c = self.image_proj(tokens.reshape(B * n, -1).to(self._dtype()))  # [B n, T, C], one image at a time
        x = c.reshape(B, n * c.shape[1], c.shape[2])  # [B, n T, C]
        blk, d = self.blocks[_key(site.name)], self.config.options.head_dim
        k = blk.to_k_ip(x).unflatten(-1, (-1, d))  # [B, n T, H, Dh]
        v = blk.to_v_ip(x).unflatten(-1, (-1, d))
        if blk.norm_k is not None:
            k, v = blk.norm_k(k), blk.norm_v(v)
        return torch.cat([k.flatten(-2), v.flatten(-2)], dim=-1).to(tokens.dtype)  # [B, n T, 2 H Dh]

    def output_mask(self, mask):
        if mask is None:
            return None
        if self.kind == "sd3":
            if not bool(mask.all()):
                raise FeatureError("the SD3 IP-Adapter's resampler attends to every feature token; pass features "
                                   "without padding (mask=None), one reference image per row.")
            return None
        return mask.repeat_interleave(self.config.options.image_proj["num_tokens"], dim=1)  # [B, n T]

    def _check_call(self, call) -> None:
        if call.placement != self.placement or call.mode != "decoupled":
            raise AdapterError(
                f"this IP-Adapter ({self.kind}) was trained for placement={self.placement!r} in decoupled mode, "
                f"not placement={call.placement!r}, mode={call.mode!r}; use vh.InjectionConfig(mode='decoupled', "
                f"placement={self.placement!r}, ...) or config=None (the adapter's own).")

    def _resampled(self, call) -> tuple[torch.Tensor, torch.Tensor]:
        """SD3: the resampler's tokens `[R, T, C]` and time embedding `[R, C_t]` for this call's rows, computed once
        per denoiser call (the blocks of one call share rows and timestep)."""
        scratch = None if torch.compiler.is_compiling() else call.scratch
        key = ("ip_adapter.resampled", None if call.rows is None else tuple(call.rows))
        if scratch is not None and key in scratch:
            return scratch[key]
        if call.timestep is None:
            raise AdapterError("the SD3 IP-Adapter needs the denoiser's timestep (BlockCall.timestep); this vlhooks "
                               "core does not provide it.")
        x = call.embedded.to(self._dtype())  # [R, N, D_img]
        t = rows_of(call.timestep, call.rows).to(x.device)  # [R] or [1]
        out = self.image_proj(x, t)
        if scratch is not None:
            scratch[key] = out
        return out

    def kv(self, call):
        self._check_call(call)
        blk = self.blocks[_key(call.site.name)]
        d, dtype = self.config.options.head_dim, call.embedded.dtype
        if self.kind == "sd3":
            c, temb = self._resampled(call)
            x = blk.norm_ip(c, temb=temb)  # [R, T, C]
            k = blk.norm_ip_k(blk.to_k_ip(x).unflatten(-1, (-1, d)))  # [R, T, H, Dh]
            v = blk.to_v_ip(x).unflatten(-1, (-1, d))
            return k.to(dtype), v.to(dtype)
        k, v = call.embedded.chunk(2, dim=-1)  # each [R, N, H Dh]: this site's embedding (`embed`)
        return k.unflatten(-1, (-1, d)), v.unflatten(-1, (-1, d))  # [R, N, H, Dh]

    def image_attention_norms(self, call):
        """Placement `"image_joint"`: the adapter's own norms of the block's raw image queries and keys."""
        blk = self.blocks[_key(call.site.name)]
        return blk.norm_q, blk.norm_k


# ---------------------------------------------------------------------------------------------------- reading
@dataclass
class _Read:
    """An IP-Adapter as read, in diffusers' names: the image projection's state, each site's state."""

    kind: str
    source: str
    proj_arch: dict
    proj_state: dict[str, torch.Tensor]
    block_states: dict[str, dict[str, torch.Tensor]]  # site name -> its state
    scales: dict[str, float]  # site name -> strength
    time_dim: int | None = None


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        raise AdapterError(f"{path} is a folder; pass the IP-Adapter's weight file (e.g. "
                           f"{path}/ip_adapter.safetensors).")
    if not path.is_file():
        raise AdapterError(f"{path} does not exist; pass the path of the IP-Adapter's .safetensors file.")
    if path.suffix != ".safetensors":
        raise AdapterError(
            f"{path} is not a .safetensors file. vlhooks never unpickles weights; convert it once where you trust "
            "the file (`sd = torch.load(path, weights_only=True)`; `safetensors.torch.save_file({f'{g}.{k}': v for g "
            "in sd for k, v in sd[g].items()}, 'ip_adapter.safetensors')`), or pass the state dict: weights=sd.")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{path} is corrupt or not a safetensors file ({e}).") from None


def _split(state: dict) -> tuple[dict, dict, str]:
    """Any published layout -> (image_proj, ip_adapter) dicts in diffusers' names, and the source."""
    if not isinstance(state, dict) or not state:
        raise AdapterError(f"weights must be a path to a .safetensors file or a non-empty state dict, got "
                           f"{type(state).__name__}.")
    if set(state) == {"image_proj", "ip_adapter"} and all(isinstance(v, dict) for v in state.values()):
        return dict(state["image_proj"]), dict(state["ip_adapter"]), "diffusers"
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise AdapterError(f"weights hold {bad[:3]}, not tensors by name; known layouts: {LAYOUTS}.")
    proj, ip, source = {}, {}, "diffusers"
    if any(k.startswith(("ip_adapter_proj_model.", "double_blocks.")) for k in state):
        source = "xlabs"  # as diffusers' FluxIPAdapterMixin.load_ip_adapter converts it
    for k, v in state.items():
        head, _, rest = k.partition(".")
        if head in ("ip_adapter_proj_model", "image_proj"):
            proj[rest] = v
        elif head in ("double_blocks", "ip_adapter"):
            ip[rest.replace("ip_adapter_double_stream_k_proj", "to_k_ip")
                   .replace("ip_adapter_double_stream_v_proj", "to_v_ip").replace("processor.", "")] = v
        else:
            raise AdapterError(f"weights have a key {k!r} that no known IP-Adapter layout has; known layouts: "
                               f"{LAYOUTS}.")
    if not proj or not ip:
        raise AdapterError(f"weights lack {'an image projection' if not proj else 'per-block IP weights'}; known "
                           f"layouts: {LAYOUTS}.")
    return proj, ip, source


def _per_index(ip: dict) -> dict[int, dict[str, torch.Tensor]]:
    out: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in ip.items():
        idx, _, name = k.partition(".")
        if not idx.isdigit() or not name:
            raise AdapterError(f"per-block IP weight {k!r} is not named '<layer index>.<name>'; known layouts: "
                               f"{LAYOUTS}.")
        out.setdefault(int(idx), {})[name] = v
    return dict(sorted(out.items()))


_SD3_RENAMES = (("0.norm1", "ln0"), ("0.norm2", "ln1"), ("0.to_q", "attn.to_q"), ("0.to_kv", "attn.to_kv"),
                ("0.to_out", "attn.to_out.0"), ("1.0", "adaln_norm"), ("1.1", "ff.net.0.proj"), ("1.3", "ff.net.2"),
                ("2.1", "adaln_proj"))


def _sd3_proj_names(proj: dict) -> tuple[dict, bool]:
    """InstantX's SD3.5 resampler names -> diffusers' (`_convert_ip_adapter_image_proj_to_diffusers`)."""
    out, renamed = {}, False
    for key, v in proj.items():
        m = re.match(r"layers\.(\d+)\.(.*)$", key)
        if m:
            i, rest = m.groups()
            for old, new in _SD3_RENAMES:
                if rest.startswith(old + "."):
                    rest, renamed = new + rest[len(old):], True
                    break
            key = f"layers.{i}.{rest}"
        out[key] = v
    return out, renamed


def _shape(state: dict, name: str, what: str) -> tuple[int, ...]:
    if name not in state:
        raise AdapterError(f"{what} lacks {name!r} (it has {sorted(state)[:6]}); known layouts: {LAYOUTS}.")
    return tuple(state[name].shape)


def _from_weights(state: Any, family: DiTFamily, transformer: nn.Module) -> _Read:
    """Published weights -> `_Read` for `transformer`, with every index mapped to a site."""
    if isinstance(state, (str, os.PathLike)):
        state = _load_file(Path(state))
    proj, ip, source = _split(state)
    if "latents" in proj:
        kind = "sd3"
        proj, renamed = _sd3_proj_names(proj)
        source = "instantx" if renamed else source
    elif "proj.0.weight" in proj:
        kind, source = "flux_instantx", "instantx"
    elif "proj.weight" in proj or "image_embeds.weight" in proj:
        kind = "flux"
        proj = {k.replace("proj", "image_embeds") if k.startswith("proj.") else k: v for k, v in proj.items()}
    else:
        raise AdapterError(f"the image projection's keys {sorted(proj)[:6]} match no known IP-Adapter layout; known "
                           f"layouts: {LAYOUTS}.")
    if FAMILY[kind] != family.name:
        raise AdapterError(f"these are {'SD3' if kind == 'sd3' else 'Flux.1'} IP-Adapter weights; the target is a "
                           f"{type(transformer).__name__}. Import them into a {'SD3' if kind == 'sd3' else 'Flux'} "
                           "pipeline.")
    layers = _per_index(ip)
    sites = family.sites(transformer)
    targets: list[str]
    if kind == "flux":  # diffusers numbers the double blocks
        targets = [s.name for s in sites if s.kind == "double"]
    elif kind == "flux_instantx":  # 0..18 the double blocks, 19..56 the single blocks: vlhooks' site indices
        targets = [s.name for s in sites]
    else:  # diffusers numbers every attention processor of the blocks: attn, then attn2 of dual-attention blocks
        targets = []
        for s in sites:
            targets.append(s.name)
            if getattr(s.block(transformer), "attn2", None) is not None:
                targets.append(f"{s.name}.attn2")
    beyond = [i for i in layers if i >= len(targets)]
    if beyond:
        raise AdapterError(f"the weights hold IP layers up to index {max(layers)} but this "
                           f"{type(transformer).__name__} has {len(targets)} such layers; they were made for a "
                           "bigger model.")
    blocks = {targets[i]: st for i, st in layers.items()}
    _refuse_attn2(list(blocks))
    if kind == "flux":
        c = _shape(proj, "norm.weight", "the image projection")[0]
        out = _shape(proj, "image_embeds.weight", "the image projection")
        arch = {"image_embed_dim": out[1], "cross_attention_dim": c, "num_tokens": max(1, out[0] // c)}
    elif kind == "flux_instantx":
        c = _shape(proj, "norm.weight", "the image projection")[0]
        p0, p2 = _shape(proj, "proj.0.weight", "the image projection"), _shape(proj, "proj.2.weight",
                                                                              "the image projection")
        arch = {"embed_dim": p0[1], "hidden_dim": p0[0], "output_dim": c, "num_tokens": max(1, p2[0] // c)}
    else:  # as diffusers' SD3 loader: dim_head 64 (the weights do not say), timestep embedding defaults
        p_in, p_out = _shape(proj, "proj_in.weight", "the resampler"), _shape(proj, "proj_out.weight", "the resampler")
        q = _shape(proj, "layers.0.attn.to_q.weight", "the resampler")
        ff = _shape(proj, "layers.0.ff.net.0.proj.weight", "the resampler")
        depth = len({k.split(".")[1] for k in proj if k.startswith("layers.")})
        arch = {"embed_dim": p_in[1], "output_dim": p_out[0], "hidden_dim": p_in[0], "depth": depth, "dim_head": 64,
                "heads": max(1, q[0] // 64), "num_queries": _shape(proj, "latents", "the resampler")[1],
                "ffn_ratio": max(1, ff[0] // p_in[0]),
                "timestep_in_dim": _shape(proj, "time_embedding.linear_1.weight", "the resampler")[1],
                "timestep_flip_sin_to_cos": True, "timestep_freq_shift": 0}
    time_dim = None
    if kind == "sd3":
        time_dim = _shape(next(iter(blocks.values())), "norm_ip.linear.weight", "the per-block IP weights")[1]
    scale = DEFAULT_SCALE[kind]
    return _Read(kind, source, arch, proj, blocks, {s: scale for s in blocks}, time_dim)


def _refuse_attn2(names: list[str]) -> None:
    dual = [n for n in names if n.endswith(".attn2")]
    if dual:
        raise AdapterError(
            f"this IP-Adapter has weights for {dual[:3]}, the image-only attention of SD3.5's dual-attention blocks "
            "(SD3.5 Medium). vlhooks injects into each block's joint attention only; use an IP-Adapter made for a "
            "model without dual attention (InstantX's is for SD3.5 Large).")


def _proc_scale(scale: Any) -> float:
    return float(scale[0] if isinstance(scale, (list, tuple)) else scale)


def _installed(family: DiTFamily, transformer: nn.Module, clone: bool) -> _Read:
    """The IP-Adapter diffusers installed on `transformer`, or an `AdapterError` naming how to get one."""
    take = (lambda t: t.detach().clone()) if clone else (lambda t: t.detach())
    name = type(transformer).__name__
    none = (f"this {name} has no IP-Adapter installed: load one first (pipe.load_ip_adapter(...), or offline "
            "transformer._load_ip_adapter_weights(state_dict, low_cpu_mem_usage=False)), or pass the weight file "
            "itself: vh.import_ip_adapter(pipe, weights='ip_adapter.safetensors').")
    sites = family.sites(transformer)
    if family.name == "flux":
        from diffusers.models.embeddings import ImageProjection
        from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

        procs = {s.name: s.attention(transformer).processor for s in sites}
        procs = {n: p for n, p in procs.items() if isinstance(p, FluxIPAdapterAttnProcessor)}
        proj = getattr(transformer, "encoder_hid_proj", None)
        if not procs or proj is None:
            raise AdapterError(none)
        layers = list(getattr(proj, "image_projection_layers", []))
        counts = {len(p.to_k_ip) for p in procs.values()}
        if len(layers) != 1 or counts != {1}:
            raise AdapterError(f"this {name} holds {max(len(layers), *counts)} IP-Adapters (pipe.load_ip_adapter with "
                               "a list); vlhooks imports one: load the one you want alone, then import it.")
        layer = layers[0]
        if not isinstance(layer, ImageProjection):
            raise AdapterError(f"this {name}'s IP image projection is a {type(layer).__name__}; vlhooks imports the "
                               "ImageProjection of Flux IP-Adapters (XLabs).")
        arch = {"image_embed_dim": layer.image_embeds.in_features,
                "cross_attention_dim": layer.norm.normalized_shape[0], "num_tokens": int(layer.num_image_text_embeds)}
        blocks = {n: {"to_k_ip.weight": take(p.to_k_ip[0].weight), "to_k_ip.bias": take(p.to_k_ip[0].bias),
                      "to_v_ip.weight": take(p.to_v_ip[0].weight), "to_v_ip.bias": take(p.to_v_ip[0].bias)}
                  for n, p in procs.items()}
        return _Read("flux", "diffusers", arch, {k: take(v) for k, v in layer.state_dict().items()}, blocks,
                     {n: _proc_scale(p.scale) for n, p in procs.items()})
    if family.name == "sd3":
        from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
        from diffusers.models.embeddings import IPAdapterTimeImageProjection

        procs, dual = {}, []
        for s in sites:
            block = s.block(transformer)
            if isinstance(s.attention(transformer).processor, SD3IPAdapterJointAttnProcessor2_0):
                procs[s.name] = s.attention(transformer).processor
            attn2 = getattr(block, "attn2", None)
            if attn2 is not None and isinstance(attn2.processor, SD3IPAdapterJointAttnProcessor2_0):
                dual.append(f"{s.name}.attn2")
        proj = getattr(transformer, "image_proj", None)
        if (not procs and not dual) or proj is None:
            raise AdapterError(none)
        _refuse_attn2(dual)
        if not isinstance(proj, IPAdapterTimeImageProjection):
            raise AdapterError(f"this {name}'s image_proj is a {type(proj).__name__}; vlhooks imports SD3's "
                               "IPAdapterTimeImageProjection.")
        attn = proj.layers[0].attn
        arch = {"embed_dim": proj.proj_in.in_features, "output_dim": proj.proj_out.out_features,
                "hidden_dim": proj.proj_in.out_features, "depth": len(proj.layers),
                "dim_head": attn.to_q.out_features // attn.heads, "heads": attn.heads,
                "num_queries": proj.latents.shape[1],
                "ffn_ratio": proj.layers[0].ff.net[0].proj.out_features // proj.proj_in.out_features,
                "timestep_in_dim": proj.time_proj.num_channels,
                "timestep_flip_sin_to_cos": bool(proj.time_proj.flip_sin_to_cos),
                "timestep_freq_shift": int(proj.time_proj.downscale_freq_shift)}
        blocks = {n: {k: take(v) for k, v in p.state_dict().items()} for n, p in procs.items()}
        time_dim = next(iter(procs.values())).norm_ip.linear.in_features
        return _Read("sd3", "diffusers", arch, {k: take(v) for k, v in proj.state_dict().items()}, blocks,
                     {n: float(p.scale) for n, p in procs.items()}, time_dim)
    raise AdapterError(f"vlhooks imports IP-Adapters of Flux.1 and SD3 / SD3.5, not of {name}.")


def _uninstall(family: DiTFamily, transformer: nn.Module) -> None:
    """Take diffusers' IP-Adapter out again, as its `unload_ip_adapter` does: the plain processors back (keeping
    an attention backend set on them), the image projection deleted, `config.encoder_hid_dim_type` reset."""
    if family.name == "flux":
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxIPAdapterAttnProcessor

        plain, ip, proj = FluxAttnProcessor, FluxIPAdapterAttnProcessor, "encoder_hid_proj"
    else:
        from diffusers.models.attention_processor import JointAttnProcessor2_0, SD3IPAdapterJointAttnProcessor2_0

        plain, ip, proj = JointAttnProcessor2_0, SD3IPAdapterJointAttnProcessor2_0, "image_proj"
    for s in family.sites(transformer):
        attn = s.attention(transformer)
        if isinstance(attn.processor, ip):
            new = plain()
            for a in ("_attention_backend", "_parallel_config"):
                if a in vars(attn.processor):
                    setattr(new, a, vars(attn.processor)[a])
            attn.set_processor(new)
    if hasattr(transformer, proj):
        delattr(transformer, proj)
    if family.name == "flux":
        transformer.config.encoder_hid_dim_type = None  # as diffusers' unload_ip_adapter


def _build(read: _Read, family: DiTFamily, transformer: nn.Module) -> IPAdapter:
    """An `IPAdapter` holding `read`'s tensors (assigned, not copied), after checking every name and shape."""
    from ..config import InjectionConfig

    sites = {s.name: s for s in family.sites(transformer)}
    head_dim = None
    blocks = {}
    for name, st in read.block_states.items():
        attn = sites[name].attention(transformer)
        width, head_dim = attn.to_q.out_features, attn.to_q.out_features // attn.heads
        k = st.get("to_k_ip.weight")
        if k is None or k.ndim != 2:
            raise AdapterError(f"the IP weights of {name} lack a 2-D to_k_ip.weight (they have {sorted(st)}); known "
                               f"layouts: {LAYOUTS}.")
        if k.shape[0] != width:
            raise AdapterError(
                f"{name}'s to_k_ip.weight is {list(k.shape)}, but this {type(transformer).__name__}'s attention is "
                f"{width} wide, so it needs [{width}, C]: the weights were made for another model size.")
        blocks[name] = [int(k.shape[1]), int(k.shape[0])]
    opts = IPAdapterOptions(read.kind, read.proj_arch, blocks, head_dim, read.time_dim, read.source)
    width = family.caption_width(transformer)
    config = AdapterConfig("ip_adapter", type(transformer).__name__, _feature_width(read), width, opts,
                           sites=[n for n in sites if n in blocks])
    adapter = IPAdapter.from_config(config)
    state = {f"image_proj.{k}": v for k, v in read.proj_state.items()}
    for name, st in read.block_states.items():
        state.update({f"blocks.{_key(name)}.{k}": v for k, v in st.items()})
    expected = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise AdapterError(f"these IP-Adapter weights do not fit a {read.kind} IP-Adapter: missing {missing[:4]}, "
                           f"unexpected {unexpected[:4]}; known layouts: {LAYOUTS}.")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise AdapterError(f"IP-Adapter weight {k} is {list(state[k].shape)}, but the architecture the other "
                               f"weights and the model give ({read.kind}: {read.proj_arch}) needs {list(shape)}; the "
                               "file is damaged or mixes two models.")
        if not state[k].is_floating_point() or not bool(torch.isfinite(state[k]).all()):
            raise AdapterError(f"IP-Adapter weight {k} is not finite floating point; the file is damaged.")
    adapter.load_state_dict(state, strict=True, assign=True)
    indices = [sites[n].index for n in config.sites]
    scales = {sites[n].index: read.scales[n] for n in config.sites}
    scale: float | dict = scales[indices[0]] if len(set(scales.values())) == 1 else scales
    config.injection = InjectionConfig(blocks=indices, mode="decoupled", placement=PLACEMENT[read.kind],
                                       scale=scale).to_dict()
    return adapter


def _feature_width(read: _Read) -> int:
    a = read.proj_arch
    return int(a["image_embed_dim"] if read.kind == "flux" else a["embed_dim"])


def import_ip_adapter(target: Any, weights: Any = None, remove: bool = True) -> IPAdapter:
    """A vlhooks adapter from a Flux.1 or SD3 / SD3.5 IP-Adapter (see the module docstring for the layouts).

    Args:
        target: a `FluxPipeline` / `StableDiffusion3Pipeline` (or any pipeline of those transformers), or the
            transformer itself.
        weights: None reads the IP-Adapter diffusers installed on the transformer; else a `.safetensors` path or a
            state dict in a published layout (nothing is installed on the model).
        remove: with `weights=None`, take diffusers' IP-Adapter out of the model (its plain processors back, the
            image projection deleted), so that `vh.inject` with the returned adapter reproduces it; False leaves it
            installed and gives the adapter its own copy of the weights.

    Returns:
        An `IPAdapter` whose `config.injection` is diffusers' placement and scales (Flux: decoupled, placement
        `"block_output"`, the double blocks; InstantX Flux: `"pre_rope"`, every block; SD3: `"image_joint"`).
        Its features are the image embeddings diffusers takes as `ip_adapter_image_embeds`. diffusers' pipelines
        also give their unconditional branch an IP input (SD3: zero embeddings; Flux true CFG: a black image's);
        vlhooks leaves unconditional rows alone unless `negative_features` are given (pass the same to match).

    Example:
        >>> pipe.load_ip_adapter("XLabs-AI/flux-ip-adapter", weight_name="ip_adapter.safetensors")
        >>> embeds = pipe.encode_image(image, "cuda", 1)[None]       # [1, 1, 768]
        >>> adapter = vh.import_ip_adapter(pipe)
        >>> with vh.inject(pipe, vh.VLFeatures(embeds), vh.InjectionConfig(mode="decoupled",
        ...                placement="block_output", blocks=[0, 1, 2], window=(0.0, 0.6)), adapter=adapter):
        ...     image = pipe(prompt).images[0]
        >>> adapter.save("flux-ip-xlabs")                             # vh.load_adapter("flux-ip-xlabs")
    """
    from ..injection import get_injection, resolve_target
    from ..models import family_for

    transformer, _ = resolve_target(target)
    family = family_for(transformer)
    if family.name not in ("flux", "sd3"):
        raise AdapterError(f"vlhooks imports IP-Adapters of Flux.1 and SD3 / SD3.5, not of "
                           f"{type(transformer).__name__}.")
    if get_injection(transformer) is not None:
        raise TargetError(f"{type(transformer).__name__} is patched by vlhooks; remove that injection "
                          "(handle.remove()) before importing an IP-Adapter from it.")
    if weights is None:
        read = _installed(family, transformer, clone=not remove)
        adapter = _build(read, family, transformer)  # every check is done: only now is the model changed
        if remove:
            _uninstall(family, transformer)
        return adapter.eval()
    read = _from_weights(weights, family, transformer)
    adapter = _build(read, family, transformer)
    p = next(transformer.parameters())
    return adapter.to(device=p.device, dtype=p.dtype).eval()
