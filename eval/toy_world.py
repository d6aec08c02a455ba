"""The `toy` world of `vlhooks compare` (the embedded default): the shipped pixel-space toy DiT (MNIST-5k, MiniLM
captions), real held-out MNIST digits as references with real DINOv2-S features, Euler sampling with guidance
against the empty caption (no reference), and the labels the class metrics need."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .arms import INJECTING, Arm


def to16(images: list[np.ndarray]) -> list[np.ndarray]:
    """28x28 digits -> 16x16 (area), as the toy DiT was trained."""
    x = torch.from_numpy(np.stack(images)).float()[:, None]  # [B, 1, 28, 28]
    small = torch.nn.functional.interpolate(x, size=(16, 16), mode="area")
    return [a[0].round().byte().numpy() for a in small]


class ToyWorld:
    """The embedded default: the shipped toy DiT, real held-out MNIST digits as references."""

    def __init__(self, cfg: dict[str, Any]):
        import vlhooks as vh
        from vlhooks.encoders import load_minilm
        from vlhooks.models import load_transformer
        from vlhooks.train.data import load_source
        from vlhooks.train.encoders import image_encoder

        from .toy import digit_classifier

        self.cfg = cfg
        self.score_size = 56  # 16x16 samples: DINOv2-S and EfficientNet-Lite0 see them at 56 px (4 x 4 DINOv2 patches)
        self.dit = load_transformer(str(cfg["dit"])).requires_grad_(False)  # missing: `check_config` says so
        self.family = vh.family_for(self.dit)
        rc = cfg["references"]
        raw = load_source("mnist", split=rc.get("split", "heldout"))
        labels = np.asarray(raw["label"])
        g = np.random.default_rng(rc.get("seed", 0))
        count = int(rc.get("count", 20))
        # `count` references spread over the classes (round-robin over a shuffled order of each class)
        per_class = [g.permutation(np.flatnonzero(labels == k)) for k in range(10)]
        pick = [int(per_class[i % 10][i // 10]) for i in range(count)]
        self.ref_images = [raw["image"][i] for i in pick]  # 28x28 uint8
        self.ref_labels = labels[pick]
        self.ref_small = to16(self.ref_images)  # the references at the toy world's size, for the metrics and grid
        self.real_images = to16([raw["image"][i] for i in range(0, len(raw["image"]), 5)])  # 200 held-out digits
        tokens, mask = image_encoder(dict(cfg["encoder"]))(self.ref_images)  # as in training: [R, N, 384]
        self.features = vh.VLFeatures(tokens.float(), mask=mask)
        self.minilm = load_minilm()
        self.empty = self.minilm.tokens([""])
        self.classifier, self.classifier_accuracy = digit_classifier()

    def _captions(self, arm: Arm, prompt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per reference: the arm's conditional caption and the empty one, padded to one length `Lc`:
        `(cond [R, Lc, C], cond_mask [R, Lc], uncond [R, Lc, C], uncond_mask [R, Lc])`."""
        from vlhooks.blending import blend
        from vlhooks.normalize import match_global_std

        R = len(self.ref_images)
        cap = self.minilm.tokens([prompt])
        Lt = int(cap.mask[0].sum())
        cond, cond_mask = cap.tokens[0, :Lt].expand(R, -1, -1), torch.ones(R, Lt, dtype=torch.bool)  # [R, Lt, C]
        if arm.kind == "blend":
            vl = match_global_std(self.features.tokens.float(), float(cond[0].std(correction=0)))  # [R, N, C]
            b = self.cfg["blend"]
            opts = {k: v for k, v in b.items() if k not in ("mode", "alpha")}
            cond = blend(cond, vl, b["mode"], b.get("alpha", 0.5), **opts)  # [R, L', C]
            cond_mask = torch.ones(cond.shape[:2], dtype=torch.bool)
        e = self.empty.tokens[0, : int(self.empty.mask[0].sum())]  # [L0, C]
        Lc = max(cond.shape[1], e.shape[0])
        caption = torch.zeros(2, R, Lc, cond.shape[-1])  # [conditional, unconditional], R rows each
        mask = torch.zeros(2, R, Lc, dtype=torch.bool)
        caption[0, :, : cond.shape[1]], mask[0, :, : cond.shape[1]] = cond, cond_mask
        caption[1, :, : e.shape[0]], mask[1, :, : e.shape[0]] = e, True
        return caption[0], mask[0], caption[1], mask[1]

    @torch.no_grad()
    def generate(self, arm: Arm, prompt: str, seeds: list[int], adapter=None) -> torch.Tensor:
        """Samples for every seed x reference, seed-major: `[S * R, 1, 16, 16]` in [-1, 1]. Seed `s` draws the
        noise of all references from `Generator().manual_seed(s)`, the same in every arm. One batched pass per
        step: per seed, the R conditional rows, then the R unconditional ones (empty caption, no reference)."""
        import vlhooks as vh
        from vlhooks.sampling import euler_sample

        R, S = len(self.ref_images), len(seeds)
        cond, cond_mask, uncond, uncond_mask = self._captions(arm, prompt)
        handle = None
        if arm.kind in INJECTING:
            m = self.features.mask
            feats = vh.VLFeatures(self.features.tokens.repeat(2 * S, 1, 1),
                                  mask=None if m is None else m.repeat(2 * S, 1))
            config = vh.InjectionConfig.from_dict(self.cfg["injection"])
            handle = vh.apply_injection(self.dit, None, config, adapter=adapter)
            handle.set_features(feats, active=([True] * R + [False] * R) * S)  # unconditional rows: no reference
        try:
            noise = torch.cat([torch.randn((R, 1, 16, 16), generator=torch.Generator().manual_seed(int(s)))
                               for s in seeds])  # [S * R, 1, 16, 16]
            return euler_sample(self.family, self.dit, noise, cond.repeat(S, 1, 1), cond_mask.repeat(S, 1),
                                steps=int(self.cfg["steps"]), cfg=float(self.cfg["cfg"]),
                                uncond=uncond.repeat(S, 1, 1), uncond_mask=uncond_mask.repeat(S, 1), groups=S)
        finally:
            if handle is not None:
                handle.remove()

    def label_metrics(self, samples: torch.Tensor) -> dict[str, np.ndarray]:
        """Per sample (seed-major rows, as `generate` returns them)."""
        proba = self.classifier.predict_proba(samples.reshape(len(samples), -1).clamp(-1, 1).numpy())
        pred = self.classifier.classes_[proba.argmax(1)]
        labels = np.tile(self.ref_labels, len(samples) // len(self.ref_labels))
        return {"class_match": (pred == labels).astype(float), "prompt_consistency": proba.max(1)}
