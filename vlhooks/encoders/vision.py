"""`VisionExtractor`: patch tokens (optionally with the CLS token) of SigLIP, CLIP-vision and DINOv2 encoders.

Owns the per-family prefix layout (CLS, DINOv2 registers), the layer choice and the preprocessing call.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import FeatureError
from ..features import VLFeatures
from ._common import Layer, as_list, jsonable, layer_list, model_device_dtype, name_of, pick_layers, to_pil

# model_type -> transformers class that returns the vision tower alone
_VISION_CLASSES = {
    "siglip": "SiglipVisionModel", "siglip_vision_model": "SiglipVisionModel",
    "clip": "CLIPVisionModel", "clip_vision_model": "CLIPVisionModel",
    "dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel",
}


def prefix_layout(config: Any) -> tuple[int, int]:
    """(CLS tokens, register tokens) in front of the patch tokens for a vision config."""
    mt = getattr(config, "model_type", "")
    if mt.startswith("siglip"):
        return 0, 0
    if mt.startswith("clip"):
        return 1, 0
    if mt.startswith("dinov2"):
        return 1, int(getattr(config, "num_register_tokens", 0) or 0)
    raise FeatureError(f"VisionExtractor supports SigLIP, CLIP and DINOv2, got model_type {mt!r}.")


class VisionExtractor:
    """Tokens of a SigLIP / CLIP / DINOv2 vision encoder.

    Args:
        model: `SiglipVisionModel`, `CLIPVisionModel`, `Dinov2Model`, `Dinov2WithRegistersModel`
            (a full `CLIPModel` / `SiglipModel` is reduced to its `vision_model`).
        image_processor: the model's image processor (decides the input size and so the patch count).
        layer: `"last"` = the model's `last_hidden_state` (after the final norm for SigLIP / DINOv2), or an index into
            `hidden_states` (0 = embeddings, negative from the end), or a list of indices.
        combine: `"mean"` or `"concat"` when `layer` is a list.
        include_cls: keep the CLS token in front of the patches (CLIP, DINOv2; SigLIP has none). Registers are
            always dropped.
        model_id: readable name for `source`.
    """

    def __init__(self, model: torch.nn.Module, image_processor: Any, *, layer: Layer | str = "last",
                 combine: str = "mean", include_cls: bool = False, model_id: str | None = None) -> None:
        if hasattr(model, "vision_model") and hasattr(model, "text_model"):
            model = _vision_tower(model)  # CLIPModel / SiglipModel -> CLIPVisionModel / SiglipVisionModel
        self.model = model.eval()
        self.image_processor = image_processor
        self.layer, self.combine, self.include_cls = layer, combine, include_cls
        self.model_id = name_of(model, model_id)
        cfg = model.config
        self.config = getattr(cfg, "vision_config", cfg)
        self.num_cls, self.num_registers = prefix_layout(self.config)
        if include_cls and self.num_cls == 0:
            raise FeatureError(f"{self.config.model_type} has no CLS token; pass include_cls=False.")

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                        local_files_only: bool | None = None, **kwargs) -> "VisionExtractor":
        """Load the vision tower and its image processor from a local folder or hub id."""
        import transformers
        from transformers import AutoConfig, AutoImageProcessor

        hub = {} if local_files_only is None else {"local_files_only": local_files_only}
        config = AutoConfig.from_pretrained(name_or_path, **hub)
        if config.model_type not in _VISION_CLASSES:
            raise FeatureError(
                f"{name_or_path!r} is a {config.model_type!r} model; VisionExtractor reads SigLIP, CLIP and DINOv2 "
                "(use QwenVLExtractor for Qwen-VL)."
            )
        model_cls = getattr(transformers, _VISION_CLASSES[config.model_type])
        model = model_cls.from_pretrained(name_or_path, dtype=dtype, **hub).to(device).eval()
        processor = AutoImageProcessor.from_pretrained(name_or_path, **hub)
        return cls(model, processor, model_id=kwargs.pop("model_id", None) or str(name_or_path), **kwargs)

    def preprocess(self, images: Any) -> torch.Tensor:
        """`pixel_values` [B, 3, H, W] on the model's device and dtype."""
        pils = [to_pil(im) for im in as_list(images)]
        pv = self.image_processor(images=pils, return_tensors="pt")["pixel_values"]
        device, dtype = model_device_dtype(self.model)
        return pv.to(device=device, dtype=dtype)

    @torch.no_grad()
    def __call__(self, images: Any, *, layer: Layer | str | None = None, include_cls: bool | None = None,
                 combine: str | None = None) -> VLFeatures:
        """Tokens [B, N, D]: patches (N = (H/p)(W/p)), plus the CLS first when `include_cls`."""
        layer = self.layer if layer is None else layer
        include_cls = self.include_cls if include_cls is None else include_cls
        combine = combine or self.combine
        if include_cls and self.num_cls == 0:
            raise FeatureError(f"{self.config.model_type} has no CLS token; pass include_cls=False.")
        pv = self.preprocess(images)
        if layer == "last":
            h = self.model(pixel_values=pv, return_dict=True).last_hidden_state  # [B, P+N, D]
        else:
            out = self.model(pixel_values=pv, output_hidden_states=True, return_dict=True)
            h = pick_layers(out.hidden_states, layer, combine)  # [B, P+N, D]
        prefix = self.num_cls + self.num_registers
        patches = h[:, prefix:]  # [B, N, D]
        tokens = torch.cat([h[:, :1], patches], 1) if include_cls else patches
        return VLFeatures(tokens.float(), space="caption", source=self.source(layer, include_cls, combine))

    def source(self, layer: Layer | str, include_cls: bool, combine: str) -> dict:
        """The `VLFeatures.source` record."""
        lay = layer if layer == "last" else layer_list(layer)
        if isinstance(lay, list) and len(lay) == 1:
            lay = lay[0]
        return {"model": self.model_id, "family": self.config.model_type, "layer": lay,
                "combine": combine if isinstance(lay, list) else None,
                "token_selection": "cls+patches" if include_cls else "patches", "normalisation": None}

    def settings(self) -> dict:
        """Everything that changes the output, for cache keys."""
        proc = self.image_processor
        return {"encoder": "vision", "model": self.model_id, "layer": self.layer, "combine": self.combine,
                "include_cls": self.include_cls, "size": jsonable(getattr(proc, "size", None)),
                "crop_size": jsonable(getattr(proc, "crop_size", None)),
                "image_mean": jsonable(getattr(proc, "image_mean", None)),
                "image_std": jsonable(getattr(proc, "image_std", None)),
                "dtype": str(model_device_dtype(self.model)[1])}


def _vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The vision tower of a full CLIP / SigLIP model as its `*VisionModel`."""
    import transformers

    name = _VISION_CLASSES.get(model.config.model_type)
    if name is None:
        raise FeatureError(f"Cannot take the vision tower of a {model.config.model_type!r} model.")
    inner = model.vision_model
    if isinstance(inner, transformers.PreTrainedModel):
        return inner.eval()  # transformers 5 keeps a whole CLIPVisionModel / SiglipVisionModel there
    tower = getattr(transformers, name)(model.config.vision_config)
    getattr(tower, "vision_model", tower).load_state_dict(inner.state_dict(), strict=True)
    device, dtype = model_device_dtype(model)
    return tower.to(device=device, dtype=dtype).eval()


def is_vision(model_type: str) -> bool:
    """True for the model types `VisionExtractor` reads."""
    return model_type in _VISION_CLASSES
