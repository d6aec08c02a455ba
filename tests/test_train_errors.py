"""Bad training options, data, caches and checkpoints: one `error:` line naming the fix (exit code 2), a named
`VLHooksError` subclass in code, and nothing written. In one process (`vlhooks.train.cli.main`), on the tiny
recipes (seconds); `tests/test_crash.py` checks the exit code of the real command."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from vlhooks.errors import CheckpointError, DataError, EncoderError, TrainingError
from vlhooks.train.checkpoint_io import check_run_dir, checkpoint_metadata, load_checkpoint_file
from vlhooks.train.cli import main
from vlhooks.train.data import PairsDataModule, load_source

ROOT = Path(__file__).resolve().parents[1]
LORA = "configs/tiny/lora.yaml"
DATA = yaml.safe_load((ROOT / LORA).read_text())["data"]


def _argv(tmp, *extra, recipe=LORA, steps=2):
    return ["--config", str(ROOT / recipe), "--trainer.max_steps", str(steps), "--trainer.enable_progress_bar",
            "false", "--trainer.logger", "false", "--model.checkpoint_root", str(tmp / "ckpt"), "--data.cache_dir",
            str(tmp / "cache"), *extra]


def _error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if "error" in l.lower()]
    assert len(lines) == 1 and lines[0].startswith("vlhooks train: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")  # these runs check errors and files, not logging


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A 2-step tiny LoRA run (its `lightning/last.ckpt`)."""
    tmp = tmp_path_factory.mktemp("lora")
    with pytest.MonkeyPatch.context() as mp:  # wandb off for this run only (a module-wide setting would leak)
        mp.setenv("WANDB_MODE", "disabled")
        assert main(_argv(tmp)) == 0
    return tmp, tmp / "ckpt" / "tiny-lora"


# ------------------------------------------------------------------------------------------------ options
@pytest.mark.parametrize("args,fix", [
    (["--model.lr=-1"], "model.lr must be a number > 0, got -1.0; use e.g. 1e-4"),
    (["--trainer.max_steps=-5"], "--trainer.max_steps must be the number of steps to train"),
    (["--data.batch_size=0"], "data.batch_size must be a positive integer, got 0"),
    (["--model.adapter={type: foo}"], "lora, projection, got 'foo'; e.g. model.adapter: {type: projection"),
    (["--model.drop_image=2"], "model.drop_image must be a number >= 0 and <= 1, got 2.0"),
    (["--model.drop_image=0.5", "--model.drop_text=0.6"], "drop_image + drop_text + drop_both must be at most 1"),
    (["--model.dit={class_name: ZImageTransformer2DModl}"], "did you mean 'ZImageTransformer2DModel'"),
    (["--model.dit.config.n_layer=3"], "model.dit.config has unknown key 'n_layer' (did you mean 'n_layers'?)"),
    (["--model.ema_decay=1.5"], "model.ema_decay must be a number > 0 and < 1"),
    (["--model.timestep_sampling=normal"], "model.timestep_sampling must be 'uniform' or 'logit_normal'"),
    (["--data.source=nope"], "data.source must be one of skimage, mnist, folder, dataset"),
    (["--ckpt_path", "last"], "--ckpt_path last: no checkpoint at "),
    (["--overwrite", "--ckpt_path", "last"], "pass only one of them"),
])
def test_bad_option_prints_one_error_line_and_writes_nothing(tmp_path, capsys, args, fix):
    assert main(_argv(tmp_path, *args)) == 2
    line = _error(capsys)
    assert fix in line, line
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "cache").exists()
    if "last.ckpt" in fix or "--ckpt_path last:" in fix:
        assert str(tmp_path / "ckpt" / "tiny-lora" / "lightning" / "last.ckpt") in line  # where it looked


def test_checkpoint_root_under_a_file_or_unwritable(tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("mine")
    assert main(_argv(tmp_path, "--model.checkpoint_root", str(tmp_path / "afile" / "runs"))) == 2
    line = _error(capsys)
    assert "is under" in line and "which is a file" in line and "set --model.checkpoint_root to a folder" in line
    assert (tmp_path / "afile").read_text() == "mine"
    locked = tmp_path / "readonly"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != locked and real(p, mode, **kw))
    with pytest.raises(TrainingError, match="is not writable by this user; set --model.checkpoint_root"):
        check_run_dir(locked / "run", None)


# ------------------------------------------------------------------------------------------------ checkpoints
def test_explicit_ckpt_path_resumes_through_the_safetensors_reader(lora_run, tmp_path, capsys):
    _, run = lora_run
    copy = tmp_path / "ckpt" / "tiny-lora"
    shutil.copytree(run, copy)
    assert main(_argv(tmp_path, "--ckpt_path", str(copy / "lightning" / "last.ckpt"), steps=3)) == 0
    assert load_checkpoint_file(copy / "lightning" / "last.ckpt")["global_step"] == 3
    assert sorted(p.name for p in (copy / "lightning").iterdir()) == ["last.ckpt"]


def test_truncated_or_foreign_checkpoints_are_named(lora_run, tmp_path, capsys):
    _, run = lora_run
    bad = tmp_path / "bad.ckpt"
    data = (run / "lightning" / "last.ckpt").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"bad\.ckpt is truncated or not a safetensors file"):
        load_checkpoint_file(bad)
    assert main(_argv(tmp_path, "--ckpt_path", str(bad))) == 2
    assert str(bad) in _error(capsys)
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(CheckpointError, match=r"PyTorch \(pickle\) checkpoint.*no pickle"):
        checkpoint_metadata(bad)
    with pytest.raises(CheckpointError, match="not a vlhooks training checkpoint"):
        checkpoint_metadata(run / "final" / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        checkpoint_metadata(tmp_path / "missing.ckpt")
    # a truncated last.ckpt of the run itself, with --ckpt_path last
    copy = tmp_path / "ckpt" / "tiny-lora"
    shutil.copytree(run, copy)
    (copy / "lightning" / "last.ckpt").write_bytes(data[:100])
    assert main(_argv(tmp_path, "--ckpt_path", "last")) == 2
    assert "last.ckpt is truncated" in _error(capsys)


def test_resuming_another_adapter_is_refused_before_anything_is_written(lora_run, tmp_path, capsys):
    _, run = lora_run
    copy = tmp_path / "ckpt" / "tiny-lora"
    shutil.copytree(run, copy)
    before = {p: p.stat().st_mtime_ns for p in copy.rglob("*")}
    assert main(_argv(tmp_path, "--ckpt_path", "last", "--model.adapter={type: kv}")) == 2
    line = _error(capsys)
    assert "written by a run training a 'lora' adapter, but this run trains a 'kv' one" in line
    assert "model.adapter.type: lora" in line and "--model.run_name" in line
    assert main(_argv(tmp_path, "--ckpt_path", "last", "--model.adapter.rank=8")) == 2
    assert "of another configuration" in _error(capsys)
    assert {p: p.stat().st_mtime_ns for p in copy.rglob("*")} == before


def test_stale_temporaries_are_removed_and_nothing_else(lora_run, tmp_path, capsys):
    _, run = lora_run
    copy = tmp_path / "ckpt" / "tiny-lora"
    shutil.copytree(run, copy)
    stale = [copy / ".step-4.k3j2_x9a", copy / ".final.old-999999", copy / ".step-2.vlhooks-tmp-999999-ab12cd34"]
    for d in stale:
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"half")
    (copy / "lightning" / ".last.ckpt.tmp-999999").write_bytes(b"half")
    keep = [copy / ".mine", copy / "notes.final.txt", copy / "lightning" / "notes.tmp-1"]
    keep[0].mkdir()
    for f in keep[1:]:
        f.write_text("user file")
    assert main(_argv(tmp_path, "--ckpt_path", "last", steps=3)) == 0
    assert "removed 4 temporary file(s)" in capsys.readouterr().err
    assert not any(p.exists() for p in stale) and not (copy / "lightning" / ".last.ckpt.tmp-999999").exists()
    assert all(p.exists() for p in keep)


# ------------------------------------------------------------------------------------------------ data
def _folder(tmp_path, lines, name="captions.jsonl", images=("a.png", "b.png")):
    root = tmp_path / "imgs"
    root.mkdir(exist_ok=True)
    for i, f in enumerate(images):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f)
    (root / name).write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("lines,match", [
    (['{"file": "a.png", "caption": "a"}', '{"file": "b.png", caption: "b"}'],
     r"captions\.jsonl:2: not valid JSON \(Expecting property name"),
    (['{"file": "a.png", "text": "a"}'], r"captions\.jsonl:1: no 'caption' \(the line has \['file', 'text'\]\)"),
    (['{"file": "a.png", "caption": "  "}'], r"captions\.jsonl:1: the caption is empty"),
    (['', '  '], r"captions\.jsonl lists no images"),
    (['{"file": "c.png", "caption": "c"}'], r"captions\.jsonl:1: image file .*c\.png' not found"),
    (['["a.png", "a"]'], r"captions\.jsonl:1: expected an object"),
])
def test_bad_caption_files_name_the_file_and_line(tmp_path, lines, match):
    root = _folder(tmp_path, lines)
    with pytest.raises(DataError, match=match):
        load_source("folder", str(root))


def test_csv_without_a_caption_column_and_a_truncated_image(tmp_path, capsys):
    root = _folder(tmp_path, ["file,text", "a.png,a"], name="captions.csv")
    with pytest.raises(DataError, match=r"captions\.csv:1: the header has no 'caption' column"):
        load_source("folder", str(root))
    (root / "captions.csv").unlink()
    root = _folder(tmp_path, ['{"file": "a.png", "caption": "a"}', '{"file": "b.png", "caption": "b"}'])
    png = (root / "b.png").read_bytes()
    (root / "b.png").write_bytes(png[: len(png) * 2 // 3])
    with pytest.raises(DataError, match=r"image file '.*b\.png' \(listed at .*captions\.jsonl:2\) cannot be read: "
                                         r"image file is truncated"):
        load_source("folder", str(root))
    # through the command: one line, and the run folder holds nothing
    assert main(_argv(tmp_path, "--data.source", "folder", "--data.path", str(root), "--data.limit", "2")) == 2
    assert "b.png" in _error(capsys)
    assert not any((tmp_path / "ckpt").rglob("*.*"))
    with pytest.raises(DataError, match="has no captions.jsonl or captions.csv"):
        load_source("folder", str(tmp_path))


def test_corrupt_dataset_cache_is_named_and_rebuilt(tmp_path):
    dm = PairsDataModule(**DATA, cache_dir=str(tmp_path))
    dm.prepare_data()
    arrow = next(dm.cache_path().glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:1000])
    fresh = PairsDataModule(**DATA, cache_dir=str(tmp_path))
    with pytest.raises(DataError, match=rf"dataset cache {dm.cache_path()} is corrupt \((OSError|ArrowInvalid).*delete the folder, "
                                        "or run again: vlhooks rebuilds"):
        fresh.setup("fit")
    with pytest.warns(UserWarning, match=rf"dataset cache {dm.cache_path()} is corrupt .*rebuilding it"):
        fresh.prepare_data()
    fresh.setup("fit")
    assert len(fresh.dataset) == 4
    # a cache folder that is not ours (other settings) is never deleted
    settings = dm.cache_path() / "settings.json"
    settings.write_text(json.dumps({"someone": "else"}))
    arrow = next(dm.cache_path().glob("*.arrow"))
    arrow.write_bytes(b"")
    with pytest.raises(DataError, match="was not made with these settings.*delete the folder"):
        PairsDataModule(**DATA, cache_dir=str(tmp_path)).prepare_data()
    assert settings.exists()


# ------------------------------------------------------------------------------------------------ feature files
def test_bad_stats_and_feature_files_are_named(tmp_path, capsys):
    from safetensors.torch import save_file

    from test_feature_cache import png, tiny_clip_folder
    from vlhooks.feature_cache import extract_main, load_features, save_features, stats_main
    from vlhooks.features import VLFeatures

    folder, _, _ = tiny_clip_folder(tmp_path)
    img = str(png(tmp_path / "a.png", 0))
    base = ["--encoder", str(folder), "--normalize", "per_dim", "--out", str(tmp_path / "f"), img]
    stats = tmp_path / "stats.safetensors"
    stats.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")  # a truncated header
    assert extract_main(base + ["--stats", str(stats)]) == 2
    err = capsys.readouterr().err
    assert f"--stats file '{stats}' is truncated or not a safetensors file" in err
    save_file({"x": torch.zeros(1)}, str(stats))
    assert extract_main(base + ["--stats", str(stats)]) == 2
    assert f"--stats {stats} is not a vlhooks reference-stats file; make one with `vlhooks stats" in \
        capsys.readouterr().err
    assert extract_main(base + ["--stats", str(tmp_path / "none.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err
    # a truncated cached feature file
    f = save_features(tmp_path / "x.safetensors", VLFeatures(torch.ones(1, 2, 3)), {"a": 1})
    f.write_bytes(f.read_bytes()[:20])
    with pytest.raises(EncoderError, match=r"x\.safetensors' is truncated or not a safetensors file.*--overwrite"):
        load_features(f)
    # `vlhooks stats` never replaces an existing --out unless told to
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    assert stats_main(["--encoder", "minilm", "--prompts", str(prompts), "--out", str(f)]) == 2
    assert "exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert stats_main(["--encoder", "minilm", "--prompts", str(tmp_path / "no.txt"), "--out",
                       str(tmp_path / "s.safetensors")]) == 2
    assert "--prompts" in capsys.readouterr().err
