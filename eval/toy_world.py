"""The `toy` world of `vlhooks compare` (the embedded default): the shipped pixel-space toy DiT (MNIST-5k train
split, MiniLM captions), real held-out MNIST digits as references (or references unlike the training digits,
`eval/references.py`) with real DINOv2-S features, Euler sampling with guidance against the empty caption (no
reference) and optional image guidance, and the labels the class metrics need."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from .arms import INJECTING, Arm, ReferenceFeatures


def to16(images: list[np.ndarray]) -> list[np.ndarray]:
    """28x28 digits -> 16x16 (area), as the toy DiT was trained."""
    x = torch.from_numpy(np.stack(images)).float()[:, None]  # [B, 1, 28, 28]
    small = torch.nn.functional.interpolate(x, size=(16, 16), mode="area")
    return [a[0].round().byte().numpy() for a in small]


def injection_config(spec: dict, adapter=None):
    """The arm's `InjectionConfig`: the compare config's `injection`, except that a trained adapter keeps the blocks,
    mode and placement it was trained with (a decoupled adapter is not run in joint mode, nor an adapter trained
    on the context refiner as well without it)."""
    import vlhooks as vh

    spec = dict(spec)
    own = getattr(getattr(adapter, "config", None), "injection", None) or {}
    for key in ("blocks", "mode", "placement"):
        if key in own:
            spec[key] = own[key]
    return vh.InjectionConfig.from_dict(spec)


class ToyWorld:
    """The embedded default: the shipped toy DiT, real held-out MNIST digits as references."""

    def __init__(self, cfg: dict[str, Any]):
        import vlhooks as vh
        from vlhooks.encoders import load_minilm
        from vlhooks.models import load_transformer
        from vlhooks.train.data import load_source

        from .references import load_references
        from .toy import load_classifier

        self.cfg = cfg
        self.score_size = 56  # 16x16 samples: DINOv2-S and EfficientNet-Lite0 see them at 56 px (4 x 4 DINOv2 patches)
        self.dit = load_transformer(str(cfg["dit"])).requires_grad_(False)  # missing: `check_config` says so
        self.family = vh.family_for(self.dit)
        rc = dict(cfg["references"])
        self.ref_images, self.ref_labels = load_references(rc)  # 28x28 uint8, spread over the classes
        self.ref_small = to16(self.ref_images)  # the references at the toy world's size, for the metrics and grid
        raw = load_source("mnist", split="heldout")
        self.real_images = to16([raw["image"][i] for i in range(0, len(raw["image"]), 5)])  # 200 held-out digits
        self.encoded = ReferenceFeatures(self.ref_images, cfg["encoder"])  # as in training: [R, N, 384]
        self.features = self.encoded.default
        self.minilm = load_minilm()
        self.empty = self.minilm.tokens([""])
        self.classifier = load_classifier(cfg.get("classifier"))
        self.classifier_accuracy = self.classifier.heldout_accuracy

    def _captions(self, arm: Arm, prompts: list[str], rows: list[int]) -> tuple[torch.Tensor, ...]:
        """Per reference (`rows`; `prompts`: one each): the arm's conditional caption and the empty one, padded to
        one length `Lc`: `(cond [R, Lc, C], cond_mask [R, Lc], uncond [R, Lc, C], uncond_mask [R, Lc])`."""
        from vlhooks.blending import blend
        from vlhooks.normalize import match_global_std

        R = len(prompts)
        caps = self.minilm.tokens(list(prompts))
        Lt = int(caps.mask.sum(1).max())
        cond, cond_mask = caps.tokens[:, :Lt], caps.mask[:, :Lt]  # [R, Lt, C]
        if arm.kind == "blend":
            vl = match_global_std(self.features.tokens[rows].float(), float(cond[0][cond_mask[0]].std(correction=0)))
            b = self.cfg["blend"]
            opts = {k: v for k, v in b.items() if k not in ("mode", "alpha")}
            cond = blend(cond, vl, b["mode"], b.get("alpha", 0.5), **opts)  # [R, L', C] (prompts of one length)
            cond_mask = torch.ones(cond.shape[:2], dtype=torch.bool)
        e = self.empty.tokens[0, : int(self.empty.mask[0].sum())]  # [L0, C]
        Lc = max(cond.shape[1], e.shape[0])
        caption = torch.zeros(2, R, Lc, cond.shape[-1])  # [conditional, unconditional], R rows each
        mask = torch.zeros(2, R, Lc, dtype=torch.bool)
        caption[0, :, : cond.shape[1]], mask[0, :, : cond.shape[1]] = cond, cond_mask
        caption[1, :, : e.shape[0]], mask[1, :, : e.shape[0]] = e, True
        return caption[0], mask[0], caption[1], mask[1]

    @torch.no_grad()
    def generate(self, arm: Arm, prompt: str | list[str], seeds: list[int], adapter=None, *,
                 scale: float | None = None, image_guidance: float | None = "config",
                 rows: list[int] | None = None, blocks=None) -> torch.Tensor:
        """Samples for every seed x reference, seed-major: `[S * R, 1, 16, 16]` in [-1, 1]. Seed `s` draws the
        noise of all references from `Generator().manual_seed(s)` (the first `R` draws when `rows` picks a subset),
        the same in every arm. One batched pass per seed and step: the R conditional rows (the reference on), with
        image guidance the R text rows (the caption, the reference off), then the R unconditional ones (empty
        caption, no reference).

        `prompt`: one prompt, or one per reference (`rows`). `scale`: the injection strength (None: the config's).
        `blocks`: the blocks to inject into (None: the config's).
        `image_guidance`: the reference's own guidance scale (None: the same as `cfg`; "config": the config's).
        Image guidance applies to the arms that inject K/V (the blend arm's reference is in its caption)."""
        import vlhooks as vh
        from vlhooks.sampling import euler_sample, guidance_rows

        rows = list(range(len(self.ref_images))) if rows is None else list(rows)
        R = len(rows)
        prompts = [prompt] * R if isinstance(prompt, str) else list(prompt)
        cond, cond_mask, uncond, uncond_mask = self._captions(arm, prompts, rows)
        cfg = float(self.cfg["cfg"])
        ig = self.cfg.get("image_guidance") if image_guidance == "config" else image_guidance
        if arm.kind not in INJECTING:
            ig = None  # no K/V reference: v_ti = v_t, plain guidance is the same formula
        order = guidance_rows(ig, cfg, True)
        handle = None
        if arm.kind in INJECTING:
            own = self.encoded.for_adapter(adapter)
            m = own.mask
            feats = vh.VLFeatures(own.tokens[rows].repeat(len(order), 1, 1),
                                  mask=None if m is None else m[rows].repeat(len(order), 1))
            config = injection_config(self.cfg["injection"], adapter if arm.kind == "adapter" else None)
            if scale is not None:
                config = dataclasses.replace(config, scale=float(scale))
            if blocks is not None:
                config = dataclasses.replace(config, blocks=blocks)
            handle = vh.apply_injection(self.dit, None, config, adapter=adapter)
            handle.set_features(feats, active=[True] * R + [False] * R * (len(order) - 1))
        try:
            out = []
            for s in seeds:  # one seed per pass: ~100-150 rows, which keeps the DiT's activations in cache
                noise = self._noise(int(s), rows)  # [R, 1, 16, 16]
                out.append(euler_sample(self.family, self.dit, noise, cond, cond_mask, steps=int(self.cfg["steps"]),
                                        cfg=cfg, uncond=uncond, uncond_mask=uncond_mask, groups=1,
                                        image_guidance=ig))
            return torch.cat(out)
        finally:
            if handle is not None:
                handle.remove()

    @torch.no_grad()
    def generate_pairs(self, arm: Arm, prompt: str, seeds: list[int], adapter, left: list[int],
                       right: list[int]) -> torch.Tensor:
        """Two references per sample (the two-reference study): reference `left[i]` masked to the left half of the
        image-token grid, `right[i]` to the right half (`vh.Reference(mask=...)` over the bare transformer's
        `h x w` grid). `[S * P, 1, 16, 16]`, seed-major; sample `i` gets the noise `generate` gives `left[i]`."""
        import vlhooks as vh
        from vlhooks.sampling import euler_sample

        if arm.kind not in INJECTING:
            raise ValueError(f"arm {arm.name!r} injects no reference; the two-reference study needs one that does.")
        P = len(left)
        cond, cond_mask, uncond, uncond_mask = self._captions(arm, [prompt] * P, list(left))
        h = 16 // int(self.dit.config.all_patch_size[0])  # the image-token grid: [h, h]
        half = torch.zeros(h, h, dtype=torch.bool)
        half[:, : h // 2] = True  # [h, w]: the left half
        own = self.encoded.for_adapter(adapter)
        tokens, m = own.tokens, own.mask

        def feats(rows: list[int]) -> vh.VLFeatures:  # the conditional rows, then the unconditional ones (off)
            return vh.VLFeatures(tokens[rows].repeat(2, 1, 1), mask=None if m is None else m[rows].repeat(2, 1))

        config = injection_config(self.cfg["injection"], adapter if arm.kind == "adapter" else None)
        handle = vh.apply_injection(self.dit, None, config, adapter=adapter)
        try:
            handle.set_references([vh.Reference(feats(list(left)), mask=half),
                                   vh.Reference(feats(list(right)), mask=~half)], active=[True] * P + [False] * P)
            return torch.cat([euler_sample(self.family, self.dit, self._noise(int(s), list(left)), cond, cond_mask,
                                           steps=int(self.cfg["steps"]), cfg=float(self.cfg["cfg"]), uncond=uncond,
                                           uncond_mask=uncond_mask, groups=1) for s in seeds])
        finally:
            handle.remove()

    def _noise(self, seed: int, rows: list[int]) -> torch.Tensor:
        """The noise reference `rows[i]` gets under `seed` (the same as in a run over all references)."""
        return torch.randn((len(self.ref_images), 1, 16, 16), generator=torch.Generator().manual_seed(seed))[rows]

    def predict(self, samples: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """`(class, probabilities [N, 10])` the classifier gives each sample."""
        proba = self.classifier.predict_proba(samples.reshape(len(samples), -1).clamp(-1, 1).numpy())
        return self.classifier.classes_[proba.argmax(1)], proba

    def label_metrics(self, samples: torch.Tensor, rows: list[int] | None = None) -> dict[str, np.ndarray]:
        """Per sample (seed-major rows, as `generate` returns them)."""
        pred, proba = self.predict(samples)
        labels = self.ref_labels if rows is None else self.ref_labels[rows]
        labels = np.tile(labels, len(samples) // len(labels))
        return {"class_match": (pred == labels).astype(float), "prompt_consistency": proba.max(1)}

