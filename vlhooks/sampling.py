"""The Euler flow-matching sampler over `DiTFamily.velocity` (training previews, the toy DiT's check, compare).

It integrates `dx/dsigma = v` from sigma 1 (noise) to 0 on a uniform grid of `steps` steps, with optional
classifier-free guidance `v = v_u + cfg * (v_c - v_u)` against unconditional rows the caller gives. Whatever
injection is applied to the transformer acts on every velocity call; a handle's per-row `active` can leave the
unconditional rows out when they share the conditional rows' batch (`groups`).
"""

from __future__ import annotations

import torch
from torch import nn


def _interleave(cond: torch.Tensor | None, uncond: torch.Tensor | None, groups: int) -> torch.Tensor | None:
    """`[B, ...]` twice -> `[2B, ...]`: `groups` groups, each its `B / groups` rows of `cond` then of `uncond`."""
    if cond is None and uncond is None:
        return None
    if cond is None or uncond is None:
        raise ValueError("give the conditional and the unconditional rows the same optional inputs (mask, pooled).")
    return torch.cat([cond.unflatten(0, (groups, -1)), uncond.unflatten(0, (groups, -1))], 1).flatten(0, 1)


@torch.no_grad()
def euler_sample(
    family,
    transformer: nn.Module,
    noise: torch.Tensor,
    caption: torch.Tensor,
    caption_mask: torch.Tensor | None = None,
    pooled: torch.Tensor | None = None,
    *,
    steps: int,
    cfg: float = 1.0,
    uncond: torch.Tensor | None = None,
    uncond_mask: torch.Tensor | None = None,
    uncond_pooled: torch.Tensor | None = None,
    groups: int | None = None,
) -> torch.Tensor:
    """`x0` `[B, C, H, W]` (float32) from `noise` `[B, C, H, W]` for `caption` `[B, L, C']` (`caption_mask`
    `[B, L]` bool, True = real; `pooled` `[B, P]`), on the transformer's device and dtype.

    Guidance is on when `uncond` `[B, L0, C']` (with `uncond_mask`, `uncond_pooled`) is given. The unconditional
    rows take a second pass per step, or, with `groups=G`, share the conditional rows' pass: the batch is then
    `G` groups of [the group's `B / G` conditional rows, its `B / G` unconditional rows] (`vlhooks compare`: one
    group per seed), and `uncond` must have `caption`'s length `L` (pad it, with its mask).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (the Euler steps from noise to image), got {steps}.")
    p = next(transformer.parameters())

    def to(t: torch.Tensor | None, cast: bool = True) -> torch.Tensor | None:
        return None if t is None else t.to(p.device, p.dtype) if cast else t.to(p.device)

    x = to(noise)  # [B, C, H, W]
    cond = (to(caption), to(caption_mask, cast=False), to(pooled))
    if uncond is not None:
        unc = (to(uncond), to(uncond_mask, cast=False), to(uncond_pooled))
        if groups:
            batch = tuple(_interleave(c, u, groups) for c, u in zip(cond, unc))  # [2B, L, C'], [2B, L], [2B, P]
    sigmas = torch.linspace(1.0, 0.0, steps + 1, device=p.device)
    for i in range(steps):
        if uncond is None:
            v = family.velocity(transformer, x, sigmas[i].expand(len(x)), *cond)
        else:
            if groups:
                xin = torch.cat([x.unflatten(0, (groups, -1))] * 2, 1).flatten(0, 1)  # [2B, C, H, W]
                vb = family.velocity(transformer, xin, sigmas[i].expand(len(xin)), *batch).unflatten(0, (groups, -1))
                r = vb.shape[1] // 2
                vc, vu = vb[:, :r].flatten(0, 1), vb[:, r:].flatten(0, 1)  # [B, C, H, W] each
            else:
                vc = family.velocity(transformer, x, sigmas[i].expand(len(x)), *cond)
                vu = family.velocity(transformer, x, sigmas[i].expand(len(x)), *unc)
            v = vu + cfg * (vc - vu)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x.float()
