"""`LoRAAdapter`: a peft LoRA on the injected tokens' K/V path only.

A plain peft LoRA installed on a block's `add_k_proj` would change the keys of every text token too. Here peft's
`lora.Linear` wraps the block's own K/V projection and is called on the injected tokens alone; the model's modules
are not replaced. The adapter's module tree holds only the `lora_A` / `lora_B` layers: the peft wrappers (which
hold the DiT's own projection as `base_layer`) are kept outside it, so `adapter.to(...)`, `adapter.half()` or
`adapter.requires_grad_(...)` never reach the DiT. `lora_B` starts at zero (peft's default), so step 0 is exactly
zero-shot. Weights are saved under peft's names without the adapter name: `<site>.<k|v>.lora_A.weight`. An optional
`ProjectionAdapter` in front (as the kv adapter has) maps the features first; its weights are `projection.*`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from .. import fused_text
from ..errors import AdapterError
from .base import Adapter, AdapterConfig, Options, check_state, register_adapter
from .projection import ProjectionAdapter, ProjectionInFront, ProjectionOptions

PEFT_NAME = "default"  # peft's adapter name inside the wrappers (never saved)


@dataclass
class LoRAOptions(Options):
    """peft's `r`, `lora_alpha` and `lora_dropout`. `projection`: a `ProjectionOptions` dict for a projection in
    front of the LoRA'd K/V path (features of another width, or a trained map into caption space), or None."""

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    projection: dict | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise AdapterError(f"lora rank must be a positive int, got {self.rank!r}.")
        if not isinstance(self.alpha, (int, float)) or not 0.0 <= float(self.dropout) < 1.0:
            raise AdapterError(f"lora alpha must be a number and dropout in [0, 1), got {self.alpha!r}, {self.dropout!r}.")
        if self.projection is not None:
            ProjectionOptions.from_dict(self.projection)


def _key(site_name: str, which: str) -> str:
    """The module-dict key of one site's K or V LoRA (dots are not allowed there)."""
    return site_name.replace(".", "_") + "__" + which


def saved_name(site_name: str, which: str, ab: str) -> str:
    """The saved name of a LoRA weight: `<site>.<k|v>.lora_<A|B>.weight` (peft's, without the adapter name)."""
    return f"{site_name}.{which}.lora_{ab}.weight"


def _plain(w: LoraLinear) -> bool:
    """Whether `w(x)` is `base_layer(x) + lora_B(lora_A(dropout(x))) * scaling` of this adapter alone (peft's
    unmerged vanilla LoRA), so that the base's GEMM can be another kernel's (`fused_text.linear_pair`)."""
    return (not w.merged and not w.disable_adapters and list(w.active_adapters) == [PEFT_NAME]
            and not w.use_dora.get(PEFT_NAME, False) and PEFT_NAME not in getattr(w, "lora_variant", {}))


def _with_delta(w: LoraLinear, base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """peft's `lora.Linear.forward` after its base layer: `base + lora_B(lora_A(dropout(x))) * scaling`, in the
    LoRA's dtype, back in the base's (the same operations, so a fresh LoRA adds exactly zero)."""
    a = w.lora_A[PEFT_NAME]
    delta = w.lora_B[PEFT_NAME](a(w.lora_dropout[PEFT_NAME](x.to(a.weight.dtype)))) * w.scaling[PEFT_NAME]
    return (base + delta).to(base.dtype)


@register_adapter("lora")
class LoRAAdapter(ProjectionInFront, Adapter):
    """LoRA deltas on the K/V projections of chosen blocks, applied to injected tokens only."""

    options_class = LoRAOptions

    def __init__(self, config: AdapterConfig):
        super().__init__(config)
        o: LoRAOptions = config.options
        self.lora_A = nn.ModuleDict()  # key -> Linear(in, r), created when bound (their widths are the DiT's)
        self.lora_B = nn.ModuleDict()  # key -> Linear(r, out)
        self.lora_dropout = nn.ModuleDict()  # key -> Dropout or Identity (here, so train() / eval() reach it)
        self._wrappers: dict[str, LoraLinear] = {}  # outside the module tree: they hold the DiT's own layers
        self._bound_to: weakref.ref | None = None
        self._pending: dict[str, torch.Tensor] | None = None  # loaded weights waiting for `bind`
        self._lora_config = LoraConfig(r=o.rank, lora_alpha=o.alpha, lora_dropout=o.dropout, target_modules=["_"])
        self.projection = None
        if o.projection is not None:
            self.projection = ProjectionAdapter(AdapterConfig("projection", config.dit_class, config.feature_width,
                                                              config.caption_width, ProjectionOptions(**o.projection)))

    @classmethod
    def create(cls, transformer: nn.Module, feature_width: int | None = None, blocks="all", rank: int = 8,
               alpha: float = 8.0, dropout: float = 0.0, projection: dict | None = None) -> "LoRAAdapter":
        """LoRA on the text K/V projections of the blocks `blocks` selects; a `projection` (`ProjectionOptions`
        fields) in front maps the features first (linear by default for a width other than the caption width)."""
        from ..models import family_for

        fam = family_for(transformer)
        sites = fam.select(transformer, blocks)
        caption = fam.caption_width(transformer)
        width = caption if feature_width is None else int(feature_width)
        if width != caption and projection is None:
            projection = {"kind": "linear"}
        opts = LoRAOptions(int(rank), float(alpha), float(dropout),
                           None if projection is None else ProjectionOptions(**projection).to_dict())
        cfg = AdapterConfig("lora", type(transformer).__name__, width, caption, opts, sites=[s.name for s in sites])
        adapter = cls(cfg)
        if adapter.projection is not None:
            p = next(transformer.parameters())
            adapter.projection.to(device=p.device, dtype=p.dtype)
        adapter.bind(fam, transformer)
        return adapter


    def _projection_state(self) -> dict[str, torch.Tensor]:
        """The projection's weights under their saved names, `projection.<name>`."""
        if self.projection is None:
            return {}
        return {f"projection.{k}": v for k, v in self.projection.state_dict().items()}

    def bind(self, family, transformer) -> None:
        """Wrap the model's own K/V projections of the adapter's sites (once per model)."""
        if self._bound_to is not None:
            if self._bound_to() is transformer:
                return
            raise AdapterError("this LoRA adapter is bound to another model; load it again for this one.")
        o: LoRAOptions = self.config.options
        sites = {s.name: s for s in family.sites(transformer)}
        for name in self.config.sites:
            k, v = family.kv_linears(transformer, sites[name])
            for which, base in (("k", k), ("v", v)):
                w = LoraLinear(base, PEFT_NAME, config=self._lora_config, r=o.rank, lora_alpha=o.alpha,
                               lora_dropout=o.dropout)
                key = _key(name, which)
                self.lora_A[key] = w.lora_A[PEFT_NAME].to(device=base.weight.device)
                self.lora_B[key] = w.lora_B[PEFT_NAME].to(device=base.weight.device)
                self.lora_dropout[key] = w.lora_dropout[PEFT_NAME]
                self._wrappers[key] = w
        self._bound_to = weakref.ref(transformer)
        if self._pending is not None:
            state, self._pending = self._pending, None
            self._assign(state)

    def kv(self, call):
        self.bind(call.family, call.transformer)
        x = call.family.text_input(call)  # [R, N, D]
        wk, wv = self._wrappers[_key(call.site.name, "k")], self._wrappers[_key(call.site.name, "v")]
        base = fused_text.linear_pair(x, wk.base_layer, wv.base_layer) if _plain(wk) and _plain(wv) else None
        if base is None:
            return call.family.finish_kv(call, wk(x), wv(x))
        return call.family.finish_kv(call, *(_with_delta(w, y, x) for w, y in zip((wk, wv), base)))

    # ------------------------------------------------------------------ weights, under peft's saved names
    def _expected_shapes(self) -> dict[str, tuple[int, ...]]:
        if self._bound_to is None:
            raise AdapterError("bind the LoRA adapter to its model (apply_injection does) before reading its weights.")
        out = {}
        for name in self.config.sites:
            for which in ("k", "v"):
                key = _key(name, which)
                out[saved_name(name, which, "A")] = tuple(self.lora_A[key].weight.shape)
                out[saved_name(name, which, "B")] = tuple(self.lora_B[key].weight.shape)
        out.update({k: tuple(v.shape) for k, v in self._projection_state().items()})
        return out

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        if self._bound_to is None:
            if self._pending is None:
                self._expected_shapes()  # raises: nothing to return yet
            return dict(self._pending)
        out = {}
        for name in self.config.sites:
            for which in ("k", "v"):
                key = _key(name, which)
                out[saved_name(name, which, "A")] = self.lora_A[key].weight
                out[saved_name(name, which, "B")] = self.lora_B[key].weight
        out.update(self._projection_state())
        return out

    def module_state(self, state):
        names = {saved_name(s, w, ab): f"lora_{ab}.{_key(s, w)}.weight" for s in self.config.sites
                 for w in ("k", "v") for ab in ("A", "B")}
        return {names.get(k, k): t for k, t in state.items()}

    @classmethod
    def upgrade_state(cls, state, config):
        """Format 1 named the weights `wrappers.<site_>__<k|v>.lora_<A|B>.default.weight`."""
        old = {f"wrappers.{_key(s, w)}.lora_{ab}.{PEFT_NAME}.weight": saved_name(s, w, ab)
               for s in config.sites for w in ("k", "v") for ab in ("A", "B")}
        return {old.get(k, k): t for k, t in state.items()}

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        if self._bound_to is not None:
            check_state(state, self._expected_shapes(), self.adapter_type)
            self._assign(state)
            return
        # not bound yet: the widths are the DiT's; check names, rank, dtypes and values now, shapes when bound
        r = self.config.options.rank
        names = {saved_name(s, w, ab) for s in self.config.sites for w in ("k", "v") for ab in ("A", "B")}
        shapes = {k: tuple(t.shape) for k, t in state.items()}
        expected = {k: shapes.get(k, ()) for k in names}
        expected.update({k: tuple(v.shape) for k, v in self._projection_state().items()})  # known before binding
        check_state(state, expected, self.adapter_type)
        bad = [k for k, t in state.items() if k in names and
               (t.ndim != 2 or (t.shape[0] if ".lora_A." in k else t.shape[1]) != r)]
        if bad:
            raise AdapterError(f"{bad[0]} does not have rank {r}; the file belongs to another configuration.")
        self._pending = dict(state)

    def _assign(self, state: dict[str, torch.Tensor]) -> None:
        own = self.trainable_state_dict()
        check_state(state, {k: tuple(v.shape) for k, v in own.items()}, self.adapter_type)
        with torch.no_grad():
            for k, t in state.items():
                own[k].copy_(t.to(own[k].device, own[k].dtype))
