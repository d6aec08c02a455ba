"""Reference digits for the toy world: held-out MNIST, and references unlike the training digits.

`load_references(spec)` returns `(images [28x28 uint8, white ink on black], labels)`, `count` of them spread over
the ten classes (round-robin over a shuffled order of each class, seeded). Sources:
- `mnist` (default), `split: heldout`: the 1000 held-out digits of MNIST-5k (`mnist_split()`), which neither the
  toy DiT, the adapters nor the classifier were trained on.
- `sklearn_digits`: scikit-learn's `load_digits`, 1797 digits from other writers (the UCI optical digits, 43
  people, none of them MNIST's), scanned at 32x32 and block-averaged to 8x8 with 17 grey levels: other writers
  and other preprocessing. Up-sampled (bilinear) to 20x20 and padded to 28x28, as MNIST frames its digits.
`transform` (any source) applies a preprocessing a user's reference may plausibly have:
- `thick` / `thin`: strokes one pixel thicker (3x3 grey dilation) or thinner (3x3 grey erosion);
- `shift_rotate`: rotated by +-20 degrees and shifted by 3 px (alternating signs);
- `invert`: dark ink on a light background (a scan of a digit written on paper);
- `blur`: Gaussian blur, sigma 1.2 px.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

SOURCES = ("mnist", "sklearn_digits")
TRANSFORMS = ("none", "thick", "thin", "shift_rotate", "invert", "blur")


def sklearn_digits() -> tuple[list[np.ndarray], np.ndarray]:
    """scikit-learn's 8x8 digits as 28x28 uint8 (20x20 bilinear in a 4-pixel frame), and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float()[:, None] / 16.0  # [1797, 1, 8, 8] in [0, 1]
    x = F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False)
    x = F.pad(x, (4, 4, 4, 4))
    return [a[0].numpy() for a in (x.clamp(0, 1) * 255).round().byte()], np.asarray(d.target)


def transform_images(images: list[np.ndarray], name: str) -> list[np.ndarray]:
    """`images` (28x28 uint8) under the named transform (see the module)."""
    if name in (None, "none"):
        return list(images)
    if name not in TRANSFORMS:
        raise ValueError(f"references.transform must be one of {TRANSFORMS}, got {name!r}.")
    x = torch.from_numpy(np.stack(images)).float()[:, None] / 255.0  # [B, 1, H, W]
    if name == "thick":
        y = F.max_pool2d(x, 3, stride=1, padding=1)
    elif name == "thin":
        y = -F.max_pool2d(-x, 3, stride=1, padding=1)
    elif name == "invert":
        y = 1.0 - x
    elif name == "blur":
        from vlhooks.train.augment import _gaussian_blur

        y = _gaussian_blur(x, torch.full((len(x),), 1.2))
    else:  # shift_rotate
        B = len(x)
        sign = torch.where(torch.arange(B) % 2 == 0, 1.0, -1.0)
        ang = sign * 20.0 * np.pi / 180.0
        t = sign * 3.0 * 2.0 / x.shape[-1]
        theta = torch.stack([torch.stack([torch.cos(ang), -torch.sin(ang), t], 1),
                             torch.stack([torch.sin(ang), torch.cos(ang), t], 1)], 1)
        grid = F.affine_grid(theta, tuple(x.shape), align_corners=False)
        y = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return [a[0].numpy() for a in (y.clamp(0, 1) * 255).round().byte()]


def spread(labels: np.ndarray, count: int, seed: int) -> list[int]:
    """`count` indices spread over the classes: round-robin over a shuffled order of each class."""
    g = np.random.default_rng(seed)
    classes = sorted(set(int(c) for c in labels))
    per_class = [g.permutation(np.flatnonzero(labels == k)) for k in classes]
    return [int(per_class[i % len(classes)][i // len(classes)]) for i in range(count)]


def load_references(spec: dict[str, Any]) -> tuple[list[np.ndarray], np.ndarray]:
    """`(images, labels)` of the toy world's references (see the module)."""
    from vlhooks.train.data import load_source

    source = spec.get("source", "mnist")
    if source == "mnist":
        raw = load_source("mnist", split=spec.get("split", "heldout"))
        images, labels = raw["image"], np.asarray(raw["label"])
    elif source == "sklearn_digits":
        images, labels = sklearn_digits()
    else:
        raise ValueError(f"references.source must be one of {SOURCES}, got {source!r}.")
    pick = spread(labels, int(spec.get("count", 50)), int(spec.get("seed", 0)))
    chosen = transform_images([images[i] for i in pick], spec.get("transform", "none"))
    return chosen, labels[pick]
