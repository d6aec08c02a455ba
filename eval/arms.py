"""The arms of `vlhooks compare` (how a reference reaches the DiT, one column each) and the random-weight control."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlhooks.errors import CompareError

BUILTIN_ARMS = ("none", "blend", "zero-shot", "random")
INJECTING = ("zero-shot", "adapter", "random")  # the arm kinds that inject the reference as extra K/V


@dataclass
class Arm:
    """One column of the comparison: how a reference reaches the DiT."""

    name: str
    kind: str  # none | blend | zero-shot | adapter | random
    adapter_path: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # what is shown in the report's config diff


class ReferenceFeatures:
    """The references' features per encoder spec: the config's `encoder` for zero-shot arms, and for an adapter the
    encoder it was trained with (`adapter.config.feature_source`: name, size, layer), each encoded once."""

    def __init__(self, images: list, spec: dict[str, Any]):
        self.images = images
        self._encoded: dict[str, Any] = {}
        self.default = self._encode(dict(spec))

    def _encode(self, spec: dict[str, Any]):
        import vlhooks as vh
        from vlhooks.train.encoders import image_encoder

        key = json.dumps(spec, sort_keys=True, default=str)
        if key not in self._encoded:
            tokens, mask = image_encoder(dict(spec))(self.images)  # [R, N, D]
            self._encoded[key] = vh.VLFeatures(tokens.float(), mask=mask)
        return self._encoded[key]

    def for_adapter(self, adapter=None):
        """The features `adapter` was trained on (the default where it records no encoder)."""
        spec = dict(getattr(getattr(adapter, "config", None), "feature_source", None) or {})
        return self._encode(spec) if "name" in spec else self.default


def _adapter_type(path: str) -> str | None:
    from vlhooks.adapters.base import CONFIG_NAME

    f = Path(path) / CONFIG_NAME
    return json.loads(f.read_text()).get("adapter_type") if f.is_file() else None


def plan_arms(cfg: dict[str, Any], check_files: bool = True) -> list[Arm]:
    """The arms in order, checked: names are unique and (with `check_files`) adapter folders hold an adapter."""
    from vlhooks.adapters.base import CONFIG_NAME, WEIGHTS_NAME

    adapters = dict(cfg.get("adapters") or {})
    wanted = cfg.get("arms") or ["none", "blend", "zero-shot", *adapters, "random"]
    inj = {f"injection.{k}": v for k, v in cfg["injection"].items()}
    arms = []
    for name in wanted:
        if name == "none":
            arms.append(Arm("none", "none", settings={"reference": "not used"}))
        elif name == "blend":
            arms.append(Arm("blend", "blend", settings={"reference": "blended into the caption", **{
                f"blend.{k}": v for k, v in cfg["blend"].items()}}))
        elif name == "zero-shot":
            arms.append(Arm("zero-shot", "zero-shot", settings={"reference": "extra K/V", "adapter": "none", **inj}))
        elif name == "random":
            like = next((p for p in adapters.values() if _adapter_type(p) not in ("lora", None)), None)
            arms.append(Arm("random", "random", like, settings={
                "reference": "extra K/V", "adapter": f"random weights ({'like ' + Path(like).parent.name if like else 'linear projection'})",
                **inj}))
        elif name in adapters:
            path = Path(adapters[name])
            present = (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()
            if check_files and not present:
                raise CompareError(f"adapter {name!r}: {path} is not an adapter folder (needs {CONFIG_NAME} and "
                                   f"{WEIGHTS_NAME}); train it with `vlhooks train` or remove it from `adapters` "
                                   "(--adapters none runs without adapter arms).")
            meta = json.loads((path / CONFIG_NAME).read_text()) if present else {"adapter_type": "?"}
            own = {f"injection.{k}": v for k, v in (meta.get("injection") or {}).items() if k in ("mode", "placement")}
            arms.append(Arm(name, "adapter", str(path), settings={
                "reference": "extra K/V", "adapter": f"{meta['adapter_type']} ({path})",
                **{f"adapter.{k}": v for k, v in meta.get("options", {}).items()}, **inj, **own}))
        else:
            raise CompareError(f"unknown arm {name!r}: use {', '.join(BUILTIN_ARMS)} or a key of `adapters` "
                               f"({sorted(adapters)}).")
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise CompareError(f"arm names must be unique, got {names}.")
    return arms


def random_control(like: str | None, dit: torch.nn.Module, feature_width: int, seed: int):
    """An untrained adapter: `like`'s architecture with every tensor redrawn from a normal with the trained
    tensor's mean and std (the trained scale, no learned structure); without `like`, a linear projection drawn
    from N(0, 1/width)."""
    import vlhooks as vh

    g = torch.Generator().manual_seed(seed)
    if like is not None:
        adapter = vh.load_adapter(like)
        if adapter.config.adapter_type == "lora":
            raise CompareError("the random control copies a projection or kv adapter; list one first in `adapters`.")
    else:
        adapter = vh.ProjectionAdapter.create(dit, feature_width, kind="linear")
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            if like is not None and p.numel() > 1:
                mean, std = float(p.float().mean()), float(p.float().std())
            else:
                mean, std = 0.0, 1.0 / math.sqrt(p.shape[-1])
            p.copy_(mean + std * torch.randn(p.shape, generator=g))
    return adapter
