"""The outputs of `vlhooks compare`: the image grid, `report.html`, `metrics.json` / `metrics.csv`, the wandb
table, and the Markdown table the command prints."""

from __future__ import annotations

import csv
import html
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from .arms import Arm
from .metrics import HIGHER_IS_BETTER, METRIC_DOCS


def make_grid(ref_images: list[np.ndarray], arms: list[str], cells: dict[str, list[list[np.ndarray]]],
              cell: int = 48, pad: int = 4) -> Image.Image:
    """References down the side, arms across; each cell holds one image per seed."""
    from PIL import ImageDraw

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
    """`out/report.html`: the command, the metrics table, the grid, the settings that differ between arms."""
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
    """`out/metrics.json` (`{"arms": summary, **extra}`) and `out/metrics.csv` (one row per arm and metric)."""
    (out / "metrics.json").write_text(json.dumps({"arms": summary, **extra}, indent=2))
    with open(out / "metrics.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["arm", "metric", "mean", "std", "n"])
        for arm, ms in summary.items():
            for m, s in ms.items():
                w.writerow([arm, m, f"{s['mean']:.6f}", f"{s['std']:.6f}", s["n"]])


def log_wandb(out: Path, summary: dict, cfg: dict) -> None:
    """A wandb run under `out/wandb` with the summary table and the grid (offline unless logged in)."""
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


def format_table(summary: dict, metrics=("class_match", "ref_similarity")) -> str:
    """A Markdown table of `metrics` per arm, `mean ± std`."""
    lines = ["| arm | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for arm, ms in summary.items():
        lines.append(f"| {arm} | " + " | ".join(f"{ms[m]['mean']:.3f} ± {ms[m]['std']:.3f}" for m in metrics if m in ms) + " |")
    return "\n".join(lines)
