"""Feature cache files and the `extract` / `stats` command functions, offline, on tiny local checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from test_encoders import vision  # tiny random vision towers (tests/ is on sys.path under pytest)
from test_normalize import tiny_bert
from vlhooks.encoders import VisionExtractor
from vlhooks.errors import FeatureError
from vlhooks.feature_cache import (FeatureCache, extract_main, extract_parser, image_hash, load_features,
                                   save_features, settings_hash, stats_main, stats_parser, text_hash)
from vlhooks.features import VLFeatures
from vlhooks.normalize import ReferenceStats


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def png(path, seed: int, size=(40, 30)):
    a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(a).save(path)
    return path


def test_hashes():
    a = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    assert image_hash(a) == image_hash(Image.fromarray(a))
    b = a.copy()
    b[0, 0, 0] ^= 1
    assert image_hash(a) != image_hash(b)
    assert image_hash(a) != image_hash(a.reshape(30, 20, 3))  # same bytes, other shape
    assert settings_hash({"a": 1, "b": [1, 2]}) == settings_hash({"b": [1, 2], "a": 1})
    assert settings_hash({"a": 1}) != settings_hash({"a": 2})
    assert text_hash("a cat") != text_hash("a cat ")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_bit_identical(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    tokens = (torch.randn(2, 7, 5, generator=g) * 1e3).to(dtype)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    f = VLFeatures(tokens, mask=mask, source={"model": "m", "layer": -6, "token_selection": "image"})
    path = save_features(tmp_path / "f.safetensors", f, {"layer": -6, "model": "m"})
    back = load_features(path, {"model": "m", "layer": -6})  # key order is irrelevant
    assert back.tokens.dtype == dtype and torch.equal(back.tokens.view(torch.uint8), tokens.view(torch.uint8))
    assert torch.equal(back.mask, mask) and back.source == f.source and back.space == "caption"


def test_settings_mismatch_is_a_clear_error(tmp_path):
    f = VLFeatures(torch.ones(1, 2, 3))
    path = save_features(tmp_path / "f.safetensors", f, {"layer": -6, "select": "all"})
    with pytest.raises(FeatureError) as e:
        load_features(path, {"layer": -8, "select": "all"})
    msg = str(e.value)
    assert "'layer': (-6, -8)" in msg and "--overwrite" in msg and "select" not in msg.split("{")[1]
    with pytest.raises(FeatureError, match="vlhooks extract"):
        load_features(tmp_path / "missing.safetensors")


def test_cache_extracts_once_with_progress(tmp_path, capsys):
    images = [np.full((8, 8, 3), i, dtype=np.uint8) for i in range(3)]
    calls = []

    def fn(im):
        calls.append(int(im[0, 0, 0]))
        return VLFeatures(torch.full((1, 2, 4), float(im[0, 0, 0])))

    cache = FeatureCache(tmp_path, {"encoder": "unit"})
    paths = cache.extract(images, fn, progress=True)
    assert calls == [0, 1, 2] and "extract" in capsys.readouterr().err  # the tqdm bar
    assert paths == [cache.path_for(image_hash(im)) for im in images]
    assert cache.extract(images, fn) == paths and calls == [0, 1, 2]  # all cached: nothing recomputed
    assert float(cache.load(image_hash(images[2])).tokens[0, 0, 0]) == 2.0
    other = FeatureCache(tmp_path, {"encoder": "unit", "layer": 1})  # other settings: other files
    assert other.path_for(image_hash(images[0])) != paths[0] and other.load(image_hash(images[0])) is None


def tiny_clip_folder(tmp_path):
    model, proc, side, patch, prefix = vision("clip")
    folder = tmp_path / "clip"
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder, model, proc


def test_extract_main_writes_loadable_features(tmp_path, capsys):
    folder, model, proc = tiny_clip_folder(tmp_path)
    imgs = [str(png(tmp_path / f"{i}.png", i)) for i in range(2)]
    out = tmp_path / "feats"
    argv = ["--encoder", str(folder), "--layer", "-2", "--include-cls", "--out", str(out), "--no-progress", *imgs]
    assert extract_main(argv) == 0
    index = json.loads((out / "index.json").read_text())
    assert sorted(index) == sorted(imgs)
    ref = VisionExtractor(model, proc, layer=-2, include_cls=True)
    for im in imgs:
        f = load_features(out / index[im])
        torch.testing.assert_close(f.tokens, ref(im).tokens)
        assert f.tokens.shape == (1, 17, 32) and f.source["layer"] == -2
    mtimes = [(out / index[i]).stat().st_mtime_ns for i in imgs]
    assert extract_main(argv) == 0  # cached: files untouched
    assert [(out / index[i]).stat().st_mtime_ns for i in imgs] == mtimes
    # normalised run: new settings, new files, target std reached on the clean set
    assert extract_main(argv[:-2] + ["--normalize", "global", "--target-std", "3", *imgs]) == 0
    index2 = json.loads((out / "index.json").read_text())
    assert index2[imgs[0]] != index[imgs[0]]
    g = load_features(out / index2[imgs[0]])
    assert g.source["normalisation"]["mode"] == "global"
    assert len(list(out.glob("*.safetensors"))) == 4
    assert "\t" in capsys.readouterr().out


def test_extract_main_errors(tmp_path, capsys):
    folder, _, _ = tiny_clip_folder(tmp_path)
    assert extract_main(["--encoder", str(folder), "--out", str(tmp_path), str(tmp_path / "nope.png")]) == 2
    assert "not found" in capsys.readouterr().err
    img = str(png(tmp_path / "a.png", 0))
    assert extract_main(["--encoder", str(folder), "--normalize", "per_dim", "--out", str(tmp_path), img]) == 2
    assert "vlhooks stats" in capsys.readouterr().err
    assert extract_main(["--encoder", str(folder), "--select", "image", "--out", str(tmp_path), img]) == 2
    assert "leave it unset" in capsys.readouterr().err


def test_stats_main_then_per_dim_extract(tmp_path, capsys):
    model, tok = tiny_bert(tmp_path)
    folder = tmp_path / "bert"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    prompts = ["a cat on the sofa", "a red car", "photo of a blue sky", "the dog"]
    pfile = tmp_path / "p.txt"
    pfile.write_text("\n".join(prompts))
    out = tmp_path / "stats.safetensors"
    assert stats_main(["--encoder", str(folder), "--prompts", str(pfile), "--out", str(out), "--layer", "-1",
                       "--sink-positions", "0", "--no-progress"]) == 0
    assert str(out) in capsys.readouterr().out
    st = ReferenceStats.load(out)
    rows = []
    with torch.no_grad():
        for p in prompts:
            rows.append(model(**tok(p, return_tensors="pt")).last_hidden_state[0, 1:].double().numpy())
    body = np.concatenate(rows)
    np.testing.assert_allclose(st.mean.numpy(), body.mean(0), rtol=1e-4, atol=1e-5)
    assert st.meta["encoder"] == str(folder) and st.meta["layer"] == -1 and st.meta["sinks_excluded"] == 4
    # per_dim extraction against these 16-d stats needs 16-d image tokens: a width mismatch is named
    cfolder, _, _ = tiny_clip_folder(tmp_path)
    img = str(png(tmp_path / "a.png", 1))
    assert extract_main(["--encoder", str(cfolder), "--normalize", "per_dim", "--stats", str(out),
                         "--out", str(tmp_path / "f"), img]) == 2
    assert "same width" in capsys.readouterr().err


def test_help_texts():
    h = extract_parser().format_help()
    for word in ("--encoder", "dinov2-small", "efficientnet-lite0", "minilm", "--layer", "--select",
                 "image_no_markers", "--normalize", "--stats", "--out", "--thinking"):
        assert word in h
    s = stats_parser().format_help()
    for word in ("--encoder", "minilm", "--prompts", "--out", "--layer", "--sink-ratio", "--max-positions"):
        assert word in s
    with pytest.raises(SystemExit) as e:
        extract_main(["--help"])
    assert e.value.code == 0


def test_cli_arguments():
    a = extract_parser().parse_args(["--encoder", "x", "--out", "d", "--layer", "-6", "i.png"])
    assert a.layer == -6 and a.enable_thinking is None and a.inputs == ["i.png"]
    a = extract_parser().parse_args(["--encoder", "x", "--out", "d", "--layer=-6,-8", "--thinking", "i.png"])
    assert a.layer == [-6, -8] and a.enable_thinking is True
    assert extract_parser().parse_args(["--encoder", "x", "--out", "d", "--no-thinking"]).enable_thinking is False
    assert extract_parser().parse_args(["--encoder", "x", "--out", "d", "--layer", "last"]).layer == "last"
