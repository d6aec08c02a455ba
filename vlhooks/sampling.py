"""The Euler flow-matching sampler over `DiTFamily.velocity` (training previews, the toy DiT's check, compare).

It integrates `dx/dsigma = v` from sigma 1 (noise) to 0 on a uniform grid of `steps` steps, with optional
classifier-free guidance `v = v_u + cfg * (v_c - v_u)` against unconditional rows the caller gives. Whatever
injection is applied to the transformer acts on every velocity call; a handle's per-row `active` can leave the
unconditional rows out when they share the conditional rows' batch (`groups`).

Image guidance (`image_guidance=s_img`, InstructPix2Pix's separate scale for its image) gives the reference its
own guidance scale: three predictions per sample, the unconditional one `v_u` (empty caption, no reference), the
text one `v_t` (the caption, no reference) and the full one `v_ti` (the caption and the reference), combined as

    v = v_u + cfg * (v_t - v_u) + s_img * (v_ti - v_t)

`s_img = cfg` is plain guidance against `v_u` (two predictions suffice, and are what runs); a larger `s_img` pushes
towards the reference, a smaller one towards the prompt; `s_img = 0` ignores the reference. Without `uncond`
(no text guidance) it is `v = v_t + s_img * (v_ti - v_t)`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def _interleave(blocks: list[torch.Tensor | None], groups: int) -> torch.Tensor | None:
    """`k` tensors `[B, ...]` -> `[k B, ...]`: `groups` groups, each its `B / groups` rows of every tensor in turn."""
    if all(b is None for b in blocks):
        return None
    if any(b is None for b in blocks):
        raise ValueError("give the conditional and the unconditional rows the same optional inputs (mask, pooled).")
    return torch.cat([b.unflatten(0, (groups, -1)) for b in blocks], 1).flatten(0, 1)


def guidance_rows(image_guidance: float | None, cfg: float, guided: bool) -> tuple[str, ...]:
    """Which predictions a step needs, in batch order: `("full", "uncond")` (plain guidance), `("full", "text",
    "uncond")` (image guidance), `("full", "text")` (image guidance without text guidance) or `("full",)`.
    `full` rows carry the reference; `text` and `uncond` rows must not (the caller switches them off)."""
    split = image_guidance is not None and (not guided or float(image_guidance) != float(cfg))
    if not guided:
        return ("full", "text") if split else ("full",)
    return ("full", "text", "uncond") if split else ("full", "uncond")


def combine(v: dict[str, torch.Tensor], cfg: float, image_guidance: float | None) -> torch.Tensor:
    """The guided velocity from the predictions `guidance_rows` named."""
    if "text" in v:
        base = v["text"] if "uncond" not in v else v["uncond"] + cfg * (v["text"] - v["uncond"])
        return base + float(image_guidance) * (v["full"] - v["text"])
    if "uncond" in v:
        return v["uncond"] + cfg * (v["full"] - v["uncond"])
    return v["full"]


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
    image_guidance: float | None = None,
    set_reference: Callable[[bool], None] | None = None,
) -> torch.Tensor:
    """`x0` `[B, C, H, W]` (float32) from `noise` `[B, C, H, W]` for `caption` `[B, L, C']` (`caption_mask`
    `[B, L]` bool, True = real; `pooled` `[B, P]`), on the transformer's device and dtype.

    Guidance is on when `uncond` `[B, L0, C']` (with `uncond_mask`, `uncond_pooled`) is given. The unconditional
    rows take a second pass per step, or, with `groups=G`, share the conditional rows' pass: the batch is then
    `G` groups of [the group's `B / G` conditional rows, its `B / G` unconditional rows] (`vlhooks compare`: one
    group per seed), and `uncond` must have `caption`'s length `L` (pad it, with its mask).

    `image_guidance` (see the module): the text rows (the caption without the reference) join each group between
    the conditional and the unconditional rows, `[full, text, uncond]` (`guidance_rows` says which are used); the
    caller leaves the reference off in the text and unconditional rows (`handle.set_features(..., active=...)`).
    Without `groups`, each prediction is its own pass and `set_reference(on)` is called before each (on for the
    conditional pass, off for the others).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (the Euler steps from noise to image), got {steps}.")
    p = next(transformer.parameters())
    rows = guidance_rows(image_guidance, cfg, uncond is not None)
    if "text" in rows and not groups and set_reference is None:
        raise ValueError("image_guidance needs the reference switched off for the text rows: pass groups= (and "
                         "set the handle's active rows) or set_reference=callable(on).")

    def to(t: torch.Tensor | None, cast: bool = True) -> torch.Tensor | None:
        return None if t is None else t.to(p.device, p.dtype) if cast else t.to(p.device)

    x = to(noise)  # [B, C, H, W]
    cond = (to(caption), to(caption_mask, cast=False), to(pooled))
    inputs = {"full": cond, "text": cond}
    if uncond is not None:
        inputs["uncond"] = (to(uncond), to(uncond_mask, cast=False), to(uncond_pooled))
    if groups and len(rows) > 1:
        batch = tuple(_interleave([inputs[r][j] for r in rows], groups) for j in range(3))  # [k B, ...] each
    sigmas = torch.linspace(1.0, 0.0, steps + 1, device=p.device)
    for i in range(steps):
        if len(rows) == 1:
            v = family.velocity(transformer, x, sigmas[i].expand(len(x)), *cond)
        elif groups:
            k = len(rows)
            xin = torch.cat([x.unflatten(0, (groups, -1))] * k, 1).flatten(0, 1)  # [k B, C, H, W]
            vb = family.velocity(transformer, xin, sigmas[i].expand(len(xin)), *batch).unflatten(0, (groups, -1))
            r = vb.shape[1] // k
            v = combine({name: vb[:, j * r:(j + 1) * r].flatten(0, 1) for j, name in enumerate(rows)}, cfg,
                        image_guidance)
        else:
            preds = {}
            for name in rows:
                if set_reference is not None:
                    set_reference(name == "full")
                preds[name] = family.velocity(transformer, x, sigmas[i].expand(len(x)), *inputs[name])
            if set_reference is not None:
                set_reference(True)
            v = combine(preds, cfg, image_guidance)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x.float()


def _mix(out, plain, r: float):
    """`plain + r * (out - plain)` over whatever a transformer returns (a tensor, a list / tuple of them, or a
    diffusers output with `.sample`)."""
    if isinstance(out, torch.Tensor):
        return plain + r * (out - plain)
    if isinstance(out, (list, tuple)):
        return type(out)(_mix(o, p, r) for o, p in zip(out, plain))
    if hasattr(out, "sample"):
        return type(out)(sample=_mix(out.sample, plain.sample, r))
    return out


class ImageGuidance:
    """Image guidance inside a diffusers pipeline's own call (`vlhooks compare`'s pipeline route).

    A forward hook on the transformer runs every call a second time with the injection at strength 0 (exactly
    the unpatched model: the caption without the reference, `v_t`) and returns `v_t + r (v_ti - v_t)` with
    `r = image_guidance / text_guidance`. The pipeline's own guidance `v_u + s_txt (out - v_u)` then gives
    `v_u + s_txt (v_t - v_u) + s_img (v_ti - v_t)`; unconditional rows carry no reference, so there `v_ti = v_t`
    and they pass unchanged. `text_guidance` is the pipeline's effective scale `s_txt` (1 without guidance).
    The extra pass costs one more transformer call per step.

        with vh.inject(pipe, feats, cfg) as handle, ImageGuidance(pipe, handle, 6.0, text_guidance=5.0):
            image = pipe(prompt, guidance_scale=4.0).images[0]     # Z-Image: s_txt = 1 + guidance_scale
    """

    def __init__(self, target, handle, image_guidance: float, text_guidance: float = 1.0):
        from .injection import resolve_target

        if not text_guidance or text_guidance <= 0:
            raise ValueError(f"text_guidance must be > 0 (the pipeline's guidance scale s in v_u + s (v_c - v_u); "
                             f"1 without guidance), got {text_guidance!r}.")
        self.transformer = resolve_target(target)[0]
        self.handle, self.ratio = handle, float(image_guidance) / float(text_guidance)
        self._hook = None
        self._inside = False

    def _after(self, module, args, kwargs, output):
        if self._inside or self.ratio == 1.0:
            return output
        inj = self.handle.injector
        saved = inj.config.scale
        self._inside = True
        try:
            self.handle.set_scale(0.0)
            plain = module(*args, **kwargs)
        finally:
            self.handle.set_scale(saved)
            self._inside = False
        return _mix(output, plain, self.ratio)

    def __enter__(self) -> "ImageGuidance":
        self._hook = self.transformer.register_forward_hook(self._after, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
