"""`vlhooks demo`: patch a tiny offline Z-Image pipeline and save unpatched vs zero-shot images side by side.

A mechanics demo, honest about what it is: the DiT has random weights (no image model ships on PyPI yet in this
repository; the pretrained toy world comes with `vlhooks compare`), so images are structured noise. It shows that
the same prompt, seed and pipeline give a different image once a reference is injected, how the two modes and a
timestep window differ, and that removal restores the pipeline bit for bit.

Reference features: real photos from scikit-image, cut into 8x8-pixel patches (16 tokens of 192 values at 32x32)
and mapped to the DiT's caption width by a fixed random projection (a stand-in encoder; real encoders come with
`vlhooks extract`, or `vh.encode(image, encoder=...)` in Python).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from .config import InjectionConfig
from .features import VLFeatures
from .images import to_uint8
from .injection import inject

CAPTION_WIDTH = 16
REFERENCES = ("astronaut", "coffee", "chelsea", "rocket")
ARMS = {
    "unpatched": None,
    "zero-shot joint": InjectionConfig(mode="joint"),
    "zero-shot decoupled": InjectionConfig(mode="decoupled", scale=2.0),
    "joint, first 40%": InjectionConfig(mode="joint", window=(0.0, 0.4)),
}


def build_tiny_pipeline(seed: int = 0):
    """A `ZImagePipeline` in pixel space (3 channels, no VAE) with a tiny random transformer; prompts are given
    as `prompt_embeds`, so no text encoder is needed."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=3, dim=64, n_layers=4, n_refiner_layers=1,
        n_heads=4, n_kv_heads=4, qk_norm=True, cap_feat_dim=CAPTION_WIDTH, axes_dims=[4, 6, 6], axes_lens=[128, 32, 32],
    ).eval()
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                          transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_features(names=REFERENCES, size: int = 32, patch: int = 8, seed: int = 0) -> tuple[VLFeatures, list]:
    """Patch tokens of skimage photos, projected to the caption width. Returns features `[R, 16, 16]` and the
    resized photos (uint8 HxWx3) for the grid."""
    import skimage.data
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    proj = torch.linalg.qr(torch.randn(3 * patch * patch, CAPTION_WIDTH, generator=g))[0]  # [192, 16] orthonormal
    tokens, photos = [], []
    for name in names:
        img = getattr(skimage.data, name)()
        img = np.asarray(Image.fromarray(img).convert("RGB").resize((size, size), Image.BICUBIC))
        photos.append(img)
        x = torch.from_numpy(img.copy()).float().permute(2, 0, 1) / 127.5 - 1.0  # [3, H, W]
        p = x.unfold(1, patch, patch).unfold(2, patch, patch)  # [3, h, w, patch, patch]
        p = p.permute(1, 2, 0, 3, 4).reshape(-1, 3 * patch * patch)  # [16, 192]
        tokens.append(p @ proj * 4.0)
    feats = VLFeatures(torch.stack(tokens), source={"encoder": "pixel patches + fixed random projection",
                                                    "references": list(names)})
    return feats, photos


def run(out_dir: str = "outputs/demo", steps: int = 8, size: int = 32, seed: int = 0) -> dict:
    from PIL import Image, ImageDraw
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe = build_tiny_pipeline()
    feats, photos = reference_features(size=size)
    g = torch.Generator().manual_seed(123)
    prompt = [torch.randn(7, CAPTION_WIDTH, generator=g)]  # a stand-in caption of 7 tokens

    def generate():
        return pipe(prompt_embeds=prompt, height=8 * size, width=8 * size, num_inference_steps=steps,
                    guidance_scale=0.0, generator=torch.Generator().manual_seed(seed), output_type="latent").images[0]

    t0 = time.time()
    grid: list[list[np.ndarray]] = []
    stats: dict = {"arms": {}, "references": list(REFERENCES)}
    with torch.no_grad():
        plain = generate()
        bar = tqdm(total=len(REFERENCES) * len(ARMS), desc="demo", unit="image")
        for r in range(len(REFERENCES)):
            row = [photos[r]]
            ref = VLFeatures(feats.tokens[r : r + 1])
            joint = None
            for arm, cfg in ARMS.items():
                if cfg is None:
                    img = plain
                else:
                    with inject(pipe, ref, cfg):
                        img = generate()
                joint = img if arm == "zero-shot joint" else joint
                stats["arms"].setdefault(arm, []).append(float((img - plain).abs().mean()))
                row.append(to_uint8(img))
                bar.update()
            diff = (joint - plain).abs().mean(0, keepdim=True)  # [1, H, W]
            row.append(to_uint8((diff / diff.max().clamp_min(1e-8) * 2 - 1).expand(3, -1, -1)))
            grid.append(row)
        bar.close()
        restored = torch.equal(generate(), plain)

    cell, pad, label_h = 112, 4, 16
    cols = ["reference"] + list(ARMS) + ["|joint - unpatched|"]
    W = len(cols) * (cell + pad) + pad
    H = label_h + len(grid) * (cell + pad) + pad
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(cols):
        draw.text((pad + c * (cell + pad), 2), name, fill="black")
    for r, row in enumerate(grid):
        for c, img in enumerate(row):
            tile = Image.fromarray(img).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (pad + c * (cell + pad), label_h + pad + r * (cell + pad)))
    png = out / "side_by_side.png"
    canvas.save(png)
    summary = {
        "image": str(png),
        "mean_abs_change_vs_unpatched": {a: float(np.mean(v)) for a, v in stats["arms"].items()},
        "removal_restores_bit_identical": restored,
        "steps": steps, "size": size, "seconds": round(time.time() - t0, 2),
        "note": "tiny random-weight DiT: a mechanics demo, not image quality",
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
