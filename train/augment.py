"""Reference augmentation for adapter training: several encoded variants of each row's reference.

A trained adapter sees the reference encoder's features of the images it was trained on. A user's reference is
rarely one of those: another writer, thicker or thinner strokes, shifted, rotated, blurred, scanned at a low
resolution, lower contrast. `PairsDataModule(augment={...})` therefore stores, per training row, `copies`
variants of the reference, each another reference image (for `reference: same_label`, another item of the same
label, drawn with the data seed) under its own random augmentation, encoded once with the run's image encoder
(`features` `[copies, N, D]` per row); `AdapterModule` draws one variant per row and step.

Augmentations (each applied with probability `p` per variant, in this order; every range is drawn uniformly):
- `rotate` (degrees, +-), `scale` ([lo, hi]), `aspect` ([lo, hi] width factor, drawn log-uniformly: a digit
  normalised to fill its box, as some scanners do, is wider or narrower than one scaled to keep its shape),
  `translate` (fraction of the side, +-): one random affine map, border filled with the image's background (its
  darkest value for grey digits: black).
- `morph` ([lo, hi] integer radius): grey dilation (> 0: thicker strokes of light ink) or erosion (< 0).
- `low_res` ([lo, hi] side in pixels) with probability `low_res_p`: down-sampled (area) and up-sampled back
  (bilinear), as a small scan or a thumbnail would be.
- `blur` ([lo, hi] Gaussian sigma in pixels).
- `contrast` ([lo, hi] factor on the ink range) and `gamma` ([lo, hi]).
- `invert_p`: the probability of inverting the image (dark ink on a light background, as a scan of paper).
The first variant of every row is left as it is when `keep_first` is true (the default), so the clean
reference stays in the training data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vlhooks.errors import TrainingError


@dataclass
class AugmentSpec:
    copies: int = 4
    p: float = 0.8
    keep_first: bool = True
    rotate: float = 0.0
    scale: list = field(default_factory=lambda: [1.0, 1.0])
    aspect: list = field(default_factory=lambda: [1.0, 1.0])
    translate: float = 0.0
    morph: list = field(default_factory=lambda: [0, 0])
    low_res: list = field(default_factory=lambda: [0, 0])
    low_res_p: float = 0.0
    blur: list = field(default_factory=lambda: [0.0, 0.0])
    contrast: list = field(default_factory=lambda: [1.0, 1.0])
    gamma: list = field(default_factory=lambda: [1.0, 1.0])
    invert_p: float = 0.0

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> "AugmentSpec":
        if not isinstance(spec, dict):
            raise TrainingError(f"data.augment must be a mapping (e.g. {{copies: 4, rotate: 12}}), got {spec!r}.")
        known = {f.name for f in fields(cls)}
        bad = sorted(set(spec) - known)
        if bad:
            raise TrainingError(f"data.augment has unknown key(s) {bad}; known: {sorted(known)}.")
        out = cls(**spec)
        if not isinstance(out.copies, int) or isinstance(out.copies, bool) or out.copies < 1:
            raise TrainingError(f"data.augment.copies must be an integer >= 1, got {out.copies!r}.")
        for name in ("p", "low_res_p", "invert_p"):
            v = getattr(out, name)
            if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise TrainingError(f"data.augment.{name} must be a probability in [0, 1], got {v!r}.")
        for name in ("scale", "aspect", "morph", "low_res", "blur", "contrast", "gamma"):
            v = getattr(out, name)
            if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v)
                    and v[0] <= v[1]):
                raise TrainingError(f"data.augment.{name} must be a range [lo, hi] with lo <= hi, got {v!r}.")
        if out.scale[0] <= 0 or out.aspect[0] <= 0 or out.gamma[0] <= 0 or out.blur[0] < 0 or out.contrast[0] < 0:
            raise TrainingError("data.augment: scale, aspect and gamma must be > 0, blur and contrast >= 0.")
        return out


def _u(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur of `x` `[B, C, H, W]` with `sigma` `[B]` (0: unchanged)."""
    r = max(1, int(math.ceil(3 * float(sigma.max()))))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    s = sigma.clamp_min(1e-3)[:, None]
    k = torch.exp(-0.5 * (t[None] / s) ** 2)
    k = k / k.sum(1, keepdim=True)  # [B, 2r+1]
    B, C, H, W = x.shape
    y = F.pad(x.reshape(1, B * C, H, W), (r, r, r, r), mode="replicate")
    kk = k.repeat_interleave(C, 0)
    y = F.conv2d(y, kk[:, None, None, :], groups=B * C)
    y = F.conv2d(y, kk[:, None, :, None], groups=B * C)
    y = y.reshape(B, C, H, W)
    return torch.where((sigma > 1e-3)[:, None, None, None], y, x)


def augment_images(images: list[np.ndarray], spec: AugmentSpec, g: torch.Generator) -> list[np.ndarray]:
    """`images` (HxW or HxWxC uint8, one size) under one random draw of `spec` each (with probability `spec.p`)."""
    if not images:
        return []
    a = np.stack([np.asarray(i) for i in images])
    grey = a.ndim == 3
    x = torch.from_numpy(a).float() / 255.0
    x = x[:, None] if grey else x.permute(0, 3, 1, 2)  # [B, C, H, W]
    B, C, H, W = x.shape
    on = torch.rand(B, generator=g) < spec.p
    bg = x.amin(dim=(2, 3), keepdim=True)  # [B, C, 1, 1] background (darkest value)
    # affine: rotation, isotropic scale, translation, then the width stretched by `aspect`
    ang = _u(g, B, -spec.rotate, spec.rotate) * math.pi / 180.0
    sc = _u(g, B, *spec.scale)
    tx, ty = _u(g, B, -spec.translate, spec.translate) * 2, _u(g, B, -spec.translate, spec.translate) * 2
    asp = torch.ones(B)
    if list(spec.aspect) != [1.0, 1.0]:  # drawn only when asked, so that older recipes draw what they drew
        asp = torch.exp(_u(g, B, math.log(spec.aspect[0]), math.log(spec.aspect[1])))
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    # output -> input coordinates: (R S)^-1 applied to (x / aspect, y)
    theta = torch.stack([torch.stack([cos / asp, -sin, tx], 1), torch.stack([sin / asp, cos, ty], 1)], 1)  # [B, 2, 3]
    grid = F.affine_grid(theta, (B, C, H, W), align_corners=False)
    moved = F.grid_sample(x - bg, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + bg
    y = torch.where(on[:, None, None, None], moved, x)
    # grey morphology (stroke width)
    rad = torch.randint(int(spec.morph[0]), int(spec.morph[1]) + 1, (B,), generator=g)
    for r in sorted(set(rad.abs().tolist()) - {0}):
        k = 2 * r + 1
        dil = F.max_pool2d(y, k, stride=1, padding=r)
        ero = -F.max_pool2d(-y, k, stride=1, padding=r)
        pick = on & (rad.abs() == r)
        y = torch.where((pick & (rad > 0))[:, None, None, None], dil, y)
        y = torch.where((pick & (rad < 0))[:, None, None, None], ero, y)
    # low resolution
    if spec.low_res_p > 0 and spec.low_res[1] > 0:
        low = on & (torch.rand(B, generator=g) < spec.low_res_p)
        sides = torch.randint(max(2, int(spec.low_res[0])), int(spec.low_res[1]) + 1, (B,), generator=g)
        for s in sorted(set(sides[low].tolist())):
            pick = low & (sides == s)
            small = F.interpolate(y[pick], size=(s, s), mode="area")
            y[pick] = F.interpolate(small, size=(H, W), mode="bilinear", align_corners=False)
    # blur
    if spec.blur[1] > 0:
        sig = torch.where(on, _u(g, B, *spec.blur), torch.zeros(B))
        y = _gaussian_blur(y, sig)
    # contrast (around the background) and gamma
    c = torch.where(on, _u(g, B, *spec.contrast), torch.ones(B))[:, None, None, None]
    gm = torch.where(on, _u(g, B, *spec.gamma), torch.ones(B))[:, None, None, None]
    y = bg + c * (y - bg)
    y = y.clamp(0, 1) ** gm
    if spec.invert_p > 0:  # last: dark ink on a light background (bg + ink - y keeps the ink range)
        inv = on & (torch.rand(B, generator=g) < spec.invert_p)
        top = y.amax(dim=(2, 3), keepdim=True)
        y = torch.where(inv[:, None, None, None], bg + top - y, y)
    out = (y.clamp(0, 1) * 255.0).round().byte()
    out = out[:, 0] if grey else out.permute(0, 2, 3, 1)
    return [o.numpy() for o in out]


def reference_variants(n: int, labels: np.ndarray, reference: str, copies: int, seed: int) -> np.ndarray:
    """`[n, copies]` reference indices: row `i`'s own index (`reference: self`), or `copies` other items of the
    same label (drawn without replacement where there are enough, with the data seed)."""
    g = np.random.default_rng(seed + 7919)
    out = np.zeros((n, copies), dtype=np.int64)
    for i in range(n):
        if reference != "same_label":
            out[i] = i
            continue
        pool = np.flatnonzero((labels == labels[i]) & (np.arange(n) != i))
        if len(pool) == 0:
            out[i] = i
        else:
            out[i] = g.choice(pool, size=copies, replace=len(pool) < copies)
    return out


class AugmentedReferences:
    """Encodes `copies` augmented variants of the references of a batch of rows: `(features [B, copies, N, D],
    mask [B, copies, N] or None)`. Deterministic: row `i`'s draws come from `seed` and `i`."""

    def __init__(self, spec: dict[str, Any], images: list, labels: np.ndarray, reference: str, seed: int):
        self.spec = AugmentSpec.from_dict(spec)
        self.images, self.seed = images, seed
        self.index = reference_variants(len(images), np.asarray(labels), reference, self.spec.copies, seed)

    def __call__(self, encoder, rows: list[int]):
        k = self.spec.copies
        imgs = []
        for i in rows:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
            variants = [self.images[j] for j in self.index[i]]
            aug = augment_images(variants, self.spec, g)
            if self.spec.keep_first:
                aug[0] = np.asarray(variants[0])
            imgs.extend(aug)
        feats, mask = encoder(imgs)  # [B * k, N, D]
        feats = feats.reshape(len(rows), k, *feats.shape[1:])
        mask = None if mask is None else mask.reshape(len(rows), k, *mask.shape[1:])
        return feats, mask


def pick_variant(features: torch.Tensor, mask: torch.Tensor | None, g: torch.Generator):
    """One variant per row of `features` `[B, K, N, D]` (and `mask` `[B, K, N]`), drawn with `g`; features
    `[B, N, D]` pass through."""
    if features.dim() != 4:
        return features, mask
    B, K = features.shape[:2]
    j = torch.randint(K, (B,), generator=g).to(features.device)
    rows = torch.arange(B, device=features.device)
    return features[rows, j], None if mask is None else mask[rows, j]
