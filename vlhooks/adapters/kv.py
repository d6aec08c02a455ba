"""`KVAdapter`: per-block K/V projections for the injected tokens, initialised as copies of the block's own text
K/V projections (IP-Adapter's init), so step 0 is exactly zero-shot. The block's pre-norm, modulation, qk-norm and
RoPE stay the model's own; an optional `ProjectionAdapter` in front maps other feature widths.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from .. import fused_text
from ..errors import AdapterError
from .base import Adapter, AdapterConfig, Options, register_adapter
from .projection import ProjectionAdapter, ProjectionInFront, ProjectionOptions


def _key(site_name: str) -> str:
    return site_name.replace(".", "_")


@dataclass
class KVOptions(Options):
    """`shapes`: per site `[in_features, out_features, bias]` of its K/V projections. `projection`: a
    `ProjectionOptions` dict for a projection in front (feature widths other than the caption width), or None."""

    shapes: dict
    projection: dict | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.shapes, dict) or not all(
                isinstance(v, list) and len(v) == 3 for v in self.shapes.values()):
            raise AdapterError(f"kv option shapes must map sites to [in, out, bias], got {self.shapes!r}.")
        if self.projection is not None:
            ProjectionOptions.from_dict(self.projection)


@register_adapter("kv")
class KVAdapter(ProjectionInFront, Adapter):
    """Own `to_k` / `to_v` per site, trained on the injected tokens only."""

    options_class = KVOptions

    def __init__(self, config: AdapterConfig):
        super().__init__(config)
        shapes = config.options.shapes  # site -> [in, out, bias]
        self.k = nn.ModuleDict({_key(s): nn.Linear(i, o, bias=b) for s, (i, o, b) in shapes.items()})
        self.v = nn.ModuleDict({_key(s): nn.Linear(i, o, bias=b) for s, (i, o, b) in shapes.items()})
        p = config.options.projection
        self.projection = None
        if p is not None:
            self.projection = ProjectionAdapter(AdapterConfig("projection", config.dit_class, config.feature_width,
                                                              config.caption_width, ProjectionOptions(**p)))

    @classmethod
    def create(cls, transformer: nn.Module, feature_width: int | None = None, blocks="all",
               projection: dict | None = None) -> "KVAdapter":
        """Copy the text K/V projections of the blocks `blocks` selects (an `InjectionConfig.blocks` value); a
        `projection` (`ProjectionOptions` fields) in front maps features of another width (linear by default)."""
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
        opts = KVOptions(shapes, None if projection is None else ProjectionOptions(**projection).to_dict())
        cfg = AdapterConfig("kv", type(transformer).__name__, width, fam.caption_width(transformer), opts,
                            sites=[s.name for s in sites])
        adapter = cls(cfg)
        for s in sites:
            k, v = fam.kv_linears(transformer, s)
            adapter.k[_key(s.name)].load_state_dict(copy.deepcopy(k.state_dict()))
            adapter.v[_key(s.name)].load_state_dict(copy.deepcopy(v.state_dict()))
        p = next(transformer.parameters())
        return adapter.to(device=p.device, dtype=p.dtype)


    def kv(self, call):
        x = call.family.text_input(call)  # [R, N, D]
        kp, vp = self.k[_key(call.site.name)], self.v[_key(call.site.name)]
        x = x.to(kp.weight.dtype)
        dtype = call.embedded.dtype
        k, v = fused_text.linear_pair(x, kp, vp) or (kp(x), vp(x))  # the zero-shot path's kernel where it serves
        return call.family.finish_kv(call, k.to(dtype), v.to(dtype))
