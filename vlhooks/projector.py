"""The one code path from features to extra K/V: `k, v = projector(features, block)`.

`ZeroShotProjector` uses the DiT's own caption path (the family's `embed` and `text_kv`). A trained adapter is a
projector too: it replaces or corrects either stage, and is initialised to reproduce zero-shot exactly.
"""

from __future__ import annotations

from typing import Hashable

import torch
from torch import nn

from .models.base import DiTFamily, Site


class ZeroShotProjector:
    """Extra K/V from the block's own text-side computation. Stateless; holds no weights."""

    def feature_width(self, family: DiTFamily, transformer: nn.Module) -> int:
        """The width `VLFeatures` in caption space must have."""
        return family.caption_width(transformer)

    def embed_key(self, family: DiTFamily, site: Site) -> Hashable:
        return family.embed_key(site)

    def embed(
        self, family: DiTFamily, transformer: nn.Module, tokens: torch.Tensor, mask: torch.Tensor | None, site: Site,
        cache: dict,
    ) -> torch.Tensor:
        """Caption-space tokens `[B, N, C]` -> the caption stream entering `site`, `[B, N, D]` (timestep-free)."""
        return family.embed(transformer, tokens, mask, site, cache)

    def output_mask(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The mask of the embedded tokens (projectors that change the token count return None)."""
        return mask

    def kv(
        self, family: DiTFamily, transformer: nn.Module, site: Site, hidden: torch.Tensor, block_args: tuple,
        block_kwargs: dict, rows: list[int] | None, cache: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`[R, N, D]` -> `k, v` `[R, N, H, Dh]` through the block's text path at this step."""
        return family.text_kv(transformer, site, hidden, block_args, block_kwargs, rows, cache)

    def parameters(self):
        return iter(())
