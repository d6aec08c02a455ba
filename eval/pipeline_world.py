"""The `pipeline` world of `vlhooks compare`: a diffusers pipeline folder (any supported family) and reference images.

Each arm calls the pipeline's own `__call__` with the config's `generate` arguments and a fixed generator per
(reference, seed); K/V arms run under `vh.inject`, the blend arm passes blended caption embeddings (from the
pipeline's own `encode_prompt`, passed back as the family's `prompt_kwargs`). No labels exist here, so only the
label-free metrics are computed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlhooks.errors import CompareError
from vlhooks.images import resize

from .arms import INJECTING, Arm, ReferenceFeatures

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

        import vlhooks as vh

        self.cfg = cfg
        spec = dict(cfg["pipeline"])  # checked by `check_config`
        dtype = getattr(torch, spec.get("dtype", "float32"))
        self.device = spec.get("device", "cuda" if torch.cuda.is_available() else "cpu")
        self.pipe = DiffusionPipeline.from_pretrained(spec["path"], torch_dtype=dtype).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.dit = self.pipe.transformer
        self.family = vh.family_for(self.dit)
        self.generate_kwargs = dict(cfg.get("generate") or {})
        self.ref_images, self.ref_names = load_references(cfg["references"])
        self.metric_size = int(spec.get("metric_size", 128))  # large pipeline images are scored at this size
        self.ref_small = [resize(a, self.metric_size) for a in self.ref_images]
        self.real_images = self.ref_small
        self.encoded = ReferenceFeatures(self.ref_images, cfg["encoder"])  # [R, N, D] per encoder spec
        self.features = self.encoded.default
        size = self.metric_size
        self.score_size = max(56, min(224, size - size % 14))  # DINOv2-S / EfficientNet-Lite0 input size

    def _blend_embeds(self, prompt: str, rows: list[int]) -> dict[str, Any]:
        """The pipeline `__call__` arguments carrying the prompt's caption embeddings blended with references `rows`."""
        from vlhooks.blending import blend
        from vlhooks.normalize import match_global_std

        n = int(self.generate_kwargs.get("max_sequence_length", 512))
        enc = self.family.encode_prompt(self.pipe, [prompt], self.device, n)
        text = enc.sequences[0]  # [Lt, C]
        if text.shape[-1] != self.features.width:
            raise CompareError(f"the blend arm needs features of the caption width {text.shape[-1]}, got "
                               f"{self.features.width}; choose an encoder of that width or drop the blend arm.")
        vl = match_global_std(self.features.tokens[rows], float(text.std(correction=0)))
        b = self.cfg["blend"]
        mixed = blend(text.expand(len(rows), -1, -1), vl, b["mode"], b.get("alpha", 0.5),
                      **{k: v for k, v in b.items() if k not in ("mode", "alpha")})  # [r, L, C]
        p = next(self.dit.parameters())
        pooled = None if enc.pooled is None else enc.pooled.to(self.device, p.dtype).expand(len(rows), -1)  # [r, P]
        return self.family.prompt_kwargs(mixed.to(self.device, p.dtype), pooled)

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
            if arm.kind in INJECTING:
                own = self.encoded.for_adapter(adapter)
                feats = vh.VLFeatures(own.tokens[rows], mask=None if own.mask is None else own.mask[rows])
                from .toy_world import injection_config

                config = injection_config(self.cfg["injection"], adapter if arm.kind == "adapter" else None)
                ig = self.cfg.get("image_guidance")
                with vh.inject(self.pipe, feats, config, adapter=adapter) as handle:
                    if ig is None:
                        images = self.pipe(**kw).images  # [r, H, W, 3] in [0, 1]
                    else:
                        from vlhooks.sampling import ImageGuidance

                        with ImageGuidance(self.pipe, handle, float(ig), self.text_guidance()):
                            images = self.pipe(**kw).images
            else:
                images = self.pipe(**kw).images
            outs.append(torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() * 2.0 - 1.0)
        return torch.cat(outs)

    def text_guidance(self) -> float:
        """The pipeline's effective text guidance scale `s` (`v_u + s (v_c - v_u)`; 1 without guidance): the
        config's `pipeline.text_guidance`, else the family's reading of the `generate` arguments and the call's
        defaults (`DiTFamily.text_guidance`)."""
        import inspect

        spec = self.cfg.get("pipeline") or {}
        if spec.get("text_guidance") is not None:
            return float(spec["text_guidance"])
        params = inspect.signature(type(self.pipe).__call__).parameters
        call = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
        s = self.family.text_guidance({**call, **self.generate_kwargs})
        if s is None:
            raise CompareError(f"image_guidance with {type(self.pipe).__name__}: set pipeline.text_guidance to the "
                               "pipeline's guidance scale s (v_u + s (v_c - v_u); 1 without guidance).")
        return float(s)

    def label_metrics(self, samples: torch.Tensor, rows=None) -> dict[str, np.ndarray]:
        """None: no labels in this world."""
        return {}
