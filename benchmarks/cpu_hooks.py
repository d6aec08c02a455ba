"""CPU: the Python overhead of vlhooks' hooks per block per step, patched but outside the window vs plain.

Tiny models (the hooks' cost does not depend on model size), interleaved timings, median over many calls.
    python benchmarks/cpu_hooks.py          # updates benchmarks/results.json: cpu_hook_overhead_us_per_block
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import vlhooks as vh  # noqa: E402
from tiny import build, caption_width, inputs, output  # noqa: E402

torch.set_num_threads(1)
OUT = Path(__file__).with_name("results.json")


def measure(family: str, reps: int = 1000) -> tuple[float, float, int]:
    model = build(family)
    kw = inputs(family, progress=0.9)
    feats = vh.VLFeatures(torch.randn(1, 8, caption_width(family)))
    n_blocks = len(vh.list_sites(model))
    plain, patched = [], []
    cfg = vh.InjectionConfig(blocks=list(range(n_blocks)), window=(0.0, 0.5))  # progress 0.9: outside
    with torch.no_grad():
        for _ in range(20):
            output(model, kw)
        for _ in range(reps // 20):  # alternate blocks of 20 calls, patched then plain
            handle = vh.apply_injection(model, feats, cfg)
            for _ in range(20):
                t0 = time.perf_counter()
                output(model, kw)
                patched.append(time.perf_counter() - t0)
            handle.remove()
            for _ in range(20):
                t0 = time.perf_counter()
                output(model, kw)
                plain.append(time.perf_counter() - t0)
    return statistics.median(plain) * 1e6, statistics.median(patched) * 1e6, n_blocks


if __name__ == "__main__":
    rows = {}
    for fam in ("flux", "z_image", "sd3"):
        p, q, n = measure(fam)
        rows[fam] = (q - p) / n
        print(f"{fam:8s} plain {p:9.1f} us  patched (outside window) {q:9.1f} us  {n} blocks  "
              f"overhead {(q - p) / n:6.1f} us/block/step  ratio {q / p:.3f}")
    merged = json.loads(OUT.read_text()) if OUT.exists() else {}
    merged["cpu_hook_overhead_us_per_block"] = round(statistics.median(rows.values()), 1)
    merged["cpu_hook_overhead_us_per_block_by_family"] = {k: round(v, 1) for k, v in rows.items()}
    OUT.write_text(json.dumps(merged, indent=2, sort_keys=True))
