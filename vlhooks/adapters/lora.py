"""`LoRAAdapter`: a peft LoRA on the injected tokens' K/V path only.

A plain peft LoRA installed on a block's `add_k_proj` would change the keys of every text token too. Here peft's
`lora.Linear` wraps the block's own K/V projection inside the adapter and is called on the injected tokens alone;
the model's modules are not replaced. `lora_B` starts at zero (peft's default), so step 0 is exactly zero-shot.
Only the `lora_` weights are trained and saved.
"""

from __future__ import annotations

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from .base import Adapter, AdapterConfig, AdapterError, register_adapter


def _key(site_name: str, which: str) -> str:
    return site_name.replace(".", "_") + "__" + which


@register_adapter("lora")
class LoRAAdapter(Adapter):
    """LoRA deltas on the K/V projections of chosen blocks, applied to injected tokens only."""

    def __init__(self, config: AdapterConfig):
        super().__init__(config)
        self.wrappers = nn.ModuleDict()
        self._pending: dict[str, torch.Tensor] | None = None
        self._bound_to: int | None = None

    @classmethod
    def create(cls, transformer: nn.Module, blocks="all", rank: int = 8, alpha: float = 8.0,
               dropout: float = 0.0) -> "LoRAAdapter":
        from ..models import family_for

        fam = family_for(transformer)
        sites = fam.select(transformer, blocks)
        width = fam.caption_width(transformer)
        cfg = AdapterConfig("lora", type(transformer).__name__, width, width, sites=[s.name for s in sites],
                            options={"rank": int(rank), "alpha": float(alpha), "dropout": float(dropout)})
        adapter = cls(cfg)
        adapter.bind(fam, transformer)
        return adapter

    @classmethod
    def from_config(cls, config: AdapterConfig) -> "LoRAAdapter":
        return cls(config)

    def bind(self, family, transformer) -> None:
        """Wrap the model's own K/V projections of the adapter's sites (once per model)."""
        if self._bound_to == id(transformer):
            return
        if self._bound_to is not None:
            raise AdapterError("this LoRA adapter is bound to another model; load it again for this one.")
        o = self.config.options
        lcfg = LoraConfig(r=o["rank"], lora_alpha=o["alpha"], lora_dropout=o["dropout"], target_modules=["_"])
        sites = {s.name: s for s in family.sites(transformer)}
        for name in self.config.sites:
            k, v = family.kv_linears(transformer, sites[name])
            for which, base in (("k", k), ("v", v)):
                w = LoraLinear(base, "default", config=lcfg, r=o["rank"], lora_alpha=o["alpha"],
                               lora_dropout=o["dropout"])
                p = base.weight
                for n, prm in w.named_parameters():
                    if "lora_" in n:
                        prm.data = prm.data.to(device=p.device)
                self.wrappers[_key(name, which)] = w
        self._bound_to = id(transformer)
        if self._pending is not None:
            self._assign(self._pending)
            self._pending = None

    def kv(self, family, transformer, site, hidden, block_args, block_kwargs, rows, cache):
        self.bind(family, transformer)
        x = family.text_input(transformer, site, hidden, block_args, block_kwargs, rows)  # [R, N, D]
        k = self.wrappers[_key(site.name, "k")](x)
        v = self.wrappers[_key(site.name, "v")](x)
        return family.finish_kv(transformer, site, k, v, cache)

    def trainable_parameters(self):
        return [p for n, p in self.named_parameters() if "lora_" in n]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        if self._bound_to is None:
            return dict(self._pending or self._expected_shapes())
        return {k: v for k, v in self.state_dict().items() if "lora_" in k}

    def _expected_shapes(self) -> dict[str, torch.Tensor]:
        raise AdapterError("bind the LoRA adapter to its model (apply_injection does) before reading its weights.")

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        if self._bound_to is None:
            expected = {f"wrappers.{_key(s, w)}.lora_{ab}.default.weight" for s in self.config.sites
                        for w in ("k", "v") for ab in ("A", "B")}
            if set(state) != expected:
                raise AdapterError(
                    f"adapter_model.safetensors does not match this lora adapter: missing "
                    f"{sorted(expected - set(state))[:4]}, unexpected {sorted(set(state) - expected)[:4]}."
                )
            r = self.config.options["rank"]
            bad = [k for k, t in state.items() if (t.shape[0] if "lora_A" in k else t.shape[1]) != r]
            if bad:
                raise AdapterError(f"{bad[0]} does not have rank {r}; the file belongs to another configuration.")
            self._pending = dict(state)
            return
        super().load_weights(state)

    def _assign(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.named_parameters())
        with torch.no_grad():
            for k, t in state.items():
                own[k].copy_(t.to(own[k].device, own[k].dtype))
