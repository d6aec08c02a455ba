"""Crashes and concurrency: `vlhooks train` killed with SIGKILL (inside a checkpoint write, inside an adapter write,
at a random moment) resumes with `--ckpt_path` to the weights of an uninterrupted run, bit for bit, across
successive resumes, and no temporary file outlives a resume; a run folder holding a finished run is never
trained over silently; dataset caches and feature caches survive kills and concurrent builders.

The kills inside a write are deterministic: `tests/crash_shim/sitecustomize.py` (on the subprocess's PYTHONPATH)
writes the n-th file of a kind, cuts it to half and SIGKILLs the process (`VLHOOKS_TEST_FAULT`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SHIM = ROOT / "tests" / "crash_shim"
RECIPE = "configs/tiny/lora.yaml"
STEPS, EVERY = 12, 2


def _env(fault: str | None = None) -> dict:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(SHIM), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    env.pop("VLHOOKS_TEST_FAULT", None)
    if fault:
        env["VLHOOKS_TEST_FAULT"] = fault
    return env


def _train_args(tmp: Path, run: str, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vlhooks", "train", "--config", str(ROOT / RECIPE), "--trainer.max_steps",
            str(steps), "--model.run_name", run, "--model.checkpoint_root", str(tmp / "ckpt"),
            "--model.save_every_n_steps", str(EVERY), "--data.cache_dir", str(tmp / "cache"),
            "--trainer.enable_progress_bar", "false", "--trainer.logger", "false", *extra]


def _train(tmp, run, steps, *extra, fault=None):
    return subprocess.run(_train_args(tmp, run, steps, *extra), capture_output=True, text=True, timeout=600,
                          cwd=tmp, env=_env(fault))


def _weights(folder: Path) -> dict:
    return load_file(str(folder / "adapter_model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _temporaries(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")
                  if "vlhooks-tmp" in p.name or ".tmp" in p.name or (p.name.startswith(".") and p.is_dir()))


def _tree(run_dir: Path) -> dict:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    r = _train(tmp, "straight", STEPS)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, tmp / "ckpt" / "straight"


@pytest.mark.slow
def test_killed_runs_resume_to_the_same_adapter(straight, tmp_path):
    """Killed inside a checkpoint write, then (resumed by explicit path) inside an adapter write, then (resumed with
    `last`) at a random moment; the last resume ends on the straight run's weights, every `step-N/` too."""
    (_, ref), run = straight, tmp_path / "ckpt" / "killed"
    # 1. SIGKILL in the middle of writing the 3rd checkpoint (step 6): last.ckpt stays at step 4
    r = _train(tmp_path, "killed", STEPS, fault="checkpoint:kill:3")
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert [p for p in (run / "lightning").iterdir() if p.name != "last.ckpt"], "a half-written checkpoint is left"
    # 2. resume from the explicit path (read through the safetensors reader, no pickle); SIGKILL in the middle
    #    of writing the 2nd adapter folder (step-8/): a temporary folder is left
    r = _train(tmp_path, "killed", STEPS, "--ckpt_path", str(run / "lightning" / "last.ckpt"),
               fault="adapter:kill:2")
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert "Restored all states" in r.stdout + r.stderr and "removed 1 temporary" in r.stderr, r.stderr[-3000:]
    assert _temporaries(run), "the kill left a temporary adapter folder"
    # 3. resume with `last`, every checkpoint write slowed; SIGKILL from outside at a random moment of training
    rng = random.Random(int(os.environ.get("VLHOOKS_CRASH_SEED", "0")))
    before = (run / "lightning" / "last.ckpt").stat().st_mtime_ns
    p = subprocess.Popen(_train_args(tmp_path, "killed", STEPS, "--ckpt_path", "last"), cwd=tmp_path,
                         env=_env("checkpoint:sleep:0:0.3"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while p.poll() is None and time.time() < deadline and (run / "lightning" / "last.ckpt").stat().st_mtime_ns == before:
        time.sleep(0.02)  # until the resumed run has written a checkpoint: it is training
    time.sleep(rng.uniform(0.0, 0.6))
    p.send_signal(signal.SIGKILL)
    err = p.communicate(timeout=60)[1].decode()
    assert "removed" in err and "temporary" in err, err[-3000:]
    # 4. resume with `last` to the end
    r = _train(tmp_path, "killed", STEPS, "--ckpt_path", "last")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _same(_weights(run / "final"), _weights(ref / "final"))
    for n in range(EVERY, STEPS + 1, EVERY):
        assert _same(_weights(run / f"step-{n}"), _weights(ref / f"step-{n}")), n
    assert _temporaries(run) == [], "no temporary file outlives a resume"
    assert sorted(p.name for p in (run / "lightning").iterdir()) == ["last.ckpt"]
    from vlhooks.train.checkpoint_io import load_checkpoint_file

    a, b = load_checkpoint_file(ref / "lightning" / "last.ckpt"), load_checkpoint_file(run / "lightning" / "last.ckpt")
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]) == (STEPS, STEPS)


@pytest.mark.slow
def test_a_finished_run_is_not_trained_over(straight, tmp_path):
    """Re-running a finished run without `--ckpt_path` is refused before anything is written (the old code
    replaced its `final/` and put a `last-v1.ckpt` beside its `last.ckpt`); `--overwrite` replaces it."""
    import shutil

    src, _ = straight
    shutil.copytree(src / "ckpt" / "straight", tmp_path / "ckpt" / "straight")
    run = tmp_path / "ckpt" / "straight"
    before = _tree(run)
    r = _train(tmp_path, "straight", 4)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [l for l in r.stderr.splitlines() if "error" in l.lower()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    for fix in ("--ckpt_path last", "--model.run_name", "--overwrite", str(run)):
        assert fix in lines[0], lines[0]
    assert _tree(run) == before, "nothing was written"
    r = _train(tmp_path, "straight", 4, "--overwrite")
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in (run / "lightning").iterdir()) == ["last.ckpt"]
    assert sorted(p.name for p in run.glob("step-*")) == ["step-2", "step-4"]
    assert _tree(run)["final/adapter_model.safetensors"] != before["final/adapter_model.safetensors"]


# ------------------------------------------------------------------------------------------------ dataset caches
CACHE_SCRIPT = """
import sys, yaml
from vlhooks.train.data import PairsDataModule
data = yaml.safe_load(open(sys.argv[1]))["data"]
dm = PairsDataModule(**data, cache_dir=sys.argv[2])
dm.prepare_data()
dm.setup("fit")
print("rows", len(dm.dataset))
"""


def _cache_proc(tmp, cache, fault=None):
    return subprocess.Popen([sys.executable, "-c", CACHE_SCRIPT, str(ROOT / RECIPE), str(cache)], cwd=tmp,
                            env=_env(fault), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_dataset_cache_concurrent_builders_and_a_killed_build(tmp_path):
    cache = tmp_path / "cache"
    # two processes build the same cache at once (each write slowed, so they overlap): one cache, both use it
    procs = [_cache_proc(tmp_path, cache, "cache:sleep:0:1.5") for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "rows 4" in out, err[-3000:]
    built = [p.name for p in cache.iterdir() if not p.name.endswith(".lock")]
    assert len(built) == 1 and not built[0].startswith("."), sorted(cache.iterdir())
    # a build killed after writing its (private, temporary) folder: the next build redoes it
    other = tmp_path / "other"
    p = _cache_proc(tmp_path, other, "cache:killafter:1")
    p.communicate(timeout=300)
    assert p.returncode == -signal.SIGKILL
    assert [q.name for q in other.iterdir() if q.name.startswith(".") and not q.name.endswith(".lock")]
    from vlhooks.train.data import PairsDataModule

    data = yaml.safe_load((ROOT / RECIPE).read_text())["data"]
    dm = PairsDataModule(**data, cache_dir=str(other))
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.dataset) == 4
    assert [q.name for q in other.iterdir() if not q.name.endswith(".lock")] == [dm.cache_path().name]


# ------------------------------------------------------------------------------------------------ feature caches
EXTRACT_SCRIPT = """
import sys
from vlhooks.feature_cache import extract_main
sys.exit(extract_main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_two_extracts_into_one_folder_end_with_one_valid_cache(tmp_path):
    from PIL import Image

    from test_feature_cache import tiny_clip_folder
    from vlhooks.feature_cache import load_features

    folder, _, _ = tiny_clip_folder(tmp_path)
    imgs = []
    for i in range(6):
        a = np.random.default_rng(i).integers(0, 256, (30, 40, 3), dtype=np.uint8)
        imgs.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(a).save(imgs[-1])
    out = tmp_path / "feats"
    sets = [imgs[:4], imgs[2:]]  # overlapping inputs
    procs = [subprocess.Popen([sys.executable, "-c", EXTRACT_SCRIPT, "--encoder", str(folder), "--out", str(out),
                               "--no-progress", *s], cwd=tmp_path, env=_env("feature:sleep:0:0.3"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in sets]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    index = json.loads((out / "index.json").read_text())
    assert sorted(index) == sorted(imgs)
    for im in imgs:
        assert load_features(out / index[im]).tokens.shape[-1] == 32
    assert sorted(p.name for p in out.iterdir()) == sorted(["index.json", *set(index.values())])
