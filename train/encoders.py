"""Encoders the training data pipeline runs once (captions, reference images, latents), resolved by name.

Built in, weight-free and deterministic (for tiny recipes and tests):
- `patches`: reference image -> pixel patches mapped to `width` by a fixed orthonormal projection.
- `hash-words`: caption -> one fixed random vector per word (seeded by the word), plus [begin] / [end] tokens.
- `pixels`: the image itself as the "latent" (pixel-space DiTs, e.g. the toy world), in [-1, 1].
- `vae`: a diffusers `AutoencoderKL` from a local folder (latent DiTs).
- `pipeline` (captions): the diffusers pipeline's own `encode_prompt` from a local folder, pooled embeddings too.
Real encoders (`dinov2-small`, `minilm`, `vae:<folder>`) come from `vlhooks.encoders` and diffusers.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlhooks.encoders.patches import PatchImageEncoder
from vlhooks.errors import DataError


def to_pil(img: Any) -> Image.Image:
    if isinstance(img, Image.Image):
        return img.convert("RGB")
    a = np.asarray(img)
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    if a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    return Image.fromarray(a[..., :3]).convert("RGB")


class HashWordEncoder:
    """Caption -> `[begin] + one vector per word + [end]`; each vector is fixed by the word (a seeded hash)."""

    def __init__(self, width: int, seed: int = 0):
        self.width, self.seed = width, seed

    def describe(self) -> dict:
        return {"encoder": "hash-words", "width": self.width, "seed": self.seed}

    def _vec(self, word: str) -> torch.Tensor:
        h = int.from_bytes(hashlib.sha256(f"{self.seed}:{word}".encode()).digest()[:8], "little")
        return torch.randn(self.width, generator=torch.Generator().manual_seed(h))

    def __call__(self, captions: list[str]) -> list[torch.Tensor]:
        return [torch.stack([self._vec("[begin]")] + [self._vec(w) for w in c.lower().split()] + [self._vec("[end]")])
                for c in captions]  # each [L_i, width]


class PixelLatents:
    """The image itself, resized to `size` and scaled to [-1, 1]; `channels` 1 (grey) or 3."""

    def __init__(self, size: int = 16, channels: int = 1):
        self.size, self.channels = size, channels

    def describe(self) -> dict:
        return {"latents": "pixels", "size": self.size, "channels": self.channels}

    def __call__(self, images: list) -> torch.Tensor:
        out = []
        for img in images:
            pil = to_pil(img).convert("L" if self.channels == 1 else "RGB").resize((self.size, self.size), Image.BOX)
            a = torch.from_numpy(np.asarray(pil).copy()).float() / 127.5 - 1.0
            out.append(a[None] if self.channels == 1 else a.permute(2, 0, 1))
        return torch.stack(out)  # [B, C, H, W]


class VAELatents:
    """Training latents through a pipeline folder's VAE, as that pipeline makes them (the family's
    `encode_latents`: Flux / SD3 / Z-Image `(z - shift) * scale`, Qwen-Image per-channel mean / std, Flux.2
    patchified and batch-norm normalised, Sana's deep-compression latents)."""

    def __init__(self, path: str, subfolder: str | None = "vae", size: int = 512, device: str = "cpu",
                 dtype: str = "float32"):
        import json

        import diffusers

        from vlhooks.models import DiTFamily, family_for_class

        self.path, self.subfolder, self.size = path, subfolder, size
        folder = Path(path) / (subfolder or "")
        cls_name = json.loads((folder / "config.json").read_text()).get("_class_name", "AutoencoderKL") \
            if (folder / "config.json").is_file() else "AutoencoderKL"
        vae_cls = getattr(diffusers, cls_name, None)
        if vae_cls is None:
            raise DataError(f"{folder}: unknown VAE class {cls_name!r}; point latents.path at a diffusers pipeline "
                            "folder.")
        index = Path(path) / "model_index.json"
        pipeline = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
        self.family = family_for_class(pipeline) if pipeline else DiTFamily()
        self.vae = vae_cls.from_pretrained(path, subfolder=subfolder, torch_dtype=getattr(torch, dtype))
        self.vae = self.vae.to(device).eval().requires_grad_(False)

    def describe(self) -> dict:
        return {"latents": "vae", "path": self.path, "subfolder": self.subfolder, "size": self.size}

    @torch.no_grad()
    def __call__(self, images: list) -> torch.Tensor:
        x = torch.stack([torch.from_numpy(np.asarray(to_pil(i).resize((self.size, self.size), Image.BICUBIC)).copy())
                         for i in images]).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # [B, 3, H, W]
        p = next(self.vae.parameters())
        return self.family.encode_latents(self.vae, x.to(p.device, p.dtype)).float().cpu()  # [B, C, h, w]


class PipelineCaptionEncoder:
    """Captions through a diffusers pipeline's own `encode_prompt` (its text encoders, tokenizers, templates and
    layers), loaded from a local folder without the transformer and VAE. Returns `{"sequences": [L_i, C] each,
    "pooled": [B, P] or None}` (Flux and SD3 pass a pooled CLIP embedding too)."""

    def __init__(self, path: str, max_sequence_length: int = 512, device: str = "cpu", dtype: str = "float32"):
        from diffusers import DiffusionPipeline

        self.path, self.max_len, self.device = path, max_sequence_length, device
        self.pipe = DiffusionPipeline.from_pretrained(path, transformer=None, vae=None,
                                                      torch_dtype=getattr(torch, dtype)).to(device)
        self.kind = type(self.pipe).__name__

    @classmethod
    def from_pipe(cls, pipe, max_sequence_length: int = 512, device: str = "cpu") -> "PipelineCaptionEncoder":
        """Wrap an already loaded pipeline (nothing is read from disk)."""
        self = cls.__new__(cls)
        self.path, self.max_len, self.device = getattr(pipe, "name_or_path", None), max_sequence_length, device
        self.pipe, self.kind = pipe, type(pipe).__name__
        return self

    def describe(self) -> dict:
        return {"encoder": "pipeline", "path": self.path, "pipeline": self.kind, "max_sequence_length": self.max_len}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> dict:
        from vlhooks.models import family_for_class

        out = family_for_class(self.kind).encode_prompt(self.pipe, captions, self.device, self.max_len)
        return {"sequences": out.sequences, "pooled": out.pooled}


def image_encoder(spec: dict) -> Any:
    spec = dict(spec)
    name = spec.pop("name")
    if name == "patches":
        return PatchImageEncoder(**spec)
    try:
        from vlhooks import encoders as real
    except ImportError as e:
        raise ValueError(f"image encoder {name!r} needs vlhooks.encoders ({e}); use name: patches for a tiny run.")
    return real.training_image_encoder(name, **spec)


def caption_encoder(spec: dict) -> Any:
    spec = dict(spec)
    name = spec.pop("name")
    if name == "hash-words":
        return HashWordEncoder(**spec)
    if name == "pipeline":
        return PipelineCaptionEncoder(**spec)
    try:
        from vlhooks import encoders as real
    except ImportError as e:
        raise ValueError(f"caption encoder {name!r} needs vlhooks.encoders ({e}); use name: hash-words for a tiny run.")
    return real.training_caption_encoder(name, **spec)


def latent_encoder(spec: dict) -> Any:
    spec = dict(spec)
    name = spec.pop("name")
    if name == "pixels":
        return PixelLatents(**spec)
    if name == "vae":
        return VAELatents(**spec)
    raise ValueError(f"unknown latent encoder {name!r}; use name: pixels or vae.")
