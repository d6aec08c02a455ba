"""Which batch rows of one denoiser call receive extra K/V, from which feature rows, at what strength.

Pure functions of the call's layout (batch size, guidance layout, cache context), the feature batch, the rows
switched off and the strength of each row: no model, no hooks. The `Injector` calls them once per denoiser call
and reference (`plan_call`), then merges the references' plans (`merge`); the tests call them directly.

Vocabulary: a model row is *conditional* (`"c"`) or *unconditional* (`"u"`, the negative branch of
classifier-free guidance). Conditional rows take the positive features, unconditional rows the negative features
if any were given, else nothing. The *feature bank* stacks the positive feature rows then the negative ones;
`feature_rows` index into it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import FeatureError

COND, UNCOND = "c", "u"
LAYOUTS = ("cond_first", "uncond_first")


@dataclass(frozen=True)
class ReferencePlan:
    """The plan of one reference in one denoiser call.

    `rows`: the model rows that receive its extra K/V, in order (`None`: every row). `feature_rows`: the bank row
    each receiving row reads. `strengths`: each receiving row's strength before the block's and the reference's
    scale (the schedule inside the window; 0 for a row kept at strength 0 by `same_graph`): Python floats, or a
    `[R]` tensor under `torch.compile` (where nothing may sync with the host)."""

    rows: list[int] | None
    feature_rows: list[int]
    strengths: list[float] | torch.Tensor


@dataclass(frozen=True)
class CallPlan:
    """The merged plan of one denoiser call: `rows` receive extras from at least one reference (`None`: every
    row); `parts` pairs each planned reference's index with its plan over exactly those rows (a row a reference
    does not reach reads bank row 0 at strength 0)."""

    rows: list[int] | None
    parts: tuple[tuple[int, ReferencePlan], ...]


def guidance_layout(guidance: str, family_layout: str | None, pipeline_cfg: bool, batch: int,
                    feature_batch: int) -> str | None:
    """The `[cond; uncond]` layout of a batch, or None when every row is conditional.

    `guidance` is `InjectionConfig.guidance`; `family_layout` the family pipeline's batched-guidance layout
    (`DiTFamily.batched_guidance`); `pipeline_cfg` whether the pipeline driving the call does classifier-free
    guidance. `"auto"` takes the family layout when the pipeline guides and the batch splits into halves whose
    size the feature batch divides."""
    if guidance in LAYOUTS:
        return guidance
    if guidance == "auto" and family_layout is not None and pipeline_cfg and batch % 2 == 0:
        if (batch // 2) % feature_batch == 0:
            return family_layout
    return None


def row_roles(batch: int, layout: str | None, context_name: str | None = None) -> list[str]:
    """`"c"` / `"u"` per model row. A call inside diffusers' `cache_context("uncond")` is unconditional as a whole
    (pipelines with separate guidance calls: Flux true CFG)."""
    if context_name == "uncond":
        return [UNCOND] * batch
    if layout is None:
        return [COND] * batch
    if batch % 2:
        raise FeatureError(
            f"guidance={layout!r} needs an even model batch ([cond; uncond] halves), got {batch} rows; "
            "set InjectionConfig(guidance='none') if this call has no unconditional rows."
        )
    half = batch // 2
    return [COND] * half + [UNCOND] * half if layout == "cond_first" else [UNCOND] * half + [COND] * half


def feature_row(k: int, n_rows: int, n_feats: int, what: str = "features") -> int:
    """The feature row for the `k`-th of `n_rows` rows of one role: a batch of 1 broadcasts; `n_feats` rows that
    divide `n_rows` are repeated in blocks (several images per prompt)."""
    if n_feats == 1:
        return 0
    if n_rows % n_feats:
        raise FeatureError(
            f"{what} have batch {n_feats} but the model call has {n_rows} such rows; pass 1 row (broadcast), "
            f"{n_rows} rows, or a divisor of {n_rows} (each row repeated for images per prompt)."
        )
    return k // (n_rows // n_feats)


@dataclass(frozen=True)
class RowAssignment:
    """`rows` receiving extras, the bank row of each, and the subset `off` kept in the plan at strength 0."""

    rows: list[int]
    feature_rows: list[int]
    off: frozenset[int]


def assign_rows(roles: list[str], n_pos: int, n_neg: int, active: list[bool] | None,
                same_graph: bool) -> RowAssignment:
    """Assign feature rows to model rows. `active[f]` False switches positive feature row `f` off (image dropout in
    training); with `same_graph` such rows stay in the plan at strength 0 instead of leaving it."""
    n_c, n_u = roles.count(COND), roles.count(UNCOND)
    rows, frows, off, kc, ku = [], [], set(), 0, 0
    for i, role in enumerate(roles):
        if role == COND:
            f = feature_row(kc, n_c, n_pos, "features")
            on = active is None or active[f]
            if on or same_graph:
                rows.append(i)
                frows.append(f)
                if not on:
                    off.add(i)
            kc += 1
        else:
            if n_neg:
                rows.append(i)
                frows.append(n_pos + feature_row(ku, n_u, n_neg, "negative features"))
            ku += 1
    return RowAssignment(rows, frows, frozenset(off))


def plan_call(assignment: RowAssignment, strengths: list[float], batch: int, same_graph: bool) -> ReferencePlan | None:
    """The eager plan: `strengths` holds the schedule strength of every model row (`[B]`, 0 outside the window).
    Rows at strength 0 leave the plan (exact: they compute as unpatched) unless `same_graph`; None when no row
    is left."""
    rows, frows = [], []
    values = []
    for r, f in zip(assignment.rows, assignment.feature_rows):
        s = 0.0 if r in assignment.off else float(strengths[r])
        if s > 0.0 or same_graph:
            rows.append(r)
            frows.append(f)
            values.append(s)
    if not rows:
        return None
    return ReferencePlan(None if rows == list(range(batch)) else rows, frows, values)


def plan_call_tensor(assignment: RowAssignment, strengths: torch.Tensor | None, batch: int) -> ReferencePlan | None:
    """The plan under `torch.compile`: no host sync, so no row leaves the plan for its strength; `strengths` is
    the `[B]` (or `[1]`) schedule strength tensor, or None when it is 1 at every step (nothing to gate)."""
    rows = list(assignment.rows)
    if not rows:
        return None
    if strengths is None:
        values: list[float] | torch.Tensor = [0.0 if r in assignment.off else 1.0 for r in rows]
    else:
        full = strengths.expand(batch) if strengths.shape[0] == 1 else strengths
        values = full[rows]
        if assignment.off:
            keep = torch.tensor([r not in assignment.off for r in rows], dtype=values.dtype, device=values.device)
            values = values * keep
    return ReferencePlan(None if rows == list(range(batch)) else rows, list(assignment.feature_rows), values)


def merge(plans: dict[int, ReferencePlan | None], batch: int) -> CallPlan | None:
    """One call plan from the references' plans (None where a reference has no row this call). One reference
    keeps its plan as it is; several are aligned to the union of their rows."""
    live = {i: p for i, p in plans.items() if p is not None}
    if not live:
        return None
    if len(live) == 1:
        (i, p), = live.items()
        return CallPlan(p.rows, ((i, p),))
    every = list(range(batch))
    union = sorted({r for p in live.values() for r in (every if p.rows is None else p.rows)})
    rows = None if union == every else union
    parts = []
    for i, p in live.items():
        own = every if p.rows is None else p.rows
        if own == union:
            parts.append((i, ReferencePlan(rows, list(p.feature_rows), p.strengths)))
            continue
        where = {r: j for j, r in enumerate(own)}
        frows = [p.feature_rows[where[r]] if r in where else 0 for r in union]
        if isinstance(p.strengths, torch.Tensor):
            idx = torch.tensor([where.get(r, 0) for r in union], device=p.strengths.device)
            keep = torch.tensor([r in where for r in union], dtype=p.strengths.dtype, device=p.strengths.device)
            values: list[float] | torch.Tensor = p.strengths[idx] * keep
        else:
            values = [p.strengths[where[r]] if r in where else 0.0 for r in union]
        parts.append((i, ReferencePlan(rows, frows, values)))
    return CallPlan(rows, tuple(parts))


def block_strengths(plan: ReferencePlan, scale: float) -> list[float] | torch.Tensor:
    """The per-row strength in one block: the plan's strengths times `scale` (the block's times the
    reference's). `[R]`."""
    if isinstance(plan.strengths, torch.Tensor):
        return plan.strengths * scale
    return [s * scale for s in plan.strengths]
