"""The figures of `vlhooks compare` (matplotlib, Agg): the strength sweep, the conflict test, class match per
class, and the adapters' training loss curves. Each returns the file it wrote, or None when there is nothing to
draw."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLORS = {"zero-shot": "#888888", "projection": "#1f77b4", "lora": "#ff7f0e", "kv": "#2ca02c",
          "random": "#d62728", "none": "#000000", "blend": "#9467bd"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, out: Path, name: str) -> str:
    """Lay out, write `out/name`, close; returns `name` (the report links it)."""
    fig.tight_layout()
    fig.savefig(out / name)
    plt.close(fig)
    return name


def _color(name: str, i: int) -> str:
    return COLORS.get(name, f"C{i % 10}")


def strength_plot(sweep: dict[str, Any] | None, out: Path, chance: float | None) -> str | None:
    if not sweep or not sweep.get("arms"):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    x = sweep["scales"]
    for i, (name, r) in enumerate(sweep["arms"].items()):
        c = _color(name, i)
        ax.plot(x, r["class_match"], "-o", color=c, label=f"{name}: class match")
        ax.fill_between(x, r["class_match_ci_low"], r["class_match_ci_high"], color=c, alpha=0.15, lw=0)
        ax.plot(x, r["prompt_consistency"], "--", color=c, alpha=0.8, label=f"{name}: prompt consistency")
    if chance:
        ax.axhline(chance, color="k", lw=0.8, ls=":", label="chance")
    ax.set_xlabel("injection scale (0 = no reference)")
    ax.set_ylabel("fraction / confidence")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Strength sweep ({sweep['references']} references x {len(sweep['seeds'])} seed(s))", fontsize=10)
    ax.legend(fontsize=7, loc="center right")
    ax.grid(alpha=0.3)
    return _save(plt, fig, out, "strength.png")


def conflict_plot(conflict: dict[str, Any] | None, out: Path) -> str | None:
    if not conflict or not conflict.get("arms"):
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.6), dpi=110, sharey=True)
    for i, (name, r) in enumerate(conflict["arms"].items()):
        for ax, key, xs, xl in ((axes[0], "by_scale", conflict["scales"], "injection scale (image guidance = cfg)"),
                                (axes[1], "by_image_guidance", conflict["image_guidance"],
                                 "image guidance (scale 1; text guidance = cfg)")):
            pts = r[key]
            ax.plot(xs, [p["reference"] for p in pts], "-o", color="#1f77b4", label=f"{name}: reference wins")
            ax.fill_between(xs, [p["reference_ci"][0] for p in pts], [p["reference_ci"][1] for p in pts],
                            color="#1f77b4", alpha=0.15, lw=0)
            ax.plot(xs, [p["prompt"] for p in pts], "-s", color="#ff7f0e", label=f"{name}: prompt wins")
            ax.fill_between(xs, [p["prompt_ci"][0] for p in pts], [p["prompt_ci"][1] for p in pts],
                            color="#ff7f0e", alpha=0.15, lw=0)
            ax.set_xlabel(xl, fontsize=8)
            ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of samples")
    axes[0].set_ylim(0, 1.02)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Conflict: the prompt names one class, the reference shows another "
                 f"({conflict['references']} references x {len(conflict['seeds'])} seed(s))", fontsize=9)
    return _save(plt, fig, out, "conflict.png")


def per_class_plot(per_class: dict[str, list] | None, out: Path, chance: float | None) -> str | None:
    if not per_class:
        return None
    plt = _plt()
    names = list(per_class)
    fig, ax = plt.subplots(figsize=(8.0, 3.2), dpi=110)
    w = 0.8 / len(names)
    for i, name in enumerate(names):
        vals = [v if v is not None else 0.0 for v in per_class[name]]
        ax.bar([k + (i - len(names) / 2 + 0.5) * w for k in range(10)], vals, w, color=_color(name, i), label=name)
    if chance:
        ax.axhline(chance, color="k", lw=0.8, ls=":")
    ax.set_xticks(range(10))
    ax.set_xlabel("the reference's class")
    ax.set_ylabel("class match")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, ncol=len(names))
    return _save(plt, fig, out, "per_class.png")


def training_plot(provenance: dict[str, Any] | None, out: Path) -> str | None:
    runs = {k: v for k, v in (provenance or {}).items() if v and v.get("loss")}
    if not runs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=110)
    for i, (name, p) in enumerate(runs.items()):
        steps, loss = zip(*p["loss"])
        ax.plot(steps, loss, color=_color(name, i), label=f"{name} ({p.get('recipe', '?')})", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(plt, fig, out, "training.png")


def pairs_plot(pairs: dict[str, Any] | None, examples: dict[str, list] | None, ref_images: list, out: Path,
               chance: float | None) -> str | None:
    """The two-reference study: per arm, how often each half shows its own reference's class (beside the same
    half with one reference over the whole image, and the half classifier's ceiling); then examples: reference A
    (left mask), reference B (right mask), the sample."""
    if not pairs or not pairs.get("arms"):
        return None
    import numpy as np

    plt = _plt()
    names = list(pairs["arms"])
    n_ex = max((len(v) for v in (examples or {}).values()), default=0)
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 3.6), dpi=110, gridspec_kw={"width_ratios": [1.1, 1.0]})
    ax = axes[0]
    keys = (("left_own", "left half: A's class"), ("right_own", "right half: B's class"),
            ("left_other", "left half: B's class"), ("right_other", "right half: A's class"))
    w = 0.8 / len(names)
    for i, name in enumerate(names):
        r = pairs["arms"][name]
        ax.bar([k + (i - len(names) / 2 + 0.5) * w for k in range(len(keys))], [r[k] for k, _ in keys], w,
               color=_color(name, i), label=name)
        ax.plot([-0.4, 0.4], [r["alone_left_own"]] * 2, color="#555555", ls="--", lw=1.5,
                label=f"{name}: A alone over the whole image, left half")
    acc = pairs["half_classifier_accuracy"]
    ax.plot([-0.4, 0.4], [acc["left"]] * 2, color="k", lw=1, label="half classifier on real digits")
    ax.plot([0.6, 1.4], [acc["right"]] * 2, color="k", lw=1)
    if chance:
        ax.axhline(chance, color="k", lw=0.8, ls=":", label="chance")
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([t for _, t in keys], fontsize=7)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("fraction of samples")
    ax.legend(fontsize=6)
    ax.set_title(f"A masked left, B right ({pairs['references']} pairs x {len(pairs['seeds'])} seed(s))",
                 fontsize=9)
    ax = axes[1]
    if n_ex:
        name = names[0]
        tiles = []
        for i, sample in enumerate(examples[name]):
            a = np.asarray(ref_images[pairs["left"][i]])
            b = np.asarray(ref_images[pairs["right"][i]])
            gap = np.full((16, 2), 128, np.uint8)
            tiles.append(np.concatenate([a, gap, b, gap, np.asarray(sample, np.uint8)], 1))  # [16, 52]
        sep = np.full((2, tiles[0].shape[1]), 128, np.uint8)
        ax.imshow(np.concatenate([t for tile in tiles for t in (tile, sep)][:-1], 0), cmap="gray", vmin=0,
                  vmax=255, interpolation="nearest")
        ax.set_title(f"{name}: reference A | reference B | sample", fontsize=9)
    ax.axis("off")
    return _save(plt, fig, out, "pairs.png")
