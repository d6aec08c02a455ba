"""`vlhooks compare`: outputs and their structure, the arms against independent references, the configs."""

import copy
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import vlhooks as vh
from vlhooks.errors import CompareError
from vlhooks.eval.arms import Arm, plan_arms, random_control
from vlhooks.eval.compare import main, run
from vlhooks.eval.config import TOY_DEFAULT, check_config, load_config
from vlhooks.eval.metrics import frechet
from vlhooks.eval.report import make_grid
from vlhooks.eval.toy_world import ToyWorld

ROOT = Path(__file__).resolve().parents[1]
TOY_DIT = ROOT / "checkpoints/toy-dit/final"
SHIPPED = {name: ROOT / f"checkpoints/toy-{name}/final" for name in ("projection", "lora")}
METRICS = ("class_match", "ref_similarity", "ref_similarity_effnet", "frechet_effnet_pca16", "prompt_consistency")


def toy_cfg(tmp_path, **kw):
    cfg = load_config(None)
    cfg.update(dit=str(TOY_DIT), out=str(tmp_path / "out"),
               adapters={k: str(v) for k, v in SHIPPED.items() if (v / "adapter_config.json").is_file()})
    cfg.update(kw)
    return cfg


# ------------------------------------------------------------------------------------------- the embedded default
@pytest.mark.slow
def test_toy_compare_writes_grid_report_and_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = toy_cfg(tmp_path, seeds=[0, 1], steps=6, references={"split": "heldout", "count": 4, "seed": 0},
                  wandb=True)
    result = run(cfg, command="vlhooks compare --seeds 0 1")
    out = Path(cfg["out"])
    data = json.loads((out / "metrics.json").read_text())
    expected_arms = ["none", "blend", "zero-shot", *cfg["adapters"], "random"]
    assert list(data["arms"]) == expected_arms
    assert {"projection", "lora"} <= set(data["arms"]), "the shipped adapters are arms of the default"
    for arm, metrics in data["arms"].items():
        assert set(METRICS) <= set(metrics), arm
        for m, s in metrics.items():
            assert set(s) == {"mean", "std", "n"} and s["n"] == 2
            per_seed = data["per_seed"][arm][m]  # the summary is the mean / spread of the per-seed values
            assert s["mean"] == pytest.approx(float(np.mean(per_seed))) and s["std"] == pytest.approx(float(np.std(per_seed)))
        assert 0.0 <= metrics["class_match"]["mean"] <= 1.0 and -1.0 <= metrics["ref_similarity"]["mean"] <= 1.0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == len(expected_arms) * len(METRICS)
    from PIL import Image

    grid = Image.open(out / "grid.png")
    assert grid.height >= 4 * 48 and grid.width >= len(expected_arms) * 2 * 48  # 4 refs down, arms x 2 seeds across
    page = (out / "report.html").read_text()
    assert "vlhooks compare --seeds 0 1" in page and 'src="grid.png"' in page
    for arm in expected_arms:
        assert f"<th>{arm}</th>" in page
    assert "adapter" in page and "blend.mode" in page  # the settings that differ between arms
    assert result["out"] == str(out)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb")), "the wandb table is logged to an offline run"


def test_none_arm_equals_the_plain_toy_sampler(tmp_path):
    """The `none` arm (cond + uncond batched, captions padded with a mask) against `euler_sample` with a separate
    unconditional pass (one caption at a time, unpadded): same noise, same guidance formula."""
    from vlhooks.sampling import euler_sample

    cfg = toy_cfg(tmp_path, steps=5, references={"split": "heldout", "count": 3, "seed": 0}, adapters={})
    world = ToyWorld(cfg)
    x = world.generate(Arm("none", "none"), "a handwritten digit", seeds=[7, 8])  # [2 * 3, 1, 16, 16]
    cap, emp = world.minilm.tokens(["a handwritten digit"]), world.empty
    for k, seed in enumerate((7, 8)):
        noise = torch.randn((3, 1, 16, 16), generator=torch.Generator().manual_seed(seed))
        ref = euler_sample(world.family, world.dit, noise, cap.tokens.expand(3, -1, -1), cap.mask.expand(3, -1),
                           steps=5, cfg=3.0, uncond=emp.tokens.expand(3, -1, -1), uncond_mask=emp.mask.expand(3, -1))
        torch.testing.assert_close(x[3 * k : 3 * k + 3], ref, atol=1e-4, rtol=0)
    # the injection arms change the samples and leave the DiT unpatched afterwards
    z = world.generate(Arm("zero-shot", "zero-shot"), "a handwritten digit", seeds=[7, 8])
    assert not torch.allclose(z, x, atol=1e-3) and vh.get_injection(world.dit) is None
    again = world.generate(Arm("none", "none"), "a handwritten digit", seeds=[7, 8])
    assert torch.equal(again, x)


@pytest.mark.slow
@pytest.mark.skipif(not all((p / "adapter_config.json").is_file() for p in SHIPPED.values()),
                    reason="the shipped toy adapters are not in this checkout")
def test_trained_adapter_beats_zero_shot_and_random_on_class_match(tmp_path):
    """The README's claim, at the README's settings (3 seeds x 20 held-out references): the best trained adapter's
    class match exceeds zero-shot's and the random control's by more than the larger of their spreads."""
    cfg = toy_cfg(tmp_path)
    result = run(cfg)
    arms = result["arms"]
    best = max(SHIPPED, key=lambda a: arms[a]["class_match"]["mean"])
    cm = {a: arms[a]["class_match"] for a in arms}
    for control in ("zero-shot", "random"):
        margin = cm[best]["mean"] - cm[control]["mean"]
        assert margin > max(cm[best]["std"], cm[control]["std"]), (best, control, cm)


# ------------------------------------------------------------------------------------------- pieces
def test_frechet_against_closed_forms():
    g = np.random.default_rng(0)
    a = g.normal(size=(4000, 3))
    assert frechet(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([1.0, -2.0, 0.5])
    assert frechet(a, a + shift) == pytest.approx(float((shift ** 2).sum()), rel=1e-6)
    # two diagonal Gaussians: |mu1 - mu2|^2 + sum (s1 - s2)^2 (the covariances' square roots commute)
    b = a * np.array([2.0, 1.0, 3.0])
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    closed = float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2) - 2 * np.sqrt(np.diag(s1) * np.diag(s2)).sum())
    assert frechet(a, b) == pytest.approx(closed, rel=1e-3)


def test_random_control_keeps_the_architecture_and_scale_but_not_the_weights(tmp_path):
    from vlhooks.models import load_transformer

    dit = load_transformer(str(TOY_DIT))
    trained = vh.ProjectionAdapter.create(dit, 384, kind="mlp")
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    trained.save(tmp_path / "a")
    rnd = random_control(str(tmp_path / "a"), dit, 384, seed=0)
    again = random_control(str(tmp_path / "a"), dit, 384, seed=0)
    for (name, p), q, r in zip(trained.named_parameters(), rnd.parameters(), again.parameters()):
        assert p.shape == q.shape and torch.equal(q, r), name  # seeded
        if p.numel() > 100:
            assert not torch.allclose(p, q) and float(q.detach().std()) == pytest.approx(float(p.detach().std()), rel=0.1), name


def test_grid_layout():
    refs = [np.full((16, 16), 255, np.uint8)] * 3
    cells = {"a": [[np.zeros((16, 16), np.uint8)] * 2] * 3, "b": [[np.zeros((32, 32, 3), np.uint8)] * 2] * 3}
    img = make_grid(refs, ["a", "b"], cells, cell=48, pad=4)
    arr = np.asarray(img)
    assert img.size == (48 + 8 + 2 * (2 * 48 + 2 + 4) + 4, 18 + 3 * 52 + 4)
    assert arr[18 + 10, 4 + 10].tolist() == [255, 255, 255]  # a reference tile
    assert arr[18 + 10, 56 + 10].tolist() == [0, 0, 0]  # a sample tile


# ------------------------------------------------------------------------------------------- configs and errors
def test_toy_compare_yaml_is_the_default():
    given = yaml.safe_load((ROOT / "configs/toy/compare.yaml").read_text())
    assert given == TOY_DEFAULT


def test_z_image_compare_config_checks_on_meta():
    cfg = load_config(str(ROOT / "configs/z_image/compare.yaml"))
    arms = check_config(cfg)
    assert [a.name for a in arms] == ["none", "blend", "zero-shot", "projection", "lora", "random"]
    bad = copy.deepcopy(cfg)
    bad["generate"]["num_steps"] = 8
    with pytest.raises(CompareError, match="num_steps"):
        check_config(bad)
    bad = copy.deepcopy(cfg)
    bad["injection"]["blocks"] = [99]
    with pytest.raises(vh.VLHooksError):
        check_config(bad)


def test_config_errors_name_the_fix(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("world: toy\nseed: [1]\n")
    with pytest.raises(CompareError, match="unknown keys \\['seed'\\]"):
        load_config(str(f))
    with pytest.raises(CompareError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    cfg = toy_cfg(tmp_path, adapters={"mine": str(tmp_path / "nowhere")})
    with pytest.raises(CompareError, match="--adapters none"):
        plan_arms(cfg)
    with pytest.raises(CompareError, match="unknown arm 'other'"):
        plan_arms(toy_cfg(tmp_path, arms=["none", "other"]))
    assert main(["--config", str(f)]) == 2


@pytest.mark.parametrize("bad, match", [
    ({"injection": {"blocks": "all", "mode": "joint", "window": [0.2, 1.5]}}, "injection: window .* outside"),
    ({"injection": {"blocks": "all", "mode": "joint", "scale": -2.0}}, "injection: scale -2.0 < 0 in joint mode"),
    ({"blend": {"mode": "mix", "alpha": 0.5}}, "blend.mode 'mix' is not one of"),
    ({"steps": 0}, "steps must be an integer >= 1"),
    ({"cfg": "3.0"}, "cfg must be a number"),
    ({"seeds": []}, "seeds must be a non-empty list"),
], ids=["window", "negative-joint-scale", "blend-mode", "zero-steps", "cfg-not-a-number", "no-seeds"])
def test_bad_config_fails_before_any_arm_runs(tmp_path, monkeypatch, bad, match):
    """The whole config is checked first: no world is loaded, no arm runs, no output folder is written."""
    def no_world(*args, **kwargs):
        raise AssertionError("the world was loaded before the config was checked")

    monkeypatch.setattr(ToyWorld, "__init__", no_world)
    cfg = toy_cfg(tmp_path, **bad)
    with pytest.raises(CompareError, match=match):
        run(cfg)
    assert not Path(cfg["out"]).exists()


def test_bad_steps_on_the_command_line_exit_2(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--steps", "0", "--out", str(out)]) == 2
    assert "steps must be an integer >= 1" in capsys.readouterr().err and not out.exists()


# ------------------------------------------------------------------------------------------- the pipeline world
@pytest.mark.slow
def test_pipeline_world_on_a_saved_tiny_pipeline(tmp_path):
    """On a saved tiny Z-Image pipeline: `none` equals a plain call of the pipeline (bit for bit), the K/V arms
    change the images, the trained-adapter arm loads its folder, and the outputs are written."""
    import skimage.data
    from PIL import Image

    from offline_pipelines import build_zimage_pipeline

    pipe = build_zimage_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    refs = tmp_path / "refs"
    refs.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(refs / f"{name}.png")
    vh.ProjectionAdapter.create(pipe.transformer, 16, kind="mlp").save(tmp_path / "adapter")
    cfg = load_config(None)
    cfg.update(world="pipeline", dit=None, out=str(tmp_path / "out"), seeds=[0, 1], prompts=["a cat"],
               pipeline={"path": str(tmp_path / "pipe"), "class": "ZImagePipeline",
                         "transformer_class": "ZImageTransformer2DModel", "device": "cpu", "metric_size": 32},
               generate={"num_inference_steps": 2, "height": 32, "width": 32, "guidance_scale": 0.0,
                         "max_sequence_length": 64},
               encoder={"name": "patches", "width": 16, "size": 32, "patch": 8},
               references={"folder": str(refs)}, adapters={"projection": str(tmp_path / "adapter")},
               batch_size=1)
    check_config(cfg)
    local = copy.deepcopy(cfg)  # a local folder names its own classes and is checked against its own blocks
    del local["pipeline"]["class"], local["pipeline"]["transformer_class"]
    assert [a.name for a in check_config(local)] == [a.name for a in check_config(cfg)]
    local["injection"]["blocks"] = [len(vh.list_sites(pipe))]
    with pytest.raises(CompareError, match="injection"):
        check_config(local)
    from vlhooks.eval.pipeline_world import PipelineWorld

    world = PipelineWorld(cfg)
    x = world.generate(Arm("none", "none"), "a cat", seeds=[1])
    plain = [world.pipe("a cat", generator=torch.Generator().manual_seed(1 * 100_003 + r), output_type="np",
                        **cfg["generate"]).images[0] for r in range(3)]
    expect = torch.from_numpy(np.stack(plain)).permute(0, 3, 1, 2).float() * 2.0 - 1.0
    assert torch.equal(x, expect)
    z = world.generate(Arm("zero-shot", "zero-shot"), "a cat", seeds=[1])
    assert z.shape == x.shape and not torch.equal(z, x)
    result = run(cfg)
    assert list(result["arms"]) == ["none", "blend", "zero-shot", "projection", "random"]
    assert "class_match" not in result["arms"]["none"]  # no labels in this world
    assert "frechet_effnet_pca16" not in result["arms"]["none"]  # too few real images for a 16-d covariance
    for name in ("grid.png", "report.html", "metrics.json", "metrics.csv"):
        assert (tmp_path / "out" / name).is_file()
