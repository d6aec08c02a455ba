"""Image array conversions shared by sample previews, the demo and `vlhooks compare`."""

from __future__ import annotations

import numpy as np
import torch


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """`[C, H, W]` in [-1, 1] -> uint8 `[H, W]` (grey: the first channel, when `C` < 3) or `[H, W, 3]` (the first
    three channels)."""
    x = x.detach().float()
    x = x[:3] if x.shape[0] >= 3 else x[:1]  # [1 or 3, H, W]
    a = x.clamp(-1, 1).add(1).mul(127.5).round().byte().cpu()
    return a[0].numpy() if a.shape[0] == 1 else a.permute(1, 2, 0).numpy()


def resize(a: np.ndarray, size: int) -> np.ndarray:
    """An `[H, W]` or `[H, W, 3]` uint8 image at `size` x `size` (bicubic)."""
    from PIL import Image

    return np.asarray(Image.fromarray(a).resize((size, size), Image.BICUBIC))
