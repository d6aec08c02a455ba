"""GPU check of the training command (one CUDA device): `vlhooks train` on the tiny recipes with bf16-mixed, under
Lightning's default strategy and under `fsdp` (one device: the wrap policy, mixed precision, gathered exports and
the safetensors resume path on CUDA; sharding across devices needs several GPUs).

For each (recipe, strategy): a straight run of 2N steps, and N steps then `--ckpt_path last` to 2N; the two `final/`
adapters are compared (GPU kernels may be nondeterministic, so the table prints the largest difference rather than
asserting bit equality), the DiT stays frozen, and `final/` is loaded and applied on the GPU. Prints a table last.

    python benchmarks/gpu_train_check.py DATA_FOLDER     # a folder with captions.jsonl (`source: folder`)
    CHECK_STRATEGIES=fsdp CHECK_RECIPES=lora python benchmarks/gpu_train_check.py DATA_FOLDER   # a subset
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

import vlhooks as vh
from vlhooks.train.module import build_dit

ROOT = Path(__file__).resolve().parents[1]
STEPS = 10
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run of this script (precision 32)


def train(recipe: str, strategy: str, root: Path, steps: int, resume: bool) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "vlhooks", "train", "--config", str(ROOT / f"configs/tiny/{recipe}.yaml"),
            "--trainer.accelerator", "gpu" if DEV == "cuda" else "cpu", "--trainer.devices", "1",
            "--trainer.precision", "bf16-mixed" if DEV == "cuda" else "32",
            "--trainer.strategy", strategy, "--trainer.max_steps", str(steps), "--trainer.enable_progress_bar",
            "false", "--model.checkpoint_root", str(root), "--data.source", "folder", "--data.path", DATA,
            "--data.cache_dir", str(root / "cache")]
    if resume:
        args += ["--ckpt_path", "last"]
    return subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=root,
                          env={**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"})


def check(recipe: str, strategy: str) -> tuple[str, ...]:
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        a, b = Path(a), Path(b)
        runs = [train(recipe, strategy, a, 2 * STEPS, False), train(recipe, strategy, b, STEPS, False),
                train(recipe, strategy, b, 2 * STEPS, True)]
        for r in runs:
            if r.returncode != 0:
                print(r.stdout[-2000:], r.stderr[-4000:], flush=True)
                return recipe, strategy, "FAILED", "", "", ""
        restored = "Restored all states" in runs[2].stdout + runs[2].stderr
        name = f"tiny-{recipe}"
        fa, fb = (load_file(str(p / name / "final" / "adapter_model.safetensors")) for p in (a, b))
        diff = max((fa[k].float() - fb[k].float()).abs().max().item() for k in fa)
        adapter = vh.load_adapter(a / name / "final")
        spec = yaml.safe_load((ROOT / f"configs/tiny/{recipe}.yaml").read_text())["model"]["dit"]
        dit = build_dit(spec).to(DEV).eval()
        kw = dict(x=[torch.randn(3, 1, 16, 16, device=DEV)], t=torch.tensor([0.5], device=DEV),
                  cap_feats=[torch.randn(5, 16, device=DEV)], return_dict=False)
        feats = vh.VLFeatures(torch.randn(1, 16, adapter.config.feature_width, device=DEV))
        with torch.no_grad():
            base = dit(**kw)[0][0]
            with vh.inject(dit, feats, adapter=adapter.to(DEV)):
                out = dit(**kw)[0][0]
            again = dit(**kw)[0][0]
        applies = (not torch.equal(out, base)) and torch.equal(again, base)
        return recipe, strategy, "ok", f"{restored}", f"{diff:.2e}", f"{applies}"


if __name__ == "__main__":
    DATA = str(Path(sys.argv[1]).resolve())
    print(torch.__version__, torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu (dry run)", flush=True)
    strategies = os.environ.get("CHECK_STRATEGIES", "auto,fsdp").split(",")
    recipes = os.environ.get("CHECK_RECIPES", "projection,lora").split(",")
    rows = [check(recipe, strategy) for strategy in strategies for recipe in recipes]
    print("\n| recipe | strategy | runs | resume restored | max |straight - resumed| | final/ loads and applies |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
