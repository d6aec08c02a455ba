"""The one code path from features to extra K/V: `k, v = projector.kv(call)` per block and step.

`Projector` is the protocol `apply_injection(adapter=...)` accepts. `ZeroShotProjector` uses the DiT's own caption
path (the family's `embed` once per generation, `text_kv` per block and step). A trained adapter is a projector
too: it replaces or corrects either stage, and is initialised to reproduce zero-shot exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Hashable, Protocol, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from .attention import BlockCall
    from .models.base import DiTFamily, Site


@runtime_checkable
class Projector(Protocol):
    """What turns features into a block's extra K/V.

    Optional (looked up with `getattr`, not part of the `isinstance` check):
    `image_attention_norms(call) -> (norm_q, norm_k)`: for placement `"image_joint"`, the norms of the separate
    attention the projector owns, applied to the block's raw image queries and keys (`[R, H, L, Dh]`; None is
    the identity). Without it the block's own `norm_q` / `norm_k` serve (an SD3 IP-Adapter brings its own).
    `text_path: bool` (default True): False for a projector whose `kv` never runs the block's text path (an
    IP-Adapter's own K/V projections), so the injector computes no pre-norm for it (`call.pre_normed` is None).
    `tokenwise: bool` (default False): True where `kv` maps each extra token on its own, so several references'
    tokens may be projected in one call (`BlockCall.batched`).
    The extra K/V themselves always come from `kv(call)`."""

    def feature_width(self, family: "DiTFamily", transformer: nn.Module) -> int:
        """The width `VLFeatures` in caption space must have."""

    def embed_key(self, family: "DiTFamily", site: "Site") -> Hashable:
        """Sites with the same key share one embedding of the features."""

    def embed(self, family: "DiTFamily", transformer: nn.Module, tokens: torch.Tensor, mask: torch.Tensor | None,
              site: "Site", cache: dict) -> torch.Tensor:
        """Features `[B, N, F]` -> the caption stream entering `site`, `[B, N', D]` (timestep-free)."""

    def output_mask(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The mask of the embedded tokens (projectors that change the token count return None)."""

    def kv(self, call: "BlockCall") -> tuple[torch.Tensor, torch.Tensor]:
        """`call.embedded` `[R, N, D]` -> `k, v` `[R, N, H, Dh]` through the block's text path at this step."""


class ZeroShotProjector:
    """Extra K/V from the block's own text-side computation. Stateless; holds no weights."""

    tokenwise = True

    def feature_width(self, family: "DiTFamily", transformer: nn.Module) -> int:
        return family.caption_width(transformer)

    def embed_key(self, family: "DiTFamily", site: "Site") -> Hashable:
        return family.embed_key(site)

    def embed(self, family, transformer, tokens, mask, site, cache) -> torch.Tensor:
        return family.embed(transformer, tokens, mask, site, cache)

    def output_mask(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        return mask

    def kv(self, call: "BlockCall") -> tuple[torch.Tensor, torch.Tensor]:
        return call.family.text_kv(call)

    def parameters(self):
        return iter(())
