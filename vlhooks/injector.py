"""`Injector`: everything one patched model needs between denoiser calls.

Owns the features (and negative features), the per-generation cache of their embedding and pre-norm, the plan of
the current call (from `planning`), the `BlockCall` each targeted block receives, and the install / exact removal
of processors and hooks. Created by `vh.apply_injection`; users hold an `InjectionHandle` instead.
"""

from __future__ import annotations

import warnings

import weakref
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from . import planning
from .attention import BlockCall, Segment
from .config import InjectionConfig
from .errors import ConfigError, FeatureError
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
from .encoding import features_of
from .references import Prepared, Reference, average, mask_for_grid, pool_mask, pool_tokens


def model_device_dtype(transformer: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(transformer.parameters())
    return p.device, p.dtype


def _pooled(feats: VLFeatures, cfg: InjectionConfig) -> VLFeatures:
    """`feats` pooled to at most `cfg.max_tokens` tokens, with the pooled mask."""
    if feats.num_tokens <= cfg.max_tokens:
        return feats
    tokens = pool_tokens(feats.tokens, feats.mask, cfg.max_tokens, cfg.pool)
    mask = pool_mask(feats.mask, feats.num_tokens, cfg.max_tokens) if cfg.pool == "mean" else None
    return VLFeatures(tokens, mask=mask, space=feats.space,
                      source={**feats.source, "pooled": [cfg.pool, cfg.max_tokens]})


def _rows_in_use(rows: list[int] | None, segments: list[Segment]) -> tuple[list[int] | None, list[Segment]]:
    """Several references: keep only the rows at least one of them reaches in this block (the others then compute
    exactly as unpatched), and the segments' tensors for those rows."""
    n = len(segments[0].strength)
    keep = [j for j in range(n) if any(s.strength[j] > 0 for s in segments)]
    if len(keep) == n:
        return rows, segments
    idx = torch.tensor(keep, device=segments[0].embedded.device)
    every = rows if rows is not None else list(range(n))
    out = []
    for s in segments:
        out.append(Segment(s.reference, s.embedded.index_select(0, idx),
                           None if s.pre_normed is None else s.pre_normed.index_select(0, idx),
                           None if s.key_mask is None else s.key_mask.index_select(0, idx),
                           [s.strength[j] for j in keep],
                           None if s.query_mask is None else s.query_mask.index_select(0, idx)))
    return [every[j] for j in keep], out


class Injector:
    """Per-model injection state and the work the hooks hand over."""

    def __init__(self, transformer: nn.Module, pipeline: Any, family: DiTFamily, sites: list[Site],
                 config: InjectionConfig, projector: Projector, encoder: Any = None):
        self.transformer = transformer
        self.pipeline_ref = weakref.ref(pipeline) if pipeline is not None else None
        self.family = family
        self.sites = sites
        self.config = config
        self.projector = projector
        self.encoder = encoder  # for references given as images (None: the adapter's recorded encoder)
        self.original_processors: dict[str, Any] = {}
        self.hooks = HookSet()
        self.references: list[Prepared] = []
        self.active: list[bool] | None = None  # per feature row of reference 0; False = no injection (image drop)
        self.grid: tuple[int, int] | None = None  # the image-token grid of the current call (spatial masks only)
        self.call_memo: dict = {}  # `DiTFamily.call_role`'s memory of earlier calls
        # True: a conditional row that injects nothing in a call (switched off by `active`, or outside the window)
        # stays in the plan with strength 0 (its extra keys get a -inf logit; a decoupled output is multiplied by
        # 0) instead of leaving it, so every call runs the extras through the same modules whatever the data.
        # Sharded training (FSDP) needs it: gathering a unit's weights is a collective, so every rank must run the
        # same units in the same order, forward and backward. Off: such rows skip the extras (exact and faster).
        self.same_graph = False
        self.cache: dict = {}  # timestep-independent tensors: valid until the features change
        self.plan: planning.CallPlan | None = None
        self.timestep: torch.Tensor | None = None  # the current call's timestep argument, as the denoiser got it
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

    def set_references(self, refs: list[Reference], active: list[bool] | None = None) -> None:
        """Check, pool and store `refs` (everything is checked before anything changes). `active` (one bool per
        feature row of the first reference) switches rows off, e.g. for image dropout in training."""
        cfg = self.config
        if not refs:
            raise FeatureError("give at least one reference (VLFeatures or vh.Reference).")
        patched = {s.name for s in self.sites}
        default = {s.name for s in self.family.select(self.transformer, cfg.blocks)}  # a reference's default blocks
        features, negatives, prepared = [], [], []
        device = model_device_dtype(self.transformer)[0]
        for i, ref in enumerate(refs):
            what = "features" if len(refs) == 1 else f"reference {i}'s features"
            feats = self.check_features(self._encoded(ref.features, what, device), what)
            neg = None
            if ref.negative is not None:
                neg = self.check_features(self._encoded(ref.negative, f"{what} (negative)", device),
                                          f"{what} (negative)")
                if neg.num_tokens != feats.num_tokens or neg.space != feats.space:
                    raise FeatureError(
                        f"negative features have {neg.num_tokens} tokens ({neg.space} space) but features have "
                        f"{feats.num_tokens} ({feats.space}); pad both to one length and pass a mask."
                    )
            if ref.mask is not None and ref.mask.ndim == 3 and ref.mask.shape[0] not in (1, feats.batch_size):
                raise FeatureError(f"reference {i}'s mask has {ref.mask.shape[0]} images but its features have "
                                   f"{feats.batch_size} rows; give one mask per feature row, or one for all.")
            if cfg.max_tokens is not None:
                feats = _pooled(feats, cfg)
                neg = None if neg is None else _pooled(neg, cfg)
            features.append(feats)
            negatives.append(neg)
            sites = default if ref.blocks is None else {s.name for s in self.family.select(self.transformer,
                                                                                             ref.blocks)}
            if not sites <= patched:
                raise ConfigError(f"reference {i} selects blocks {sorted(sites - patched)}, which this patch does not "
                                  "cover; apply the injection with those blocks (InjectionConfig.blocks) first.")
            if ref.mask is not None:
                blind = sorted(s.name for s in self.sites
                               if s.name in sites and s.kind in self.family.caption_only_kinds)
                if blind:
                    warnings.warn(
                        f"reference {i}'s spatial mask cannot apply in {blind}: those blocks have no image queries "
                        "(caption tokens only), so the reference reaches the whole image through the caption; leave "
                        "them out of its blocks (e.g. blocks='all', the main blocks) to keep it inside its mask.",
                        stacklevel=3)
            prepared.append(Prepared(feats, neg, frozenset(sites), ref.timing(cfg), float(ref.scale), ref.mask))
        if cfg.combine == "average" and len(refs) > 1:
            feats, neg = average(refs, features, negatives)
            prepared = [Prepared(feats, neg, frozenset(default), cfg, 1.0)]
        if active is not None:
            active = [bool(a) for a in active]
            if len(active) != prepared[0].features.batch_size:
                raise FeatureError(f"active has {len(active)} entries but features have "
                                   f"{prepared[0].features.batch_size} rows.")
        self.references, self.active = prepared, active
        self.cache, self.call_memo = {}, {}  # nothing stale after new references

    def _encoded(self, x: Any, what: str, device: torch.device) -> Any:
        """`x` itself, or if it is an image its features (on the model's device)."""
        feats = features_of(x, self.encoder, None if isinstance(self.projector, ZeroShotProjector) else
                            self.projector, what)
        return feats.to(device) if feats is not x else x

    def set_features(self, feats: VLFeatures, negative: VLFeatures | None = None,
                     active: list[bool] | None = None) -> None:
        """One reference at the config's settings (the single-reference form of `set_references`)."""
        self.set_references([Reference(feats, negative=negative)], active)

    def _bank(self, r: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Reference `r`'s feature bank: positive rows then negative rows, in the space the features were given.
        `[Bf + Bn, N, D]` and its mask."""
        f, n = self.references[r].features, self.references[r].negative
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

    def embedded(self, site: Site, r: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Reference `r`'s bank as the caption stream entering `site` `[Bf + Bn, N', D]`, and its mask."""
        key = ("embed", r, self.projector.embed_key(self.family, site))
        store = self._store()
        if key in store:
            return store[key]
        tokens, mask = self._bank(r)
        if self.references[r].features.space == "hidden":
            out = tokens
        else:
            self._embedding = True
            try:
                out = self.projector.embed(self.family, self.transformer, tokens, mask, site, self.cache)
            finally:
                self._embedding = False
            mask = self.projector.output_mask(mask)
        if not torch.compiler.is_compiling() and out.device.type != "meta" and not bool(torch.isfinite(out).all()):
            raise FeatureError(
                "the injected tokens are NaN or Inf once embedded (features changed in place after apply_injection, "
                "or an adapter that overflows in this dtype); give finite features with handle.set_features(...), "
                "or run the adapter in float32."
            )
        store[key] = (out, mask)
        return store[key]

    def pre_normed(self, site: Site, r: int = 0) -> torch.Tensor | None:
        """The family's timestep-independent pre-norm of `embedded(site, r)`, cached like it (None for a projector
        whose K/V do not go through the block's text path, `text_path = False`)."""
        if not getattr(self.projector, "text_path", True):
            self.embedded(site, r)
            return None
        key = ("pre_norm", r, self.projector.embed_key(self.family, site),
               self.family.norm_key(self.transformer, site))
        store = self._store()
        if key not in store:
            store[key] = self.family.text_norm(self.transformer, site, self.embedded(site, r)[0])
        return store[key]

    # ------------------------------------------------------------------ per call
    def begin_forward(self, args: tuple, kwargs: dict, context_name: str | None) -> None:
        self.plan, self.grid = None, None
        self.forward_cache = {}
        compiling = torch.compiler.is_compiling()
        if not compiling:  # a Python counter changing under torch.compile would force a recompile per call
            self.calls += 1
        if not self.references:
            return
        fam, cfg = self.family, self.config
        fam.check_call(args, kwargs)
        self.timestep = fam.read_timestep(args, kwargs)
        batch = fam.batch_size(args, kwargs)
        pipe = self.pipeline_ref() if self.pipeline_ref is not None else None
        guided = pipe is not None and fam.pipeline_guides(pipe, args, kwargs)
        if guided and context_name is None and cfg.guidance == "auto":
            context_name = fam.call_role(args, kwargs, self.call_memo)
        feature_batch = max(ref.features.batch_size for ref in self.references)
        layout = planning.guidance_layout(cfg.guidance, fam.batched_guidance, guided, batch, feature_batch)
        roles = planning.row_roles(batch, layout, context_name)
        # the progress is read to the host (one sync) only where a reference's strength changes with it
        timed = any(ref.scale != 0.0 and not ref.timing.always_full() for ref in self.references)
        progress = fam.read_progress_list(args, kwargs) if timed and not compiling else None
        plans: dict[int, planning.ReferencePlan | None] = {}
        for r, ref in enumerate(self.references):
            if ref.scale == 0.0:
                plans[r] = None  # exact: this reference is off
                continue
            n_neg = 0 if ref.negative is None else ref.negative.batch_size
            active = self.active if r == 0 else None
            assignment = planning.assign_rows(roles, ref.features.batch_size, n_neg, active, self.same_graph)
            if compiling:
                strengths = None if ref.timing.always_full() else ref.timing.strength_tensor(
                    fam.read_progress(args, kwargs))
                plans[r] = planning.plan_call_tensor(assignment, strengths, batch)
            else:
                if progress is None:  # whole window, constant schedule: the factor is 1 at every step
                    values = [1.0] * batch
                else:
                    values = [ref.timing.strength_at(p) for p in (progress * batch if len(progress) == 1 else progress)]
                plans[r] = planning.plan_call(assignment, values, batch, self.same_graph)
        self.plan = planning.merge(plans, batch)
        if self.plan is None:
            return
        if any(ref.mask is not None for ref in self.references):
            self.grid = fam.image_grid(self.transformer, args, kwargs)
        if not compiling:
            self.injected_calls += 1
        # Embed now, outside any block: a block may run under gradient checkpointing, whose recomputation must
        # see exactly the work of the original forward.
        for r, _ in self.plan.parts:
            for site in self.sites:
                if site.name in self.references[r].sites:
                    self.pre_normed(site, r)

    def _query_mask(self, r: int, part: planning.ReferencePlan) -> torch.Tensor | None:
        """Reference `r`'s spatial mask over the image tokens of this call, one row per plan row. `[R, L_img]`."""
        ref = self.references[r]
        if ref.mask is None:
            return None
        key = ("mask", self.grid)
        if key not in ref.cache:
            device, dtype = model_device_dtype(self.transformer)
            m = mask_for_grid(ref.mask.to(device), self.grid, resize=self.pipeline_ref is not None)
            ref.cache[key] = m.to(dtype)  # [B_m, h * w]
        m = ref.cache[key]
        if m.shape[0] == 1:
            return m.expand(len(part.feature_rows), -1)
        n_pos = ref.features.batch_size
        idx = _device_index([f if f < n_pos else f - n_pos for f in part.feature_rows], m.device)
        return m.index_select(0, idx)

    def block_call(self, site: Site, args: tuple, kwargs: dict) -> BlockCall | None:
        """The block's `BlockCall` for this call, or None when the block runs unpatched."""
        plan = self.plan
        if plan is None or self._embedding:
            return None
        scale = self.config.block_scale(site.index)
        if scale == 0.0:
            return None  # exact: the block runs unpatched
        eager = not torch.compiler.is_compiling()
        segments = []
        for r, part in plan.parts:
            ref = self.references[r]
            if site.name not in ref.sites:
                continue
            strength = planning.block_strengths(part, scale * ref.scale)
            if eager and isinstance(strength, list) and not any(strength) and not self.same_graph:
                continue  # exact: this reference is off in this block
            bank, mask = self.embedded(site, r)  # [Bf + Bn, N, D]
            pre = self.pre_normed(site, r)
            frows = part.feature_rows
            if len(set(frows)) == 1 and bank.shape[0] == 1:
                embedded = bank.expand(len(frows), -1, -1)
                pre = None if pre is None else pre.expand(len(frows), -1, -1)
                key_mask = None if mask is None else mask.expand(len(frows), -1)
            elif list(frows) == list(range(frows[0], frows[0] + len(frows))):  # a run of bank rows: a view, no copy
                a, b = frows[0], frows[0] + len(frows)
                embedded = bank[a:b]
                pre = None if pre is None else pre[a:b]
                key_mask = None if mask is None else mask[a:b]
            else:
                idx = _device_index(frows, bank.device)
                embedded = bank.index_select(0, idx)
                pre = None if pre is None else pre.index_select(0, idx)
                key_mask = None if mask is None else mask.index_select(0, idx)
            segments.append(Segment(r, embedded, pre, key_mask, strength, self._query_mask(r, part)))
        if not segments:
            return None
        rows = plan.rows
        if eager and len(segments) > 1 and not self.same_graph:
            rows, segments = _rows_in_use(rows, segments)
        span = None
        if any(s.query_mask is not None for s in segments):
            span = self.family.image_span(site, args, kwargs, self.grid)
            if span is None:  # a block without image queries (e.g. a caption refiner): masks do not apply
                segments = [replace(s, query_mask=None) for s in segments]
        first = segments[0]
        placement = self.config.placement
        return BlockCall(
            site=site, transformer=self.transformer, family=self.family, projector=self.projector,
            block_args=args, block_kwargs=kwargs, rows=rows, strength=first.strength,
            embedded=first.embedded, pre_normed=first.pre_normed, key_mask=first.key_mask, mode=self.config.mode,
            placement=placement,
            image_len=self.family.image_tokens(args, kwargs) if placement == "block_output" else None,
            timestep=self.timestep, cache=self.cache, scratch=self.forward_cache, segments=segments,
            kv_scaling=self.config.kv_scaling,
            image_span=span,
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
        self.cache, self.forward_cache, self.plan, self.timestep, self.call_memo = {}, {}, None, None, {}


def _device_index(rows: list[int], device: torch.device) -> torch.Tensor:
    """`torch.tensor(rows, device=device)` without a stream sync: a plain host-to-device copy waits for every
    queued kernel (once per block and step, that starved the GPU while the host caught up); from pinned memory
    with `non_blocking` it is queued like a kernel."""
    idx = torch.tensor(rows)
    if device.type == "cuda":
        return idx.pin_memory().to(device, non_blocking=True)
    return idx.to(device)
