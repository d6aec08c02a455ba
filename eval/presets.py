"""Do some blocks carry a reference's layout and others its appearance? The measurement behind the block presets.

InstantStyle found, for SDXL's UNet, one block that carries layout and one that carries style; Stable Flow names
"vital layers" of Flux. A style / composition preset is shipped for a family only where this kind of measurement
supports it. In the toy world a trained adapter is injected into each single main block and into all of them, on
the same held-out references and seeds, and three things are read from the samples:

- `class_match`: the sample shows the reference's class (its content and layout);
- `ink_correlation`: across references, the Pearson correlation of the reference's ink (mean brightness, a proxy
  for stroke width) with the sample's, each taken relative to its reference class's mean (a "1" has less ink
  than an "8" whatever the writer): its appearance, not its class;
- `ref_similarity`: DINOv2-S cosine to the reference (both).

A block that is a "style" block would keep `ink_correlation` while losing `class_match`.

    python -m vlhooks.eval.presets [--adapter checkpoints/toy-projection/final] [--references 50] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def measure(adapter_path: str, references: int = 50, seeds: list[int] | None = None) -> dict:
    import vlhooks as vh
    from vlhooks.images import to_uint8

    from .arms import Arm
    from .config import load_config
    from .metrics import Scorer
    from .toy_world import ToyWorld

    seeds = seeds or [0, 1]
    cfg = load_config(None)
    cfg["references"] = {**cfg["references"], "count": references}
    adapter = vh.load_adapter(adapter_path)
    world = ToyWorld(cfg)
    scorer = Scorer(world.real_images, world.score_size)
    ref_dino = scorer.dino_embed(world.ref_small)  # [R, 384]
    labels = world.ref_labels

    def within_class(v: np.ndarray) -> np.ndarray:  # [R]: minus the mean over references of the same class
        return v - np.asarray([v[labels == k].mean() for k in labels])

    ref_ink = within_class(np.asarray([a.mean() for a in world.ref_small], dtype=np.float64))  # [R]
    arm = Arm("adapter", "adapter", adapter_path)
    sites = vh.list_sites(world.dit)
    own = adapter.config.sites or sites  # a kv or LoRA adapter has weights for its own blocks only
    sets = {f"{name} only": [i] for i, name in enumerate(sites) if name in own}
    sets["all its blocks"] = [i for i, name in enumerate(sites) if name in own]
    out: dict = {"adapter": adapter_path, "references": references, "seeds": seeds, "sets": {}}
    for name, blocks in sets.items():
        x = world.generate(arm, cfg["prompts"][0], seeds, adapter, blocks=blocks)  # [S * R, 1, 16, 16]
        images = [to_uint8(xi) for xi in x]
        ink = np.asarray([a.mean() for a in images], dtype=np.float64).reshape(len(seeds), -1)
        d = scorer.dino_embed(images).view(len(seeds), -1, 384)
        out["sets"][name] = {
            "blocks": blocks,
            "class_match": float(world.label_metrics(x)["class_match"].mean()),
            "ink_correlation": float(np.mean([np.corrcoef(ref_ink, within_class(k))[0, 1] for k in ink])),
            "ref_similarity": float((d * ref_dino[None]).sum(-1).mean()),
        }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlhooks.eval.presets", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", default="checkpoints/toy-projection/final")
    p.add_argument("--references", type=int, default=50)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    a = p.parse_args(argv)
    from vlhooks.assets import shipped

    r = measure(str(shipped(a.adapter, "adapter")), a.references, a.seeds)
    print("| blocks | class match | ink correlation | DINOv2 ref. similarity |\n|---|---|---|---|")
    for name, m in r["sets"].items():
        print(f"| {name} | {m['class_match']:.3f} | {m['ink_correlation']:.3f} | {m['ref_similarity']:.3f} |")
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
