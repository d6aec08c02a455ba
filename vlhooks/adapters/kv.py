"""`KVAdapter`: per-block K/V projections for the injected tokens, initialised as copies of the block's own text
K/V projections (IP-Adapter's init), so step 0 is exactly zero-shot. The block's pre-norm, modulation, qk-norm and
RoPE stay the model's own; an optional `ProjectionAdapter` in front maps other feature widths.
"""

from __future__ import annotations

import copy

from torch import nn

from .base import Adapter, AdapterConfig, register_adapter
from .projection import ProjectionAdapter


def _key(site_name: str) -> str:
    return site_name.replace(".", "_")


@register_adapter("kv")
class KVAdapter(Adapter):
    """Own `to_k` / `to_v` per site, trained on the injected tokens only."""

    def __init__(self, config: AdapterConfig):
        super().__init__(config)
        shapes = config.options["shapes"]  # site -> [in, out, bias]
        self.k = nn.ModuleDict({_key(s): nn.Linear(i, o, bias=b) for s, (i, o, b) in shapes.items()})
        self.v = nn.ModuleDict({_key(s): nn.Linear(i, o, bias=b) for s, (i, o, b) in shapes.items()})
        p = config.options.get("projection")
        self.projection = None
        if p is not None:
            self.projection = ProjectionAdapter(AdapterConfig("projection", config.dit_class, config.feature_width,
                                                              config.caption_width, options=p))

    @classmethod
    def create(cls, transformer: nn.Module, blocks="all", feature_width: int | None = None,
               projection: dict | None = None) -> "KVAdapter":
        """Copy the text K/V projections of the blocks `blocks` selects (an `InjectionConfig.blocks` value)."""
        from ..models import family_for

        fam = family_for(transformer)
        sites = fam.select(transformer, blocks)
        width = fam.caption_width(transformer) if feature_width is None else int(feature_width)
        if width != fam.caption_width(transformer) and projection is None:
            projection = {"kind": "linear"}
        shapes = {}
        for s in sites:
            k, _ = fam.kv_linears(transformer, s)
            shapes[s.name] = [k.in_features, k.out_features, k.bias is not None]
        cfg = AdapterConfig("kv", type(transformer).__name__, width, fam.caption_width(transformer),
                            sites=[s.name for s in sites], options={"shapes": shapes, "projection": projection})
        adapter = cls(cfg)
        for s in sites:
            k, v = fam.kv_linears(transformer, s)
            adapter.k[_key(s.name)].load_state_dict(copy.deepcopy(k.state_dict()))
            adapter.v[_key(s.name)].load_state_dict(copy.deepcopy(v.state_dict()))
        p = next(transformer.parameters())
        return adapter.to(device=p.device, dtype=p.dtype)

    @classmethod
    def from_config(cls, config: AdapterConfig) -> "KVAdapter":
        return cls(config)

    def embed(self, family, transformer, tokens, mask, site, cache):
        if self.projection is None:
            return family.embed(transformer, tokens, mask, site, cache)
        return self.projection.embed(family, transformer, tokens, mask, site, cache)

    def output_mask(self, mask):
        return mask if self.projection is None else self.projection.output_mask(mask)

    def kv(self, family, transformer, site, hidden, block_args, block_kwargs, rows, cache):
        x = family.text_input(transformer, site, hidden, block_args, block_kwargs, rows)  # [R, N, D]
        kp, vp = self.k[_key(site.name)], self.v[_key(site.name)]
        x = x.to(kp.weight.dtype)
        return family.finish_kv(transformer, site, kp(x).to(hidden.dtype), vp(x).to(hidden.dtype), cache)
