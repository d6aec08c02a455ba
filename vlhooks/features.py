"""`VLFeatures`: the reference-image tokens that injection reads.

Owns the tensor container and its validation; nothing here knows about a DiT. Encoders that produce
`VLFeatures` live elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .errors import FeatureError

FeatureSpace = Literal["caption", "hidden"]


@dataclass
class VLFeatures:
    """Tokens of a reference image, ready to be injected as extra keys/values.

    Args:
        tokens (`torch.Tensor` of shape `[B, N, D]`):
            One row per batch item (a batch of 1 broadcasts to every conditional row).
        mask (`torch.Tensor` of shape `[B, N]`, *optional*):
            Boolean, `True` marks a real token, `False` a padded one (padded tokens get no attention).
        space (`str`, defaults to `"caption"`):
            `"caption"`: `D` is the width of the pipeline's `prompt_embeds` (Z-Image 2560, Flux / SD3 4096 at full
            size); the DiT's own caption embedder runs first. `"hidden"`: `D` is the DiT's hidden width; the
            tokens are taken as the caption stream as it enters the chosen block (used to inject a block's own
            text tokens, or tokens captured from another run).
        source (`dict`, *optional*):
            Free-form record of how the tokens were made (encoder, layer, token selection, normalisation).
    """

    tokens: torch.Tensor  # [B, N, D]
    mask: torch.Tensor | None = None  # [B, N] bool, True = real token
    space: FeatureSpace = "caption"
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check shapes, dtypes and values; raise `FeatureError` naming the fix."""
        t = self.tokens
        if not isinstance(t, torch.Tensor):
            raise FeatureError(f"VLFeatures.tokens must be a torch.Tensor [B, N, D], got {type(t).__name__}.")
        if t.ndim == 2:
            raise FeatureError(
                f"VLFeatures.tokens has shape {tuple(t.shape)}; expected [B, N, D]. "
                "Add a batch dimension with `tokens.unsqueeze(0)`."
            )
        if t.ndim != 3:
            raise FeatureError(f"VLFeatures.tokens has shape {tuple(t.shape)}; expected [B, N, D].")
        if t.shape[0] == 0 or t.shape[1] == 0:
            raise FeatureError(f"VLFeatures.tokens has shape {tuple(t.shape)}; it needs at least one row and one token.")
        if not t.is_floating_point():
            raise FeatureError(
                f"VLFeatures.tokens has dtype {t.dtype}; pass floating-point features (e.g. `tokens.float()`)."
            )
        if t.device.type != "meta" and not bool(torch.isfinite(t).all()):
            raise FeatureError(
                "VLFeatures.tokens contains NaN or Inf; check the encoder output "
                "(e.g. an fp16 overflow) or clean it with `torch.nan_to_num`."
            )
        if self.space not in ("caption", "hidden"):
            raise FeatureError(f"VLFeatures.space must be 'caption' or 'hidden', got {self.space!r}.")
        if self.mask is not None:
            m = self.mask
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
                raise FeatureError("VLFeatures.mask must be a bool tensor [B, N] (True = real token); use `mask.bool()`.")
            if tuple(m.shape) != tuple(t.shape[:2]):
                raise FeatureError(
                    f"VLFeatures.mask has shape {tuple(m.shape)} but tokens are {tuple(t.shape)}; "
                    f"the mask must be [B, N] = {tuple(t.shape[:2])}."
                )
            if m.device != t.device:
                raise FeatureError(f"VLFeatures.mask is on {m.device} but tokens are on {t.device}; move both together.")
            if not bool(m.any(dim=1).all()):
                raise FeatureError(
                    "VLFeatures.mask has a row with no real token; drop that row or mark at least one token True."
                )

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[1]

    @property
    def width(self) -> int:
        return self.tokens.shape[2]

    def to(self, *args, **kwargs) -> "VLFeatures":
        """Return a copy with tokens (and mask, device only) moved like `torch.Tensor.to`."""
        tokens = self.tokens.to(*args, **kwargs)
        mask = None if self.mask is None else self.mask.to(tokens.device)
        return VLFeatures(tokens, mask=mask, space=self.space, source=dict(self.source))
