"""`ProjectionAdapter`: features of any width -> the DiT's caption width; the block's own text path does the rest.

Kinds:
- `linear`: one Linear. Width equal to the caption width: initialised to the identity (exactly zero-shot).
- `mlp`: `skip(x) + W2 gelu(W1 LN(x))` with `W2` zero-initialised; `skip` is the identity when widths are equal
  (exactly zero-shot at step 0), else a Linear.
- `mix_depth` (linear and mlp kinds): that many self-attention layers over one reference's tokens before the map,
  `x + out(attn(LN(x)))` with `out` zero-initialised (step 0 is still exactly zero-shot): the map then reads every
  token of the reference at once, as a probe of the features does, instead of each token on its own.
- `codes` (linear and mlp kinds): a codebook bottleneck beside the map. A router reads all `code_tokens` tokens of a
  reference at once (flattened, as a linear probe of the features does) and picks a soft mix of `codes` learned
  token sets `[code_tokens, C]`, added to the map's output. The codebook starts at zero (step 0 is still exactly
  zero-shot); trained, each code is one shared answer for every reference the router sends to it.
- `resampler`: `num_tokens` learned queries cross-attending to the features (IP-Adapter-Plus style). It changes the
  token count, so no zero-shot exists to reproduce; queries start at N(0, 0.02^2) like IP-Adapter-Plus.
Where the feature width differs from the caption width, zero-shot does not exist either: the Linear layers start
from PyTorch's default (Kaiming-uniform) initialisation with zero bias.
"""

from __future__ import annotations

import torch
from torch import nn

from dataclasses import dataclass

from ..errors import AdapterError
from .base import Adapter, AdapterConfig, Options, register_adapter

KINDS = ("linear", "mlp", "resampler")


@dataclass
class ProjectionOptions(Options):
    """`kind`: `linear` | `mlp` | `resampler`. `hidden`: the mlp's hidden width (None: twice the caption width).
    `num_tokens`, `depth`, `heads`: the resampler's learned queries, layers and attention heads. `mix_depth`:
    self-attention layers over the reference's tokens before a linear or mlp map (`heads` heads each). `codes`,
    `code_tokens`: a codebook of that many learned token sets and the reference token count its router reads (0
    codes: none)."""

    kind: str = "linear"
    hidden: int | None = None
    num_tokens: int = 16
    depth: int = 2
    heads: int = 4
    mix_depth: int = 0
    codes: int = 0
    code_tokens: int = 17

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise AdapterError(f"projection kind must be one of {KINDS}, got {self.kind!r}.")
        for k in ("num_tokens", "depth", "heads") + (("hidden",) if self.hidden is not None else ()):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise AdapterError(f"projection option {k} must be a positive int, got {v!r}.")
        if not isinstance(self.mix_depth, int) or isinstance(self.mix_depth, bool) or self.mix_depth < 0:
            raise AdapterError(f"projection option mix_depth must be an int >= 0, got {self.mix_depth!r}.")
        for k in ("codes", "code_tokens"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if k == "codes" else 1):
                raise AdapterError(f"projection option {k} must be an int >= {0 if k == 'codes' else 1}, got {v!r}.")
        if self.codes and self.kind == "resampler":
            raise AdapterError("projection option codes applies to the linear and mlp kinds (set codes: 0 or "
                               "kind: mlp).")
        if self.mix_depth and self.kind == "resampler":
            raise AdapterError("projection option mix_depth applies to the linear and mlp kinds; the resampler "
                               "mixes tokens already (set mix_depth: 0 or kind: mlp).")


class _TokenMixer(nn.Module):
    """`depth` pre-norm self-attention layers over one reference's tokens, each `x + out(attn(LN(x)))` with `out`
    zero-initialised: the identity at step 0. Plain SDPA (not `nn.MultiheadAttention`, whose eval fast path
    computes differently from its training path)."""

    def __init__(self, dim: int, depth: int, heads: int):
        super().__init__()
        if dim % heads:
            raise AdapterError(f"projection option heads={heads} must divide the feature width {dim}.")
        self.heads = heads
        self.layers = nn.ModuleList()
        for _ in range(depth):
            layer = nn.ModuleDict({"norm": nn.LayerNorm(dim), "qkv": nn.Linear(dim, 3 * dim), "out": nn.Linear(dim, dim)})
            nn.init.zeros_(layer["out"].weight)
            nn.init.zeros_(layer["out"].bias)
            self.layers.append(layer)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        keep = None
        if mask is not None:  # [B, N], True for real tokens; a row of padding only attends to all (else NaN)
            keep = (mask | ~mask.any(-1, keepdim=True))[:, None, None, :]  # [B, 1, 1, N]
        for layer in self.layers:
            qkv = layer["qkv"](layer["norm"](x)).view(b, n, 3, self.heads, d // self.heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, H, N, Dh]
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
            x = x + layer["out"](a.transpose(1, 2).reshape(b, n, d))
        return x  # [B, N, F]


class _Codebook(nn.Module):
    """`codes` learned token sets `[T, C]` and a router over a reference's `T` tokens flattened: `softmax(router(
    LN(flatten(x)))) @ codebook`. The codebook starts at zero: the module adds nothing at step 0."""

    def __init__(self, in_dim: int, dim: int, codes: int, tokens: int):
        super().__init__()
        self.tokens = tokens
        self.norm = nn.LayerNorm(tokens * in_dim)
        self.router = nn.Linear(tokens * in_dim, codes)
        self.codebook = nn.Parameter(torch.zeros(codes, tokens, dim))

    def logits(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The router's logits `[B, codes]` for features `[B, N, F]` (N = `tokens`; padding zeroed)."""
        if x.shape[1] != self.tokens:
            raise AdapterError(f"this projection's codebook reads {self.tokens} tokens per reference, got "
                               f"{x.shape[1]}: use the image encoder settings it was trained with (the "
                               "adapter's feature source), or train with code_tokens set to the new count.")
        if mask is not None:
            x = x * mask[..., None].to(x.dtype)
        return self.router(self.norm(x.flatten(1)))  # [B, K]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        w = self.logits(x, mask).softmax(-1)  # [B, K]
        return torch.einsum("bk,ktc->btc", w, self.codebook)  # [B, T, C]


class _Resampler(nn.Module):
    def __init__(self, in_dim: int, dim: int, num_tokens: int, depth: int, heads: int):
        super().__init__()
        self.proj_in = nn.Linear(in_dim, dim)
        self.queries = nn.Parameter(torch.randn(1, num_tokens, dim) * 0.02)
        self.layers = nn.ModuleList()
        for _ in range(depth):
            self.layers.append(nn.ModuleDict({
                "norm_q": nn.LayerNorm(dim), "norm_kv": nn.LayerNorm(dim),
                "attn": nn.MultiheadAttention(dim, heads, batch_first=True),
                "norm_ff": nn.LayerNorm(dim),
                "ff": nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)),
            }))
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        kv = self.proj_in(x)  # [B, N, C]
        q = self.queries.expand(x.shape[0], -1, -1)  # [B, M, C]
        pad = None if mask is None else ~mask
        for layer in self.layers:
            kvn = layer["norm_kv"](kv)
            q = q + layer["attn"](layer["norm_q"](q), kvn, kvn, key_padding_mask=pad, need_weights=False)[0]
            q = q + layer["ff"](layer["norm_ff"](q))
        return self.norm_out(q)  # [B, M, C]


@register_adapter("projection")
class ProjectionAdapter(Adapter):
    """Trainable map from feature space to caption space, in front of the zero-shot path."""

    options_class = ProjectionOptions

    def __init__(self, config: AdapterConfig):
        super().__init__(config)
        o: ProjectionOptions = config.options
        f, c = config.feature_width, config.caption_width
        self.kind = o.kind
        self.mixer = _TokenMixer(f, o.mix_depth, o.heads) if o.mix_depth else None
        self.codebook = _Codebook(f, c, o.codes, o.code_tokens) if o.codes else None
        if o.kind == "linear":
            self.proj = nn.Linear(f, c)
            nn.init.zeros_(self.proj.bias)
            if f == c:
                with torch.no_grad():
                    self.proj.weight.copy_(torch.eye(c))
        elif o.kind == "mlp":
            hidden = o.hidden or 2 * c
            self.skip = nn.Identity() if f == c else nn.Linear(f, c)
            self.mlp = nn.Sequential(nn.LayerNorm(f), nn.Linear(f, hidden), nn.GELU(), nn.Linear(hidden, c))
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)
        else:
            self.resampler = _Resampler(f, c, o.num_tokens, o.depth, o.heads)

    @classmethod
    def create(cls, transformer: nn.Module, feature_width: int | None = None, blocks="all",
               **options) -> "ProjectionAdapter":
        """A projection from `feature_width` (None: the caption width) to `transformer`'s caption width; the
        projection serves every block, so `blocks` is not used. `options`: `ProjectionOptions` fields."""
        from ..models import family_for

        fam = family_for(transformer)
        width = fam.caption_width(transformer) if feature_width is None else int(feature_width)
        cfg = AdapterConfig("projection", type(transformer).__name__, width, fam.caption_width(transformer),
                            options=ProjectionOptions(**options))
        return cls(cfg)

    def project(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Features `[B, N, F]` -> caption-space tokens `[B, N, C]` (resampler: `[B, M, C]`)."""
        if self.kind == "resampler":
            return self.resampler(tokens, mask)
        x = tokens if self.mixer is None else self.mixer(tokens, mask)  # [B, N, F]
        out = self.proj(x) if self.kind == "linear" else self.skip(x) + self.mlp(x)  # [B, N, C]
        if self.codebook is not None:
            out = out + self.codebook(tokens, mask)
        return out

    def output_mask(self, mask):
        return None if self.kind == "resampler" else mask

    def embed(self, family, transformer, tokens, mask, site, cache):
        x = self.project(tokens.to(self._dtype()), mask).to(tokens.dtype)
        return family.embed(transformer, x, self.output_mask(mask), site, cache)

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


class ProjectionInFront:
    """Mixin of the adapters whose features may pass a `ProjectionAdapter` first (`projection`, None: none): their
    embedding and its mask go through it, then the DiT's own caption path."""

    projection: ProjectionAdapter | None

    def embed(self, family, transformer, tokens, mask, site, cache):
        if self.projection is None:
            return family.embed(transformer, tokens, mask, site, cache)
        return self.projection.embed(family, transformer, tokens, mask, site, cache)

    def output_mask(self, mask):
        return mask if self.projection is None else self.projection.output_mask(mask)
