"""The `pipeline` world of `vlhooks compare`: a diffusers pipeline folder (Z-Image, Flux, SD3) and reference images.

Each arm calls the pipeline's own `__call__` with the config's `generate` arguments and a fixed generator per
(reference, seed); K/V arms run under `vh.inject`, the blend arm passes blended `prompt_embeds` (from the
pipeline's own `encode_prompt`). No labels exist here, so only the label-free metrics are computed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .compare import Arm, CompareError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_references(spec: dict[str, Any]) -> tuple[list[np.ndarray], list[str]]:
    """`{"folder": path, "count": n}`: the first `n` images of the folder (sorted by name) as HxWx3 uint8."""
    from PIL import Image

    folder = Path(spec.get("folder", ""))
    if not folder.is_dir():
        raise CompareError(f"references.folder {folder} is not a folder; point it at your reference images.")
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)[: spec.get("count") or None]
    if not files:
        raise CompareError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}.")
    return [np.asarray(Image.open(f).convert("RGB")) for f in files], [f.name for f in files]


class PipelineWorld:
    """A real (or saved tiny) pipeline; references from a folder."""

    def __init__(self, cfg: dict[str, Any]):
        from diffusers import DiffusionPipeline

        from vlhooks.train.encoders import image_encoder

        import vlhooks as vh

        self.cfg = cfg
        spec = dict(cfg.get("pipeline") or {})
        if not spec.get("path"):
            raise CompareError("world 'pipeline' needs pipeline.path (a diffusers pipeline folder or hub id).")
        dtype = getattr(torch, spec.get("dtype", "float32"))
        self.device = spec.get("device", "cuda" if torch.cuda.is_available() else "cpu")
        self.pipe = DiffusionPipeline.from_pretrained(spec["path"], torch_dtype=dtype).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.dit = self.pipe.transformer
        self.kind = type(self.pipe).__name__
        self.generate_kwargs = dict(cfg.get("generate") or {})
        self.ref_images, self.ref_names = load_references(cfg["references"])
        size = int(spec.get("metric_size", 128))
        from PIL import Image

        self.ref_small = [np.asarray(Image.fromarray(a).resize((size, size), Image.BICUBIC)) for a in self.ref_images]
        self.real_images = self.ref_small
        tokens, mask = image_encoder(dict(cfg["encoder"]))(self.ref_images)  # [R, N, D]
        self.features = vh.VLFeatures(tokens.float(), mask=mask)
        self.metric_size = size
        self.score_size = max(56, min(224, size - size % 14))  # DINOv2-S / EfficientNet-Lite0 input size

    def _blend_embeds(self, prompt: str, rows: list[int]) -> dict[str, Any]:
        from vlhooks.blend import blend
        from vlhooks.normalize import match_global_std
        from vlhooks.train.encoders import PipelineCaptionEncoder

        n = int(self.generate_kwargs.get("max_sequence_length", 512))
        enc = PipelineCaptionEncoder.from_pipe(self.pipe, n, self.device)([prompt])
        text = enc["sequences"][0]  # [Lt, C]
        if text.shape[-1] != self.features.width:
            raise CompareError(f"the blend arm needs features of the caption width {text.shape[-1]}, got "
                               f"{self.features.width}; choose an encoder of that width or drop the blend arm.")
        vl = match_global_std(self.features.tokens[rows], float(text.std(correction=0)))
        b = self.cfg["blend"]
        mixed = blend(text.expand(len(rows), -1, -1), vl, b["mode"], b.get("alpha", 0.5),
                      **{k: v for k, v in b.items() if k not in ("mode", "alpha")})  # [r, L, C]
        p = next(self.dit.parameters())
        mixed = mixed.to(self.device, p.dtype)
        if self.kind.startswith("ZImage"):
            return {"prompt_embeds": list(mixed)}
        out = {"prompt_embeds": mixed}
        if enc["pooled"] is not None:
            out["pooled_prompt_embeds"] = enc["pooled"].to(self.device, p.dtype).expand(len(rows), -1)
        return out

    @torch.no_grad()
    def generate(self, arm: Arm, prompt: str, seeds: list[int], adapter=None) -> torch.Tensor:
        """Images for every seed x reference, seed-major: `[S * R, 3, H, W]` in [-1, 1]. Reference `r` under seed
        `s` uses `Generator(device).manual_seed(s * 100003 + r)`, the same in every arm."""
        return torch.cat([self._generate_one_seed(arm, prompt, int(s), adapter) for s in seeds])

    def _generate_one_seed(self, arm: Arm, prompt: str, seed: int, adapter=None) -> torch.Tensor:
        import vlhooks as vh

        R = len(self.ref_images)
        bs = int(self.cfg.get("batch_size", 1))
        outs = []
        for start in range(0, R, bs):
            rows = list(range(start, min(R, start + bs)))
            gens = [torch.Generator(self.device).manual_seed(int(seed) * 100_003 + r) for r in rows]
            kw = dict(self.generate_kwargs, generator=gens, output_type="np")
            if arm.kind == "blend":
                kw.update(self._blend_embeds(prompt, rows))
            else:
                kw["prompt"] = [prompt] * len(rows)
            if arm.kind in ("zero-shot", "adapter", "random"):
                mask = None if self.features.mask is None else self.features.mask[rows]
                feats = vh.VLFeatures(self.features.tokens[rows], mask=mask)
                config = vh.InjectionConfig.from_dict(self.cfg["injection"])
                with vh.inject(self.pipe, feats, config, adapter=adapter):
                    images = self.pipe(**kw).images
            else:
                images = self.pipe(**kw).images
            outs.append(torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() * 2.0 - 1.0)
        return torch.cat(outs)

    def label_metrics(self, samples: torch.Tensor) -> dict[str, np.ndarray]:
        return {}
