"""References unlike the training digits: class match of the trained arms (and zero-shot) when the reference comes
from other writers or has gone through other preprocessing (`eval/references.py`).

Sets (each 50 references spread over the classes, 5 seeds, the compare defaults otherwise):
- `heldout`: held-out MNIST digits as they are (the main table's setting, for comparison);
- `sklearn_digits`: scikit-learn's 8x8 digits (the UCI optical digits: 43 other writers, 32x32 scans block-averaged
  to 8x8), up-sampled to 20x20 in a 28x28 frame: other writers AND other preprocessing;
- `thick`, `thin`: held-out MNIST with strokes one pixel thicker / thinner;
- `shift_rotate`: rotated by 20 degrees and shifted by 3 px;
- `invert`: dark ink on a light background (a scan of paper);
- `blur`: Gaussian blur, sigma 1.2 px.

    python -m vlhooks.eval.robustness [--out outputs/robustness] [--image-guidance 6] [--adapters NAME=PATH ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SETS = {
    "heldout": {"source": "mnist", "split": "heldout"},
    "sklearn_digits": {"source": "sklearn_digits"},
    "thick": {"source": "mnist", "split": "heldout", "transform": "thick"},
    "thin": {"source": "mnist", "split": "heldout", "transform": "thin"},
    "shift_rotate": {"source": "mnist", "split": "heldout", "transform": "shift_rotate"},
    "invert": {"source": "mnist", "split": "heldout", "transform": "invert"},
    "blur": {"source": "mnist", "split": "heldout", "transform": "blur"},
}
UNLIKE = [s for s in SETS if s != "heldout"]


def run_robustness(out: str = "outputs/robustness", arms: list[str] | None = None, count: int = 50,
                   seeds: list[int] | None = None, image_guidance: float | None = None,
                   sets: list[str] | None = None, adapters: dict[str, str] | None = None) -> dict:
    from .compare import run
    from .config import load_config
    from .report import claim_out

    t0 = time.time()
    claim_out(Path(out), "python -m vlhooks.eval.robustness", ("robustness.json", "sets"))  # a user's folder: refused
    results: dict = {"sets": {}, "count": count}
    for name in sets or list(SETS):
        cfg = load_config(None)
        if adapters is not None:  # the user's own adapters instead of the shipped ones
            cfg["adapters"] = adapters
        cfg.update(references={**SETS[name], "count": count, "seed": 0}, sweep=None, conflict=None, pairs=None,
                   out=str(Path(out) / name), image_guidance=image_guidance,
                   arms=arms or ["zero-shot", *cfg["adapters"]])
        if seeds:
            cfg["seeds"] = seeds
        r = run(cfg, command=f"python -m vlhooks.eval.robustness ({name})")
        results["sets"][name] = {a: {k: r["arms"][a]["class_match"][k] for k in ("mean", "ci_low", "ci_high")}
                                 for a in r["arms"]}
        results["seeds"] = r["seeds"]
    trained = [a for a in next(iter(results["sets"].values())) if a != "zero-shot"]
    unlike = [s for s in results["sets"] if s in UNLIKE]
    if unlike:
        results["unlike_mean"] = {a: sum(results["sets"][s][a]["mean"] for s in unlike) / len(unlike)
                                  for a in ["zero-shot", *trained] if a in results["sets"][unlike[0]]}
    results["image_guidance"] = image_guidance
    results["seconds"] = round(time.time() - t0, 1)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "robustness.json").write_text(json.dumps(results, indent=1))
    (Path(out) / "robustness.md").write_text(format_robustness(results))
    return results


def format_robustness(results: dict) -> str:
    sets = list(results["sets"])
    arms = list(results["sets"][sets[0]])
    lines = ["| reference set | " + " | ".join(f"`{a}`" for a in arms) + " |", "|---|" + "---|" * len(arms)]
    for s in sets:
        lines.append(f"| {s} | " + " | ".join(
            f"{results['sets'][s][a]['mean']:.3f} [{results['sets'][s][a]['ci_low']:.3f}, "
            f"{results['sets'][s][a]['ci_high']:.3f}]" for a in arms) + " |")
    if results.get("unlike_mean"):
        lines.append("| mean of the unlike sets | " + " | ".join(
            f"{results['unlike_mean'].get(a, float('nan')):.3f}" for a in arms) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlhooks.eval.robustness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/robustness")
    p.add_argument("--image-guidance", type=float)
    p.add_argument("--references", type=int, default=50)
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--sets", nargs="+", choices=list(SETS))
    p.add_argument("--arms", nargs="+")
    p.add_argument("--adapters", nargs="+", metavar="NAME=PATH",
                   help="trained adapters to score, one arm each (default: the shipped ones)")
    a = p.parse_args(argv)
    from vlhooks.errors import CompareError

    from .compare import parse_adapters

    try:
        r = run_robustness(a.out, a.arms, a.references, a.seeds, a.image_guidance, a.sets,
                           parse_adapters(a.adapters, p.error) if a.adapters else None)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_robustness(r))
    print(f"\n{r['seconds']} s; {Path(a.out) / 'robustness.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
