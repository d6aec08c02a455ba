"""What the reference features themselves say about the class: the first bound on an adapter's class match.

Encodes the 4000 training digits, the 1000 held-out digits and the 1797 UCI digits (`references.sklearn_digits`)
with the embedded default's image encoder (DINOv2-S, CLS + patch tokens; `--encoder efficientnet-lite0` for the
other shipped vision encoder) at each resolution asked for, and fits
probes on the training split: a logistic regression on all tokens flattened, on CLS + the mean patch token and on
CLS alone, and a one-hidden-layer MLP on all tokens (standardised). An adapter that read the class perfectly from
these features could not do better than the best probe on each set (times the DiT's text-conditional ceiling).

    python -m vlhooks.eval.feature_probe [--sizes 56 112] [--layers last 6] [--encoder dinov2-small]
                                         [--out outputs/feature_probe] [--limit N]

`--layers` (DINOv2): the encoder layer each probe reads, `last` (after the final norm) or a block index (the
residual stream after that many blocks, as `image_encoder: {layer: 6}` gives it); rows are keyed `56` for the last
layer and `56, layer 6` for the others.

Writes `probe.json` (accuracy per size, probe and set; encode seconds per image) and prints a table. About 1 min at
56 px and 3 min at 112 px on one core (224 px: ~12 min); `--limit` keeps N digits of each set (a quick check).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

PROBES = ("logistic, all tokens", "logistic, CLS + mean patch", "logistic, CLS", "logistic, mean token",
          "MLP 256, all tokens")


def _sets(limit: int | None) -> dict[str, tuple[list, np.ndarray]]:
    from vlhooks.train.data import load_source

    from .references import sklearn_digits

    train, heldout = load_source("mnist", split="train"), load_source("mnist", split="heldout")
    uci_x, uci_y = sklearn_digits()
    sets = {"train": (list(train["image"]), np.asarray(train["label"])),
            "heldout": (list(heldout["image"]), np.asarray(heldout["label"])),
            "uci": (list(uci_x), np.asarray(uci_y))}
    if limit:
        sets = {k: (x[:limit], y[:limit]) for k, (x, y) in sets.items()}
    return sets


def encode(size: int, sets: dict, batch: int = 50, encoder: str = "dinov2-small",
           layer: int | str = "last") -> tuple[dict[str, np.ndarray], float]:
    """Tokens `[n, T, C]` of every set (DINOv2-S: `T = 1 + (size / 14)^2` with CLS first), and the encode time per
    image."""
    from vlhooks.train.encoders import image_encoder

    spec = {"name": encoder, "image_size": size}
    if encoder == "dinov2-small":
        spec["include_cls"] = True
        if layer != "last":
            spec["layer"] = int(layer)
    enc = image_encoder(spec)
    feats, n, t0 = {}, 0, time.perf_counter()
    for name, (images, _) in sets.items():
        parts = []
        for i in range(0, len(images), batch):
            tokens, _mask = enc(images[i:i + batch])
            parts.append(tokens.float().numpy())
        feats[name], n = np.concatenate(parts), n + len(images)
    return feats, (time.perf_counter() - t0) / n


def fit(feats: dict[str, np.ndarray], labels: dict[str, np.ndarray], cls: bool = True) -> dict[str, dict[str, float]]:
    """Accuracy of each probe (fitted on `train`) on `heldout` and `uci`; `cls`: the first token is a CLS token."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    views = {"logistic, all tokens": lambda a: a.reshape(len(a), -1)}
    if cls:  # DINOv2: CLS first, then the patch tokens
        views["logistic, CLS + mean patch"] = lambda a: np.concatenate([a[:, 0], a[:, 1:].mean(1)], 1)
        views["logistic, CLS"] = lambda a: a[:, 0]
    else:  # spatial tokens only (EfficientNet-Lite0's 7 x 7 grid)
        views["logistic, mean token"] = lambda a: a.mean(1)
    out = {}
    for probe, view in views.items():
        clf = LogisticRegression(C=1.0, max_iter=2000).fit(view(feats["train"]), labels["train"])
        out[probe] = {s: float(clf.score(view(feats[s]), labels[s])) for s in ("heldout", "uci")}
    flat = {k: v.reshape(len(v), -1) for k, v in feats.items()}
    scaler = StandardScaler().fit(flat["train"])
    mlp = MLPClassifier(hidden_layer_sizes=(256,), alpha=1e-2, max_iter=300, early_stopping=True, random_state=0)
    mlp.fit(scaler.transform(flat["train"]), labels["train"])
    out["MLP 256, all tokens"] = {s: float(mlp.score(scaler.transform(flat[s]), labels[s])) for s in ("heldout", "uci")}
    return out


def run_probe(sizes: list[int], out: str | None = None, limit: int | None = None,
              encoder: str = "dinov2-small", layers: list[int | str] | None = None) -> dict:
    sets = _sets(limit)
    labels = {k: y for k, (_, y) in sets.items()}
    results = {"encoder": encoder, "sizes": {}, "counts": {k: len(y) for k, y in labels.items()}}
    for size, layer in ((s, l) for s in sizes for l in (layers or ["last"])):
        feats, s_per_image = encode(size, sets, encoder=encoder, layer=layer)
        results["sizes"][str(size) if layer == "last" else f"{size}, layer {layer}"] = {"probes": fit(feats, labels, cls=encoder == "dinov2-small"),
                                       "encode_s_per_image": round(s_per_image, 4),
                                       "tokens": int(feats["train"].shape[1])}
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        path = Path(out) / "probe.json"
        if path.exists():
            path = Path(out) / f"probe-{time.strftime('%Y%m%d-%H%M%S')}.json"  # never overwrite a user's file
        path.write_text(json.dumps(results, indent=1))
        results["written"] = str(path)
    return results


def format_probe(results: dict) -> str:
    lines = ["| size (px) | tokens | probe | held-out | UCI digits | encode s / image |", "|---|---|---|---|---|---|"]
    for size, r in results["sizes"].items():
        for probe in (p for p in PROBES if p in r["probes"]):
            acc = r["probes"][probe]
            lines.append(f"| {size} | {r['tokens']} | {probe} | {acc['heldout']:.3f} | {acc['uci']:.3f} | "
                         f"{r['encode_s_per_image']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlhooks.eval.feature_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[56, 112],
                   help="encoder input sizes (multiples of 14 for DINOv2)")
    p.add_argument("--encoder", default="dinov2-small", choices=["dinov2-small", "efficientnet-lite0"])
    p.add_argument("--out", default="outputs/feature_probe")
    p.add_argument("--limit", type=int, default=None, help="keep this many digits of each set (a quick check)")
    p.add_argument("--layers", nargs="+", default=["last"],
                   help="DINOv2 layers to probe: last (after the final norm) or block indices 0-12")
    a = p.parse_args(argv)
    bad_layers = [x for x in a.layers if x != "last" and not (x.isdigit() and 0 <= int(x) <= 12)]
    if bad_layers or (a.encoder != "dinov2-small" and a.layers != ["last"]):
        p.error(f"--layers takes 'last' or block indices 0-12 of dinov2-small; got {a.layers} for {a.encoder}")
    bad = [s for s in a.sizes if s <= 0 or (a.encoder == "dinov2-small" and s % 14)]
    if bad:
        p.error(f"--sizes must be positive (multiples of 14, DINOv2's patch size, for dinov2-small); got {bad}")
    results = run_probe(a.sizes, a.out, a.limit, a.encoder, [x if x == "last" else int(x) for x in a.layers])
    print(format_probe(results))
    print(f"wrote {results['written']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
