"""Images wherever features go: `vh.encode(images, encoder=...)`, and the encoder an adapter records.

Owns turning an image (a PIL image, a path, an array or tensor, or a list of them) into `VLFeatures` with a
named encoder (`"dinov2-small"`, `"siglip"`, `"qwen3-vl"`, a local folder / hub id, `"patches"`), an encoder
spec dict as adapters record it (`adapter.config.feature_source`, e.g. `{"name": "dinov2-small", "image_size": 56,
"include_cls": True}`), or an extractor object. Built encoders are kept per spec, and features per image and
settings (in memory, the most recent 256), so encoding the same image twice costs one lookup.
"""

from __future__ import annotations

import functools
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from .errors import EncoderError, FeatureError
from .features import VLFeatures

ALIASES = {  # short names of the hub checkpoints each VL family is usually run with
    "siglip": "google/siglip-so400m-patch14-384",
    "clip": "openai/clip-vit-large-patch14",
    "qwen3-vl": "Qwen/Qwen3-VL-4B-Instruct",
    "qwen2.5-vl": "Qwen/Qwen2.5-VL-7B-Instruct",
}
_FEATURES: "OrderedDict[tuple, VLFeatures]" = OrderedDict()
_MAX_CACHED = 256


def is_image(x: Any) -> bool:
    """Whether `x` is an image (or a list of them) rather than features."""
    import numpy as np
    from PIL import Image

    if isinstance(x, (list, tuple)):
        return bool(x) and all(is_image(i) for i in x)
    if isinstance(x, (Image.Image, str, os.PathLike, np.ndarray)):
        return True
    # a tensor is an image when it is CHW RGB `[3, H, W]` or a batch `[B, 3, H, W]` (features are `VLFeatures`)
    return isinstance(x, torch.Tensor) and ((x.ndim == 3 and x.shape[0] == 3) or (x.ndim == 4 and x.shape[1] == 3))


def _images(x: Any) -> list:
    """One image per feature row."""
    if isinstance(x, torch.Tensor) and x.ndim == 4:
        return list(x.unbind(0))
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _spec(encoder: Any, options: dict) -> tuple[str, dict]:
    if isinstance(encoder, dict):
        spec = dict(encoder)
        name = spec.pop("name", None) or spec.pop("encoder", None)
        if not isinstance(name, str):
            raise EncoderError(f"an encoder spec needs a 'name' (e.g. {{'name': 'dinov2-small'}}), got {encoder!r}.")
        return name, {**spec, **options}
    return encoder, dict(options)


@functools.lru_cache(maxsize=8)
def _built(name: str, options_json: str) -> Any:
    options = json.loads(options_json)
    if name == "patches":
        from .encoders.patches import PatchImageEncoder

        return PatchImageEncoder(**options)
    from .encoders import load_extractor

    return load_extractor(ALIASES.get(name, name), **options)


def image_encoder(encoder: Any, **options: Any) -> Any:
    """An image encoder: built from a name or spec dict (kept for later calls), or `encoder` itself."""
    if not isinstance(encoder, (str, dict)):
        if not callable(encoder):
            raise EncoderError(f"encoder must be a name, a spec dict or an extractor, got {type(encoder).__name__}.")
        return encoder
    name, opts = _spec(encoder, options)
    try:
        return _built(name, json.dumps(opts, sort_keys=True, default=str))
    except TypeError as e:
        raise EncoderError(f"encoder {name!r} does not take {sorted(opts)} ({e}); see vlhooks.encoders.load_extractor."
                           ) from None


def _settings(encoder: Any) -> str:
    for attr in ("settings", "describe"):
        fn = getattr(encoder, attr, None)
        if callable(fn):
            return json.dumps(fn(), sort_keys=True, default=str)
    return f"object:{id(encoder)}"


def encode(images: Any, encoder: Any = "dinov2-small", **options: Any) -> VLFeatures:
    """`VLFeatures` `[B, N, D]` of `images` (one row per image) through `encoder` (a name, a spec dict or an
    extractor; `options` go to `vlhooks.encoders.load_extractor`).

    Example:
        >>> feats = vh.encode("photo.png", encoder="dinov2-small", include_cls=True)
    """
    from .feature_cache import image_hash

    enc = image_encoder(encoder, **options)
    items = _images(images)
    if not items:
        raise FeatureError("encode got no image; pass a PIL image, a path, an array or tensor, or a list of them.")
    settings = _settings(enc)
    keys = [(image_hash(i), settings) for i in items]
    if all(k in _FEATURES for k in keys):
        rows = [_FEATURES[k] for k in keys]
        for k in keys:
            _FEATURES.move_to_end(k)
    else:
        out = enc(items)
        feats = out if isinstance(out, VLFeatures) else VLFeatures(out[0].float(), mask=out[1])
        rows = [VLFeatures(feats.tokens[i:i + 1], None if feats.mask is None else feats.mask[i:i + 1],
                           source=dict(feats.source)) for i in range(len(items))]
        for k, r in zip(keys, rows):
            _FEATURES[k] = r
            while len(_FEATURES) > _MAX_CACHED:
                _FEATURES.popitem(last=False)
    if len(rows) == 1:
        return rows[0]
    if len({r.num_tokens for r in rows}) != 1:
        raise FeatureError("the images encode to different token counts; encode them one at a time (one reference "
                           "each).")
    masks = [r.mask for r in rows]
    mask = None if all(m is None for m in masks) else torch.cat(
        [m if m is not None else torch.ones(r.tokens.shape[:2], dtype=torch.bool) for m, r in zip(masks, rows)])
    return VLFeatures(torch.cat([r.tokens for r in rows]), mask=mask, source=dict(rows[0].source))


def features_of(x: Any, encoder: Any = None, adapter: Any = None, what: str = "reference") -> Any:
    """`x` itself unless it is an image; an image is encoded with `encoder`, else with the encoder the adapter was
    trained with (`adapter.config.feature_source`)."""
    if x is None or isinstance(x, VLFeatures) or not is_image(x):
        return x
    if encoder is None:
        source = getattr(getattr(adapter, "config", None), "feature_source", None) or {}
        if not (source.get("name") or source.get("encoder")):
            raise FeatureError(
                f"an image was given for the {what}, but there is no encoder to turn it into features: pass encoder= (e.g. "
                "encoder='dinov2-small') or an adapter that records the encoder it was trained with "
                "(adapter.config.feature_source), or pass VLFeatures."
            )
        encoder = source
    return encode(x, encoder)


def load_features(path: str | os.PathLike, settings: dict | None = None) -> VLFeatures:
    """Features written by `vlhooks extract` (one safetensors file), as `VLFeatures`; `settings` (optional) must
    match the ones recorded in the file."""
    from .feature_cache import load_features as _load

    if not Path(path).is_file():
        raise EncoderError(f"{path} is not a feature file; write one with `vlhooks extract`.")
    return _load(path, settings)
