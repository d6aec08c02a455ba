"""Tiny offline DiTs and pipelines of every supported family: try the API in seconds, with no download.

    from vlhooks.testing import build, inputs, output, pipeline
    model = build("flux")                        # a random-weight FluxTransformer2DModel of a few kB
    out = output(model, inputs("flux", batch=2))  # one denoiser call
    pipe = pipeline("flux")                       # a real FluxPipeline: tiny CLIP / T5 / VAE, in-memory tokenizers

Each family's tiny parts live in one file here (`z_image.py`, `flux.py`, ...), registered by name with
`register_tiny`; the configs are those of diffusers' own tests (they build and run in milliseconds on a CPU).
Images are 32x32 everywhere (latents 8x8, the shapes `inputs` uses). Weights are random: outputs are noise, but
every code path of the real model runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

SIZE = 32  # pipeline image height and width for every family
TEXT_LEN = 64  # max_sequence_length for the tiny pipelines (their defaults pad to 256-512 tokens)
PROMPT, NEGATIVE = "a photo of a cat", "blurry, low quality"


@dataclass
class TinyDiT:
    """One tiny model: how to build its transformer, its denoiser inputs and (where diffusers has one that
    builds offline) its pipeline.

    `inputs(batch, progress, seed, cap_len)` returns keyword arguments of one denoiser call at `progress`
    (= 1 - sigma); `pipeline(seed)` a pipeline around `build(seed)`; `guidance(cfg)` the pipeline `__call__`
    arguments that switch its classifier-free guidance on or off."""

    name: str
    class_name: str
    config: dict[str, Any]
    caption_width: int
    inputs: Callable[..., dict]
    pipeline: Callable[[int], Any] | None = None
    guidance: Callable[[bool], dict] = field(default=lambda cfg: {})

    def build(self, seed: int = 0) -> torch.nn.Module:
        import diffusers

        torch.manual_seed(seed)
        return getattr(diffusers, self.class_name)(**self.config).eval()


_TINY: dict[str, TinyDiT] = {}
_LOADED = False  # every family file imported (one imported on its own registers only itself)


def register_tiny(tiny: TinyDiT) -> TinyDiT:
    _TINY[tiny.name] = tiny
    return tiny


def _all() -> dict[str, TinyDiT]:
    """Every tiny model: each family file of this package registers its own on import."""
    global _LOADED
    if not _LOADED:
        import pkgutil

        for m in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "parts"):
            importlib.import_module(f".{m}", __name__)
        _LOADED = True
    return _TINY


def tiny(name: str) -> TinyDiT:
    """The tiny model registered as `name` (`names()` lists them)."""
    models = _all()
    if name not in models:
        from ..errors import TargetError

        raise TargetError(f"no tiny model {name!r}; known: {sorted(models)}.")
    return models[name]


def names() -> list[str]:
    """Every registered tiny model (a family name, or a variant such as `"sd35"`)."""
    return list(_all())


def build(name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random-weight transformer (seeded), in eval mode."""
    return tiny(name).build(seed)


def caption_width(name: str) -> int:
    """The width of the tiny model's caption tokens (zero-shot features have this width)."""
    return tiny(name).caption_width


def inputs(name: str, batch: int = 1, progress: float = 0.3, seed: int = 1, cap_len: int = 8) -> dict:
    """Keyword inputs for one denoiser call at `progress` (= 1 - sigma)."""
    return tiny(name).inputs(batch=batch, progress=progress, seed=seed, cap_len=cap_len)


def output(model: torch.nn.Module, kwargs: dict) -> torch.Tensor:
    """The denoiser's output for `inputs(...)` as one tensor (Z-Image's list output stacked)."""
    out = model(**kwargs)[0]
    return torch.stack(out) if isinstance(out, list) else out


def pipeline(name: str, seed: int = 0) -> Any:
    """A real diffusers pipeline of the family, from tiny random-weight parts (progress bar off)."""
    t = tiny(name)
    if t.pipeline is None:
        from ..errors import TargetError

        raise TargetError(f"no offline tiny pipeline for {name!r}; pipelines exist for "
                          f"{[n for n, x in _all().items() if x.pipeline is not None]}.")
    pipe = t.pipeline(seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


PATCHES = {"name": "patches", "width": 16, "size": 32, "patch": 8}  # the tiny offline image encoder's settings


def adapter(target: Any, seed: int = 0) -> Any:
    """A tiny trained-looking projection adapter for `target` (a pipeline or transformer): an MLP from the
    `PATCHES` encoder's width to the caption width, weights drawn from `seed`, the encoder recorded, so that
    `vh.inject(pipe, image, adapter=adapter(pipe))` encodes images by itself."""
    import vlhooks as vh
    from ..injection import resolve_target

    transformer, _ = resolve_target(target)
    a = vh.ProjectionAdapter.create(transformer, PATCHES["width"], kind="mlp")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    a.config.feature_source = dict(PATCHES)
    return a.to(next(transformer.parameters()).device)


def reference_image(path: str = "reference.png", seed: int = 0) -> str:
    """Write a 64x64 RGB image (seeded noise) to `path`, for examples that read a reference from a file."""
    import numpy as np
    from PIL import Image

    Image.fromarray((np.random.default_rng(seed).random((64, 64, 3)) * 255).astype(np.uint8)).save(path)
    return path


def run_pipeline(pipe: Any, name: str, steps: int = 2, cfg: bool = False, seed: int = 0, **kwargs) -> torch.Tensor:
    """One `SIZE`x`SIZE` image of `PROMPT`, `[1, 3, SIZE, SIZE]` in [0, 1]; `cfg` turns guidance on."""
    call = dict(num_inference_steps=steps, height=SIZE, width=SIZE, max_sequence_length=TEXT_LEN,
                generator=torch.Generator().manual_seed(seed), output_type="pt")
    call.update(tiny(name).guidance(cfg))
    call.update(kwargs)
    return pipe(prompt=PROMPT, **call).images


__all__ = ["TinyDiT", "register_tiny", "tiny", "names", "build", "caption_width", "inputs", "output", "pipeline",
           "run_pipeline", "adapter", "reference_image", "PATCHES", "SIZE", "TEXT_LEN", "PROMPT", "NEGATIVE"]
