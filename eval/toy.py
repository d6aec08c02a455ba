"""The toy world's own check: how often does the pretrained toy DiT draw the digit its caption names?

A scikit-learn MLP trained on real MNIST-5k digits (4000, stratified; 1000 held out, where its own accuracy is
measured) classifies samples drawn with fixed seeds: 20 per digit, classifier-free guidance scale `cfg`
(`v = v_uncond + cfg * (v_cond - v_uncond)`, the empty caption as unconditional), Euler over sigma 1 -> 0.

    python -m vlhooks.eval.toy --dit checkpoints/toy-dit/final        # prints JSON
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def mnist16(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MNIST-5k at 16x16 in [-1, 1] (area downsampling), split 4000 / 1000 stratified."""
    from sklearn.model_selection import train_test_split

    from vlhooks.train.data import load_source

    raw = load_source("mnist")
    x = torch.from_numpy(np.stack(raw["image"])).float()[:, None] / 127.5 - 1.0  # [5000, 1, 28, 28]
    x = torch.nn.functional.interpolate(x, size=(16, 16), mode="area")[:, 0].numpy()
    y = np.asarray(raw["label"])
    return train_test_split(x.reshape(len(x), -1), y, test_size=1000, stratify=y, random_state=seed)


def digit_classifier(seed: int = 0):
    """`(classifier, held-out accuracy)`; the classifier takes `[N, 256]` pixels in [-1, 1]."""
    from sklearn.neural_network import MLPClassifier

    xtr, xte, ytr, yte = mnist16(seed)
    clf = MLPClassifier((256,), alpha=1e-3, max_iter=200, random_state=seed).fit(xtr, ytr)
    return clf, float(clf.score(xte, yte))


@torch.no_grad()
def sample(family, dit, caption: torch.Tensor, mask: torch.Tensor, empty: torch.Tensor, empty_mask: torch.Tensor,
           n: int, cfg: float, steps: int, seed: int, shape=(1, 16, 16)) -> torch.Tensor:
    """`n` samples for one caption `[1, L, C]`, CFG against `empty` `[1, L0, C]`. Returns `[n, C, H, W]`."""
    x = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))
    sig = torch.linspace(1.0, 0.0, steps + 1)
    cap, cm = caption.expand(n, -1, -1), mask.expand(n, -1)
    emp, em = empty.expand(n, -1, -1), empty_mask.expand(n, -1)
    for i in range(steps):
        s = sig[i].expand(n)
        v = family.velocity(dit, x, s, cap, cm)
        if cfg != 1.0:
            vu = family.velocity(dit, x, s, emp, em)
            v = vu + cfg * (v - vu)
        x = x + (sig[i + 1] - sig[i]) * v
    return x


def evaluate(dit_path: str, per_class: int = 20, cfg: float = 3.0, steps: int = 25, seed: int = 123) -> dict:
    from diffusers import ZImageTransformer2DModel
    from tqdm.auto import tqdm

    import vlhooks as vh
    from vlhooks.encoders import load_minilm

    t0 = time.time()
    dit = ZImageTransformer2DModel.from_pretrained(dit_path).eval()
    fam = vh.family_for(dit)
    enc = load_minilm()
    caps = enc.tokens([f"a handwritten digit {d}" for d in DIGITS])
    empty = enc.tokens([""])
    clf, clf_acc = digit_classifier()
    correct = []
    for k in tqdm(range(10), desc="sampling digits", unit="class"):
        m = caps.mask[k : k + 1]
        x = sample(fam, dit, caps.tokens[k : k + 1], m, empty.tokens, empty.mask, per_class, cfg, steps, seed + k)
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
