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


def summarize(per_seed: dict[str, dict[str, list[float]]],
              per_sample: dict[str, dict[str, np.ndarray]] | None = None, resamples: int = 1000, seed: int = 0,
              level: float = 0.95) -> dict[str, dict[str, dict[str, float]]]:
    """`{arm: {metric: [value per seed]}}` -> `{arm: {metric: {"mean", "std", "n"}}}` (std over seeds, ddof 0).
    With `per_sample` (`{arm: {metric: [S, R] values}}`) each such metric also gets `ci_low` / `ci_high`: the
    bootstrap interval of its mean over references and seeds (`bootstrap_ci`)."""
    out = {}
    for arm, metrics in per_seed.items():
        out[arm] = {m: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)} for m, v in metrics.items()}
        for m, values in ((per_sample or {}).get(arm) or {}).items():
            if m in out[arm]:
                lo, hi = bootstrap_ci(values, resamples, seed, level)
                out[arm][m].update(ci_low=lo, ci_high=hi)
    return out


def bootstrap_ci(values: np.ndarray, resamples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of `values` `[S, R]` (seeds x references), resampling the
    references and the seeds independently (both with replacement): it covers the choice of references as well as
    the sampling noise. Seeded, so a run prints the same interval every time."""
    v = np.asarray(values, dtype=float)
    if v.ndim == 1:
        v = v[None]
    S, R = v.shape
    g = np.random.default_rng(seed)
    si = g.integers(0, S, size=(resamples, S))
    ri = g.integers(0, R, size=(resamples, R))
    # mean over the resampled seeds of the mean over the resampled references: [B]
    ref_means = np.stack([v[:, r].mean(1) for r in ri])  # [B, S]
    means = np.take_along_axis(ref_means, si, axis=1).mean(1)
    a = (1.0 - level) / 2.0
    return float(np.quantile(means, a)), float(np.quantile(means, 1.0 - a))


def per_class(values: np.ndarray, labels: np.ndarray, classes: int = 10) -> list[float | None]:
    """The mean of `values` `[S, R]` over the seeds and the references of each class (None: no reference)."""
    v = np.asarray(values, dtype=float)
    return [float(v[:, labels == k].mean()) if (labels == k).any() else None for k in range(classes)]


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

    def dino_embed(self, images: list[np.ndarray]) -> torch.Tensor:
        """DINOv2-S CLS features, unit norm `[B, 384]` (`[0, 384]` for no image)."""
        if not images:
            return torch.zeros(0, 384)
        return torch.nn.functional.normalize(self.dino(images).tokens[:, 0].float(), dim=-1)

    def similarity(self, samples: tuple, refs: tuple) -> tuple[np.ndarray, np.ndarray]:
        """Per row cosines `([B], [B])` of two `embed` results."""
        d = (samples[0] * refs[0]).sum(-1).numpy()
        e = torch.nn.functional.cosine_similarity(samples[1], refs[1], dim=-1).numpy()
        return d, e

    def frechet(self, sample_effnet: torch.Tensor) -> float:
        """`frechet` of EfficientNet-Lite0 features `[N, 1280]` to the real images', in their 16-d PCA."""
        return frechet((sample_effnet.numpy() - self.mean) @ self.pca, self.real16)
