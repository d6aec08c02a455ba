"""`training.json` beside a shipped adapter: where it comes from (recipe, command, steps, loss curve, machine), so
that `vlhooks compare` can show it.

    python -m vlhooks.eval.provenance checkpoints/toy-projection --recipe configs/toy/projection.yaml \\
        --run /tmp/runs/toy-projection --trained-on "2 CPU cores, 21 min" [--overwrite]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path


def loss_curve(run_dir: str | Path) -> list[list[float]]:
    """`[[step, loss], ...]` from the run's CSV log (`logs/**/metrics.csv`, Lightning's `train/loss`)."""
    rows = []
    for f in sorted(Path(run_dir).glob("logs/**/metrics.csv")):
        with open(f, newline="") as fh:
            for r in csv.DictReader(fh):
                if r.get("train/loss"):
                    rows.append([int(r["step"]), float(r["train/loss"])])
    return sorted(rows)


def write_provenance(folder: str | Path, recipe: str, run_dir: str | Path | None = None, *,
                     command: str | None = None, trained_on: str | None = None,
                     extra: dict | None = None, overwrite: bool = False) -> Path:
    import yaml

    out = Path(folder) / "training.json"
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it (after keeping a copy if it matters).")

    cfg = yaml.safe_load(Path(recipe).read_text())
    curve = loss_curve(run_dir) if run_dir else []
    tail = [l for s, l in curve if s >= (curve[-1][0] - 100 if curve else 0)]
    data = {"recipe": recipe, "command": command or f"vlhooks train --config {recipe}",
            "steps": int(cfg.get("trainer", {}).get("max_steps", 0)), "batch_size": cfg.get("data", {}).get("batch_size"),
            "adapter": cfg.get("model", {}).get("adapter"), "trained_on": trained_on,
            "final_loss": round(sum(tail) / len(tail), 4) if tail else None, "loss": curve, **(extra or {})}
    out.write_text(json.dumps(data, indent=1))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlhooks.eval.provenance", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="the shipped adapter's run folder (checkpoints/<run>, holding final/)")
    p.add_argument("--recipe", required=True)
    p.add_argument("--run", help="the training run's folder (its logs/ hold the CSV loss log)")
    p.add_argument("--command")
    p.add_argument("--trained-on")
    p.add_argument("--overwrite", action="store_true", help="replace an existing training.json")
    a = p.parse_args(argv)
    try:
        print(write_provenance(a.folder, a.recipe, a.run, command=a.command, trained_on=a.trained_on,
                               overwrite=a.overwrite))
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
