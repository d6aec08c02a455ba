"""The metrics of `vlhooks compare`: their definitions, the Frechet distance, the per-seed summary, and the
reference-similarity and distribution scorer (DINOv2-S, EfficientNet-Lite0) both worlds share."""

from __future__ import annotations

import numpy as np
import torch

METRIC_DOCS = {
    "class_match": "fraction of samples the MNIST classifier puts in the reference's class",
    "ref_similarity": "cosine of DINOv2-S CLS features, sample vs reference",
    "ref_similarity_effnet": "cosine of EfficientNet-Lite0 pooled features, sample vs reference",
    "frechet_effnet_pca16": "Frechet distance of EfficientNet-Lite0 features to real images, 16-d PCA (not FID)",
    "prompt_consistency": "classifier confidence that the sample is a digit at all (the prompt's request)",
}
METRIC_ORDER = tuple(METRIC_DOCS)  # the order of the report's and metrics.json's columns
HIGHER_IS_BETTER = {"frechet_effnet_pca16": False}


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to rows of `a` `[N, D]` and `b` `[M, D]`."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)  # [D, D]
    covmean = linalg.sqrtm(s1 @ s2)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2.0 * covmean))


def summarize(per_seed: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """`{arm: {metric: [value per seed]}}` -> `{arm: {metric: {"mean", "std", "n"}}}` (std over seeds, ddof 0)."""
    out = {}
    for arm, metrics in per_seed.items():
        out[arm] = {m: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)} for m, v in metrics.items()}
    return out


class Scorer:
    """Reference-similarity and distribution metrics shared by both worlds (DINOv2-S, EfficientNet-Lite0)."""

    def __init__(self, real_images: list[np.ndarray], image_size: int = 224):
        from vlhooks.encoders import load_efficientnet_lite0, load_extractor

        self.dino = load_extractor("dinov2-small", image_size=image_size, include_cls=True)
        self.effnet = load_efficientnet_lite0()
        self.effnet.image_size = image_size
        real = self.effnet.pooled(real_images).numpy()  # [M, 1280]
        self.has_frechet = len(real) >= 32  # a 16-d covariance needs well over 16 real images
        self.mean = real.mean(0)  # [1280]
        _, _, vt = np.linalg.svd(real - self.mean, full_matrices=False)
        self.pca = vt[:16].T  # [1280, 16]
        self.real16 = (real - self.mean) @ self.pca  # [M, 16]

    def embed(self, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """`(DINOv2-S CLS, unit norm [B, 384], EfficientNet-Lite0 pooled [B, 1280])`."""
        d = torch.nn.functional.normalize(self.dino(images).tokens[:, 0].float(), dim=-1)  # [B, 384] CLS
        e = self.effnet.pooled(images)  # [B, 1280]
        return d, e

    def similarity(self, samples: tuple, refs: tuple) -> tuple[np.ndarray, np.ndarray]:
        """Per row cosines `([B], [B])` of two `embed` results."""
        d = (samples[0] * refs[0]).sum(-1).numpy()
        e = torch.nn.functional.cosine_similarity(samples[1], refs[1], dim=-1).numpy()
        return d, e

    def frechet(self, sample_effnet: torch.Tensor) -> float:
        """`frechet` of EfficientNet-Lite0 features `[N, 1280]` to the real images', in their 16-d PCA."""
        return frechet((sample_effnet.numpy() - self.mean) @ self.pca, self.real16)
