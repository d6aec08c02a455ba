"""The adapter folder format: older folders load, newer ones are refused, bad files get named errors, `save`
never deletes or overwrites what is not an adapter, and a LoRA adapter never reaches into the DiT."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import vlhooks as vh
from conftest import snapshot
from tiny import build, caption_width, inputs, output

FIXTURES = Path(__file__).parent / "fixtures" / "adapters_format1"


@pytest.mark.parametrize("name", ["flux-projection", "flux-kv", "flux-lora", "z_image-projection", "z_image-kv",
                                  "z_image-lora"])
@torch.no_grad()
def test_format1_folders_load_and_give_their_recorded_outputs(name):
    """Written by vlhooks 0.1 (format 1, `make_fixtures.py` beside them), with the outputs that version gave."""
    family = name.split("-")[0]
    expected = load_file(str(FIXTURES / "expected_outputs.safetensors"))
    adapter = vh.load_adapter(FIXTURES / name)
    assert adapter.config.format_version == 2  # converted on load
    model = build(family)
    with vh.inject(model, vh.VLFeatures(expected[f"{name}.features"]), None, adapter=adapter):
        # recorded on another CPU: float32 kernels round differently across instruction sets (~2e-6 measured on
        # an AVX512-BF16 AMD EPYC), while the adapter moves the output by 0.02-0.1 from the plain model's
        torch.testing.assert_close(output(model, inputs(family, batch=1)), expected[name], rtol=1e-5, atol=1e-5)


def test_lora_saves_peft_style_names(tmp_path):
    model = build("flux")
    adapter = vh.LoRAAdapter.create(model, blocks=[0], rank=2)
    adapter.save(tmp_path / "a")
    names = sorted(load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    assert names == ["transformer_blocks.0.k.lora_A.weight", "transformer_blocks.0.k.lora_B.weight",
                     "transformer_blocks.0.v.lora_A.weight", "transformer_blocks.0.v.lora_B.weight"]
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["format_version"] == 2 and cfg["vlhooks_version"] == vh.__version__


def _saved(tmp_path, kind="projection"):
    model = build("flux")
    adapter = {"projection": lambda: vh.ProjectionAdapter.create(model, 24),
               "lora": lambda: vh.LoRAAdapter.create(model, rank=2)}[kind]()
    return adapter.save(tmp_path / kind)


def _edit_config(folder, **changes):
    f = folder / "adapter_config.json"
    cfg = json.loads(f.read_text())
    cfg.update(changes)
    f.write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes,match", [
    (dict(format_version=99), "format 99.*Upgrade vlhooks"),
    (dict(format_version="2"), "format_version must be a positive int"),
    (dict(feature_width="24"), "feature_width must be int"),
    (dict(options=None), "options` must be a dict"),
    (dict(options={"kind": "linear", "depth": 0}), "positive int"),
    (dict(options={"kind": "linear", "bogus": 1}), "unknown options"),
    (dict(adapter_type="bogus"), "unknown adapter_type"),
    (dict(extra_key=1), "unknown keys"),
])
def test_bad_configs_are_named(tmp_path, changes, match):
    folder = _saved(tmp_path)
    _edit_config(folder, **changes)
    with pytest.raises(vh.AdapterError, match=match):
        vh.load_adapter(folder)


def test_non_utf8_config_and_foreign_weights(tmp_path):
    folder = _saved(tmp_path)
    good = (folder / "adapter_config.json").read_bytes()
    (folder / "adapter_config.json").write_bytes(b"\xff\xfe" + good)
    with pytest.raises(vh.AdapterError, match="UTF-8"):
        vh.load_adapter(folder)
    (folder / "adapter_config.json").write_bytes(good)
    state = load_file(str(folder / "adapter_model.safetensors"))
    save_file({k: v.to(torch.int32) for k, v in state.items()}, str(folder / "adapter_model.safetensors"))
    with pytest.raises(vh.AdapterError, match="floating point"):
        vh.load_adapter(folder)
    bad = {k: v.clone() for k, v in state.items()}
    next(iter(bad.values()))[0] = float("nan")
    save_file(bad, str(folder / "adapter_model.safetensors"))
    with pytest.raises(vh.AdapterError, match="NaN or Inf"):
        vh.load_adapter(folder)


def test_nan_weights_set_in_memory_are_refused_at_patch_time():
    model = build("flux")
    before = snapshot(model)
    adapter = vh.ProjectionAdapter.create(model, 24)
    with torch.no_grad():
        adapter.proj.weight[0, 0] = float("nan")
    feats = vh.VLFeatures(torch.randn(1, 3, 24))
    with pytest.raises(vh.AdapterError, match="non-finite weights"):
        vh.apply_injection(model, feats, adapter=adapter)
    assert snapshot(model) == before


def test_save_refuses_what_is_not_an_adapter_folder(tmp_path):
    adapter = vh.ProjectionAdapter.create(build("flux"), 24)
    user = tmp_path / "mine"
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("mine")
    (user / "sub" / "data.csv").write_text("a,b")
    with pytest.raises(vh.AdapterError, match="not an adapter folder"):
        adapter.save(user)
    assert (user / "notes.txt").read_text() == "mine" and (user / "sub" / "data.csv").read_text() == "a,b"
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt", "sub"]
    f = tmp_path / "file.bin"
    f.write_bytes(b"keep")
    with pytest.raises(vh.AdapterError, match="is a file"):
        adapter.save(f)
    assert f.read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin", "mine"]  # no hidden leftovers


def test_save_over_an_adapter_folder_keeps_other_files(tmp_path):
    model = build("flux")
    a = vh.ProjectionAdapter.create(model, 24)
    folder = a.save(tmp_path / "a")
    (folder / "README.md").write_text("card")
    b = vh.ProjectionAdapter.create(model, 24, kind="mlp")
    b.save(folder)
    assert (folder / "README.md").read_text() == "card"
    assert vh.load_adapter(folder).config.options.kind == "mlp"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json",
                                                         "adapter_model.safetensors"]


def test_interrupted_save_leaves_a_temporary_that_clean_temporaries_removes(tmp_path, monkeypatch):
    import vlhooks.adapters.base as base

    adapter = vh.ProjectionAdapter.create(build("flux"), 24)
    real, real_remove = base.os.replace, base._remove_tree

    def crash_on_rename(src, dst):  # the process dies between writing the temporary and publishing it
        raise KeyboardInterrupt

    monkeypatch.setattr(base.os, "replace", crash_on_rename)
    monkeypatch.setattr(base, "_remove_tree", lambda folder: None)  # a killed process cleans up nothing
    with pytest.raises(KeyboardInterrupt):
        adapter.save(tmp_path / "a")
    monkeypatch.setattr(base.os, "replace", real)
    monkeypatch.setattr(base, "_remove_tree", real_remove)
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and base.TMP_MARK in left[0] and not (tmp_path / "a").exists()
    monkeypatch.setattr(base, "process_alive", lambda pid: False)  # the writer is gone
    assert [p.name for p in base.clean_temporaries(tmp_path)] == left
    assert list(tmp_path.iterdir()) == []


def test_lora_adapter_casts_and_grad_flags_never_reach_the_dit():
    model = build("flux").requires_grad_(False)
    dit_state = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = vh.LoRAAdapter.create(model, rank=2)
    adapter.to(torch.float64)
    adapter.half()
    adapter.requires_grad_(True)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, dit_state[k]) for k, v in model.state_dict().items())
    assert {p.dtype for p in adapter.parameters()} == {torch.float16}
    assert sum(p.numel() for p in adapter.parameters()) == sum(p.numel() for p in adapter.trainable_parameters())
    adapter.float()
    feats = vh.VLFeatures(torch.randn(1, 3, caption_width("flux")))
    with torch.no_grad(), vh.inject(model, feats, adapter=adapter):
        out = output(model, inputs("flux"))
    assert torch.isfinite(out).all()


def test_old_lora_names_are_converted(tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(FIXTURES / "flux-lora", folder)
    names = sorted(load_file(str(folder / "adapter_model.safetensors")))
    assert names[0].startswith("wrappers.") and ".default." in names[0]  # format 1
    loaded = vh.load_adapter(folder)
    loaded.bind(vh.family_for(build("flux")), build("flux"))
    assert all(".default." not in k and not k.startswith("wrappers") for k in loaded.trainable_state_dict())


def test_folder_written_before_an_option_existed_loads(tmp_path):
    """A folder whose config and weights' metadata lack an option added since (its default applies) loads; an
    option that really differs between the two is still refused."""
    folder = _saved(tmp_path)
    w = folder / "adapter_model.safetensors"
    from safetensors import safe_open

    with safe_open(str(w), "pt") as fh:
        meta = fh.metadata()
    state = load_file(str(w))
    old = json.loads(meta["adapter_config"])
    del old["options"]["mix_depth"]  # as vlhooks wrote it before `mix_depth` existed
    save_file(state, str(w), metadata=dict(meta, adapter_config=json.dumps(old)))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    del cfg["options"]["mix_depth"]
    _edit_config(folder, options=cfg["options"])
    assert vh.load_adapter(folder).config.options.mix_depth == 0
    _edit_config(folder, options=dict(cfg["options"], mix_depth=1))  # the config alone says otherwise
    with pytest.raises(vh.AdapterError, match="does not describe"):
        vh.load_adapter(folder)
