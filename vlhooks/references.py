"""`Reference`: one reference image's features with its own strength, blocks, window, schedule, spatial mask and
negative features; and what a patch needs from a list of them (checked, pooled, averaged).

Strength of reference `r` in block `b` at progress `p`: `config.block_scale(b) * r.scale * schedule_r(p)`, where
`r`'s window, schedule and blocks default to the config's. Spatial masks are `[H, W]` or `[B, H, W]` (bool or float
in [0, 1]); how they reach the image tokens is in `mask_for_grid`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from .config import BlockSelector, InjectionConfig, Schedule
from .errors import ConfigError, FeatureError
from .features import VLFeatures


@dataclass
class Reference:
    """One reference for `vh.inject(target, [ref, ...], config)`.

    Args:
        features: `VLFeatures` (or, with an encoder, an image: a PIL image, a path, a tensor or a list of them).
        scale (`float`): this reference's strength, multiplied into the config's scale and schedule.
        blocks, window, schedule, schedule_params: as in `InjectionConfig`; None takes the config's.
        mask (`torch.Tensor`, *optional*): where in the image the reference acts, `[H, W]` or `[B, H, W]`, bool or
            float in [0, 1]. On a pipeline target it is over the output image and resized to the DiT's image-token
            grid; on a bare transformer it is over the image-token grid itself (`h x w` = image tokens, row-major).
            Image queries outside the mask do not see this reference's keys; a float scales its strength per query;
            text queries see every reference.
        negative: `VLFeatures` for the unconditional rows of classifier-free guidance (the reference to move away
            from), or None (unconditional rows get nothing from this reference).
    """

    features: Any
    scale: float = 1.0
    blocks: BlockSelector | None = None
    window: tuple[float, float] | None = None
    schedule: Schedule | None = None
    schedule_params: dict[str, float] | None = None
    mask: torch.Tensor | None = None
    negative: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.scale, (int, float)) or isinstance(self.scale, bool) or not math.isfinite(self.scale):
            raise ConfigError(f"Reference.scale must be a finite number, got {self.scale!r}.")
        if self.mask is not None:
            check_mask(self.mask)

    def timing(self, config: InjectionConfig) -> InjectionConfig:
        """The config with this reference's window and schedule in place of the config's (validated)."""
        changes: dict[str, Any] = {}
        if self.window is not None:
            changes["window"] = tuple(self.window)
        if self.schedule is not None:
            changes["schedule"] = self.schedule
            changes["schedule_params"] = dict(self.schedule_params or {})
        elif self.schedule_params is not None:
            changes["schedule_params"] = dict(self.schedule_params)
        if config.mode == "joint" and self.scale < 0:
            raise ConfigError(f"Reference.scale {self.scale} < 0 in joint mode: strength is a log(strength) logit "
                              "bias there and must be >= 0. Use mode='decoupled' for a negative weight.")
        return replace(config, **changes) if changes else config


def as_references(inputs: Any) -> list[Reference]:
    """A list of `Reference`s from what `apply_injection` takes: a `Reference`, one `VLFeatures` (or image, or
    list of images: one reference with a row per image), or a list of `Reference`s / `VLFeatures` (one reference
    each; a bare `VLFeatures` takes the config's settings)."""
    if isinstance(inputs, Reference):
        return [inputs]
    if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(x, (Reference, VLFeatures)) for x in inputs):
        return [x if isinstance(x, Reference) else Reference(x) for x in inputs]
    return [Reference(inputs)]


def check_mask(mask: torch.Tensor) -> None:
    """Raise `FeatureError` naming the fix for a mask that is not `[H, W]` / `[B, H, W]` bool or float in [0, 1]
    with some area."""
    if not isinstance(mask, torch.Tensor):
        raise FeatureError(f"a Reference mask must be a torch.Tensor [H, W] or [B, H, W], got {type(mask).__name__}.")
    if mask.ndim not in (2, 3):
        raise FeatureError(f"a Reference mask must be [H, W] or [B, H, W], got shape {tuple(mask.shape)}; "
                           "for one image use mask[0] or mask.squeeze().")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise FeatureError(f"a Reference mask must be bool or float in [0, 1], got {mask.dtype}; use mask.bool().")
    if mask.is_floating_point():
        if not bool(torch.isfinite(mask).all()) or float(mask.min()) < 0.0 or float(mask.max()) > 1.0:
            raise FeatureError("a float Reference mask must hold values in [0, 1] (NaN or out of range found).")
    flat = mask.reshape(mask.shape[0] if mask.ndim == 3 else 1, -1)
    if not bool((flat > 0).any(dim=1).all()):
        raise FeatureError("a Reference mask is all False (zero) for some image: the reference would act nowhere; "
                           "drop the reference or give its mask some area.")


def mask_for_grid(mask: torch.Tensor, grid: tuple[int, int], resize: bool) -> torch.Tensor:
    """A reference mask as weights of the image tokens: `[B or 1, h * w]` float in [0, 1], row-major.

    `resize` (a pipeline target): the mask is over the output image and is area-resized to the grid `(h, w)`
    (a bool mask is resized as 0 / 1 and then kept bool: a token is in when at least half its area is).
    Otherwise (a bare transformer) the mask must already be `[h, w]` or `[B, h, w]`."""
    h, w = grid
    m = mask if mask.ndim == 3 else mask[None]  # [B, H, W]
    if tuple(m.shape[1:]) != (h, w):
        if not resize:
            raise FeatureError(
                f"the Reference mask is {tuple(m.shape[1:])} but this transformer call has a {h} x {w} image-token "
                "grid; on a bare transformer give the mask over the image-token grid itself (or patch the "
                "pipeline, whose masks are over the output image and are resized)."
            )
        area = F.interpolate(m.float()[:, None], size=(h, w), mode="area")[:, 0]
        m = area >= 0.5 if mask.dtype == torch.bool else area
    return m.float().reshape(m.shape[0], h * w)


def pool_mask(mask: torch.Tensor | None, n: int, max_tokens: int) -> torch.Tensor | None:
    """The mask of `pool_tokens`' output: a pooled token is real when its group holds a real token. `[B, M]`."""
    if mask is None or n <= max_tokens:
        return mask
    return F.adaptive_max_pool1d(mask[:, None].float(), max_tokens)[:, 0] > 0


def pool_tokens(tokens: torch.Tensor, mask: torch.Tensor | None, max_tokens: int, pool: str) -> torch.Tensor:
    """`tokens` `[B, N, D]` pooled to `[B, min(N, max_tokens), D]` (see `InjectionConfig.max_tokens`); a group
    with no real token gives a zero token, which `pool_mask` marks padded.

    `"mean"`: token `j` of the output is the mean of the real input tokens `floor(j N / M)` to
    `ceil((j + 1) N / M) - 1` (`adaptive_avg_pool1d`'s groups), weighted by the mask. `"interpolate"`: linear
    resampling with aligned ends (`vlhooks.blending.resample_tokens`). `"attention"`: `softmax(m t^T / sqrt(D)) t` with
    `m` the `"mean"` tokens and `t` the real input tokens."""
    B, N, D = tokens.shape
    if N <= max_tokens:
        return tokens
    M = max_tokens
    weight = torch.ones(B, N, 1, dtype=tokens.dtype, device=tokens.device) if mask is None else \
        mask[..., None].to(tokens.dtype)
    if pool == "interpolate":
        from .blending import resample_tokens

        if mask is not None and not bool(mask.all()):
            raise FeatureError("pool='interpolate' needs features without padded tokens; use pool='mean'.")
        return resample_tokens(tokens, M)
    num = F.adaptive_avg_pool1d((tokens * weight).transpose(1, 2), M)  # [B, D, M]
    den = F.adaptive_avg_pool1d(weight.transpose(1, 2), M).clamp_min(torch.finfo(tokens.dtype).tiny)
    means = (num / den).transpose(1, 2)  # [B, M, D]
    if pool == "mean":
        return means
    logits = means @ tokens.transpose(1, 2) / math.sqrt(D)  # [B, M, N]
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
    return logits.softmax(-1) @ tokens


@dataclass
class Prepared:
    """One reference as the injector holds it: checked (and pooled) features, its negative features, the sites it
    acts on, its timing (a config with its window and schedule), its scale and its mask."""

    features: VLFeatures
    negative: VLFeatures | None
    sites: frozenset[str]
    timing: InjectionConfig
    scale: float
    mask: torch.Tensor | None = None
    cache: dict = field(default_factory=dict)  # the feature bank's embeddings, valid while these features stand


def average(refs: list[Reference], features: list[VLFeatures], negatives: list[VLFeatures | None]
            ) -> tuple[VLFeatures, VLFeatures | None]:
    """`combine="average"`: one token set, `sum_r s_r F_r / sum_r s_r` (and the same for the negatives)."""
    bad = [i for i, r in enumerate(refs) if r.blocks is not None or r.window is not None or r.schedule is not None
           or r.mask is not None]
    if bad:
        raise ConfigError(f"references {bad} set their own blocks, window, schedule or mask, which combine='average' "
                          "cannot keep (it mixes every reference into one token set); use combine='concat'.")
    shapes = {tuple(f.tokens.shape[1:]) for f in features}
    if len(shapes) != 1:
        raise FeatureError(f"combine='average' needs references of one token count and width, got {sorted(shapes)}; "
                           "pool them to one length (InjectionConfig(max_tokens=...)) or use combine='concat'.")
    if any(f.mask is not None for f in features):
        raise FeatureError("combine='average' needs features without padded tokens; use combine='concat'.")
    total = sum(r.scale for r in refs)
    if total == 0:
        raise ConfigError("combine='average' with every reference at scale 0 has nothing to average; set a scale.")

    def mean(items: list[VLFeatures]) -> VLFeatures:
        batch = max(f.batch_size for f in items)
        tokens = sum(r.scale / total * f.tokens.expand(batch, -1, -1) for r, f in zip(refs, items))
        return VLFeatures(tokens, space=items[0].space, source={"combine": "average",
                                                                "weights": [r.scale / total for r in refs]})

    neg = None
    if any(n is not None for n in negatives):
        if not all(n is not None for n in negatives):
            raise FeatureError("combine='average' needs negative features for every reference or for none.")
        neg = mean(negatives)
    return mean(features), neg
