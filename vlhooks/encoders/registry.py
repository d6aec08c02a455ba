"""`load_extractor`: one name for every encoder the CLI and the examples use.

Owns the mapping from an encoder name (`dinov2-small`, `efficientnet-lite0`, `minilm`, or a transformers folder /
hub id) to a ready extractor, and which options each kind takes.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import FeatureError

BUILTIN = ("dinov2-small", "efficientnet-lite0", "minilm")


def load_extractor(name: str, *, layer: Any = None, select: str | None = None, prompt: str | None = None,
                   enable_thinking: bool | None = None, include_cls: bool = False, combine: str = "mean",
                   image_size: int = 224, device: str = "cpu", dtype: torch.dtype = torch.float32,
                   local_files_only: bool | None = None) -> Any:
    """An extractor by name: the offline `dinov2-small` / `efficientnet-lite0` / `minilm`, or a local folder or hub
    id of a Qwen3-VL, Qwen2.5-VL, SigLIP, CLIP or DINOv2 checkpoint. Options a kind does not use must be left unset."""
    def unused(kind: str, **given: Any) -> None:
        bad = [k for k, v in given.items() if v not in (None, False)]
        if bad:
            them = "them" if len(bad) > 1 else "it"
            raise FeatureError(f"{kind} does not take {', '.join(bad)}; leave {them} unset.")

    if name == "dinov2-small":
        from .dinov2_small import dinov2_small_extractor

        unused(name, select=select, prompt=prompt, enable_thinking=enable_thinking)
        return dinov2_small_extractor(layer="last" if layer is None else layer, include_cls=include_cls,
                                      image_size=image_size, combine=combine, device=device, dtype=dtype)
    if name == "efficientnet-lite0":
        from .efficientnet import load_efficientnet_lite0

        unused(name, layer=layer, select=select, prompt=prompt, enable_thinking=enable_thinking,
               include_cls=include_cls)
        ext = load_efficientnet_lite0(device=device)
        ext.image_size = image_size
        return ext
    if name == "minilm":
        from .minilm import load_minilm

        unused(name, select=select, prompt=prompt, enable_thinking=enable_thinking, include_cls=include_cls)
        return load_minilm(device=device, layer=-1 if layer is None else layer)

    from transformers import AutoConfig

    from .qwen_vl import QwenVLExtractor, is_qwen_vl
    from .vision import VisionExtractor, is_vision

    hub = {} if local_files_only is None else {"local_files_only": local_files_only}
    try:
        config = AutoConfig.from_pretrained(name, **hub)
    except (OSError, ValueError) as e:
        raise FeatureError(
            f"Unknown encoder {name!r}: use one of {', '.join(BUILTIN)}, or a local folder / hub id of a "
            f"Qwen3-VL, Qwen2.5-VL, SigLIP, CLIP or DINOv2 checkpoint ({e})."
        ) from e
    if is_qwen_vl(config.model_type):
        unused(name, include_cls=include_cls)
        kw = {k: v for k, v in dict(layer=layer, select=select, prompt=prompt,
                                    enable_thinking=enable_thinking).items() if v is not None}
        return QwenVLExtractor.from_pretrained(name, dtype=dtype, device=device, combine=combine, **hub, **kw)
    if is_vision(config.model_type):
        unused(name, select=select, prompt=prompt, enable_thinking=enable_thinking)
        return VisionExtractor.from_pretrained(name, dtype=dtype, device=device, combine=combine,
                                               layer="last" if layer is None else layer, include_cls=include_cls,
                                               **hub)
    raise FeatureError(
        f"{name!r} is a {config.model_type!r} model; supported: Qwen3-VL, Qwen2.5-VL, SigLIP, CLIP, DINOv2 "
        f"(or one of {', '.join(BUILTIN)})."
    )


class TrainingEncoder:
    """An extractor in the shape `train/encoders.py` uses: `describe() -> dict`, `__call__(items) -> (tokens
    [B, N, D], mask [B, N] or None)`."""

    def __init__(self, extractor: Any) -> None:
        self.extractor = extractor

    def describe(self) -> dict:
        return self.extractor.settings()

    def __call__(self, items: list) -> tuple[torch.Tensor, torch.Tensor | None]:
        f = self.extractor(list(items))
        return f.tokens, f.mask


def training_image_encoder(name: str, **options: Any) -> TrainingEncoder:
    """`load_extractor(name, **options)` for reference images, wrapped as a `TrainingEncoder`."""
    if name == "minilm":
        raise FeatureError("minilm encodes captions; use it as the caption encoder (or dinov2-small for images).")
    return TrainingEncoder(load_extractor(name, **options))


def training_caption_encoder(name: str, **options: Any) -> TrainingEncoder:
    """The caption encoder (`minilm`: token embeddings with [CLS]/[SEP], padded, with a mask) as a `TrainingEncoder`."""
    if name != "minilm":
        raise FeatureError(f"Unknown caption encoder {name!r}; the offline caption encoder is 'minilm'.")
    return TrainingEncoder(load_extractor(name, **options))
