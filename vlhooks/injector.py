"""`Injector`: everything one patched model needs between denoiser calls.

Owns the features (and negative features), the per-generation cache of their embedding and pre-norm, the plan of
the current call (from `planning`), the `BlockCall` each targeted block receives, and the install / exact removal
of processors and hooks. Created by `vh.apply_injection`; users hold an `InjectionHandle` instead.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from . import planning
from .attention import BlockCall
from .config import InjectionConfig
from .errors import FeatureError
from .features import VLFeatures
from .hooks import (
    ATTENTION_HOOK,
    BLOCK_HOOK,
    MODULATION_HOOK,
    PROGRESS_HOOK,
    AttentionHook,
    BlockHook,
    HookSet,
    ModulationHook,
    ProgressHook,
    SiteSlot,
)
from .models.base import DiTFamily, Site
from .projector import Projector, ZeroShotProjector


def model_device_dtype(transformer: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(transformer.parameters())
    return p.device, p.dtype


class Injector:
    """Per-model injection state and the work the hooks hand over."""

    def __init__(self, transformer: nn.Module, pipeline: Any, family: DiTFamily, sites: list[Site],
                 config: InjectionConfig, projector: Projector):
        self.transformer = transformer
        self.pipeline_ref = weakref.ref(pipeline) if pipeline is not None else None
        self.family = family
        self.sites = sites
        self.config = config
        self.projector = projector
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
        self.plan: planning.CallPlan | None = None
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
        device, dtype = model_device_dtype(tf)
        if feats.tokens.device != device:
            raise FeatureError(
                f"{what} are on {feats.tokens.device} but the model is on {device}; move them with "
                f"`feats.to('{device}')` (vlhooks does not move features between devices for you)."
            )
        if feats.tokens.dtype != dtype:  # documented: features are cast to the model's dtype
            feats = VLFeatures(feats.tokens.to(dtype), mask=feats.mask, space=feats.space, source=feats.source)
        return feats

    def set_features(self, feats: VLFeatures, negative: VLFeatures | None = None,
                     active: list[bool] | None = None) -> None:
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
        """The feature bank: positive rows then negative rows, in the space the features were given.
        `[Bf + Bn, N, D]` and its mask."""
        f, n = self.features, self.negative
        if n is None:
            return f.tokens, f.mask
        tokens = torch.cat([f.tokens, n.tokens], dim=0)
        if f.mask is None and n.mask is None:
            return tokens, None
        fm = f.mask if f.mask is not None else torch.ones(f.tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        nm = n.mask if n.mask is not None else torch.ones(n.tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return tokens, torch.cat([fm, nm], dim=0)

    def _store(self) -> dict:
        """Where embeddings live: the per-features cache, except under autograd (training), where the adapter
        changes every step and the embedding is kept for the current call only."""
        return self.cache if not torch.is_grad_enabled() else self.forward_cache

    def embedded(self, site: Site) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The feature bank as the caption stream entering `site` `[Bf + Bn, N', D]`, and its mask."""
        key = ("embed", self.projector.embed_key(self.family, site))
        store = self._store()
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

    def pre_normed(self, site: Site) -> torch.Tensor:
        """The family's timestep-independent pre-norm of `embedded(site)`, cached like it."""
        key = ("pre_norm", self.projector.embed_key(self.family, site), self.family.norm_key(self.transformer, site))
        store = self._store()
        if key not in store:
            store[key] = self.family.text_norm(self.transformer, site, self.embedded(site)[0])
        return store[key]

    # ------------------------------------------------------------------ per call
    def begin_forward(self, args: tuple, kwargs: dict, context_name: str | None) -> None:
        self.plan = None
        self.forward_cache = {}
        compiling = torch.compiler.is_compiling()
        if not compiling:  # a Python counter changing under torch.compile would force a recompile per call
            self.calls += 1
        if self.features is None:
            return
        fam, cfg = self.family, self.config
        fam.check_call(args, kwargs)
        batch = fam.batch_size(args, kwargs)
        pipe = self.pipeline_ref() if self.pipeline_ref is not None else None
        guided = pipe is not None and bool(getattr(pipe, "do_classifier_free_guidance", False))
        layout = planning.guidance_layout(cfg.guidance, fam.batched_guidance, guided, batch, self.features.batch_size)
        roles = planning.row_roles(batch, layout, context_name)
        n_neg = 0 if self.negative is None else self.negative.batch_size
        assignment = planning.assign_rows(roles, self.features.batch_size, n_neg, self.active, self.same_graph)
        if compiling:
            strengths = None if cfg.always_full() else cfg.strength_tensor(fam.read_progress(args, kwargs))
            self.plan = planning.plan_call_tensor(assignment, strengths, batch)
        else:
            progress = fam.read_progress_list(args, kwargs)
            strengths = [cfg.strength_at(p) for p in (progress * batch if len(progress) == 1 else progress)]
            self.plan = planning.plan_call(assignment, strengths, batch, self.same_graph)
        if self.plan is None:
            return
        if not compiling:
            self.injected_calls += 1
        # Embed now, outside any block: a block may run under gradient checkpointing, whose recomputation must
        # see exactly the work of the original forward.
        for site in self.sites:
            self.pre_normed(site)

    def block_call(self, site: Site, args: tuple, kwargs: dict) -> BlockCall | None:
        """The block's `BlockCall` for this call, or None when the block runs unpatched."""
        plan = self.plan
        if plan is None or self._embedding:
            return None
        scale = self.config.block_scale(site.index)
        if scale == 0.0:
            return None  # exact: the block runs unpatched
        bank, mask = self.embedded(site)  # [Bf + Bn, N, D]
        pre = self.pre_normed(site)
        frows = plan.feature_rows
        if len(set(frows)) == 1 and bank.shape[0] == 1:
            embedded = bank.expand(len(frows), -1, -1)
            pre = pre.expand(len(frows), -1, -1)
            key_mask = None if mask is None else mask.expand(len(frows), -1)
        else:
            idx = torch.tensor(frows, device=bank.device)
            embedded = bank.index_select(0, idx)
            pre = pre.index_select(0, idx)
            key_mask = None if mask is None else mask.index_select(0, idx)
        placement = self.config.placement
        return BlockCall(
            site=site, transformer=self.transformer, family=self.family, projector=self.projector,
            block_args=args, block_kwargs=kwargs, rows=plan.rows, strength=planning.block_strengths(plan, scale),
            embedded=embedded, pre_normed=pre, key_mask=key_mask, mode=self.config.mode, placement=placement,
            image_len=self.family.image_tokens(args, kwargs) if placement == "block_output" else None,
            cache=self.cache, scratch=self.forward_cache,
        )

    def finish_block(self, call: BlockCall, output: Any) -> Any:
        """The block's output, plus what its processor left for it (placement `"block_output"`)."""
        if call.block_output is None:
            return output
        added, rows = call.block_output
        return self.family.add_to_block_output(call.site, output, added, rows)

    # ------------------------------------------------------------------ install / remove
    def install(self) -> None:
        tf = self.transformer
        try:
            for site in self.sites:
                attn = site.attention(tf)
                self.original_processors[site.name] = attn.processor
                attn.set_processor(self.family.make_processor(site, attn.processor))
            self.hooks.add(tf, ProgressHook(self), PROGRESS_HOOK)
            for site in self.sites:
                slot = SiteSlot()
                self.hooks.add(site.block(tf), BlockHook(self, site, slot), BLOCK_HOOK)
                self.hooks.add(site.attention(tf), AttentionHook(slot), ATTENTION_HOOK)
                mod = self.family.modulation_module(tf, site)
                if mod is not None:
                    self.hooks.add(mod, ModulationHook(slot), MODULATION_HOOK)
            if hasattr(tf, "_diffusers_hook"):
                tf._diffusers_hook.invalidate_child_registries_cache()
        except Exception:
            self.uninstall()
            raise

    def uninstall(self) -> None:
        self.hooks.remove_all()
        by_name = {s.name: s for s in self.sites}
        for name, base in self.original_processors.items():
            by_name[name].attention(self.transformer).set_processor(base)
        self.original_processors.clear()
        self.cache, self.forward_cache, self.plan = {}, {}, None
