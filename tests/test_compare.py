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
SHIPPED = {name: ROOT / f"checkpoints/toy-{name}/final" for name in ("projection", "lora", "kv")}
METRICS = ("class_match", "ref_similarity", "ref_similarity_effnet", "frechet_effnet_pca16", "prompt_consistency")


def toy_cfg(tmp_path, **kw):
    cfg = load_config(None)
    cfg.update(dit=str(TOY_DIT), out=str(tmp_path / "out"), classifier=str(ROOT / "checkpoints/toy-classifier"),
               adapters={k: str(v) for k, v in SHIPPED.items() if (v / "adapter_config.json").is_file()})
    cfg.update(kw)
    return cfg


# ------------------------------------------------------------------------------------------- the embedded default
@pytest.mark.slow
def test_toy_compare_writes_grid_report_and_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = toy_cfg(tmp_path, seeds=[0, 1], steps=4, references={"split": "heldout", "count": 4, "seed": 0},
                  wandb=True, similarity_seeds=None, grid_references=4,
                  sweep={"scales": [0.0, 1.0, 2.0], "arms": None, "seeds": [1], "references": 4},
                  conflict={"scales": [0.0, 1.0], "image_guidance": [1.0, 3.0, 6.0], "arms": None, "seeds": [0],
                            "references": 4},
                  pairs={"references": 4, "arms": None, "seeds": [0, 1]})
    result = run(cfg, command="vlhooks compare --seeds 0 1")
    out = Path(cfg["out"])
    data = json.loads((out / "metrics.json").read_text())
    expected_arms = ["none", "blend", "zero-shot", *cfg["adapters"], "random"]
    assert list(data["arms"]) == expected_arms
    assert {"projection", "lora"} <= set(data["arms"]), "the shipped adapters are arms of the default"
    for arm, metrics in data["arms"].items():
        assert set(METRICS) <= set(metrics), arm
        for m, s in metrics.items():
            assert {"mean", "std", "n"} <= set(s) and s["n"] == 2
            per_seed = data["per_seed"][arm][m]  # the summary is the mean / spread of the per-seed values
            assert s["mean"] == pytest.approx(float(np.mean(per_seed))) and s["std"] == pytest.approx(float(np.std(per_seed)))
            if m != "frechet_effnet_pca16":  # per-sample metrics: a bootstrap interval over references and seeds
                assert s["ci_low"] <= s["mean"] + 1e-9 and s["mean"] <= s["ci_high"] + 1e-9, (arm, m, s)
        assert 0.0 <= metrics["class_match"]["mean"] <= 1.0 and -1.0 <= metrics["ref_similarity"]["mean"] <= 1.0
        assert len(data["per_class"][arm]) == 10
    assert data["chance"] == 0.1 and data["best_arm"] in cfg["adapters"] and data["seconds"] > 0
    # the strength sweep: zero-shot and the best adapter; scale 0 injects nothing, so it is the `none` arm
    sweep = data["sweep"]
    assert sweep["scales"] == [0.0, 1.0, 2.0] and list(sweep["arms"]) == ["zero-shot", data["best_arm"]]
    none1 = np.asarray(data["per_seed"]["none"]["class_match"])[1]  # seed 1: the sweep's seed
    for arm, r in sweep["arms"].items():
        assert len(r["class_match"]) == len(r["prompt_consistency"]) == 3
        assert r["class_match"][0] == pytest.approx(none1)
        assert r["class_match"][1] == pytest.approx(data["per_seed"][arm]["class_match"][1])  # scale 1: the arm
    conflict = data["conflict"]
    assert list(conflict["arms"]) == [data["best_arm"]]
    r = conflict["arms"][data["best_arm"]]
    assert len(r["by_scale"]) == 2 and len(r["by_image_guidance"]) == 3
    for p in r["by_scale"] + r["by_image_guidance"]:
        assert p["reference"] + p["prompt"] + p["other"] == pytest.approx(1.0)
    assert r["by_scale"][1] == r["by_image_guidance"][1]  # scale 1 at image guidance = cfg: the same samples
    # two references, left / right masks: B is another class; every fraction is one of 8 samples
    pairs = data["pairs"]
    assert list(pairs["arms"]) == [data["best_arm"]] and pairs["references"] == 4
    refs = data["reference_labels"]
    assert all(refs[a] != refs[b] for a, b in zip(pairs["left"], pairs["right"]))
    assert 0.5 < pairs["half_classifier_accuracy"]["left"] <= 1 and 0.5 < pairs["half_classifier_accuracy"]["right"]
    p = pairs["arms"][data["best_arm"]]
    assert "examples" not in p  # pictures go to the figure, not metrics.json
    for k in ("left_own", "left_other", "right_own", "right_other", "both_own", "alone_left_own"):
        assert p[k] * 8 == pytest.approx(round(p[k] * 8)), k
    assert p["left_own"] + p["left_other"] <= 1 and p["both_own"] <= min(p["left_own"], p["right_own"])
    for fig in ("strength.png", "conflict.png", "per_class.png", "pairs.png"):
        assert (out / fig).is_file() and fig in (out / "report.html").read_text()
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == len(expected_arms) * len(METRICS)
    from PIL import Image

    grid = Image.open(out / "grid.png")
    assert grid.height >= 4 * 48 and grid.width >= len(expected_arms) * 2 * 48  # 4 refs down, arms x 2 seeds across
    px = np.asarray(grid)  # samples framed green (the reference's class) or red
    assert ((px == [0, 170, 0]).all(-1).sum() + (px == [220, 0, 0]).all(-1).sum()) > 0
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
    # scale 0 injects nothing: bit for bit the `none` arm (the strength sweep's first point)
    z0 = world.generate(Arm("zero-shot", "zero-shot"), "a handwritten digit", seeds=[7, 8], scale=0.0)
    assert torch.equal(z0, x)
    # image guidance equal to cfg is plain guidance; another value changes the samples; a subset of references
    # gets the same noise it gets in the whole run
    zi = world.generate(Arm("zero-shot", "zero-shot"), "a handwritten digit", seeds=[7, 8], image_guidance=3.0)
    torch.testing.assert_close(zi, z, atol=1e-5, rtol=0)
    z6 = world.generate(Arm("zero-shot", "zero-shot"), "a handwritten digit", seeds=[7, 8], image_guidance=6.0)
    assert not torch.allclose(z6, z, atol=1e-3)
    sub = world.generate(Arm("zero-shot", "zero-shot"), "a handwritten digit", seeds=[8], rows=[2])
    torch.testing.assert_close(sub, z[5:6], atol=1e-5, rtol=0)


def test_image_guidance_formula_in_the_sampler():
    """`euler_sample(image_guidance=s)`: one step is `v_u + cfg (v_t - v_u) + s (v_ti - v_t)` with the reference
    switched by the handle's rows (grouped) or by `set_reference` (separate passes); both routes agree."""
    from vlhooks.models import load_transformer
    from vlhooks.sampling import euler_sample

    dit = load_transformer(str(TOY_DIT))
    fam = vh.family_for(dit)
    g = torch.Generator().manual_seed(0)
    noise, cap, unc = torch.randn(2, 1, 16, 16, generator=g), torch.randn(2, 6, 384, generator=g), torch.zeros(2, 6, 384)
    cm, um = torch.ones(2, 6, dtype=torch.bool), torch.zeros(2, 6, dtype=torch.bool)
    um[:, :2] = True
    feats = torch.randn(2, 5, 384, generator=g)
    sig = torch.ones(2)
    with torch.no_grad():
        plain = lambda c, m: fam.velocity(dit, noise, sig, c, m)  # noqa: E731
        v_u, v_t = plain(unc, um), plain(cap, cm)
        with vh.inject(dit, vh.VLFeatures(feats)):
            v_ti = plain(cap, cm)
    expect = noise - (v_u + 3.0 * (v_t - v_u) + 6.0 * (v_ti - v_t))  # one Euler step from sigma 1 to 0
    handle = vh.apply_injection(dit, None, vh.InjectionConfig())
    try:
        handle.set_features(vh.VLFeatures(feats.repeat(3, 1, 1)), active=[True] * 2 + [False] * 4)
        grouped = euler_sample(fam, dit, noise, cap, cm, steps=1, cfg=3.0, uncond=unc, uncond_mask=um, groups=1,
                               image_guidance=6.0)
        handle.set_features(vh.VLFeatures(feats))
        on = lambda flag: handle.set_features(vh.VLFeatures(feats), active=[flag] * 2)  # noqa: E731
        separate = euler_sample(fam, dit, noise, cap, cm, steps=1, cfg=3.0, uncond=unc, uncond_mask=um,
                                image_guidance=6.0, set_reference=on)
    finally:
        handle.remove()
    torch.testing.assert_close(grouped, expect, atol=1e-5, rtol=0)
    torch.testing.assert_close(separate, expect, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="set_reference"):
        euler_sample(fam, dit, noise, cap, cm, steps=1, cfg=3.0, uncond=unc, uncond_mask=um, image_guidance=6.0)


def test_bootstrap_interval():
    from vlhooks.eval.metrics import bootstrap_ci

    assert bootstrap_ci(np.full((5, 50), 0.7)) == pytest.approx((0.7, 0.7))
    g = np.random.default_rng(0)
    v = (g.random((5, 50)) < 0.8).astype(float)
    lo, hi = bootstrap_ci(v)
    assert lo < v.mean() < hi and 0.03 < hi - lo < 0.2  # binomial over 250 samples: about +-0.05
    assert bootstrap_ci(v) == (lo, hi)  # seeded
    # the references' spread counts: a reference-level effect widens the interval
    ref_effect = np.tile((g.random(50) < 0.8).astype(float), (5, 1))
    lo2, hi2 = bootstrap_ci(ref_effect)
    assert hi2 - lo2 > 0.9 * (hi - lo)


def readme_table() -> str:
    """The main table of the README's "The two commands" section (what `vlhooks compare` prints)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## The two commands"):text.index("## Patch a pipeline in code")]
    lines = [l for l in section.splitlines() if l.startswith("|")]
    start = next(i for i, l in enumerate(lines) if l.startswith("| arm |"))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("| chance"))
    return "\n".join(lines[start:end + 1])


@pytest.mark.slow
@pytest.mark.skipif(not all((p / "adapter_config.json").is_file() for p in SHIPPED.values()),
                    reason="the shipped toy adapters are not in this checkout")
def test_the_readme_table_and_trained_adapters_beat_the_controls(tmp_path, capsys):
    """`vlhooks compare` at its defaults (5 seeds x 50 held-out references, the shipped DiT, classifier and
    adapters) prints exactly the README's table; and every trained arm's class match beats zero-shot's and the
    random control's by more than their intervals (its interval's low end above theirs' high end)."""
    from vlhooks.eval.report import format_table

    assert main(["--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    data = json.loads((tmp_path / "out" / "metrics.json").read_text())
    table = format_table(data["arms"], data["best_arm"], data["chance"])
    assert table in printed
    assert table == readme_table(), "the README's table is not what `vlhooks compare` prints: update the README"
    cm = {a: m["class_match"] for a, m in data["arms"].items()}
    for arm in SHIPPED:
        for control in ("zero-shot", "random"):
            assert cm[arm]["ci_low"] > cm[control]["ci_high"], (arm, control, cm)
    assert data["seconds"] > 0  # its run time is reported; the time itself is a benchmark (BENCHMARKS.md), not a test


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
    ({"image_guidance": "6"}, "image_guidance must be a number"),
    ({"sweep": {"scales": [1.0, -1.0]}}, "sweep.scales must be a non-empty list of numbers >= 0"),
    ({"conflict": {"scales": [1.0], "image_guidance": []}}, "conflict.image_guidance must be a non-empty list"),
    ({"pairs": {"seeds": "0"}}, "pairs.seeds must be a non-empty list of integers"),
    ({"references": {"source": "mnist", "transform": "sepia"}}, "references.transform must be one of"),
    ({"references": {"source": "emnist"}}, "references.source must be one of"),
], ids=["window", "negative-joint-scale", "blend-mode", "zero-steps", "cfg-not-a-number", "no-seeds",
        "image-guidance-not-a-number", "negative-sweep-scale", "empty-conflict-guidance", "pairs-seeds",
        "unknown-transform", "unknown-source"])
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
    assert main(["--references", "0", "--out", str(out)]) == 2  # not taken for "the default"
    assert "references.count must be an integer >= 1" in capsys.readouterr().err and not out.exists()


def test_a_folder_of_the_users_is_refused_before_anything_loads(tmp_path, monkeypatch, capsys):
    """`--out` holding files no compare wrote: refused with the fix named, nothing loaded, nothing written."""
    def no_world(*args, **kwargs):
        raise AssertionError("the world was loaded before --out was checked")

    monkeypatch.setattr(ToyWorld, "__init__", no_world)
    out = tmp_path / "out"
    out.mkdir()
    (out / "grid.png").write_bytes(b"my own picture")
    cfg = toy_cfg(tmp_path, references={"split": "heldout", "count": 2, "seed": 0})
    with pytest.raises(CompareError, match="did not write; pass another --out"):
        run(cfg)
    assert main(["--out", str(out), "--no-studies"]) == 2
    assert "did not write" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["grid.png"]
    assert (out / "grid.png").read_bytes() == b"my own picture"
    file = tmp_path / "afile"
    file.write_text("x")
    with pytest.raises(CompareError, match="is a file"):
        run(toy_cfg(tmp_path, out=str(file)))
    assert file.read_text() == "x"


def test_outputs_of_an_earlier_run_are_replaced(tmp_path):
    """A folder a run filled (its marker, or an older run's metrics.json) is taken again; the marker is written."""
    from vlhooks.eval.report import MARKER, check_out, claim_out

    new = tmp_path / "new"
    claim_out(new)
    assert (new / MARKER).is_file()
    (new / "metrics.json").write_text("{}")
    check_out(new)  # marked: accepted
    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.json").write_text(json.dumps({"arms": {}, "seeds": [0]}))
    check_out(old)  # written by an older compare, before the marker
    (old / "metrics.json").write_text(json.dumps({"loss": 1}))  # someone else's metrics.json
    with pytest.raises(CompareError, match="did not write"):
        check_out(old)


def test_robustness_and_provenance_leave_a_users_files_intact(tmp_path, capsys):
    from vlhooks.eval import provenance, robustness

    out = tmp_path / "rob"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    assert robustness.main(["--out", str(out), "--sets", "heldout"]) == 2
    assert "did not write" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.md"] and (out / "notes.md").read_text() == "mine"
    folder = tmp_path / "adapter"
    folder.mkdir()
    recipe = ROOT / "configs/toy/projection.yaml"
    provenance.main([str(folder), "--recipe", str(recipe)])
    first = json.loads((folder / "training.json").read_text())
    assert first["steps"] == yaml.safe_load(recipe.read_text())["trainer"]["max_steps"]
    (folder / "training.json").write_text('{"kept": true}')
    assert provenance.main([str(folder), "--recipe", str(recipe)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert json.loads((folder / "training.json").read_text()) == {"kept": True}
    assert provenance.main([str(folder), "--recipe", str(recipe), "--overwrite"]) == 0
    assert json.loads((folder / "training.json").read_text())["recipe"] == str(recipe)



def test_robustness_scores_a_users_own_adapter(tmp_path, capsys):
    """`--adapters NAME=PATH` scores that folder: the shipped projection under another name gives the shipped arm's
    figures on the same set, references and seeds; a bad pair exits 2 naming the form."""
    from vlhooks.eval import robustness

    common = ["--sets", "thick", "--references", "10", "--seeds", "0"]
    shipped = robustness.run_robustness(str(tmp_path / "a"), ["projection"], 10, [0], sets=["thick"])
    assert robustness.main(["--out", str(tmp_path / "b"), *common,
                            "--adapters", f"mine={ROOT / 'checkpoints/toy-projection/final'}"]) == 0
    mine = json.loads((tmp_path / "b" / "robustness.json").read_text())
    assert list(mine["sets"]["thick"]) == ["zero-shot", "mine"]
    assert mine["sets"]["thick"]["mine"] == shipped["sets"]["thick"]["projection"]
    with pytest.raises(SystemExit) as e:
        robustness.main(["--out", str(tmp_path / "c"), *common, "--adapters", "checkpoints/toy-projection/final"])
    assert e.value.code == 2 and "NAME=PATH" in capsys.readouterr().err

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


def test_image_guidance_in_a_pipelines_own_call():
    """`vh.sampling.ImageGuidance` on a tiny Z-Image pipeline: one denoising step with latent output is linear in the
    velocity, so the guided latents are `plain + r (injected - plain)`, `r = image_guidance / text_guidance`; with
    the pipeline's own CFG on, the unconditional rows stay unpatched and the result is the formula's."""
    from offline_pipelines import build_zimage_pipeline

    from vlhooks.sampling import ImageGuidance
    from vlhooks.testing import PROMPT, SIZE, TEXT_LEN

    pipe = build_zimage_pipeline()
    pipe.set_progress_bar_config(disable=True)
    width = vh.family_for(pipe.transformer).caption_width(pipe.transformer)
    feats = vh.VLFeatures(torch.randn(1, 4, width, generator=torch.Generator().manual_seed(3)))

    def call(guidance_scale=0.0):
        return pipe(prompt=PROMPT, num_inference_steps=1, height=SIZE, width=SIZE, max_sequence_length=TEXT_LEN,
                    guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(0),
                    output_type="latent").images

    plain = call()
    with vh.inject(pipe, feats) as handle:
        injected = call()
        with ImageGuidance(pipe, handle, 4.0, text_guidance=1.0):
            guided = call()
        with ImageGuidance(pipe, handle, 1.0, text_guidance=1.0):
            same = call()
    assert not torch.allclose(injected, plain, atol=1e-4)
    torch.testing.assert_close(guided, plain + 4.0 * (injected - plain), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(same, injected, atol=0, rtol=0)
    assert vh.get_injection(pipe) is None
    # with CFG (Z-Image: v = v_c + w (v_c - v_u), s_txt = 1 + w): image guidance s_img = s_txt is plain injection
    with vh.inject(pipe, feats) as handle:
        cfg_injected = call(2.0)
        with ImageGuidance(pipe, handle, 3.0, text_guidance=3.0):
            cfg_same = call(2.0)
        with ImageGuidance(pipe, handle, 6.0, text_guidance=3.0):
            cfg_guided = call(2.0)
    cfg_plain = call(2.0)
    torch.testing.assert_close(cfg_same, cfg_injected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cfg_guided, cfg_plain + 2.0 * (cfg_injected - cfg_plain), atol=1e-4, rtol=1e-4)


def test_the_default_finds_the_shipped_assets_from_any_folder(tmp_path, monkeypatch):
    """Run from another folder, the embedded default's relative paths resolve to the repository's shipped assets;
    a user's own `checkpoints/toy-dit/final` in the current folder wins; a path found nowhere stays as given."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None)
    assert Path(cfg["dit"]) == TOY_DIT and Path(cfg["classifier"]) == ROOT / "checkpoints/toy-classifier"
    assert Path(cfg["adapters"]["projection"]) == SHIPPED["projection"]
    check_config(cfg)  # the DiT's blocks on the meta device: found
    own = tmp_path / "checkpoints/toy-dit/final"
    own.mkdir(parents=True)
    (own / "config.json").write_text((TOY_DIT / "config.json").read_text())
    assert Path(load_config(None)["dit"]) == own
    assert load_config(None, {"classifier": "nowhere/clf"})["classifier"] == "nowhere/clf"


@pytest.mark.slow
@pytest.mark.skipif(not (SHIPPED["kv"] / "adapter_config.json").is_file(), reason="no shipped kv adapter")
def test_block_measurement_behind_the_presets(tmp_path):
    """`python -m vlhooks.eval.presets`: one row per block the adapter has weights for, plus all of them together;
    that last row is the compare arm itself (same references, seeds and samples)."""
    from vlhooks.eval.presets import measure

    r = measure(str(SHIPPED["kv"]), references=20, seeds=[0])  # two per class: a within-class spread exists
    assert list(r["sets"]) == ["layers.0 only", "layers.1 only", "all its blocks"]
    cfg = load_config(None)
    cfg["references"] = {**cfg["references"], "count": 20}
    world = ToyWorld(cfg)
    x = world.generate(Arm("kv", "adapter", str(SHIPPED["kv"])), cfg["prompts"][0], [0], vh.load_adapter(SHIPPED["kv"]))
    assert r["sets"]["all its blocks"]["class_match"] == pytest.approx(world.label_metrics(x)["class_match"].mean())
    for m in r["sets"].values():
        assert 0 <= m["class_match"] <= 1 and -1 <= m["ink_correlation"] <= 1 and 0 < m["ref_similarity"] <= 1


def test_a_trained_adapter_keeps_its_own_blocks_mode_and_placement():
    """A kv adapter trained on the context refiner as well is compared with it (its K/V there were trained with the
    main blocks'), and a decoupled one in decoupled mode, whatever the compare config's `injection` says."""
    from vlhooks.eval.toy_world import injection_config
    from vlhooks.models import load_transformer

    dit = load_transformer(str(TOY_DIT))
    blocks = r"(layers|context_refiner)\.\d+"
    adapter = vh.KVAdapter.create(dit, blocks=blocks)
    adapter.config.injection = vh.InjectionConfig(blocks=blocks, mode="decoupled").to_dict()
    cfg = injection_config({"blocks": "all", "mode": "joint", "scale": 0.5}, adapter)
    assert (cfg.blocks, cfg.mode, cfg.scale) == (blocks, "decoupled", 0.5)
    names = [s.name for s in vh.family_for(dit).select(dit, cfg.blocks)]
    assert sorted(names) == sorted(adapter.config.sites) == ["context_refiner.0", "layers.0", "layers.1"]
    plain = injection_config({"blocks": "all", "mode": "joint"}, None)  # zero-shot arms: the compare config's own
    assert (plain.blocks, plain.mode) == ("all", "joint")


def test_an_adapter_gets_the_features_it_was_trained_on(tmp_path):
    """An adapter whose `feature_source` names another encoder layer than the compare config's `encoder` is given
    the references encoded that way (what `vh.encode` gives for its spec), zero-shot arms the config's own."""
    from vlhooks.train.encoders import image_encoder

    cfg = toy_cfg(tmp_path, references={"split": "heldout", "count": 3, "seed": 0})
    world = ToyWorld(cfg)
    adapter = vh.ProjectionAdapter.create(world.dit, 384, kind="mlp")
    own = {**cfg["encoder"], "layer": 3 if cfg["encoder"].get("layer") != 3 else 4}  # not the config's layer
    adapter.config.feature_source = dict(own)
    want, _ = image_encoder(own)(world.ref_images)
    got = world.encoded.for_adapter(adapter)
    assert torch.equal(got.tokens, want.float())
    assert not torch.allclose(got.tokens, world.features.tokens)
    assert world.encoded.for_adapter(None) is world.features
    adapter.config.feature_source = dict(reversed(list(cfg["encoder"].items())))  # the same spec, another order
    assert world.encoded.for_adapter(adapter) is world.features
