"""`InjectionConfig`: where, when and how strongly extra K/V are injected.

Owns the config dataclass, its validation and the strength schedule as a function of denoising progress.
Progress is model-agnostic: `0.0` is the first step (pure noise, sigma = 1) and `1.0` is clean (sigma = 0);
each DiT family file converts its own timestep convention to it (`progress = 1 - sigma`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal, Union

import torch

from .errors import ConfigError

BlockSelector = Union[str, list, tuple]
Schedule = Union[str, Callable[[float], float]]

SCHEDULES = ("constant", "linear_decay", "cosine_decay", "step")
COMBINES = ("concat", "average")
KV_SCALINGS = ("kv", "v_only", "kv_penalty", "k_mean_v")
POOLS = ("mean", "interpolate", "attention")
MODES = ("joint", "decoupled")
GUIDANCE = ("auto", "none", "cond_first", "uncond_first")
PLACEMENTS = ("attention", "block_output", "pre_rope", "image_joint")


@dataclass
class InjectionConfig:
    """What to inject where, when and how strongly.

    Args:
        blocks (`str` | `list[int]`, defaults to `"all"`):
            `"all"` (the family's main blocks), a named preset (`vh.list_presets(model)`: Flux `"double"` /
            `"single"`, Z-Image `"main"` / `"refiners"` / `"context_refiner"` / `"noise_refiner"`, SD3 `"joint"`),
            a list of block indices into `vh.list_sites(model)`, or a regex that must fully match site names
            (e.g. `r"transformer_blocks\\.[0-3]"`).
        window (`tuple[float, float]`, defaults to `(0.0, 1.0)`):
            Denoising progress interval, inclusive: 0.0 = first step (pure noise), 1.0 = clean. Progress is
            `1 - sigma` of the step being denoised.
        schedule (`str` | callable, defaults to `"constant"`):
            Strength factor over the window: `"constant"`, `"linear_decay"`, `"cosine_decay"`, `"step"`, or a
            callable `u -> factor` where `u` in [0, 1] is the position inside the window.
        schedule_params (`dict`):
            `linear_decay` / `cosine_decay`: `end` (factor at the window's end, default 0.0).
            `step`: `at` (position in the window, default 0.5) and `after` (factor after it, default 0.0).
        scale (`float` | `dict[int, float]`, defaults to `1.0`):
            Strength. In joint mode a `log(scale)` bias on the extra keys' logits (scale 1 = plain extra keys);
            in decoupled mode the weight of the added attention. A dict maps block indices to scales; selected
            blocks missing from it use 1.0. Scale 0 skips the block exactly.
        mode (`str`, defaults to `"joint"`):
            `"joint"`: extra K/V join the block's own softmax, seen by every query (image and text).
            `"decoupled"`: a separate attention of the block's queries over the extra K/V, added with the scale.
        guidance (`str`, defaults to `"auto"`):
            Which batch rows are conditional. `"auto"`: a pipeline's batched classifier-free guidance is
            detected (Z-Image `[cond, uncond]`, SD3 `[uncond, cond]`) and diffusers' `cache_context("uncond")`
            marks whole unconditional calls (Flux true CFG); otherwise every row is conditional. `"none"`: every
            row is conditional. `"cond_first"` / `"uncond_first"`: the model batch is `[cond; uncond]` /
            `[uncond; cond]` halves. Unconditional rows get no injection unless negative features are given.
        combine (`str`, defaults to `"concat"`):
            How several references (`vh.Reference`) share a block. `"concat"`: every reference's tokens are extra
            keys of their own, each with its own strength, window, blocks and mask (joint: one softmax over the
            block's keys and all references' keys, `log(strength_r)` on reference `r`'s; decoupled: one separate
            attention per reference, `sum_r strength_r * softmax(q k_r^T) v_r`). `"average"`: one token set, the
            mean of the references' features weighted by their scales, `sum_r s_r F_r / sum_r s_r` (same token
            count and width; the references' scales weight the mean and do not scale the strength; per-reference
            blocks, windows, schedules and masks need `"concat"`).
        kv_scaling (`str`, defaults to `"kv"`):
            How a strength `s` acts on a reference's extra K/V (ComfyUI's names). `"kv"`: joint: a `log(s)` bias on
            its keys' logits (its share of the softmax mass times `s`); decoupled: `s * attention`. `"v_only"`: its
            values are `s * v` (keys unchanged; decoupled: the same as `"kv"`). `"kv_penalty"`: values `s * v` and
            keys `k * max(0.5, min(1, 1 / s))`: above strength 1 the reference's attention is flattened, at most
            halving its logits, so a strong reference spreads over its tokens instead of copying a few.
            `"k_mean_v"`: values `(v - mean(v)) + s * mean(v)` (the mean over the reference's tokens, per head):
            the strength scales what the tokens share, their differences stay. Strength 0 skips a reference exactly
            in every mode.
        max_tokens (`int`, *optional*):
            Pool each reference's tokens to at most this many (the cost of injection grows with the token count in
            every block), in feature space, once per set of features. `pool`: `"mean"` (contiguous groups averaged,
            `adaptive_avg_pool1d` over the real tokens), `"interpolate"` (linear resampling along the tokens) or
            `"attention"` (the `"mean"` tokens as queries of a parameter-free softmax attention over all tokens).
        placement (`str`, defaults to `"attention"`):
            Where a decoupled attention's output goes. `"attention"`: every query of the block (text and image,
            after RoPE) attends to the extra K/V and the result joins the block's attention output, before its
            output projection. `"block_output"` (decoupled mode, Flux): diffusers' IP-Adapter placement: only the
            image tokens' queries (after qk-norm, before RoPE) attend, and the result times the strength is added
            to the block's image-stream output, after the feed-forward, with no output projection and no gate.
            `"pre_rope"` (decoupled mode, Flux; InstantX's Flux IP-Adapter): the block's queries after qk-norm and
            before RoPE (a double block's image tokens, a single block's every token) attend to the extra K/V,
            and the result times the strength joins the attention output before the output projection (double:
            the image stream's `to_out`; single: the attention half of `proj_out`'s input), under the block's gate.
            `"image_joint"` (decoupled mode, SD3; diffusers' SD3 IP-Adapter placement): the image tokens' queries
            attend, in a softmax of their own, to `[the block's image keys; the extra keys]` (queries and image
            keys taken before the block's qk-norm and normed by the adapter's own norms,
            `Projector.image_attention_norms`, else the block's), and the result times the strength joins the
            image stream's attention output before `to_out`.
    """

    blocks: BlockSelector = "all"
    window: tuple[float, float] = (0.0, 1.0)
    schedule: Schedule = "constant"
    schedule_params: dict[str, float] = field(default_factory=dict)
    scale: Union[float, dict[int, float]] = 1.0
    mode: Literal["joint", "decoupled"] = "joint"
    guidance: Literal["auto", "none", "cond_first", "uncond_first"] = "auto"
    placement: Literal["attention", "block_output", "pre_rope", "image_joint"] = "attention"

    combine: Literal["concat", "average"] = "concat"
    kv_scaling: Literal["kv", "v_only", "kv_penalty", "k_mean_v"] = "kv"
    max_tokens: int | None = None
    pool: Literal["mean", "interpolate", "attention"] = "mean"

    def __post_init__(self) -> None:
        if isinstance(self.window, list):
            self.window = tuple(self.window)
        if isinstance(self.blocks, tuple):
            self.blocks = list(self.blocks)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise `ConfigError` naming the fix for any bad field."""
        w = self.window
        if not (isinstance(w, tuple) and len(w) == 2 and all(isinstance(x, (int, float)) for x in w)):
            raise ConfigError(f"window must be a pair (start, end) of floats in [0, 1], got {w!r}.")
        start, end = float(w[0]), float(w[1])
        if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0):
            raise ConfigError(
                f"window {w!r} lies outside [0, 1]; progress runs from 0.0 (first step, pure noise) to 1.0 "
                "(clean). Use e.g. window=(0.0, 0.6) for the first 60% of denoising."
            )
        if start > end:
            raise ConfigError(f"window {w!r} has start > end; write it as (start, end) with start <= end.")
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}.")
        if self.guidance not in GUIDANCE:
            raise ConfigError(f"guidance must be one of {GUIDANCE}, got {self.guidance!r}.")
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}.")
        if self.placement != "attention" and self.mode != "decoupled":
            raise ConfigError(
                f"placement={self.placement!r} adds a separate attention's output to the block; it needs "
                "mode='decoupled' (joint mode has no separate output to place)."
            )
        if self.combine not in COMBINES:
            raise ConfigError(f"combine must be one of {COMBINES}, got {self.combine!r}.")
        if self.kv_scaling not in KV_SCALINGS:
            raise ConfigError(f"kv_scaling must be one of {KV_SCALINGS}, got {self.kv_scaling!r}.")
        if self.pool not in POOLS:
            raise ConfigError(f"pool must be one of {POOLS}, got {self.pool!r}.")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool)
                                            or self.max_tokens < 1):
            raise ConfigError(f"max_tokens must be a positive int (or None for no pooling), got {self.max_tokens!r}.")
        if not callable(self.schedule) and self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES} or a callable u -> factor, got {self.schedule!r}.")
        if not isinstance(self.schedule_params, dict):
            raise ConfigError(f"schedule_params must be a dict, got {type(self.schedule_params).__name__}.")
        allowed = {"linear_decay": {"end"}, "cosine_decay": {"end"}, "step": {"at", "after"}}.get(
            self.schedule if isinstance(self.schedule, str) else "", set()
        )
        unknown = set(self.schedule_params) - allowed
        if unknown:
            raise ConfigError(
                f"schedule_params {sorted(unknown)} are not used by schedule {self.schedule!r}; allowed: {sorted(allowed)}."
            )
        for k, x in self.schedule_params.items():
            if not _is_real(x) or not 0.0 <= float(x) <= 1.0:
                raise ConfigError(
                    f"schedule_params[{k!r}] = {x!r}: it must be a number in [0, 1] (`end` / `after`: the factor "
                    "at the window's end / after the step, `at`: the step's position in the window)."
                )
        if callable(self.schedule):
            for u in (0.0, 0.5, 1.0):
                check_factor(self.schedule, u)
        scales = self.scale.values() if isinstance(self.scale, dict) else [self.scale]
        for s in scales:
            if not _is_real(s):
                raise ConfigError(f"scale must be a finite float or a dict {{block index: float}}, got {self.scale!r}.")
            if self.mode == "joint" and s < 0:
                raise ConfigError(
                    f"scale {s} < 0 in joint mode: the scale is a log(scale) logit bias and must be >= 0. "
                    "Use mode='decoupled' for a negative weight."
                )
            if self.mode == "decoupled" and abs(float(s)) > MAX_DECOUPLED_SCALE:
                raise ConfigError(
                    f"scale {s} in decoupled mode is beyond +-{MAX_DECOUPLED_SCALE:g}: the added attention would "
                    "swamp the block's own output (non-finite in half precision). Use a scale of a few units at most."
                )
        if isinstance(self.scale, dict) and not all(isinstance(k, int) and not isinstance(k, bool) for k in self.scale):
            raise ConfigError(f"scale dict keys must be block indices (int), got {list(self.scale)!r}.")
        b = self.blocks
        if isinstance(b, list):
            if not b or not all(isinstance(i, int) and not isinstance(i, bool) for i in b):
                raise ConfigError(f"blocks as a list must be non-empty block indices (int), got {b!r}.")
        elif not isinstance(b, str) or not b:
            raise ConfigError(f"blocks must be 'all', a preset name, a regex or a list of indices, got {b!r}.")

    # ------------------------------------------------------------------ schedule
    def in_window(self, progress: float) -> bool:
        return self.window[0] <= progress <= self.window[1]

    def strength_at(self, progress: float) -> float:
        """The schedule's strength at `progress` (0 outside the window), before the per-block scale."""
        if not self.in_window(progress):
            return 0.0
        start, end = self.window
        u = 0.0 if end == start else (progress - start) / (end - start)
        if callable(self.schedule):
            return check_factor(self.schedule, u)
        return float(_schedule_fn(self.schedule, self.schedule_params)(u))

    def strength_tensor(self, progress: torch.Tensor) -> torch.Tensor:
        """Tensor form of `strength_at` (no host sync), used under `torch.compile`."""
        start, end = self.window
        inside = (progress >= start) & (progress <= end)
        u = torch.zeros_like(progress) if end == start else (progress - start) / (end - start)
        u = u.clamp(0.0, 1.0)
        if self.schedule == "constant":
            f = torch.ones_like(u)
        elif self.schedule == "linear_decay":
            f = 1.0 + (self.schedule_params.get("end", 0.0) - 1.0) * u
        elif self.schedule == "cosine_decay":
            e = self.schedule_params.get("end", 0.0)
            f = e + (1.0 - e) * 0.5 * (1.0 + torch.cos(math.pi * u))
        elif self.schedule == "step":
            f = torch.where(u < self.schedule_params.get("at", 0.5), torch.ones_like(u),
                            torch.full_like(u, self.schedule_params.get("after", 0.0)))
        else:  # a user callable: evaluated per element on the host
            f = torch.tensor([check_factor(self.schedule, float(x)) for x in u.tolist()], dtype=u.dtype,
                             device=u.device)
        return torch.where(inside, f, torch.zeros_like(f))

    def always_full(self) -> bool:
        """True when the strength factor is 1 at every step (whole window, constant schedule): then nothing
        needs gating, also under `torch.compile`."""
        return tuple(self.window) == (0.0, 1.0) and self.schedule == "constant"

    def block_scale(self, index: int) -> float:
        if isinstance(self.scale, dict):
            return float(self.scale.get(index, 1.0))
        return float(self.scale)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        if callable(self.schedule):
            raise ConfigError("A callable schedule cannot be saved; use a named schedule to save this config.")
        d = asdict(self)
        d["window"] = list(self.window)
        if isinstance(self.scale, dict):
            d["scale"] = {str(k): v for k, v in self.scale.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InjectionConfig":
        """The inverse of `to_dict` (also reads configs saved by older versions: missing keys take defaults)."""
        if not isinstance(d, dict):
            raise ConfigError(f"an injection config must be a dict of InjectionConfig fields, got {type(d).__name__}.")
        d = dict(d)
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(
                f"unknown InjectionConfig keys {unknown}; known: {sorted(cls.__dataclass_fields__)} (a config "
                "written by a newer vlhooks? upgrade vlhooks to read it)."
            )
        if isinstance(d.get("scale"), dict):
            try:
                d["scale"] = {int(k): float(v) for k, v in d["scale"].items()}
            except (TypeError, ValueError):
                raise ConfigError(f"scale must map block indices to numbers, got {d['scale']!r}.") from None
        if isinstance(d.get("window"), list):
            d["window"] = tuple(d["window"])
        return cls(**d)


MAX_DECOUPLED_SCALE = 1e3


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def check_factor(schedule: Callable[[float], float], u: float) -> float:
    """A callable schedule's factor at `u`, checked: it must take one float and return a number in [0, 1]."""
    try:
        value = schedule(u)
    except Exception as e:
        raise ConfigError(
            f"the schedule callable raised {type(e).__name__}: {e} at u={u:g}; it must take one float u in [0, 1] "
            "(the position inside the window) and return a factor in [0, 1]."
        ) from e
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not _is_real(value) or not 0.0 <= float(value) <= 1.0:
        raise ConfigError(
            f"the schedule callable returned {value!r} at u={u:g}; it must return a finite number in [0, 1] "
            "(0 = no injection, 1 = full strength; set the strength itself with `scale`)."
        )
    return float(value)


def _schedule_fn(schedule: Schedule, params: dict[str, float]) -> Callable[[float], float]:
    if callable(schedule):
        return schedule
    if schedule == "constant":
        return lambda u: 1.0
    if schedule == "linear_decay":
        e = params.get("end", 0.0)
        return lambda u: 1.0 + (e - 1.0) * u
    if schedule == "cosine_decay":
        e = params.get("end", 0.0)
        return lambda u: e + (1.0 - e) * 0.5 * (1.0 + math.cos(math.pi * u))
    if schedule == "step":
        at, after = params.get("at", 0.5), params.get("after", 0.0)
        return lambda u: 1.0 if u < at else after
    raise ConfigError(f"Unknown schedule {schedule!r}.")
