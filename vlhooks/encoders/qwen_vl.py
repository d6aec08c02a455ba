"""`QwenVLExtractor`: hidden states of Qwen3-VL / Qwen2.5-VL for a chat turn holding the reference image.

Owns the chat-template rendering (instruct or thinking), the model inputs (through the full processor where one can be
built, else through the image processor alone: torchvision-free), the layer choice and the token selection.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Sequence

import torch

from ..errors import FeatureError
from ..features import VLFeatures
from ._common import Layer, as_list, jsonable, layer_list, model_device_dtype, name_of, pad_rows, pick_layers, to_pil

SELECTIONS = ("all", "image", "image_no_markers", "text")

# Used only when neither the tokenizer nor the model folder carries a chat template. It renders what the
# Qwen3-VL Instruct template renders for one user turn with an image and text; `enable_thinking=True` opens a
# `<think>` block after the assistant header, as the Qwen3-VL Thinking template does.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.content is string %}{{ m.content }}{% else %}{% for c in m.content %}"
    "{% if c.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% elif c.type == 'text' %}{{ c.text }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking %}<think>\n{% endif %}{% endif %}"
)


def _read_chat_template(name_or_path: str, **kwargs) -> str | None:
    """The processor chat template stored beside a model (`chat_template.jinja` or `chat_template.json`), if any."""
    import json

    from transformers.utils import cached_file

    for fname in ("chat_template.jinja", "chat_template.json"):
        try:
            path = cached_file(name_or_path, fname, _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False, **kwargs)
        except (OSError, ValueError):
            path = None
        if path and os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
            return json.loads(text)["chat_template"] if fname.endswith(".json") else text
    return None


class QwenVLExtractor:
    """Hidden states of a Qwen3-VL or Qwen2.5-VL model for `[image, optional prompt]` in a user chat turn.

    Args:
        model: `Qwen3VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration` or their base `*Model`.
        tokenizer: the model's tokenizer (its chat template is used when it has one).
        image_processor: a `Qwen2VLImageProcessor` (the PIL one works without torchvision). Needed unless `processor`.
        processor: optional full `Qwen3VLProcessor` / `Qwen2_5_VLProcessor` (needs torchvision); used when given.
        layer: index into `hidden_states` (0 = embeddings, negative from the end), or a list of them.
        combine: `"mean"` or `"concat"` (on the feature axis) when `layer` is a list.
        select: `"all"` tokens, `"image"` (image pads plus `<|vision_start|>`/`<|vision_end|>`),
            `"image_no_markers"` (image pads only), or `"text"` (every position that is not image or marker:
            template tokens and the prompt).
        prompt: optional text placed after the image in the user turn.
        enable_thinking: passed to the chat template (`True`: thinking template, `False`/`None`: instruct).
        chat_template: overrides the tokenizer's template.
        system_prompt: optional system turn.
        add_generation_prompt: end with the assistant header (default `True`).
        model_id: readable name for `source` (defaults to the config's `_name_or_path`).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any = None, image_processor: Any = None, *,
                 processor: Any = None, layer: Layer = -6, combine: str = "mean", select: str = "all",
                 prompt: str | None = None, enable_thinking: bool | None = None, chat_template: str | None = None,
                 system_prompt: str | None = None, add_generation_prompt: bool = True,
                 model_id: str | None = None) -> None:
        if processor is not None:
            tokenizer = tokenizer or getattr(processor, "tokenizer", None)
            image_processor = image_processor or getattr(processor, "image_processor", None)
        if tokenizer is None or image_processor is None:
            raise FeatureError("QwenVLExtractor needs a tokenizer and an image processor (or a full `processor=`).")
        self.model = model.eval()
        self.base = getattr(model, "model", model)  # skip the LM head: only hidden states are read
        self.tokenizer, self.image_processor, self.processor = tokenizer, image_processor, processor
        self.layer, self.combine = layer, combine
        self.select, self.prompt = select, prompt
        self.enable_thinking, self.system_prompt = enable_thinking, system_prompt
        self.add_generation_prompt = add_generation_prompt
        self.model_id = name_of(model, model_id)
        self.chat_template = (chat_template or getattr(tokenizer, "chat_template", None)
                              or getattr(processor, "chat_template", None) or FALLBACK_CHAT_TEMPLATE)
        self._check_select(select)
        cfg = model.config
        self.image_token_id = int(cfg.image_token_id)
        self.vision_start_id = int(cfg.vision_start_token_id)
        self.vision_end_id = int(getattr(cfg, "vision_end_token_id", None)
                                 or tokenizer.convert_tokens_to_ids("<|vision_end|>"))
        self.merge_size = int(getattr(image_processor, "merge_size", 2))
        vc = cfg.vision_config
        if int(getattr(vc, "spatial_merge_size", self.merge_size)) != self.merge_size or \
                int(getattr(vc, "patch_size", image_processor.patch_size)) != int(image_processor.patch_size):
            raise FeatureError(
                f"The image processor (patch {image_processor.patch_size}, merge {self.merge_size}) does not match "
                f"the model (patch {vc.patch_size}, merge {vc.spatial_merge_size}); load the processor from the "
                "same checkpoint or build it with the model's patch and merge sizes."
            )

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, name_or_path: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                        local_files_only: bool | None = None, **kwargs) -> "QwenVLExtractor":
        """Load model, tokenizer and image processor from a local folder or hub id (the full processor if it builds)."""
        from transformers import AutoConfig, AutoTokenizer

        hub = {} if local_files_only is None else {"local_files_only": local_files_only}
        config = AutoConfig.from_pretrained(name_or_path, **hub)
        model_cls = _model_class(config.model_type)
        model = model_cls.from_pretrained(name_or_path, dtype=dtype, **hub).to(device).eval()
        processor = None
        try:  # the full processor needs torchvision (its video processor); fine when it is importable
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(name_or_path, **hub)
            if not hasattr(processor, "image_processor"):
                processor = None
        except Exception:  # noqa: BLE001 - any failure here means: build inputs without it
            processor = None
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **hub)
        image_processor = getattr(processor, "image_processor", None) or _image_processor(name_or_path, hub)
        template = kwargs.pop("chat_template", None) or getattr(tokenizer, "chat_template", None) \
            or getattr(processor, "chat_template", None) or _read_chat_template(name_or_path, **hub)
        return cls(model, tokenizer, image_processor, processor=processor, chat_template=template,
                   model_id=kwargs.pop("model_id", None) or str(name_or_path), **kwargs)

    # ---------------------------------------------------------------- inputs
    def messages(self, prompt: str | None = None) -> list[dict]:
        """The chat turns for one image and an optional prompt."""
        content: list[dict] = [{"type": "image"}]
        text = self.prompt if prompt is None else prompt
        if text:
            content.append({"type": "text", "text": text})
        turns = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return turns + [{"role": "user", "content": content}]

    def render(self, prompt: str | None = None) -> str:
        """The chat-template text (one `<|image_pad|>` placeholder, not yet expanded)."""
        return self.tokenizer.apply_chat_template(
            self.messages(prompt), chat_template=self.chat_template, tokenize=False,
            add_generation_prompt=self.add_generation_prompt, enable_thinking=self.enable_thinking)

    def prepare(self, image: Any, prompt: str | None = None) -> dict[str, torch.Tensor]:
        """Model inputs for one image: `input_ids` [1, L], `attention_mask`, `pixel_values`, `image_grid_thw`,
        `mm_token_type_ids` (1 at image tokens)."""
        pil = to_pil(image)
        text = self.render(prompt)
        if text.count("<|image_pad|>") != 1:
            raise FeatureError(
                "The chat template must render exactly one `<|image_pad|>` for the image; pass a Qwen-VL "
                "`chat_template=` (or leave it unset to use the built-in one)."
            )
        if self.processor is not None:
            batch = self.processor(text=[text], images=[pil], return_tensors="pt")
            inputs = {k: v for k, v in batch.items()}
        else:  # torchvision-free route: image processor + expanded placeholders (what the processor does)
            vis = self.image_processor(images=[pil], return_tensors="pt")
            n_img = int(vis["image_grid_thw"][0].prod()) // self.merge_size ** 2
            text = text.replace("<|image_pad|>", "<|image_pad|>" * n_img)
            enc = self.tokenizer([text], return_tensors="pt", add_special_tokens=False)
            inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                      "pixel_values": vis["pixel_values"], "image_grid_thw": vis["image_grid_thw"]}
        if "mm_token_type_ids" not in inputs:
            inputs["mm_token_type_ids"] = (inputs["input_ids"] == self.image_token_id).to(torch.int32)
        device, dtype = model_device_dtype(self.model)
        out = {k: v.to(device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        out["pixel_values"] = out["pixel_values"].to(dtype)
        return out

    def selection_mask(self, input_ids: torch.Tensor, select: str | None = None) -> torch.Tensor:
        """[L] bool mask of the positions that `select` keeps, from one row of `input_ids` [L]."""
        select = select or self.select
        self._check_select(select)
        pad = input_ids == self.image_token_id
        marker = (input_ids == self.vision_start_id) | (input_ids == self.vision_end_id)
        return {"all": torch.ones_like(pad), "image": pad | marker, "image_no_markers": pad,
                "text": ~(pad | marker)}[select]

    # ---------------------------------------------------------------- forward
    @torch.no_grad()
    def hidden_states(self, image: Any, prompt: str | None = None) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """All hidden states ([1, L, D] each, index 0 = embeddings) and `input_ids` [1, L] for one image."""
        inputs = self.prepare(image, prompt)
        out = self.base(**inputs, output_hidden_states=True, use_cache=False, return_dict=True)
        return tuple(out.hidden_states), inputs["input_ids"]

    @torch.no_grad()
    def __call__(self, images: Any, prompt: str | Sequence[str] | None = None, *, layer: Layer | None = None,
                 select: str | None = None, combine: str | None = None) -> VLFeatures:
        """Features of one image or a list: tokens [B, N, D] (padded with a mask when the counts differ)."""
        images = as_list(images)
        prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt] * len(images)
        if len(prompts) != len(images):
            raise FeatureError(f"Got {len(images)} images but {len(prompts)} prompts; pass one prompt per image.")
        layer = self.layer if layer is None else layer
        select = select or self.select
        combine = combine or self.combine
        rows = []
        for im, pr in zip(images, prompts):
            hs, ids = self.hidden_states(im, pr)
            h = pick_layers(hs, layer, combine)[0]  # [L, D]
            keep = self.selection_mask(ids[0], select)
            if not bool(keep.any()):
                raise FeatureError(f"Token selection {select!r} kept no token; pass a prompt or select 'all'.")
            rows.append(h[keep].float())  # [N_i, D]
        tokens, mask = pad_rows(rows)
        return VLFeatures(tokens, mask=mask, space="caption", source=self.source(layer, select, combine, prompts))

    def source(self, layer: Layer, select: str, combine: str, prompts: Sequence[str | None] = ()) -> dict:
        """The `VLFeatures.source` record."""
        lay = layer_list(layer)
        return {"model": self.model_id, "family": self.model.config.model_type,
                "layer": lay[0] if len(lay) == 1 else lay, "combine": combine if len(lay) > 1 else None,
                "token_selection": select, "enable_thinking": self.enable_thinking,
                "prompt": [p if p is not None else self.prompt for p in prompts] if prompts else self.prompt,
                "normalisation": None}

    def settings(self) -> dict:
        """Everything that changes the output, for cache keys."""
        return {"encoder": "qwen-vl", "model": self.model_id, "layer": self.layer, "combine": self.combine,
                "select": self.select, "prompt": self.prompt, "enable_thinking": self.enable_thinking,
                "system_prompt": self.system_prompt, "add_generation_prompt": self.add_generation_prompt,
                "chat_template": hashlib.sha256(self.chat_template.encode()).hexdigest()[:16],
                "size": jsonable(getattr(self.image_processor, "size", None)),
                "dtype": str(model_device_dtype(self.model)[1])}

    @staticmethod
    def _check_select(select: str) -> None:
        if select not in SELECTIONS:
            raise FeatureError(f"Unknown token selection {select!r}; use one of {', '.join(SELECTIONS)}.")


def _model_class(model_type: str):
    import transformers

    classes = {"qwen3_vl": "Qwen3VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
    if model_type not in classes:
        raise FeatureError(
            f"QwenVLExtractor supports Qwen3-VL and Qwen2.5-VL (model_type qwen3_vl / qwen2_5_vl), got {model_type!r}; "
            "use VisionExtractor for SigLIP / CLIP / DINOv2."
        )
    return getattr(transformers, classes[model_type])


def _image_processor(name_or_path: str, hub: dict):
    """The Qwen image processor from a checkpoint, in its torchvision-free (PIL) form when torchvision is missing."""
    import importlib.util

    from transformers import AutoImageProcessor

    if importlib.util.find_spec("torchvision") is None:
        from transformers import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil.from_pretrained(name_or_path, **hub)
    return AutoImageProcessor.from_pretrained(name_or_path, **hub)


def is_qwen_vl(model_type: str) -> bool:
    """True for the model types `QwenVLExtractor` reads."""
    return model_type in ("qwen3_vl", "qwen2_5_vl")
