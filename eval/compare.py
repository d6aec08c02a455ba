"""`vlhooks compare`: the same prompts x references x seeds through several arms; a grid, a report, metrics.

Arms (every arm sees the same prompts, reference images and initial noise):
- `none`: the prompt alone, no reference.
- `blend`: the embedding route: the reference's features rescaled to the caption's std and blended into the
  caption embeddings (`vlhooks.blending`, the configured mode).
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
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlhooks.errors import CompareError
from vlhooks.images import resize, to_uint8

from .arms import random_control
from .config import check_config, load_config
from .metrics import METRIC_DOCS, METRIC_ORDER, Scorer, summarize
from .report import format_table, log_wandb, make_grid, write_metrics, write_report


def run(cfg: dict[str, Any], command: str = "vlhooks compare") -> dict[str, Any]:
    """Check the whole config, run every arm, write the outputs; returns `metrics.json`'s content plus `out`."""
    from tqdm.auto import tqdm

    import vlhooks as vh

    t0 = time.time()
    arms = check_config(cfg, check_files=True)  # before anything heavy is loaded or written
    out = Path(cfg["out"])
    if cfg["world"] == "pipeline":
        from .pipeline_world import PipelineWorld

        world = PipelineWorld(cfg)
    else:
        from .toy_world import ToyWorld

        world = ToyWorld(cfg)
    scorer = Scorer(world.real_images, world.score_size)
    refs = scorer.embed(world.ref_small)  # ([R, 384], [R, 1280])
    R, seeds = len(world.ref_images), [int(s) for s in cfg["seeds"]]
    per_seed: dict[str, dict[str, list[float]]] = {}
    cells: dict[str, list[list[np.ndarray]]] = {}
    jobs = [(a, p, s) for a in arms for p in cfg["prompts"] for s in seeds]
    bar = tqdm(total=len(jobs), desc="compare", unit="seed")
    adapters: dict[str, Any] = {}
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
                images = [resize(a, world.metric_size) for a in images]
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
    summary = summarize({a: {m: per_seed[a][m] for m in METRIC_ORDER if m in per_seed[a]} for a in per_seed})
    out.mkdir(parents=True, exist_ok=True)
    make_grid(world.ref_small, [a.name for a in arms], cells).save(out / "grid.png")
    extra = {"world": cfg["world"], "references": R, "seeds": seeds, "prompts": cfg["prompts"],
             "per_seed": per_seed, "command": command, "seconds": round(time.time() - t0, 1),
             "metric_definitions": {m: METRIC_DOCS[m] for m in METRIC_ORDER if m in summary[arms[0].name]}}
    if getattr(world, "classifier_accuracy", None) is not None:
        extra["classifier_heldout_accuracy"] = world.classifier_accuracy
        extra["note"] = (f"The classifier scores {world.classifier_accuracy:.1%} on the real held-out digits it was "
                         "not trained on; references come from those held-out digits.")
    write_metrics(out, summary, extra)
    write_report(out, cfg, arms, summary, extra, command)
    if cfg.get("wandb"):
        log_wandb(out, summary, cfg)
    return {"arms": summary, **extra, "out": str(out)}


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
