"""`PatchImageEncoder`: the tiny offline image encoder of the tiny training recipes (no weights to download).

An image at `size` px, cut into `patch` x `patch` pixel patches, each projected to `width` by a fixed random
orthonormal matrix (seeded): `[B, (size / patch)^2, width]` tokens. It carries no semantics; it lets the tiny
recipes and their tests run end to end in seconds.
"""

from __future__ import annotations

import numpy as np
import torch

from ._common import to_pil


class PatchImageEncoder:
    """Pixel patches of the image at `size` px, projected to `width` by a fixed random orthonormal matrix."""

    def __init__(self, width: int, size: int = 32, patch: int = 8, seed: int = 0):
        self.width, self.size, self.patch, self.seed = width, size, patch, seed
        g = torch.Generator().manual_seed(seed)
        d = 3 * patch * patch
        q = torch.linalg.qr(torch.randn(max(d, width), min(d, width), generator=g))[0]  # orthonormal columns
        self.proj = q if d >= width else q.T  # [3 p^2, width]

    def describe(self) -> dict:
        return {"encoder": "patches", "width": self.width, "size": self.size, "patch": self.patch, "seed": self.seed}

    def __call__(self, images: list) -> tuple[torch.Tensor, None]:
        from PIL import Image

        out = []
        for img in images:
            a = np.asarray(to_pil(img).resize((self.size, self.size), Image.BICUBIC)).copy()
            x = torch.from_numpy(a).float().permute(2, 0, 1) / 127.5 - 1.0  # [3, H, W]
            p = x.unfold(1, self.patch, self.patch).unfold(2, self.patch, self.patch)  # [3, h, w, p, p]
            p = p.permute(1, 2, 0, 3, 4).reshape(-1, 3 * self.patch * self.patch)  # [N, 3 p^2]
            out.append(p @ self.proj * 4.0)
        return torch.stack(out), None  # [B, N, width]
