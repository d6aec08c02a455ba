"""Patching a loaded pipeline or transformer: `apply_injection`, `inject`, `remove_injection`, `list_sites`.

Owns the `Injector` (per-model state: features, the per-generation cache, the plan of the current call) and the
`InjectionHandle` users hold. This mutates the model in place: it swaps the targeted attention modules'
processors and registers diffusers hooks; `remove()` restores both exactly.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass, replace
from typing import Any, Iterator

import torch
from diffusers.hooks import ModelHook
from torch import nn

from .attention import ExtraKV
from .config import InjectionConfig
from .errors import ConfigError, FeatureError, TargetError
from .features import VLFeatures
from .hooks import BLOCK_HOOK, PROGRESS_HOOK, BlockHook, HookSet, ProgressHook
from .models import family_for
from .models.base import DiTFamily, Site
from .projector import ZeroShotProjector

logger = logging.getLogger(__name__)

_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, InjectionHandle]" = weakref.WeakKeyDictionary()
MODULATION_HOOK = "vlhooks.modulation"


class ModulationHook(ModelHook):
    """On the block's modulation layer (the family's `modulation_module`): hands its output to the block's
    processor, so that the extras' text path reuses the block's own modulation instead of computing it again."""

    def __init__(self, processor: Any):
        super().__init__()
        self.processor = processor

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        self.processor.captured_mod = output
        return output


# ---------------------------------------------------------------------------------------------------- targets
def resolve_target(target: Any) -> tuple[nn.Module, Any]:
    """`(transformer, pipeline or None)` for a diffusers pipeline, a transformer, or a compiled transformer."""
    pipeline = None
    if not isinstance(target, nn.Module) and hasattr(target, "transformer"):
        pipeline, target = target, target.transformer
        if target is None:
            raise TargetError("The pipeline has no transformer loaded; load one or pass the transformer itself.")
    target = getattr(target, "_orig_mod", target)  # torch.compile wrapper -> the module it wraps
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


def _model_device_dtype(transformer: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(transformer.parameters())
    return p.device, p.dtype


# ---------------------------------------------------------------------------------------------------- plan
@dataclass
class _Plan:
    """Which batch rows of the current call get extra K/V, from which feature rows, at what strength."""

    rows: list[int] | None  # model rows that receive extras (None: all rows, in order)
    feature_rows: list[int]  # index into the feature bank, one per receiving row
    factors: list[float] | torch.Tensor  # schedule x window per receiving row (before the block scale)


class Injector:
    """Everything one patched model needs between calls. Created by `apply_injection`."""

    def __init__(
        self,
        transformer: nn.Module,
        pipeline: Any,
        family: DiTFamily,
        sites: list[Site],
        config: InjectionConfig,
        projector: Any,
    ):
        self.transformer = transformer
        self.pipeline_ref = weakref.ref(pipeline) if pipeline is not None else None
        self.family = family
        self.sites = sites
        self.config = config
        self.projector = projector
        self.processors: dict[str, Any] = {}
        self.original_processors: dict[str, Any] = {}
        self.hooks = HookSet()
        self.features: VLFeatures | None = None
        self.negative: VLFeatures | None = None
        self.active: list[bool] | None = None  # per feature row; False = that row injects nothing (image drop)
        # True: a conditional row that injects nothing in a call (switched off by `active`, or outside the window)
        # stays in the plan with strength 0 (its extra keys get a -inf logit; a decoupled output is multiplied by
        # 0) instead of leaving it, so every call runs the extras through the same modules whatever the data.
        # Sharded training (FSDP) needs it: gathering a unit's weights is a collective, so every rank must run the
        # same units in the same order, forward and backward. Off: such rows skip the extras (exact and faster).
        self.same_graph = False
        self.cache: dict = {}  # timestep-independent tensors: valid until the features change
        self.plan: _Plan | None = None
        self.forward_cache: dict = {}  # embeddings for the current call when the cache must not persist
        self._embedding = False
        self.calls = 0  # denoiser calls seen (for tests and reports)
        self.injected_calls = 0  # calls in which at least one row received extras

    # ------------------------------------------------------------------ features
    def check_features(self, feats: VLFeatures, what: str = "features") -> VLFeatures:
        if not isinstance(feats, VLFeatures):
            raise FeatureError(f"{what} must be vh.VLFeatures(tokens, mask=None), got {type(feats).__name__}.")
        feats.validate()
        tf = self.transformer
        if feats.space == "hidden":
            want = self.family.hidden_width(tf)
            where = f"the hidden width of {type(tf).__name__}"
        else:
            want = self.projector.feature_width(self.family, tf)
            where = (
                f"the caption width of {type(tf).__name__} (the width of the prompt_embeds its pipeline passes)"
                if isinstance(self.projector, ZeroShotProjector)
                else "the adapter's feature width"
            )
        if feats.width != want:
            raise FeatureError(
                f"{what} have width {feats.width} but {where} is {want}. Project or pick features of width {want}"
                + (", or use a trained adapter (adapter=...) whose input width is "
                   f"{feats.width}." if isinstance(self.projector, ZeroShotProjector) else ".")
            )
        device, dtype = _model_device_dtype(tf)
        if feats.tokens.device != device:
            raise FeatureError(
                f"{what} are on {feats.tokens.device} but the model is on {device}; move them with "
                f"`feats.to('{device}')` (vlhooks does not move features between devices for you)."
            )
        if feats.tokens.dtype != dtype:  # documented: features are cast to the model's dtype
            feats = VLFeatures(feats.tokens.to(dtype), mask=feats.mask, space=feats.space, source=feats.source)
        return feats

    def set_features(
        self, feats: VLFeatures, negative: VLFeatures | None = None, active: list[bool] | None = None
    ) -> None:
        feats = self.check_features(feats)
        if active is not None:
            active = [bool(a) for a in active]
            if len(active) != feats.batch_size:
                raise FeatureError(f"active has {len(active)} entries but features have {feats.batch_size} rows.")
        if negative is not None:
            negative = self.check_features(negative, "negative features")
            if negative.num_tokens != feats.num_tokens or negative.space != feats.space:
                raise FeatureError(
                    f"negative features have {negative.num_tokens} tokens ({negative.space} space) but features have "
                    f"{feats.num_tokens} ({feats.space}); pad both to one length and pass a mask."
                )
        self.features, self.negative, self.active = feats, negative, active
        self.cache = {}  # nothing stale after set_features

    def _bank(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positive rows then negative rows, in the space the features were given. `[Bf + Bn, N, D]`."""
        f, n = self.features, self.negative
        if n is None:
            return f.tokens, f.mask
        tokens = torch.cat([f.tokens, n.tokens], dim=0)
        if f.mask is None and n.mask is None:
            return tokens, None
        fm = f.mask if f.mask is not None else torch.ones(f.tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        nm = n.mask if n.mask is not None else torch.ones(n.tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return tokens, torch.cat([fm, nm], dim=0)

    def embedded(self, site: Site) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The feature bank as the caption stream entering `site`, cached while it cannot change."""
        key = ("embed", self.projector.embed_key(self.family, site))
        persistent = not torch.is_grad_enabled()  # under autograd (training) the adapter changes every step
        store = self.cache if persistent else self.forward_cache
        if key in store:
            return store[key]
        tokens, mask = self._bank()
        if self.features.space == "hidden":
            out = tokens
        else:
            self._embedding = True
            try:
                out = self.projector.embed(self.family, self.transformer, tokens, mask, site, self.cache)
            finally:
                self._embedding = False
            mask = self.projector.output_mask(mask)
        store[key] = (out, mask)
        return store[key]

    def normed(self, site: Site) -> torch.Tensor:
        """The family's timestep-independent pre-norm of the embedded bank for `site`, cached like `embedded`."""
        key = ("normed", self.projector.embed_key(self.family, site), self.family.norm_key(self.transformer, site))
        store = self.cache if not torch.is_grad_enabled() else self.forward_cache
        if key not in store:
            bank, _ = self.embedded(site)
            store[key] = self.family.text_norm(self.transformer, site, bank)
        return store[key]

    # ------------------------------------------------------------------ per call
    def _roles(self, batch: int, context_name: str | None) -> list[str]:
        """'c' (conditional) or 'u' (unconditional) per model row."""
        g = self.config.guidance
        if context_name == "uncond":
            return ["u"] * batch
        layout = None
        if g in ("cond_first", "uncond_first"):
            layout = g
        elif g == "auto" and self.family.batched_guidance and self.pipeline_ref is not None:
            pipe = self.pipeline_ref()
            if pipe is not None and bool(getattr(pipe, "do_classifier_free_guidance", False)) and batch % 2 == 0:
                if (batch // 2) % self.features.batch_size == 0:
                    layout = self.family.batched_guidance
        if layout is None:
            return ["c"] * batch
        if batch % 2:
            raise FeatureError(
                f"guidance={layout!r} needs an even model batch ([cond; uncond] halves), got {batch} rows; "
                "set InjectionConfig(guidance='none') if this call has no unconditional rows."
            )
        half = batch // 2
        return (["c"] * half + ["u"] * half) if layout == "cond_first" else (["u"] * half + ["c"] * half)

    @staticmethod
    def _feature_row(k: int, n_rows: int, n_feats: int, what: str) -> int:
        if n_feats == 1:
            return 0
        if n_rows % n_feats:
            raise FeatureError(
                f"{what} have batch {n_feats} but the model call has {n_rows} such rows; pass 1 row (broadcast), "
                f"{n_rows} rows, or a divisor of {n_rows} (each row repeated for images per prompt)."
            )
        return k // (n_rows // n_feats)

    def begin_forward(self, args: tuple, kwargs: dict, context_name: str | None) -> None:
        self.plan = None
        self.forward_cache = {}
        compiling = torch.compiler.is_compiling()
        if not compiling:  # a Python counter changing under torch.compile would force a recompile per call
            self.calls += 1
        if self.features is None:
            return
        fam = self.family
        fam.check_call(args, kwargs)
        batch = fam.batch_size(args, kwargs)
        roles = self._roles(batch, context_name)
        n_pos = self.features.batch_size
        n_neg = 0 if self.negative is None else self.negative.batch_size
        n_c, n_u = roles.count("c"), roles.count("u")
        rows, frows, off, kc, ku = [], [], set(), 0, 0  # off: rows kept at strength 0 (same_graph)
        for i, role in enumerate(roles):
            if role == "c":
                f = self._feature_row(kc, n_c, n_pos, "features")
                on = self.active is None or self.active[f]
                if on or self.same_graph:
                    rows.append(i)
                    frows.append(f)
                    if not on:
                        off.add(i)
                kc += 1
            else:
                if n_neg:
                    rows.append(i)
                    frows.append(n_pos + self._feature_row(ku, n_u, n_neg, "negative features"))
                ku += 1
        if not rows:
            return
        if compiling and self.config.always_full():
            # nothing to gate (unless same_graph kept rows at 0): no bias, fastest kernels
            factors: list[float] | torch.Tensor = [0.0 if r in off else 1.0 for r in rows]
        elif compiling:
            # no host sync under compile: strengths stay tensors; zero strength becomes a -inf bias
            factor = self.config.factor_tensor(fam.read_progress(args, kwargs))  # [B] or [1]
            factor = factor.expand(batch) if factor.shape[0] == 1 else factor
            factors = factor[rows]
            if off:
                factors = factors * torch.tensor([r not in off for r in rows], dtype=factors.dtype,
                                                 device=factors.device)
        else:
            prog = fam.read_progress_list(args, kwargs)
            prog = prog * batch if len(prog) == 1 else prog
            all_f = [0.0 if r in off else self.config.factor(p) for r, p in enumerate(prog)]
            keep = [j for j, r in enumerate(rows) if all_f[r] > 0.0 or self.same_graph]
            if not keep:
                return
            rows = [rows[j] for j in keep]
            frows = [frows[j] for j in keep]
            factors = [all_f[r] for r in rows]
        self.plan = _Plan(rows=None if rows == list(range(batch)) else rows, feature_rows=frows, factors=factors)
        if not compiling:
            self.injected_calls += 1
        # Embed now, outside any block: a block may run under gradient checkpointing, whose recomputation must
        # see exactly the work of the original forward.
        for site in self.sites:
            self.embedded(site)
            self.normed(site)

    def prepare_block(self, site: Site, args: tuple, kwargs: dict) -> None:
        proc = self.processors[site.name]
        proc.pending = None
        proc.normed = None
        proc.to_block_output = None
        plan = self.plan
        if plan is None or self._embedding:
            return
        scale = self.config.block_scale(site.index)
        if scale == 0.0:
            return  # exact: the block runs unpatched
        if isinstance(plan.factors, torch.Tensor):
            lam: list[float] | torch.Tensor = plan.factors * scale
        else:
            lam = [f * scale for f in plan.factors]
        bank, mask = self.embedded(site)  # [Bf + Bn, N, D]
        normed = self.normed(site)
        frows = plan.feature_rows
        if len(set(frows)) == 1 and bank.shape[0] == 1:
            hidden = bank.expand(len(frows), -1, -1)
            normed = normed.expand(len(frows), -1, -1)
            key_mask = None if mask is None else mask.expand(len(frows), -1)
        else:
            idx = torch.tensor(frows, device=bank.device)
            hidden = bank.index_select(0, idx)
            normed = normed.index_select(0, idx)
            key_mask = None if mask is None else mask.index_select(0, idx)
        proc.normed = (hidden, normed)  # read by the family's text_input for exactly this `hidden`
        fam, tf, rows, projector, cache = self.family, self.transformer, plan.rows, self.projector, self.cache

        # The K/V are computed inside the processor, after the block's own modulation (captured, not recomputed).
        def make_kv():
            return projector.kv(fam, tf, site, hidden, args, kwargs, rows, cache)

        placement = self.config.placement
        image_len = fam.image_tokens(args, kwargs) if placement == "block_output" else None
        proc.pending = ExtraKV(k=None, v=None, rows=rows, lam=lam, key_mask=key_mask, mode=self.config.mode,
                               placement=placement, image_len=image_len, make_kv=make_kv,
                               scratch=self.forward_cache)

    def finish_block(self, site: Site, output: Any) -> Any:
        """The block's output, plus what its processor left for it (placement `"block_output"`)."""
        proc = self.processors[site.name]
        left, proc.to_block_output = proc.to_block_output, None
        if left is None:
            return output
        added, rows = left
        return self.family.add_to_block_output(site, output, added, rows)

    # ------------------------------------------------------------------ install / remove
    def install(self) -> None:
        tf = self.transformer
        try:
            for site in self.sites:
                attn = site.attention(tf)
                base = attn.processor
                proc = self.family.make_processor(site, base)
                self.original_processors[site.name] = base
                self.processors[site.name] = proc
                attn.set_processor(proc)
            self.hooks.add(tf, ProgressHook(self), PROGRESS_HOOK)
            for site in self.sites:
                self.hooks.add(site.block(tf), BlockHook(self, site), BLOCK_HOOK)
                mod = self.family.modulation_module(tf, site)
                if mod is not None:
                    self.hooks.add(mod, ModulationHook(self.processors[site.name]), MODULATION_HOOK)
            if hasattr(tf, "_diffusers_hook"):
                tf._diffusers_hook.invalidate_child_registries_cache()
        except Exception:
            self.uninstall()
            raise

    def uninstall(self) -> None:
        tf = self.transformer
        self.hooks.remove_all()
        for name, base in self.original_processors.items():
            attn = tf.get_submodule(name).get_submodule(
                next(s.attn_name for s in self.sites if s.name == name)
            )
            attn.set_processor(base)
        self.original_processors.clear()
        self.processors.clear()
        self.cache, self.forward_cache, self.plan = {}, {}, None


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
        """Replace the injected features (and optional negative features for unconditional rows). `active`
        (one bool per feature row) switches rows off, e.g. for image dropout in training."""
        self.injector.set_features(features, negative, active)

    def set_scale(self, scale: float | dict[int, float]) -> None:
        """Change the strength: a float, or `{block index: float}`."""
        inj = self.injector
        new = replace(inj.config, scale=scale)  # validates
        if isinstance(scale, dict):
            allowed = {s.index for s in inj.sites}
            bad = sorted(set(scale) - allowed)
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
def _as_projector(adapter: Any) -> Any:
    if adapter is None:
        return ZeroShotProjector()
    needed = ("feature_width", "embed_key", "embed", "kv", "output_mask")
    missing = [m for m in needed if not callable(getattr(adapter, m, None))]
    if missing:
        raise ConfigError(
            f"adapter {type(adapter).__name__} lacks {missing}; pass an adapter from vh.load_adapter(path) "
            "or a ZeroShotProjector subclass."
        )
    return adapter


def apply_injection(
    target: Any,
    features: VLFeatures | None,
    config: InjectionConfig | None = None,
    adapter: Any = None,
    negative_features: VLFeatures | None = None,
) -> InjectionHandle:
    """Patch `target` (a diffusers pipeline or its transformer) to inject `features` as extra K/V.

    Everything is checked before anything changes: on a bad input the model is left unpatched.

    Args:
        target: a `ZImagePipeline` / `FluxPipeline` / `StableDiffusion3Pipeline` (or any pipeline with a
            supported `.transformer`), or the transformer itself.
        features (`VLFeatures`): the reference tokens; `None` patches now and waits for `handle.set_features`.
        config (`InjectionConfig`): where, when, how strongly (defaults: all main blocks, whole run, scale 1).
        adapter: a trained adapter (`vh.load_adapter`); `None` is zero-shot (the block's own text path).
        negative_features (`VLFeatures`, *optional*): injected into unconditional rows instead of nothing.

    Returns:
        `InjectionHandle` with `set_features`, `set_scale`, `remove`.

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
    if config.placement not in family.placements:
        raise ConfigError(
            f"placement={config.placement!r} is not implemented for {type(transformer).__name__} (it has "
            f"{list(family.placements)}); use placement='attention'."
        )
    sites = family.select(transformer, config.blocks)
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
    injector = Injector(transformer, pipeline, family, sites, config, projector)
    if features is not None:
        injector.set_features(features, negative_features)
    elif negative_features is not None:
        raise FeatureError("negative_features were given without features; pass both.")
    injector.install()
    handle = InjectionHandle(injector)
    _ACTIVE[transformer] = handle
    return handle


@contextlib.contextmanager
def inject(
    target: Any,
    features: VLFeatures | None,
    config: InjectionConfig | None = None,
    adapter: Any = None,
    negative_features: VLFeatures | None = None,
) -> Iterator[InjectionHandle]:
    """Scoped `apply_injection`: the model is restored on leaving the block, also on an exception.

    Example:
        >>> with vh.inject(pipe, feats, vh.InjectionConfig(scale=0.8)) as handle:
        ...     image = pipe(prompt).images[0]
    """
    handle = apply_injection(target, features, config, adapter=adapter, negative_features=negative_features)
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
