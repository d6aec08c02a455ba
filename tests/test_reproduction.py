"""The toy world's DiT is reproducible: rerunning its recipe reaches the card's class accuracy.

This reruns the whole pretraining recipe (1400 steps, about 15 minutes on 2 CPU cores), so it is the slowest test;
it runs in CI all the same, because the embedded default stands on this checkpoint.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CARD = ROOT / "checkpoints/toy-dit/README.md"


def card_accuracy_and_tolerance() -> tuple[float, float]:
    text = CARD.read_text()
    acc = float(re.search(r"\| CFG scale 3 [^|]*\| ([\d.]+) %", text).group(1))
    tol = float(re.search(r"tolerance[^.]*?\+-(\d+(?:\.\d+)?) points", text).group(1))
    return acc / 100.0, tol / 100.0


@pytest.mark.slow
def test_pretraining_recipe_reproduces_the_shipped_accuracy(tmp_path):
    shipped, tol = card_accuracy_and_tolerance()
    r = subprocess.run([sys.executable, "-m", "vlhooks", "pretrain", "--config", str(ROOT / "configs/toy/pretrain.yaml"),
                        "--model.checkpoint_root", str(tmp_path), "--trainer.enable_progress_bar", "false"],
                       capture_output=True, text=True, timeout=3600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    from vlhooks.eval.toy import evaluate

    result = evaluate(str(tmp_path / "toy-dit" / "final"))  # the card's protocol: 200 samples, CFG 3, 25 steps
    assert abs(result["class_accuracy"] - shipped) <= tol, (result, shipped, tol)
