"""The toy world's own check: how often does the pretrained toy DiT draw the digit its caption names?

A scikit-learn MLP trained on real MNIST-5k digits (4000, stratified; 1000 held out, where its own accuracy is
measured) classifies samples drawn with fixed seeds: 20 per digit, classifier-free guidance scale `cfg`
(`v = v_uncond + cfg * (v_cond - v_uncond)`, the empty caption as unconditional), Euler over sigma 1 -> 0.

    python -m vlhooks.eval.toy --dit checkpoints/toy-dit/final        # prints JSON
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def mnist16(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MNIST-5k at 16x16 in [-1, 1] (area downsampling), split by `mnist_split(seed)`:
    `(x_train [4000, 256], x_heldout [1000, 256], y_train, y_heldout)`."""
    from vlhooks.train.data import load_source, mnist_split

    raw = load_source("mnist")
    x = torch.from_numpy(np.stack(raw["image"])).float()[:, None] / 127.5 - 1.0  # [5000, 1, 28, 28]
    x = torch.nn.functional.interpolate(x, size=(16, 16), mode="area")[:, 0].reshape(len(x), -1).numpy()
    y = np.asarray(raw["label"])
    tr, te = mnist_split(seed)
    return x[tr], x[te], y[tr], y[te]


class DigitClassifier:
    """A scikit-learn `MLPClassifier((256,))` trained on the 4000 train-split digits, kept as its weights
    (safetensors in the vlhooks cache, no pickle) and evaluated with the same formula as sklearn's
    `predict_proba` (ReLU hidden layer, softmax output)."""

    def __init__(self, weights: dict[str, np.ndarray], heldout_accuracy: float):
        self.w = weights
        self.heldout_accuracy = heldout_accuracy
        self.classes_ = weights["classes"]

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        h = np.maximum(x @ self.w["coef0"] + self.w["bias0"], 0.0)  # [N, 256]
        z = h @ self.w["coef1"] + self.w["bias1"]  # [N, 10]
        z = np.exp(z - z.max(1, keepdims=True))
        return z / z.sum(1, keepdims=True)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(x).argmax(1)]


def digit_classifier(seed: int = 0) -> tuple[DigitClassifier, float]:
    """`(classifier, held-out accuracy)`; the classifier takes `[N, 256]` pixels in [-1, 1]. Trained once, then
    read from `<vlhooks cache>/classifiers/`."""
    import sklearn
    from safetensors.numpy import load_file, save_file
    from sklearn.neural_network import MLPClassifier

    from vlhooks.encoders._common import cache_dir

    path = cache_dir() / "classifiers" / f"mnist16-mlp256-seed{seed}-sklearn{sklearn.__version__}.safetensors"
    if path.is_file():
        w = load_file(str(path))
        return DigitClassifier(w, float(w["heldout_accuracy"][0])), float(w["heldout_accuracy"][0])
    xtr, xte, ytr, yte = mnist16(seed)
    clf = MLPClassifier((256,), alpha=1e-3, max_iter=200, random_state=seed).fit(xtr, ytr)
    acc = float(clf.score(xte, yte))
    w = {"coef0": clf.coefs_[0], "bias0": clf.intercepts_[0], "coef1": clf.coefs_[1], "bias1": clf.intercepts_[1],
         "classes": np.asarray(clf.classes_), "heldout_accuracy": np.asarray([acc])}
    w = {k: np.ascontiguousarray(v) for k, v in w.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(w, str(tmp))
    os.replace(tmp, path)
    return DigitClassifier(w, acc), acc


class HalfClassifiers:
    """Which digit a half of a 16x16 image shows: one multinomial logistic regression per half (the left 8
    columns, the right 8), fitted on the 4000 train-split digits' halves (lbfgs, deterministic). `accuracy` is
    each one's on the 1000 held-out digits' halves: the ceiling of the two-reference study."""

    def __init__(self, seed: int = 0):
        from sklearn.linear_model import LogisticRegression

        xtr, xte, ytr, yte = mnist16(seed)
        self.models, self.accuracy = {}, {}
        for side in ("left", "right"):
            clf = LogisticRegression(C=0.1, max_iter=500).fit(self.half(xtr, side), ytr)
            self.models[side] = clf
            self.accuracy[side] = float(clf.score(self.half(xte, side), yte))

    @staticmethod
    def half(x: np.ndarray, side: str) -> np.ndarray:
        """`[N, 256]` (or `[N, 1, 16, 16]`) pixels -> `[N, 128]`: the left or right 8 columns."""
        img = np.asarray(x, dtype=np.float64).reshape(len(x), 16, 16)
        return (img[:, :, :8] if side == "left" else img[:, :, 8:]).reshape(len(x), -1)

    def predict(self, x: np.ndarray, side: str) -> np.ndarray:
        return self.models[side].predict(self.half(np.clip(x, -1, 1), side))


CLASSIFIER_FILE = "mnist16-mlp256.safetensors"


def load_classifier(path: str | os.PathLike | None = None) -> DigitClassifier:
    """The shipped digit classifier (`checkpoints/toy-classifier/`: the weights `digit_classifier()` trains, saved
    once, so every machine scores with the same classifier). `path`: that folder or its file; where it is
    missing, the classifier is trained here (about 10 s, then cached) and a message says so."""
    from pathlib import Path

    from safetensors.numpy import load_file

    p = Path(path) if path else None
    if p is not None and p.is_dir():
        p = p / CLASSIFIER_FILE
    if p is not None and p.is_file():
        w = load_file(str(p))
        return DigitClassifier(w, float(w["heldout_accuracy"][0]))
    import sys

    print(f"vlhooks: the shipped digit classifier {path} is missing; training one on the train split (once, then "
          "cached).", file=sys.stderr)
    return digit_classifier()[0]


def export_classifier(folder: str | os.PathLike) -> str:
    """Write the classifier `digit_classifier()` gives to `folder/mnist16-mlp256.safetensors` (what ships)."""
    from pathlib import Path

    from safetensors.numpy import save_file

    clf, acc = digit_classifier()
    out = Path(folder) / CLASSIFIER_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in clf.w.items()}, str(out))
    return str(out)


def evaluate(dit_path: str, per_class: int = 20, cfg: float = 3.0, steps: int = 25, seed: int = 123,
             classifier: str | None = "checkpoints/toy-classifier") -> dict:
    from tqdm.auto import tqdm

    import vlhooks as vh
    from vlhooks.encoders import load_minilm
    from vlhooks.models import load_transformer
    from vlhooks.sampling import euler_sample

    t0 = time.time()
    dit = load_transformer(dit_path)
    fam = vh.family_for(dit)
    enc = load_minilm()
    caps = enc.tokens([f"a handwritten digit {d}" for d in DIGITS])
    empty = enc.tokens([""])
    clf = load_classifier(classifier)
    clf_acc = clf.heldout_accuracy
    correct = []
    for k in tqdm(range(10), desc="sampling digits", unit="class"):
        noise = torch.randn((per_class, 1, 16, 16), generator=torch.Generator().manual_seed(seed + k))
        guided = {} if cfg == 1.0 else {"uncond": empty.tokens.expand(per_class, -1, -1),
                                        "uncond_mask": empty.mask.expand(per_class, -1)}
        x = euler_sample(fam, dit, noise, caps.tokens[k : k + 1].expand(per_class, -1, -1),
                         caps.mask[k : k + 1].expand(per_class, -1), steps=steps, cfg=cfg, **guided)
        pred = clf.predict(x.reshape(per_class, -1).clamp(-1, 1).numpy())
        correct.append(float((pred == k).mean()))
    return {"class_accuracy": float(np.mean(correct)), "per_class": correct, "samples": 10 * per_class,
            "cfg": cfg, "steps": steps, "seed": seed, "classifier_heldout_accuracy": clf_acc,
            "seconds": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlhooks.eval.toy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dit", default="checkpoints/toy-dit/final")
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--steps", type=int, default=25)
    a = p.parse_args(argv)
    print(json.dumps(evaluate(a.dit, a.per_class, a.cfg, a.steps), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
