"""The README's main job and the CLI, end to end."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_writes_grid_and_summary(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "vlhooks", "demo", "--out", str(out), "--steps", "3"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["removal_restores_bit_identical"] is True
    changes = summary["mean_abs_change_vs_unpatched"]
    assert changes["unpatched"] == 0.0 and changes["zero-shot joint"] > 0 and changes["zero-shot decoupled"] > 0
    from PIL import Image

    assert Image.open(out / "side_by_side.png").size[0] > 500


def test_sites_lists_full_size_flux_blocks():
    r = subprocess.run([sys.executable, "-m", "vlhooks", "sites", "flux"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [l for l in r.stdout.splitlines() if l.strip() and not l.startswith("preset")]
    assert len(lines) == 57 and lines[0].split()[-1] == "transformer_blocks.0"
    assert "preset 'double': 19 blocks" in r.stdout and "preset 'single': 38 blocks" in r.stdout


@pytest.mark.slow
def test_compare_command_prints_table_and_report_path(tmp_path):
    """The README's main job through the command line (fewer references, seeds and steps)."""
    out = tmp_path / "cmp"
    r = subprocess.run([sys.executable, "-m", "vlhooks", "compare", "--out", str(out), "--seeds", "0", "--references",
                        "2", "--steps", "2", "--arms", "none", "zero-shot"], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| `zero-shot` |" in r.stdout and f"Report: {out / 'report.html'}" in r.stdout
    assert "pairs.png" in r.stdout and "strength.png" in r.stdout  # the figures it wrote, named
    data = json.loads((out / "metrics.json").read_text())
    assert list(data["arms"]) == ["none", "zero-shot"] and data["arms"]["none"]["class_match"]["n"] == 1
    bad = subprocess.run([sys.executable, "-m", "vlhooks", "compare", "--arms", "nonsense", "--out", str(out)],
                         capture_output=True, text=True, timeout=900)
    assert bad.returncode == 2 and "unknown arm 'nonsense'" in bad.stderr


def test_train_help_is_short_and_names_the_recipes(capsys):
    from vlhooks.__main__ import main

    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) < 60 and "configs/tiny/projection.yaml" in out and "--help-all" in out


def test_unknown_command_is_named(capsys):
    from vlhooks.__main__ import main

    assert main(["comapre"]) == 2
    assert "unknown command 'comapre'; did you mean 'compare'?" in capsys.readouterr().err


def test_every_public_name_is_its_object_after_every_submodule_is_imported():
    """A submodule named like a public name would shadow it once imported (`vlhooks.blend` the module instead of
    the function); every name must still resolve to what its module defines, in a fresh interpreter."""
    import subprocess
    import sys

    code = (
        "import importlib, pkgutil, vlhooks\n"
        "for m in pkgutil.walk_packages(vlhooks.__path__, 'vlhooks.'):\n"
        "    if not m.name.startswith(('vlhooks.testing', 'vlhooks.train', 'vlhooks.eval', 'vlhooks.__main__')):\n"
        "        importlib.import_module(m.name)\n"
        "bad = [n for n, mod in vlhooks._EXPORTS.items()\n"
        "       if getattr(vlhooks, n) is not getattr(importlib.import_module('vlhooks.' + mod), n)]\n"
        "assert not bad, bad\n"
        "print(len(vlhooks._EXPORTS))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.strip()) >= 30
