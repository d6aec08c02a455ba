"""Shared helpers of the extractors: image loading, layer picking, padding, the user cache folder.

Owns nothing model-specific; every extractor module imports from here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, Union

import numpy as np
import torch

from ..errors import FeatureError

if TYPE_CHECKING:
    import PIL.Image

ImageLike = Union[str, os.PathLike, "PIL.Image.Image", np.ndarray, torch.Tensor]
Layer = Union[int, Sequence[int]]


def cache_dir() -> Path:
    """The vlhooks cache folder: `$VLHOOKS_CACHE`, else `$XDG_CACHE_HOME/vlhooks`, else `~/.cache/vlhooks`."""
    if os.environ.get("VLHOOKS_CACHE"):
        return Path(os.environ["VLHOOKS_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "vlhooks"


def to_pil(image: ImageLike):
    """One image as an RGB `PIL.Image` (path, PIL image, HWC/HW numpy array, or CHW/HWC torch tensor)."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FeatureError(f"Image file {str(path)!r} does not exist; pass an existing image path.")
        with Image.open(path) as im:
            return im.convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 3 and t.shape[0] in (1, 3) and t.shape[-1] not in (1, 3):
            t = t.permute(1, 2, 0)  # CHW -> HWC
        image = t.float().numpy() if t.is_floating_point() else t.numpy()
    if isinstance(image, np.ndarray):
        a = image
        if a.ndim == 2:
            a = np.stack([a] * 3, axis=-1)
        if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
            raise FeatureError(f"Image array has shape {a.shape}; pass HxWx3 (or HxW grey) pixels.")
        if a.shape[-1] == 1:
            a = np.repeat(a, 3, axis=-1)
        if a.dtype != np.uint8:
            a = np.asarray(a, dtype=np.float64)
            if a.max(initial=0.0) <= 1.0:
                a = a * 255.0
            a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(a[..., :3]))
    raise FeatureError(
        f"Cannot read an image from {type(image).__name__}; pass a path, a PIL image, or an HxWx3 array."
    )


def as_list(images: Any) -> list:
    """A single image or a list of them, as a list."""
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise FeatureError("No images were given; pass at least one image.")
        return list(images)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return list(images)
    return [images]


def layer_list(layer: Layer) -> list[int]:
    """An int or a sequence of ints as a list of ints."""
    if isinstance(layer, (int, np.integer)) and not isinstance(layer, bool):
        return [int(layer)]
    out = [int(x) for x in layer]
    if not out:
        raise FeatureError("`layer` is an empty list; pass one layer index or a non-empty list of them.")
    return out


def pick_layers(hidden_states: Sequence[torch.Tensor], layer: Layer, combine: str = "mean") -> torch.Tensor:
    """`hidden_states[layer]`, or for a list of layers their mean (`combine="mean"`) or concatenation on D.

    `hidden_states` is the tuple a transformers model returns with `output_hidden_states=True`
    (index 0 = embeddings, -1 = last layer). Each entry is [B, N, D]; the result is [B, N, D] or [B, N, K*D].
    """
    n = len(hidden_states)
    idx = layer_list(layer)
    for i in idx:
        if not -n <= i < n:
            raise FeatureError(
                f"Layer {i} is out of range: this model returns {n} hidden states "
                f"(valid indices {-n}..{n - 1}; 0 = embeddings, -1 = last layer)."
            )
    hs = [hidden_states[i] for i in idx]
    if len(hs) == 1:
        return hs[0]
    if combine == "mean":
        return torch.stack(hs, 0).mean(0)  # [B, N, D]
    if combine == "concat":
        return torch.cat(hs, -1)  # [B, N, K*D]
    raise FeatureError(f"combine must be 'mean' or 'concat', got {combine!r}.")


def pad_rows(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack [N_i, D] rows into [B, N, D], zero-padded at the end, with a [B, N] bool mask (None if no padding)."""
    lengths = [r.shape[0] for r in rows]
    if len(set(lengths)) == 1:
        return torch.stack(list(rows), 0), None
    n, d = max(lengths), rows[0].shape[-1]
    out = rows[0].new_zeros(len(rows), n, d)
    mask = torch.zeros(len(rows), n, dtype=torch.bool, device=rows[0].device)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = True
    return out, mask


def model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of a model's first floating parameter."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def name_of(model: torch.nn.Module, given: str | None) -> str:
    """A readable model id for `source`: the given one, else the config's `_name_or_path`, else the class name."""
    if given:
        return str(given)
    cfg = getattr(model, "config", None)
    path = getattr(cfg, "_name_or_path", "") if cfg is not None else ""
    return str(path) if path else type(model).__name__


def jsonable(x: Any) -> Any:
    """A processor setting (size dicts, mean/std lists) as plain JSON values, for cache keys."""
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if hasattr(x, "items"):
        return {str(k): jsonable(v) for k, v in x.items() if v is not None}
    if hasattr(x, "__dict__"):
        return {k: jsonable(v) for k, v in vars(x).items() if v is not None and not k.startswith("_")}
    return str(x)
