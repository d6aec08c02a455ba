"""`vlhooks compare`: the same prompts x references x seeds through several arms; a grid, a report, metrics.

Arms (every arm sees the same prompts, reference images and initial noise):
- `none`: the prompt alone, no reference.
- `blend`: the embedding route: the reference's features rescaled to the caption's std and blended into the
  caption embeddings (`vlhooks.blend`, the configured mode).
- `zero-shot`: K/V injection through the DiT's own caption path, no adapter.
- one arm per trained adapter (`projection`, `lora`, ...): K/V injection with that adapter.
- `random`: the control: the first trained adapter's architecture with random weights (each tensor redrawn from
  a normal with the trained tensor's std), or a random linear projection when no adapter is given.

Worlds:
- `toy` (the embedded default): the shipped pixel-space toy DiT (MNIST-5k, MiniLM captions); references are real
  held-out MNIST digits, features from the real DINOv2-S; sampling is Euler with classifier-free guidance (the
  unconditional row: empty caption, no reference). Metrics below.
- `pipeline`: a diffusers pipeline folder (Z-Image, Flux, SD3) and a folder of reference images; the pipeline's
  own `__call__` generates under `vh.inject`; metrics that need labels are left out.

Metrics (per arm: mean over the samples of one seed, then mean / std / n over seeds):
- `class_match` (toy): a scikit-learn MLP trained on real MNIST digits (the train split) says the sample's class
  equals the reference's.
- `ref_similarity`: cosine of DINOv2-S CLS features of sample and reference (the reference at the sample's size).
- `ref_similarity_effnet`: the same with EfficientNet-Lite0 pooled features.
- `frechet_effnet_pca16`: the Frechet distance between EfficientNet-Lite0 pooled features of the seed's samples
  and of real images (toy: the held-out digits; pipeline: the references), in the 16-d PCA of the real features.
  It is NOT the Inception FID: a small-sample distance, comparable across arms of one run only.
- `prompt_consistency` (toy): the classifier's confidence (max class probability) that the sample is a digit at
  all, which is what the prompt "a handwritten digit" asks for.

Outputs in `--out`: `grid.png` (references down the side, arms across, one small image per seed), `report.html`
(grid, metrics table, the settings that differ between arms, the command), `metrics.json`
(`{"arms": {ARM: {METRIC: {"mean", "std", "n"}}}, ...}`), `metrics.csv`, and a wandb table with `--wandb`.

    vlhooks compare                                       # the embedded default (configs/toy/compare.yaml)
    vlhooks compare --config configs/z_image/compare.yaml # a real pipeline
"""

from __future__ import annotations

import argparse
import copy
import csv
import html
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

BUILTIN_ARMS = ("none", "blend", "zero-shot", "random")
METRIC_DOCS = {
    "class_match": "fraction of samples the MNIST classifier puts in the reference's class",
    "ref_similarity": "cosine of DINOv2-S CLS features, sample vs reference",
    "ref_similarity_effnet": "cosine of EfficientNet-Lite0 pooled features, sample vs reference",
    "frechet_effnet_pca16": "Frechet distance of EfficientNet-Lite0 features to real images, 16-d PCA (not FID)",
    "prompt_consistency": "classifier confidence that the sample is a digit at all (the prompt's request)",
}
HIGHER_IS_BETTER = {"frechet_effnet_pca16": False}

TOY_DEFAULT: dict[str, Any] = {
    "world": "toy",
    "dit": "checkpoints/toy-dit/final",
    "encoder": {"name": "dinov2-small", "image_size": 56, "include_cls": True},
    "prompts": ["a handwritten digit"],
    "references": {"split": "heldout", "count": 20, "seed": 0},
    "seeds": [0, 1, 2],
    "steps": 25,
    "cfg": 3.0,
    "injection": {"blocks": "all", "mode": "joint"},
    "blend": {"mode": "interpolate", "alpha": 0.5},
    "adapters": {"projection": "checkpoints/toy-projection/final", "lora": "checkpoints/toy-lora/final"},
    "random_seed": 0,
    "arms": None,  # None: none, blend, zero-shot, every adapter, random
    "out": "outputs/compare",
    "wandb": False,
}


KNOWN_KEYS = set(TOY_DEFAULT) | {"pipeline", "generate", "batch_size"}


class CompareError(ValueError):
    """A bad compare configuration; the message names the fix."""


# ---------------------------------------------------------------------------------------------------- config
def load_config(path: str | None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The toy defaults, updated by a YAML file (top-level keys replace the defaults') and by `overrides`."""
    cfg = copy.deepcopy(TOY_DEFAULT)
    if path:
        import yaml

        p = Path(path)
        if not p.is_file():
            raise CompareError(f"config file {path} does not exist; see configs/toy/compare.yaml for the format.")
        given = yaml.safe_load(p.read_text()) or {}
        unknown = sorted(set(given) - KNOWN_KEYS)
        if unknown:
            raise CompareError(f"{path}: unknown keys {unknown}; known: {sorted(KNOWN_KEYS)}.")
        if given.get("world", "toy") != "toy":  # a real pipeline: toy paths do not apply
            for k in ("dit", "adapters"):
                cfg[k] = None if k == "dit" else {}
        cfg.update(given)
    for k, v in (overrides or {}).items():
        if v is not None:
            cfg[k] = v
    if cfg["world"] not in ("toy", "pipeline"):
        raise CompareError(f"world must be 'toy' or 'pipeline', got {cfg['world']!r}.")
    if not cfg["seeds"] or not cfg["prompts"]:
        raise CompareError("give at least one seed and one prompt.")
    return cfg


@dataclass
class Arm:
    """One column of the comparison: how a reference reaches the DiT."""

    name: str
    kind: str  # none | blend | zero-shot | adapter | random
    adapter_path: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # what is shown in the report's config diff


def check_config(cfg: dict[str, Any]) -> list[Arm]:
    """Everything that can be checked without weights (the meta device): arms, the injection config against the
    DiT's blocks, the blend mode, and (pipeline world) every `generate` key against the pipeline's `__call__`."""
    import inspect

    import diffusers

    import vlhooks as vh
    from vlhooks.blend import BLEND_MODES

    arms = plan_arms(cfg, check_files=False)
    config = vh.InjectionConfig.from_dict(cfg["injection"])
    config.validate()
    if cfg["blend"]["mode"] not in BLEND_MODES:
        raise CompareError(f"blend.mode {cfg['blend']['mode']!r} is not one of {BLEND_MODES}.")
    if cfg["world"] == "pipeline":
        spec = cfg.get("pipeline") or {}
        for key in ("path", "class", "transformer_class"):
            if not spec.get(key):
                raise CompareError(f"pipeline.{key} is required for world 'pipeline'.")
        pipe_cls, dit_cls = getattr(diffusers, spec["class"]), getattr(diffusers, spec["transformer_class"])
        accepted = set(inspect.signature(pipe_cls.__call__).parameters)
        bad = sorted(set(cfg.get("generate") or {}) - accepted)
        if bad:
            raise CompareError(f"generate keys {bad} are not arguments of {spec['class']}.__call__.")
        if not (cfg.get("references") or {}).get("folder"):
            raise CompareError("world 'pipeline' needs references.folder (a folder of images).")
        with torch.device("meta"):
            dit = dit_cls()
    else:
        from diffusers import ZImageTransformer2DModel

        with torch.device("meta"):
            dit = ZImageTransformer2DModel.from_config(ZImageTransformer2DModel.load_config(cfg["dit"]))
    vh.family_for(dit).select(dit, config.blocks)
    return arms


def _adapter_type(path: str) -> str | None:
    from vlhooks.adapters.base import CONFIG_NAME

    f = Path(path) / CONFIG_NAME
    return json.loads(f.read_text()).get("adapter_type") if f.is_file() else None


def plan_arms(cfg: dict[str, Any], check_files: bool = True) -> list[Arm]:
    """The arms in order, checked: names are unique and (with `check_files`) adapter folders hold an adapter."""
    from vlhooks.adapters.base import CONFIG_NAME, WEIGHTS_NAME

    adapters = dict(cfg.get("adapters") or {})
    wanted = cfg.get("arms") or ["none", "blend", "zero-shot", *adapters, "random"]
    inj = dict(cfg["injection"])
    arms = []
    for name in wanted:
        if name == "none":
            arms.append(Arm("none", "none", settings={"reference": "not used"}))
        elif name == "blend":
            arms.append(Arm("blend", "blend", settings={"reference": "blended into the caption", **{
                f"blend.{k}": v for k, v in cfg["blend"].items()}}))
        elif name == "zero-shot":
            arms.append(Arm("zero-shot", "zero-shot", settings={"reference": "extra K/V", "adapter": "none",
                                                                **{f"injection.{k}": v for k, v in inj.items()}}))
        elif name == "random":
            like = next((p for p in adapters.values() if _adapter_type(p) not in ("lora", None)), None)
            arms.append(Arm("random", "random", like, settings={
                "reference": "extra K/V", "adapter": f"random weights ({'like ' + Path(like).parent.name if like else 'linear projection'})",
                **{f"injection.{k}": v for k, v in inj.items()}}))
        elif name in adapters:
            path = Path(adapters[name])
            present = (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()
            if check_files and not present:
                raise CompareError(f"adapter {name!r}: {path} is not an adapter folder (needs {CONFIG_NAME} and "
                                   f"{WEIGHTS_NAME}); train it with `vlhooks train` or remove it from `adapters` "
                                   "(--adapters none runs without adapter arms).")
            meta = json.loads((path / CONFIG_NAME).read_text()) if present else {"adapter_type": "?"}
            arms.append(Arm(name, "adapter", str(path), settings={
                "reference": "extra K/V", "adapter": f"{meta['adapter_type']} ({path})",
                **{f"adapter.{k}": v for k, v in meta.get("options", {}).items()},
                **{f"injection.{k}": v for k, v in inj.items()}}))
        else:
            raise CompareError(f"unknown arm {name!r}: use {', '.join(BUILTIN_ARMS)} or a key of `adapters` "
                               f"({sorted(adapters)}).")
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise CompareError(f"arm names must be unique, got {names}.")
    return arms


def random_control(like: str | None, dit: torch.nn.Module, feature_width: int, seed: int):
    """An untrained adapter: `like`'s architecture with every tensor redrawn from a normal with the trained
    tensor's mean and std (the trained scale, no learned structure); without `like`, a linear projection drawn
    from N(0, 1/width)."""
    import vlhooks as vh

    g = torch.Generator().manual_seed(seed)
    if like is not None:
        adapter = vh.load_adapter(like)
        if adapter.config.adapter_type == "lora":
            raise CompareError("the random control copies a projection or kv adapter; list one first in `adapters`.")
    else:
        adapter = vh.ProjectionAdapter.create(dit, feature_width, kind="linear")
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            if like is not None and p.numel() > 1:
                mean, std = float(p.float().mean()), float(p.float().std())
            else:
                mean, std = 0.0, 1.0 / math.sqrt(p.shape[-1])
            p.copy_(mean + std * torch.randn(p.shape, generator=g))
    return adapter


# ---------------------------------------------------------------------------------------------------- metrics
def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to rows of `a` and `b`."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2.0 * covmean))


def summarize(per_seed: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """`{arm: {metric: [value per seed]}}` -> `{arm: {metric: {"mean", "std", "n"}}}` (std over seeds, ddof 0)."""
    out = {}
    for arm, metrics in per_seed.items():
        out[arm] = {m: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)} for m, v in metrics.items()}
    return out


class Scorer:
    """Reference-similarity and distribution metrics shared by both worlds (DINOv2-S, EfficientNet-Lite0)."""

    def __init__(self, real_images: list[np.ndarray], image_size: int = 224):
        from vlhooks.encoders import load_efficientnet_lite0, load_extractor

        self.dino = load_extractor("dinov2-small", image_size=image_size, include_cls=True)
        self.effnet = load_efficientnet_lite0()
        self.effnet.image_size = image_size
        real = self.effnet.pooled(real_images).numpy()  # [M, 1280]
        self.has_frechet = len(real) >= 32  # a 16-d covariance needs well over 16 real images
        self.mean = real.mean(0)
        _, _, vt = np.linalg.svd(real - self.mean, full_matrices=False)
        self.pca = vt[:16].T  # [1280, 16]
        self.real16 = (real - self.mean) @ self.pca

    def embed(self, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        d = torch.nn.functional.normalize(self.dino(images).tokens[:, 0].float(), dim=-1)  # [B, 384] CLS
        e = self.effnet.pooled(images)  # [B, 1280]
        return d, e

    def similarity(self, samples: tuple, refs: tuple) -> tuple[np.ndarray, np.ndarray]:
        d = (samples[0] * refs[0]).sum(-1).numpy()
        e = torch.nn.functional.cosine_similarity(samples[1], refs[1], dim=-1).numpy()
        return d, e

    def frechet(self, sample_effnet: torch.Tensor) -> float:
        return frechet((sample_effnet.numpy() - self.mean) @ self.pca, self.real16)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """`[C, H, W]` in [-1, 1] -> HxW (grey) or HxWx3 uint8."""
    a = x.float().clamp(-1, 1).add(1).mul(127.5).round().byte()
    return a[0].numpy() if a.shape[0] == 1 else a.permute(1, 2, 0).numpy()


def to16(images: list[np.ndarray]) -> list[np.ndarray]:
    """28x28 digits -> 16x16 (area), as the toy DiT was trained."""
    x = torch.from_numpy(np.stack(images)).float()[:, None]  # [B, 1, 28, 28]
    small = torch.nn.functional.interpolate(x, size=(16, 16), mode="area")
    return [a[0].round().byte().numpy() for a in small]


# ---------------------------------------------------------------------------------------------------- worlds
class ToyWorld:
    """The embedded default: the shipped toy DiT, real held-out MNIST digits as references."""

    def __init__(self, cfg: dict[str, Any]):
        from diffusers import ZImageTransformer2DModel

        import vlhooks as vh
        from vlhooks.encoders import load_minilm
        from vlhooks.train.encoders import image_encoder
        from vlhooks.eval.toy import digit_classifier
        from vlhooks.train.data import load_source

        self.cfg = cfg
        self.score_size = 56  # 16x16 samples: DINOv2-S and EfficientNet-Lite0 see them at 56 px (4 x 4 DINOv2 patches)
        dit_path = Path(cfg["dit"])
        if not (dit_path / "config.json").is_file():
            raise CompareError(f"the toy DiT {dit_path} is missing; run from the repository root or set `dit`.")
        self.dit = ZImageTransformer2DModel.from_pretrained(str(dit_path)).eval().requires_grad_(False)
        self.family = vh.family_for(self.dit)
        rc = cfg["references"]
        raw = load_source("mnist", split=rc.get("split", "heldout"))
        labels = np.asarray(raw["label"])
        g = np.random.default_rng(rc.get("seed", 0))
        count = int(rc.get("count", 20))
        # `count` references spread over the classes (round-robin over a shuffled order of each class)
        per_class = [g.permutation(np.flatnonzero(labels == k)) for k in range(10)]
        pick = [int(per_class[i % 10][i // 10]) for i in range(count)]
        self.ref_images = [raw["image"][i] for i in pick]  # 28x28 uint8
        self.ref_labels = labels[pick]
        self.ref_small = to16(self.ref_images)  # the references at the toy world's size, for the metrics and grid
        self.real_images = to16([raw["image"][i] for i in range(0, len(raw["image"]), 5)])  # 200 held-out digits
        tokens, mask = image_encoder(dict(cfg["encoder"]))(self.ref_images)  # as in training: [R, N, 384]
        self.features = vh.VLFeatures(tokens.float(), mask=mask)
        self.minilm = load_minilm()
        self.empty = self.minilm.tokens([""])
        self.classifier, self.classifier_accuracy = digit_classifier()

    def caption(self, prompt: str):
        return self.minilm.tokens([prompt])

    @torch.no_grad()
    def generate(self, arm: Arm, prompt: str, seeds: list[int], adapter=None) -> torch.Tensor:
        """Samples for every seed x reference, seed-major: `[S * R, 1, 16, 16]` in [-1, 1]. Seed `s` draws the
        noise of all references from `Generator().manual_seed(s)`, the same in every arm."""
        import vlhooks as vh
        from vlhooks.blend import blend
        from vlhooks.normalize import match_global_std

        R, S = len(self.ref_images), len(seeds)
        steps, cfg_scale = int(self.cfg["steps"]), float(self.cfg["cfg"])
        cap = self.caption(prompt)
        Lt = int(cap.mask[0].sum())
        cond, cond_mask = cap.tokens[0, :Lt].expand(R, -1, -1), torch.ones(R, Lt, dtype=torch.bool)  # [R, Lt, C]
        if arm.kind == "blend":
            vl = match_global_std(self.features.tokens.float(), float(cond[0].std(correction=0)))  # [R, N, C]
            b = self.cfg["blend"]
            opts = {k: v for k, v in b.items() if k not in ("mode", "alpha")}
            cond = blend(cond, vl, b["mode"], b.get("alpha", 0.5), **opts)  # [R, L', C]
            cond_mask = torch.ones(cond.shape[:2], dtype=torch.bool)
        e = self.empty.tokens[0, : int(self.empty.mask[0].sum())]  # [L0, C]
        Lc = max(cond.shape[1], e.shape[0])
        caption = torch.zeros(2 * R, Lc, cond.shape[-1])  # rows: R conditional, then R unconditional
        mask = torch.zeros(2 * R, Lc, dtype=torch.bool)
        caption[:R, : cond.shape[1]], mask[:R, : cond.shape[1]] = cond, cond_mask
        caption[R:, : e.shape[0]], mask[R:, : e.shape[0]] = e, True
        caption = caption.repeat(S, 1, 1)  # [S * 2R, Lc, C]
        mask = mask.repeat(S, 1)

        handle = None
        if arm.kind in ("zero-shot", "adapter", "random"):
            m = self.features.mask
            feats = vh.VLFeatures(self.features.tokens.repeat(2 * S, 1, 1),
                                  mask=None if m is None else m.repeat(2 * S, 1))
            config = vh.InjectionConfig.from_dict(self.cfg["injection"])
            handle = vh.apply_injection(self.dit, None, config, adapter=adapter)
            handle.set_features(feats, active=([True] * R + [False] * R) * S)  # unconditional rows: no reference
        try:
            x = torch.stack([torch.randn((R, 1, 16, 16), generator=torch.Generator().manual_seed(int(s)))
                             for s in seeds])  # [S, R, 1, 16, 16]
            sig = torch.linspace(1.0, 0.0, steps + 1)
            for i in range(steps):
                xin = torch.cat([x, x], dim=1).flatten(0, 1)  # [S * 2R, 1, 16, 16]
                v = self.family.velocity(self.dit, xin, sig[i].expand(len(xin)), caption, mask).view(S, 2 * R, 1, 16, 16)
                vc, vu = v[:, :R], v[:, R:]
                x = x + (sig[i + 1] - sig[i]) * (vu + cfg_scale * (vc - vu))
        finally:
            if handle is not None:
                handle.remove()
        return x.flatten(0, 1)

    def label_metrics(self, samples: torch.Tensor) -> dict[str, np.ndarray]:
        """Per sample (seed-major rows, as `generate` returns them)."""
        proba = self.classifier.predict_proba(samples.reshape(len(samples), -1).clamp(-1, 1).numpy())
        pred = self.classifier.classes_[proba.argmax(1)]
        labels = np.tile(self.ref_labels, len(samples) // len(self.ref_labels))
        return {"class_match": (pred == labels).astype(float), "prompt_consistency": proba.max(1)}


# ---------------------------------------------------------------------------------------------------- report
def make_grid(ref_images: list[np.ndarray], arms: list[str], cells: dict[str, list[list[np.ndarray]]],
              cell: int = 48, pad: int = 4) -> "Image.Image":
    """References down the side, arms across; each cell holds one image per seed."""
    from PIL import Image, ImageDraw

    def tile(a: np.ndarray, size: int) -> Image.Image:
        im = Image.fromarray(a).convert("RGB")
        return im.resize((size, size), Image.NEAREST if im.width < size else Image.BICUBIC)

    n_seeds = len(next(iter(cells.values()))[0])
    s = cell
    cell_w = n_seeds * s + (n_seeds - 1) * 2
    head, left = 18, s + 2 * pad
    W = left + len(arms) * (cell_w + pad) + pad
    H = head + len(ref_images) * (s + pad) + pad
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, 3), "ref", fill="black")
    for j, arm in enumerate(arms):
        draw.text((left + j * (cell_w + pad), 3), arm, fill="black")
    for i, ref in enumerate(ref_images):
        y = head + i * (s + pad)
        img.paste(tile(ref, s), (pad, y))
        for j, arm in enumerate(arms):
            for k, a in enumerate(cells[arm][i]):
                img.paste(tile(a, s), (left + j * (cell_w + pad) + k * (s + 2), y))
    return img


def config_diff(arms: list[Arm]) -> tuple[list[str], dict[str, dict[str, str]]]:
    """The settings keys whose values differ between arms, and each arm's value (`-` where unset)."""
    keys = sorted({k for a in arms for k in a.settings})
    vals = {a.name: {k: str(a.settings.get(k, "-")) for k in keys} for a in arms}
    differ = [k for k in keys if len({vals[a.name][k] for a in arms}) > 1]
    return differ, vals


def write_report(out: Path, cfg: dict, arms: list[Arm], summary: dict, extra: dict, command: str) -> None:
    metrics = list(next(iter(summary.values())).keys())
    rows = []
    for a in arms:
        cells = "".join(f"<td>{summary[a.name][m]['mean']:.3f} &plusmn; {summary[a.name][m]['std']:.3f}</td>"
                        for m in metrics)
        rows.append(f"<tr><th>{html.escape(a.name)}</th>{cells}</tr>")
    differ, vals = config_diff(arms)
    diff_rows = "".join(
        f"<tr><th>{html.escape(k)}</th>" + "".join(f"<td>{html.escape(vals[a.name][k])}</td>" for a in arms) + "</tr>"
        for k in differ)
    docs = "".join(f"<li><b>{m}</b>: {html.escape(METRIC_DOCS.get(m, ''))}"
                   f"{' (lower is better)' if not HIGHER_IS_BETTER.get(m, True) else ''}</li>" for m in metrics)
    n = next(iter(next(iter(summary.values())).values()))["n"]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>vlhooks compare</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}th{{text-align:left}}code{{background:#f4f4f4}}</style>
</head><body><h1>vlhooks compare: {html.escape(cfg['world'])} world</h1>
<p>Command: <code>{html.escape(command)}</code></p>
<p>{extra['references']} references x {len(cfg['seeds'])} seeds x {len(cfg['prompts'])} prompt(s)
(prompts: {html.escape('; '.join(cfg['prompts']))}); {cfg.get('steps')} steps, guidance {cfg.get('cfg')}.
Mean &plusmn; std over the {n} seeds (each seed: the mean over its samples). {html.escape(extra.get('note', ''))}</p>
<h2>Metrics</h2><table><tr><th>arm</th>{''.join(f'<th>{m}</th>' for m in metrics)}</tr>{''.join(rows)}</table>
<ul>{docs}</ul>
<h2>Samples</h2><p>References down the side, arms across, one image per seed.</p><img src="grid.png">
<h2>What differs between arms</h2><table><tr><th>setting</th>{''.join(f'<th>{html.escape(a.name)}</th>' for a in arms)}</tr>
{diff_rows}</table>
<h2>Shared settings</h2><pre>{html.escape(json.dumps({k: v for k, v in cfg.items() if k not in ('adapters', 'arms')}, indent=2, default=str))}</pre>
</body></html>"""
    (out / "report.html").write_text(page)


def write_metrics(out: Path, summary: dict, extra: dict) -> None:
    (out / "metrics.json").write_text(json.dumps({"arms": summary, **extra}, indent=2))
    with open(out / "metrics.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["arm", "metric", "mean", "std", "n"])
        for arm, ms in summary.items():
            for m, s in ms.items():
                w.writerow([arm, m, f"{s['mean']:.6f}", f"{s['std']:.6f}", s["n"]])


def log_wandb(out: Path, summary: dict, cfg: dict) -> None:
    try:
        import wandb
    except ImportError:
        print("wandb is not installed; skipping the wandb table (pip install wandb).", file=sys.stderr)
        return
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    run = wandb.init(project="vlhooks-compare", dir=str(out), mode=mode, config=cfg, reinit=True)
    metrics = list(next(iter(summary.values())).keys())
    table = wandb.Table(columns=["arm", *[f"{m}_{s}" for m in metrics for s in ("mean", "std")]])
    for arm, ms in summary.items():
        table.add_data(arm, *[ms[m][s] for m in metrics for s in ("mean", "std")])
    run.log({"compare": table, "grid": wandb.Image(str(out / "grid.png"))})
    run.finish()


# ---------------------------------------------------------------------------------------------------- run
def run(cfg: dict[str, Any], command: str = "vlhooks compare") -> dict[str, Any]:
    """Run every arm, write the outputs; returns `metrics.json`'s content plus `out`."""
    from PIL import Image
    from tqdm.auto import tqdm

    t0 = time.time()
    arms = plan_arms(cfg)  # checked before anything heavy is loaded
    out = Path(cfg["out"])
    if cfg["world"] == "pipeline":
        from .compare_pipeline import PipelineWorld

        world = PipelineWorld(cfg)
    else:
        world = ToyWorld(cfg)
    scorer = Scorer(world.real_images, world.score_size)
    refs = scorer.embed(world.ref_small)
    R, seeds = len(world.ref_images), [int(s) for s in cfg["seeds"]]
    per_seed: dict[str, dict[str, list[float]]] = {}
    cells: dict[str, list[list[np.ndarray]]] = {}
    jobs = [(a, p, s) for a in arms for p in cfg["prompts"] for s in seeds]
    bar = tqdm(total=len(jobs), desc="compare", unit="seed")
    adapters: dict[str, Any] = {}
    import vlhooks as vh

    for arm in arms:
        if arm.kind == "adapter":
            adapters[arm.name] = vh.load_adapter(arm.adapter_path)
        elif arm.kind == "random":
            adapters[arm.name] = random_control(arm.adapter_path, world.dit, world.features.width,
                                                int(cfg.get("random_seed", 0)))
    for arm in arms:
        per_seed[arm.name] = {}
        cells[arm.name] = [[] for _ in range(R)]
        values: dict[str, list[np.ndarray]] = {}  # metric -> per prompt [S, R]
        effs = []  # per prompt [S, R, 1280]
        for prompt in cfg["prompts"]:
            bar.set_postfix(arm=arm.name)
            x = world.generate(arm, prompt, seeds, adapters.get(arm.name))  # [S * R, C, H, W], seed-major
            images = [to_uint8(xi) for xi in x]
            if getattr(world, "metric_size", None):  # large pipeline images: score at a fixed size
                images = [np.asarray(Image.fromarray(a).resize((world.metric_size,) * 2, Image.BICUBIC))
                          for a in images]
            emb = scorer.embed(images)
            d, e = scorer.similarity(emb, (refs[0].repeat(len(seeds), 1), refs[1].repeat(len(seeds), 1)))
            row = {"ref_similarity": d, "ref_similarity_effnet": e, **world.label_metrics(x)}
            for k, v in row.items():
                values.setdefault(k, []).append(np.asarray(v).reshape(len(seeds), R))
            effs.append(emb[1].view(len(seeds), R, -1))
            if prompt == cfg["prompts"][0]:
                for k in range(len(seeds)):
                    for i in range(R):
                        cells[arm.name][i].append(images[k * R + i])
            bar.update(len(seeds))
        for k, v in values.items():  # per seed: the mean over prompts x references
            per_seed[arm.name][k] = [float(x) for x in np.stack(v, 1).mean((1, 2))]
        if scorer.has_frechet:
            feats = torch.stack(effs, 1)  # [S, P, R, 1280]
            per_seed[arm.name]["frechet_effnet_pca16"] = [scorer.frechet(f.flatten(0, 1)) for f in feats]
    bar.close()
    order = ["class_match", "ref_similarity", "ref_similarity_effnet", "frechet_effnet_pca16", "prompt_consistency"]
    summary = summarize({a: {m: per_seed[a][m] for m in order if m in per_seed[a]} for a in per_seed})
    out.mkdir(parents=True, exist_ok=True)
    make_grid(world.ref_small, [a.name for a in arms], cells).save(out / "grid.png")
    extra = {"world": cfg["world"], "references": R, "seeds": seeds, "prompts": cfg["prompts"],
             "per_seed": per_seed, "command": command, "seconds": round(time.time() - t0, 1),
             "metric_definitions": {m: METRIC_DOCS[m] for m in order if m in summary[arms[0].name]}}
    if getattr(world, "classifier_accuracy", None) is not None:
        extra["classifier_heldout_accuracy"] = world.classifier_accuracy
        extra["note"] = (f"The classifier scores {world.classifier_accuracy:.1%} on the real held-out digits it was "
                         "not trained on; references come from those held-out digits.")
    write_metrics(out, summary, extra)
    write_report(out, cfg, arms, summary, extra, command)
    if cfg.get("wandb"):
        log_wandb(out, summary, cfg)
    return {"arms": summary, **extra, "out": str(out)}


def format_table(summary: dict, metrics=("class_match", "ref_similarity")) -> str:
    """A Markdown table of `metrics` per arm, `mean ± std`."""
    lines = ["| arm | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for arm, ms in summary.items():
        lines.append(f"| {arm} | " + " | ".join(f"{ms[m]['mean']:.3f} ± {ms[m]['std']:.3f}" for m in metrics if m in ms) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vlhooks compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file (default: the embedded toy world, as in configs/toy/compare.yaml)")
    p.add_argument("--out", help="output folder (default: outputs/compare)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default: 0 1 2)")
    p.add_argument("--references", type=int, help="number of reference images (toy world; default 20)")
    p.add_argument("--steps", type=int, help="denoising steps")
    p.add_argument("--arms", nargs="+", help="arms to run, in order (default: all)")
    p.add_argument("--adapters", nargs="+", metavar="NAME=PATH",
                   help="trained adapters, one arm each (default: the shipped ones); 'none' for no adapter arms")
    p.add_argument("--wandb", action="store_true", help="also log a wandb table (offline unless WANDB_API_KEY is set)")
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.config, {"out": a.out, "seeds": a.seeds, "steps": a.steps, "arms": a.arms,
                                     "wandb": a.wandb or None})
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.adapters:
        if a.adapters == ["none"]:
            cfg["adapters"] = {}
        else:
            bad = [x for x in a.adapters if "=" not in x]
            if bad:
                p.error(f"--adapters takes NAME=PATH pairs (e.g. projection=checkpoints/toy-projection/final), got {bad}")
            cfg["adapters"] = dict(x.split("=", 1) for x in a.adapters)
    if a.references:
        cfg["references"] = {**cfg["references"], "count": a.references}
    command = "vlhooks compare" + ("" if argv is None and len(sys.argv) <= 2 else " ") + " ".join(
        shlex.quote(x) for x in (sys.argv[2:] if argv is None else argv))
    try:
        result = run(cfg, command.strip())
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(result["arms"]))
    print(f"\n{len(result['seeds'])} seeds x {result['references']} references; {result['seconds']} s")
    print(f"Report: {Path(result['out']) / 'report.html'}  (grid.png, metrics.json, metrics.csv beside it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
