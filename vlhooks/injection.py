"""Patching a loaded pipeline or transformer: `apply_injection`, `inject`, `remove_injection`, `list_sites`.

Owns the public API, the `InjectionHandle` users hold, and target resolution (pipeline -> transformer). The
per-model state and the install / removal live in the `Injector` (`injector.py`). This mutates the model in
place: it swaps the targeted attention modules' processors and registers diffusers hooks; `remove()` restores
both exactly.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import replace
from typing import Any, Iterator

from torch import nn

from .config import InjectionConfig
from .errors import ConfigError, FeatureError, TargetError
from .features import VLFeatures
from .injector import Injector
from .models import family_for
from .projector import Projector, ZeroShotProjector
from .references import Reference, as_references

_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, InjectionHandle]" = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------------------------------------------- targets
def resolve_target(target: Any) -> tuple[nn.Module, Any]:
    """`(transformer, pipeline or None)` for a diffusers pipeline, a transformer, or a compiled transformer."""
    pipeline = None
    if not isinstance(target, nn.Module) and hasattr(target, "transformer"):
        pipeline, target = target, target.transformer
        if target is None:
            raise TargetError("The pipeline has no transformer loaded; load one or pass the transformer itself.")
    target = getattr(target, "_orig_mod", target)  # torch.compile wrapper -> the module it wraps
    if not isinstance(target, nn.Module) and getattr(target, "unet", None) is not None:
        raise TargetError(
            f"{type(target).__name__} denoises with a UNet, not a diffusion transformer; vlhooks patches DiT "
            "pipelines (Z-Image, Flux, SD3, ...). For UNet pipelines use diffusers' own IP-Adapter support."
        )
    if not isinstance(target, nn.Module):
        raise TargetError(
            f"Expected a diffusers pipeline or its transformer (an nn.Module), got {type(target).__name__}."
        )
    return target, pipeline


def list_sites(target: Any) -> list[str]:
    """Names of the blocks that can be targeted, in index order (the indices `InjectionConfig.blocks` uses)."""
    transformer, _ = resolve_target(target)
    return [s.name for s in family_for(transformer).sites(transformer)]


def list_presets(target: Any) -> dict[str, list[str]]:
    """Named block presets of the target's family and the sites each selects."""
    transformer, _ = resolve_target(target)
    fam = family_for(transformer)
    return {name: [s.name for s in fam.select(transformer, name)] for name in fam.presets}


# ---------------------------------------------------------------------------------------------------- handle
class InjectionHandle:
    """A live injection. Use as a context manager, or call `remove()`.

    Example:
        >>> handle = vh.apply_injection(pipe, feats, vh.InjectionConfig(blocks="double"))
        >>> handle.set_scale(0.5); image = pipe(prompt).images[0]
        >>> handle.remove()
    """

    def __init__(self, injector: Injector):
        self._injector: Injector | None = injector

    @property
    def injector(self) -> Injector:
        if self._injector is None:
            raise TargetError("This injection was removed; call vh.apply_injection(...) again.")
        return self._injector

    @property
    def sites(self) -> list[str]:
        return [s.name for s in self.injector.sites]

    @property
    def config(self) -> InjectionConfig:
        return self.injector.config

    @property
    def active(self) -> bool:
        return self._injector is not None

    def set_features(
        self, features: VLFeatures, negative: VLFeatures | None = None, active: list[bool] | None = None
    ) -> None:
        """Replace the injected references by one: `features` (and optional negative features for unconditional
        rows) at the config's settings. `active` (one bool per feature row) switches rows off, e.g. for image
        dropout in training."""
        self.injector.set_features(features, negative, active)

    def set_references(self, references: Any, active: list[bool] | None = None) -> None:
        """Replace the injected references (a list of `vh.Reference` / `VLFeatures`, or one); their blocks must be
        among the patched ones. `active` (one bool per feature row) switches rows off for every reference, e.g.
        the unconditional rows of a batched guidance pass."""
        self.injector.set_references(as_references(references), active)

    def set_scale(self, scale_or_index: float | dict[int, float] | int, scale: float | None = None) -> None:
        """`set_scale(s)`: the config's strength, a float or `{block index: float}`. `set_scale(i, s)`: the scale
        of reference `i`."""
        inj = self.injector
        if scale is not None:
            i = scale_or_index
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(inj.references):
                raise ConfigError(f"reference index {i!r} is out of range: {len(inj.references)} reference(s) are "
                                  "injected (with combine='average' they are one).")
            Reference(inj.references[i].features, scale=scale)  # validates the number
            if inj.config.mode == "joint" and scale < 0:
                raise ConfigError(f"scale {scale} < 0 in joint mode: use mode='decoupled' for a negative weight.")
            inj.references[i] = replace(inj.references[i], scale=float(scale))
            return
        new = replace(inj.config, scale=scale_or_index)  # validates
        if isinstance(scale_or_index, dict):
            allowed = {s.index for s in inj.sites}
            bad = sorted(set(scale_or_index) - allowed)
            if bad:
                raise ConfigError(f"scale keys {bad} are not among the patched block indices {sorted(allowed)}.")
        inj.config = new

    def remove(self) -> None:
        """Restore the model exactly: original processors back, hooks removed. Safe to call twice."""
        if self._injector is None:
            return
        inj, self._injector = self._injector, None
        inj.uninstall()
        if _ACTIVE.get(inj.transformer) is self:
            del _ACTIVE[inj.transformer]

    def __enter__(self) -> "InjectionHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        if self._injector is None:
            return "InjectionHandle(removed)"
        inj = self._injector
        names = [s.name for s in inj.sites]
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        return (
            f"InjectionHandle({type(inj.transformer).__name__}, {len(names)} sites: {shown}; "
            f"mode={inj.config.mode}, window={inj.config.window}, scale={inj.config.scale})"
        )


# ---------------------------------------------------------------------------------------------------- public API
def _as_projector(adapter: Any) -> Projector:
    if adapter is None:
        return ZeroShotProjector()
    if not isinstance(adapter, Projector):
        missing = [m for m in ("feature_width", "embed_key", "embed", "output_mask", "kv")
                   if not callable(getattr(adapter, m, None))]
        raise ConfigError(
            f"adapter {type(adapter).__name__} lacks {missing} of the vh.Projector protocol; pass an adapter from "
            "vh.load_adapter(path) or a class implementing vh.Projector."
        )
    return adapter


def apply_injection(
    target: Any,
    features: Any,
    config: InjectionConfig | None = None,
    adapter: Any = None,
    negative_features: VLFeatures | None = None,
    encoder: Any = None,
) -> InjectionHandle:
    """Patch `target` (a diffusers pipeline or its transformer) to inject references as extra K/V.

    Everything is checked before anything changes: on a bad input the model is left unpatched.

    Args:
        target: a `ZImagePipeline` / `FluxPipeline` / `StableDiffusion3Pipeline` (or any pipeline with a
            supported `.transformer`), or the transformer itself.
        features: what to inject: `VLFeatures`, an image (a PIL image, a path, an array or tensor, or a list of
            them: one reference, a row per image), a `vh.Reference`, or a list of references (each with its own
            scale, blocks, window, schedule, mask and negative features); `None` patches now and waits for
            `handle.set_features` / `handle.set_references`.
        config (`InjectionConfig`): where, when, how strongly (defaults: the adapter's own, else all main blocks,
            whole run, scale 1).
        adapter: a trained adapter (`vh.load_adapter`); `None` is zero-shot (the block's own text path).
        negative_features (`VLFeatures`, *optional*): injected into unconditional rows instead of nothing (for one
            reference given as features; a `vh.Reference` carries its own `negative`).
        encoder: turns images into features: a name (`"dinov2-small"`, `"siglip"`, `"qwen3-vl"`, a folder or hub
            id), a spec dict, or an extractor; None uses the encoder the adapter records (`feature_source`).

    Returns:
        `InjectionHandle` with `set_features`, `set_references`, `set_scale`, `remove`.

    Example:
        >>> feats = vh.VLFeatures(tokens)                     # [1, N, caption width]
        >>> handle = vh.apply_injection(pipe, feats, vh.InjectionConfig(blocks="double", window=(0.0, 0.6)))
        >>> image = pipe(prompt).images[0]
        >>> handle.remove()
    """
    if config is None:
        stored = getattr(getattr(adapter, "config", None), "injection", None)
        config = InjectionConfig.from_dict(stored) if stored else InjectionConfig()
    if not isinstance(config, InjectionConfig):
        raise ConfigError(f"config must be vh.InjectionConfig, got {type(config).__name__}.")
    config.validate()
    transformer, pipeline = resolve_target(target)
    if transformer in _ACTIVE:
        raise TargetError(
            f"{type(transformer).__name__} is already patched by vlhooks; call handle.remove() or "
            "vh.remove_injection(model) first."
        )
    family = family_for(transformer)
    if config.mode not in family.modes:
        raise ConfigError(
            f"mode={config.mode!r} is not available for {type(transformer).__name__} (it has {list(family.modes)}): "
            f"{family.mode_note or 'its attention cannot take it exactly'}. Use mode={family.modes[0]!r}."
        )
    if config.placement not in family.placements:
        raise ConfigError(
            f"placement={config.placement!r} is not implemented for {type(transformer).__name__} (it has "
            f"{list(family.placements)}); use placement='attention'."
        )
    refs = None if features is None else as_references(features)
    if negative_features is not None:
        if refs is None:
            raise FeatureError("negative_features were given without features; pass both.")
        if len(refs) != 1 or refs[0].negative is not None:
            raise FeatureError("negative_features go with one reference given as features; give each vh.Reference "
                               "its own negative= instead.")
        refs = [replace(refs[0], negative=negative_features)]
    selected = {s.name for s in family.select(transformer, config.blocks)}
    for ref in refs or []:
        if ref.blocks is not None:
            selected |= {s.name for s in family.select(transformer, ref.blocks)}
        if ref.mask is not None and not family.supports_masks():
            raise ConfigError(f"spatial masks (vh.Reference(mask=...)) are not implemented for "
                              f"{type(transformer).__name__}; drop the mask.")
    sites = [s for s in family.sites(transformer) if s.name in selected]
    if isinstance(config.scale, dict):
        bad = sorted(set(config.scale) - {s.index for s in sites})
        if bad:
            raise ConfigError(
                f"scale keys {bad} are not among the selected block indices {[s.index for s in sites]}; "
                "select those blocks too, or drop the keys."
            )
    projector = _as_projector(adapter)
    if adapter is not None:
        if hasattr(adapter, "check_target"):
            adapter.check_target(family, transformer, sites)
        if hasattr(adapter, "bind"):
            adapter.bind(family, transformer)
    injector = Injector(transformer, pipeline, family, sites, config, projector, encoder=encoder)
    if refs is not None:
        injector.set_references(refs)
    injector.install()
    handle = InjectionHandle(injector)
    _ACTIVE[transformer] = handle
    return handle


@contextlib.contextmanager
def inject(
    target: Any,
    features: Any,
    config: InjectionConfig | None = None,
    adapter: Any = None,
    negative_features: VLFeatures | None = None,
    encoder: Any = None,
) -> Iterator[InjectionHandle]:
    """Scoped `apply_injection`: the model is restored on leaving the block, also on an exception.

    Example:
        >>> with vh.inject(pipe, "reference.png", adapter=vh.load_adapter("checkpoints/toy-projection/final")):
        ...     image = pipe(prompt).images[0]
    """
    handle = apply_injection(target, features, config, adapter=adapter, negative_features=negative_features,
                             encoder=encoder)
    try:
        yield handle
    finally:
        handle.remove()


def remove_injection(target: Any) -> bool:
    """Remove vlhooks' injection from `target` if there is one; return whether there was."""
    transformer, _ = resolve_target(target)
    handle = _ACTIVE.get(transformer)
    if handle is None:
        return False
    handle.remove()
    return True


def get_injection(target: Any) -> InjectionHandle | None:
    """The live handle patching `target`, or None."""
    transformer, _ = resolve_target(target)
    return _ACTIVE.get(transformer)
