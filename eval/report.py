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

from vlhooks.errors import CompareError

from .arms import Arm
from .metrics import HIGHER_IS_BETTER, METRIC_DOCS

MARKER = ".vlhooks-outputs"  # written into every folder these commands fill; its presence makes re-runs replace


def _written_before(out: Path, summary: tuple[str, str]) -> bool:
    """Whether `out` holds the summary file (name, key) that the command writes, from before it left `MARKER`."""
    try:
        return summary[1] in json.loads((out / summary[0]).read_text())
    except (OSError, ValueError, TypeError):
        return False


def check_out(out: Path, command: str = "vlhooks compare", summary: tuple[str, str] = ("metrics.json", "arms")) -> None:
    """Raise `CompareError` unless `out` is new, empty, or a folder a previous run of `command` filled (it holds
    `MARKER`, or the command's `summary` file): called before anything heavy loads, so a user's files stay intact
    and the error comes at once."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CompareError(f"--out {out} is a file; pass a folder (new, or one that {command} wrote before).")
    if (out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file()
            and not _written_before(out, summary)):
        raise CompareError(f"--out {out} holds files that {command} did not write; pass another --out (a new or "
                           f"empty folder, or one a previous run wrote: those outputs are replaced).")


def claim_out(out: Path, command: str = "vlhooks compare", summary: tuple[str, str] = ("metrics.json", "arms")) -> None:
    """`check_out`, then create `out` and mark it as this command's."""
    out = Path(out)
    check_out(out, command, summary)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(f"written by {command}; a re-run with this --out replaces the outputs beside it\n")


def make_grid(ref_images: list[np.ndarray], arms: list[str], cells: dict[str, list[list[np.ndarray]]],
              cell: int = 48, pad: int = 4, labels: list[str] | None = None,
              marks: dict[str, list[list[bool]]] | None = None) -> Image.Image:
    """References down the side, arms across; each cell holds one image per seed. `labels`: the references'
    classes, written beside them; `marks` (per arm, reference and seed): a green frame where the sample shows the
    reference's class, a red one where it does not."""
    from PIL import ImageDraw

    def tile(a: np.ndarray, size: int) -> Image.Image:
        im = Image.fromarray(a).convert("RGB")
        return im.resize((size, size), Image.NEAREST if im.width < size else Image.BICUBIC)

    n_seeds = len(next(iter(cells.values()))[0])
    s = cell
    cell_w = n_seeds * s + (n_seeds - 1) * 2
    head, lab = 18, (14 if labels else 0)
    left = lab + s + 2 * pad
    W = left + len(arms) * (cell_w + pad) + pad
    H = head + len(ref_images) * (s + pad) + pad
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, 3), "ref", fill="black")
    for j, arm in enumerate(arms):
        draw.text((left + j * (cell_w + pad), 3), arm, fill="black")
    for i, ref in enumerate(ref_images):
        y = head + i * (s + pad)
        if labels:
            draw.text((2, y + s // 2 - 6), str(labels[i]), fill="black")
        img.paste(tile(ref, s), (lab + pad, y))
        for j, arm in enumerate(arms):
            for k, a in enumerate(cells[arm][i]):
                x0 = left + j * (cell_w + pad) + k * (s + 2)
                img.paste(tile(a, s), (x0, y))
                if marks and marks.get(arm) and k < len(marks[arm][i]):
                    color = (0, 170, 0) if marks[arm][i][k] else (220, 0, 0)
                    draw.rectangle((x0, y, x0 + s - 1, y + s - 1), outline=color, width=2)
    return img


def config_diff(arms: list[Arm]) -> tuple[list[str], dict[str, dict[str, str]]]:
    """The settings keys whose values differ between arms, and each arm's value (`-` where unset)."""
    keys = sorted({k for a in arms for k in a.settings})
    vals = {a.name: {k: str(a.settings.get(k, "-")) for k in keys} for a in arms}
    differ = [k for k in keys if len({vals[a.name][k] for a in arms}) > 1]
    return differ, vals


def _fmt(m: dict, digits: int = 3) -> str:
    if "ci_low" in m:
        return f"{m['mean']:.{digits}f} [{m['ci_low']:.{digits}f}, {m['ci_high']:.{digits}f}]"
    return f"{m['mean']:.{digits}f} &plusmn; {m['std']:.{digits}f}" if m.get("n", 1) > 1 else f"{m['mean']:.{digits}f}"


def write_report(out: Path, cfg: dict, arms: list[Arm], summary: dict, extra: dict, command: str,
                 ref_images: list | None = None, pair_examples: dict | None = None) -> dict:
    """`out/report.html` and its figures: the command and run time, the metrics table (best arm marked, chance
    given), class match per class, the strength sweep, the conflict test, the adapters' provenance, the grid, the
    settings that differ between arms. Returns the figures written."""
    from . import plots

    chance = extra.get("chance")
    figures = {
        "strength": plots.strength_plot(extra.get("sweep"), out, chance),
        "conflict": plots.conflict_plot(extra.get("conflict"), out),
        "per_class": plots.per_class_plot(extra.get("per_class"), out, chance),
        "training": plots.training_plot(extra.get("provenance"), out),
        "pairs": plots.pairs_plot(extra.get("pairs"), pair_examples, ref_images or [], out, chance),
    }
    metrics = list(next(iter(summary.values())).keys())
    best = extra.get("best_arm")
    rows = []
    for a in arms:
        cells = "".join(f"<td>{_fmt(summary[a.name][m], 2 if m.startswith('frechet') else 3)}</td>"
                        for m in metrics if m in summary[a.name])
        name = html.escape(a.name) + (" &#9733; best" if a.name == best else "")
        style = ' style="background:#eef6ff;font-weight:bold"' if a.name == best else ""
        rows.append(f"<tr{style}><th>{name}</th>{cells}</tr>")
    if chance is not None:
        rows.append(f"<tr><th>chance (ten classes)</th><td>{chance:.3f}</td>"
                    + "<td></td>" * (len(metrics) - 1) + "</tr>")
    differ, vals = config_diff(arms)
    diff_rows = "".join(
        f"<tr><th>{html.escape(k)}</th>" + "".join(f"<td>{html.escape(vals[a.name][k])}</td>" for a in arms) + "</tr>"
        for k in differ)
    docs = "".join(f"<li><b>{m}</b>: {html.escape(METRIC_DOCS.get(m, ''))}"
                   f"{' (lower is better)' if not HIGHER_IS_BETTER.get(m, True) else ''}</li>" for m in metrics)
    n = len(extra["seeds"])
    img = lambda key, alt: f'<p><img src="{figures[key]}" alt="{alt}"></p>' if figures.get(key) else ""  # noqa: E731
    per_class_html = ""
    if extra.get("per_class"):
        head = "".join(f"<th>{k}</th>" for k in range(10))
        body = "".join(f"<tr><th>{html.escape(a)}</th>" + "".join(
            f"<td>{v:.2f}</td>" if v is not None else "<td>-</td>" for v in pc) + "</tr>"
            for a, pc in extra["per_class"].items())
        per_class_html = (f"<h2>Class match per class</h2><table><tr><th>arm \\ reference class</th>{head}</tr>"
                          f"{body}</table>{img('per_class', 'class match per class')}")
    sweep_html = ""
    if extra.get("sweep"):
        sw = extra["sweep"]
        body = "".join(f"<tr><th>{html.escape(a)}</th>" + "".join(
            f"<td>{c:.2f} / {p:.2f}</td>" for c, p in zip(r["class_match"], r["prompt_consistency"])) + "</tr>"
            for a, r in sw["arms"].items())
        sweep_html = (f"<h2>Strength sweep</h2><p>Class match / prompt consistency against the injection scale "
                      f"({sw['references']} references x {len(sw['seeds'])} seed(s); scale 0 injects nothing, the "
                      f"<code>none</code> arm).</p><table><tr><th>arm \\ scale</th>"
                      + "".join(f"<th>{x:g}</th>" for x in sw["scales"]) + f"</tr>{body}</table>"
                      + img("strength", "strength sweep"))
    conflict_html = ""
    if extra.get("conflict"):
        cf = extra["conflict"]
        parts = []
        for a, r in cf["arms"].items():
            for key, xs, title in (("by_scale", cf["scales"], "scale"),
                                   ("by_image_guidance", cf["image_guidance"], "image guidance")):
                parts.append(f"<tr><th>{html.escape(a)}, {title}</th>" + "".join(
                    f"<td>{x:g}: {p['reference']:.2f} / {p['prompt']:.2f}</td>" for x, p in zip(xs, r[key]))
                    + "</tr>")
        conflict_html = (f"<h2>Conflict: prompt against reference</h2><p>The prompt names one class "
                         f"(&ldquo;{html.escape(cf['prompt'])}&rdquo;), the reference shows another; each cell: "
                         f"setting: reference wins / prompt wins ({cf['references']} references x "
                         f"{len(cf['seeds'])} seed(s)).</p><table>{''.join(parts)}</table>"
                         + img("conflict", "conflict test"))
    pairs_html = ""
    if extra.get("pairs"):
        pr = extra["pairs"]
        acc = pr["half_classifier_accuracy"]
        body = "".join(
            f"<tr><th>{html.escape(a)}</th>" + "".join(f"<td>{r[k]:.2f}</td>" for k in (
                "left_own", "right_own", "both_own", "left_other", "right_other", "alone_left_own",
                "alone_right_own")) + "</tr>" for a, r in pr["arms"].items())
        pairs_html = (f"<h2>Two references, left and right</h2><p>Reference A masked to the left half of the image, "
                      f"reference B (another class) to the right ({pr['references']} pairs x {len(pr['seeds'])} "
                      f"seed(s)); a logistic regression per half (fitted on the train split's halves; on real "
                      f"held-out digits it reads the left half's class {acc['left']:.2f} and the right half's "
                      f"{acc['right']:.2f} of the time) says which class each half shows. <i>A alone</i>: one "
                      f"reference, no mask, over the whole image.</p><table><tr><th>arm</th><th>left: A</th>"
                      f"<th>right: B</th><th>both</th><th>left: B</th><th>right: A</th><th>A alone, left: A</th>"
                      f"<th>A alone, right: A</th></tr>{body}</table>" + img("pairs", "two references"))
    prov_html = ""
    if any(extra.get("provenance", {}).values()):
        body = ""
        for a, p in extra["provenance"].items():
            if not p:
                body += f"<tr><th>{html.escape(a)}</th><td colspan=4>no training.json beside the adapter</td></tr>"
                continue
            body += (f"<tr><th>{html.escape(a)}</th><td><code>{html.escape(str(p.get('recipe')))}</code></td>"
                     f"<td>{p.get('steps')}</td><td>{html.escape(str(p.get('final_loss', '')))}</td>"
                     f"<td>{html.escape(str(p.get('trained_on', '')))}</td></tr>")
        prov_html = (f"<h2>Where the adapters come from</h2><table><tr><th>arm</th><th>recipe</th><th>steps</th>"
                     f"<th>final loss (last 100 steps)</th><th>trained on</th></tr>{body}</table>"
                     + img("training", "training loss"))
    timing = extra.get("timings", {})
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>vlhooks compare</title>
<style>body{{font-family:sans-serif;max-width:1300px;margin:2em auto}}table{{border-collapse:collapse;margin:.5em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}th{{text-align:left}}code{{background:#f4f4f4}}</style>
</head><body><h1>vlhooks compare: {html.escape(cfg['world'])} world</h1>
<p>Command: <code>{html.escape(command)}</code>; ran in {extra.get('seconds')} s
({', '.join(f'{k} {v} s' for k, v in timing.items())}).</p>
<p>{extra['references']} references x {n} seeds x {len(cfg['prompts'])} prompt(s)
(prompts: {html.escape('; '.join(cfg['prompts']))}); {cfg.get('steps')} Euler steps, guidance {cfg.get('cfg')}, image
guidance {cfg.get('image_guidance') if cfg.get('image_guidance') is not None else '= guidance'}.
Each cell: the mean over every sample, [the 95 % bootstrap interval over references and seeds]; the Fr&eacute;chet
distance: mean &plusmn; std over seeds. {html.escape(extra.get('note', ''))}</p>
<h2>Metrics</h2><table><tr><th>arm</th>{''.join(f'<th>{m}</th>' for m in metrics)}</tr>{''.join(rows)}</table>
<ul>{docs}</ul>
{per_class_html}{sweep_html}{conflict_html}{pairs_html}{prov_html}
<h2>Samples</h2><p>References down the side (their class at the left), arms across, one image per seed; a green
frame: the classifier finds the reference's class in the sample, red: it does not.</p><img src="grid.png">
<h2>What differs between arms</h2><table><tr><th>setting</th>{''.join(f'<th>{html.escape(a.name)}</th>' for a in arms)}</tr>
{diff_rows}</table>
<h2>Shared settings</h2><pre>{html.escape(json.dumps({k: v for k, v in cfg.items() if k not in ('adapters', 'arms')}, indent=2, default=str))}</pre>
</body></html>"""
    (out / "report.html").write_text(page)
    return {k: v for k, v in figures.items() if v}


def write_metrics(out: Path, summary: dict, extra: dict) -> None:
    """`out/metrics.json` (`{"arms": summary, **extra}`) and `out/metrics.csv` (one row per arm and metric)."""
    (out / "metrics.json").write_text(json.dumps({"arms": summary, **extra}, indent=2))
    with open(out / "metrics.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["arm", "metric", "mean", "std", "n", "ci_low", "ci_high"])
        for arm, ms in summary.items():
            for m, s in ms.items():
                ci = [f"{s[k]:.6f}" if k in s else "" for k in ("ci_low", "ci_high")]
                w.writerow([arm, m, f"{s['mean']:.6f}", f"{s['std']:.6f}", s["n"], *ci])


def log_wandb(out: Path, summary: dict, cfg: dict, extra: dict | None = None) -> None:
    """A wandb run under `out/wandb`: the summary table, per-class class match, the strength sweep and the conflict
    test as tables, and the figures (offline unless logged in)."""
    try:
        import wandb
    except ImportError:
        print("wandb is not installed; skipping the wandb table (pip install wandb).", file=sys.stderr)
        return
    extra = extra or {}
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    run = wandb.init(project="vlhooks-compare", dir=str(out), mode=mode, config=cfg, reinit=True)
    metrics = list(next(iter(summary.values())).keys())
    cols = ["arm", *[f"{m}_{s}" for m in metrics for s in ("mean", "std", "ci_low", "ci_high")]]
    table = wandb.Table(columns=cols)
    for arm, ms in summary.items():
        table.add_data(arm, *[ms[m].get(s) if m in ms else None for m in metrics
                              for s in ("mean", "std", "ci_low", "ci_high")])
    logs = {"compare": table, "grid": wandb.Image(str(out / "grid.png")), "seconds": extra.get("seconds")}
    if extra.get("per_class"):
        t = wandb.Table(columns=["arm", *[str(k) for k in range(10)]])
        for arm, pc in extra["per_class"].items():
            t.add_data(arm, *pc)
        logs["per_class"] = t
    if extra.get("sweep"):
        t = wandb.Table(columns=["arm", "scale", "class_match", "prompt_consistency"])
        for arm, r in extra["sweep"]["arms"].items():
            for x, c, p in zip(extra["sweep"]["scales"], r["class_match"], r["prompt_consistency"]):
                t.add_data(arm, x, c, p)
        logs["strength_sweep"] = t
    if extra.get("conflict"):
        cf = extra["conflict"]
        t = wandb.Table(columns=["arm", "scale", "image_guidance", "reference_wins", "prompt_wins"])
        for arm, r in cf["arms"].items():
            for x, pnt in zip(cf["scales"], r["by_scale"]):
                t.add_data(arm, x, cfg.get("cfg"), pnt["reference"], pnt["prompt"])
            for g, pnt in zip(cf["image_guidance"], r["by_image_guidance"]):
                t.add_data(arm, 1.0, g, pnt["reference"], pnt["prompt"])
        logs["conflict"] = t
    if extra.get("pairs"):
        t = wandb.Table(columns=["arm", "left_own", "right_own", "both_own", "left_other", "right_other",
                                 "alone_left_own"])
        for arm, r in extra["pairs"]["arms"].items():
            t.add_data(arm, r["left_own"], r["right_own"], r["both_own"], r["left_other"], r["right_other"],
                       r["alone_left_own"])
        logs["pairs"] = t
    for key, name in (extra.get("figures") or {}).items():
        logs[f"figure/{key}"] = wandb.Image(str(out / name))
    run.log(logs)
    run.finish()


TABLE_COLUMNS = (("class_match", "class match [95 % CI]"), ("ref_similarity", "DINOv2 ref. similarity"),
                 ("prompt_consistency", "prompt consistency"),
                 ("frechet_effnet_pca16", "Fréchet (EffNet-Lite0, 16-d PCA; lower is better)"))


def _cell(m: dict, digits: int) -> str:
    if "ci_low" in m:
        return f"{m['mean']:.{digits}f} [{m['ci_low']:.{digits}f}, {m['ci_high']:.{digits}f}]"
    return f"{m['mean']:.{digits}f} ± {m['std']:.{digits}f}"


def format_table(summary: dict, best: str | None = None, chance: float | None = None,
                 columns=TABLE_COLUMNS) -> str:
    """The Markdown table `vlhooks compare` prints (and the README shows): per arm, each metric's mean with its
    bootstrap interval (or ± std over seeds); the best trained arm in bold; chance last."""
    present = [(m, t) for m, t in columns if any(m in ms for ms in summary.values())]
    lines = ["| arm | " + " | ".join(t for _, t in present) + " |", "|---|" + "---|" * len(present)]
    for arm, ms in summary.items():
        name = f"**`{arm}`** (best)" if arm == best else f"`{arm}`"
        lines.append(f"| {name} | " + " | ".join(
            _cell(ms[m], 2 if m.startswith("frechet") else 3) if m in ms else "" for m, _ in present) + " |")
    if chance is not None:
        lines.append(f"| chance (ten classes) | {chance:.3f} |" + " |" * (len(present) - 1))
    return "\n".join(lines)


def format_studies(result: dict) -> str:
    """The strength sweep, the conflict test and the two-reference study as short Markdown tables (empty when
    not run)."""
    out = []
    sw = result.get("sweep")
    if sw:
        out.append("Strength sweep: class match / prompt consistency against the injection scale "
                   f"({sw['references']} references x {len(sw['seeds'])} seed(s))")
        out.append("| arm | " + " | ".join(f"scale {x:g}" for x in sw["scales"]) + " |")
        out.append("|---|" + "---|" * len(sw["scales"]))
        for arm, r in sw["arms"].items():
            out.append(f"| `{arm}` | " + " | ".join(f"{c:.2f} / {p:.2f}" for c, p in
                                                    zip(r["class_match"], r["prompt_consistency"])) + " |")
    cf = result.get("conflict")
    if cf:
        if out:
            out.append("")
        out.append(f"Conflict: the prompt names another class than the reference; reference wins / prompt wins "
                   f"({cf['references']} references x {len(cf['seeds'])} seed(s))")
        for arm, r in cf["arms"].items():
            out.append("| `" + arm + "` | " + " | ".join(f"scale {x:g}" for x in cf["scales"]) + " |")
            out.append("|---|" + "---|" * len(cf["scales"]))
            out.append("| by scale | " + " | ".join(f"{p['reference']:.2f} / {p['prompt']:.2f}"
                                                   for p in r["by_scale"]) + " |")
            out.append("| `" + arm + "` | " + " | ".join(f"image guidance {g:g}" for g in cf["image_guidance"]) + " |")
            out.append("|---|" + "---|" * len(cf["image_guidance"]))
            out.append("| by image guidance | " + " | ".join(f"{p['reference']:.2f} / {p['prompt']:.2f}"
                                                           for p in r["by_image_guidance"]) + " |")
    pr = result.get("pairs")
    if pr:
        if out:
            out.append("")
        acc = pr["half_classifier_accuracy"]
        out.append(f"Two references (A masked left, B right; {pr['references']} pairs x {len(pr['seeds'])} seed(s)): "
                   f"how often each half shows its own reference's class (half classifier on real digits: left "
                   f"{acc['left']:.2f}, right {acc['right']:.2f})")
        out.append("| arm | left: A | right: B | both | left: B | right: A | A alone, left: A |")
        out.append("|---|---|---|---|---|---|---|")
        for arm, r in pr["arms"].items():
            out.append(f"| `{arm}` | " + " | ".join(f"{r[k]:.2f}" for k in (
                "left_own", "right_own", "both_own", "left_other", "right_other", "alone_left_own")) + " |")
    return "\n".join(out)
