"""Training: step 0 equals zero-shot, overfitting a fixed batch, exact resume, the one command, every recipe."""

import glob
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml

import vlhooks as vh
from vlhooks.train.checkpoint_io import SafetensorsCheckpointIO
from vlhooks.train.data import PairsDataModule
from vlhooks.train.module import AdapterModule, build_dit

ROOT = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((ROOT / "configs/tiny/projection.yaml").read_text())
FLUX_TINY = {"class_name": "FluxTransformer2DModel",
             "config": dict(patch_size=1, in_channels=12, num_layers=2, num_single_layers=2, attention_head_dim=16,
                            num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
                            axes_dims_rope=[4, 4, 8])}
ADAPTERS = {"projection": {"type": "projection", "kind": "mlp", "feature_width": 16},
            "kv": {"type": "kv"}, "lora": {"type": "lora", "rank": 4, "alpha": 4.0}}


def _module(adapter, dit=None, **kw):
    cfg = dict(TINY["model"], adapter=adapter, **kw)
    if dit is not None:
        cfg["dit"] = dit
    return AdapterModule(**cfg)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    dm = PairsDataModule(**TINY["data"], cache_dir=str(tmp_path_factory.mktemp("cache")), shuffle=False)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _batch(dm):
    return next(iter(torch.utils.data.DataLoader(dm.dataset, batch_size=4)))


@pytest.mark.parametrize("family", ["z_image", "flux"])
@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_step0_loss_equals_zero_shot(data, family, kind):
    module = _module(ADAPTERS[kind], dit=None if family == "z_image" else FLUX_TINY, drop_text=0.0)
    batch = _batch(data)
    losses = []
    for adapter in (module.adapter, None):
        module.handle = vh.apply_injection(module.dit, None, module.injection, adapter=adapter)
        with torch.no_grad():
            losses.append(module.compute_loss(batch, torch.Generator().manual_seed(3)))
        module.release()
    assert torch.equal(losses[0], losses[1])


def test_class_objective_adds_the_cross_entropy_of_the_reference_class(data, tmp_path):
    """`model.class_weight`: the loss grows by exactly weight x the cross-entropy (written out by hand) of a linear
    head over the mean of the projection's tokens; the head is not part of the exported adapter."""
    module = _module(ADAPTERS["projection"], class_weight=0.5, num_classes=4, drop_image=0.0, drop_text=0.0,
                     drop_both=0.0)
    with torch.no_grad():  # a projection away from the identity's start, and a head that is not near zero
        for p in list(module.adapter.parameters()) + list(module.class_head.parameters()):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    batch = _batch(data)
    module.handle = vh.apply_injection(module.dit, None, module.injection, adapter=module.adapter)
    with torch.no_grad():
        with_head = module.compute_loss(batch, torch.Generator().manual_seed(3))
        head = module.class_head
        module.hparams.class_weight = 0.0
        without = module.compute_loss(batch, torch.Generator().manual_seed(3))
        module.hparams.class_weight = 0.5
        tokens = module.adapter.project(batch["features"].float())  # [B, N, C], no padding in this data
        logits = tokens.mean(1) @ head.weight.T + head.bias  # [B, 4]
        labels = batch["label"].long()
        ce = (torch.logsumexp(logits, 1) - logits[torch.arange(len(labels)), labels]).mean()
    module.release()
    assert ce > 0.1
    torch.testing.assert_close(with_head - without, 0.5 * ce, rtol=1e-5, atol=1e-6)
    module.export_adapter(tmp_path / "with")
    plain = _module(ADAPTERS["projection"])
    plain.export_adapter(tmp_path / "plain")
    from safetensors.torch import load_file

    assert (load_file(tmp_path / "with/adapter_model.safetensors").keys()
            == load_file(tmp_path / "plain/adapter_model.safetensors").keys())


def test_class_objective_with_a_codebook_reads_the_router(data, tmp_path):
    """With a codebook projection, `model.class_weight` adds weight x the cross-entropy of the router's first
    `num_classes` logits (written out by hand); no separate head is built."""
    n = _batch(data)["features"].shape[1]
    spec = dict(ADAPTERS["projection"], codes=5, code_tokens=n)
    module = _module(spec, class_weight=0.5, num_classes=4, drop_image=0.0, drop_text=0.0, drop_both=0.0)
    assert module.class_head is None
    with torch.no_grad():
        for p in module.adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    batch = _batch(data)
    module.handle = vh.apply_injection(module.dit, None, module.injection, adapter=module.adapter)
    with torch.no_grad():
        with_router = module.compute_loss(batch, torch.Generator().manual_seed(3))
        module.hparams.class_weight = 0.0
        without = module.compute_loss(batch, torch.Generator().manual_seed(3))
        module.hparams.class_weight = 0.5
        cb = module.adapter.codebook
        flat = torch.nn.functional.layer_norm(batch["features"].float().flatten(1), (cb.norm.normalized_shape[0],),
                                              cb.norm.weight, cb.norm.bias)
        logits = (flat @ cb.router.weight.T + cb.router.bias)[:, :4]
        labels = batch["label"].long()
        ce = (torch.logsumexp(logits, 1) - logits[torch.arange(len(labels)), labels]).mean()
    module.release()
    assert ce > 0.1
    torch.testing.assert_close(with_router - without, 0.5 * ce, rtol=1e-5, atol=1e-6)
    from vlhooks.errors import TrainingError

    with pytest.raises(TrainingError, match=r"codes \(3\) must be at least model.num_classes \(4\)"):
        _module(dict(spec, codes=3), class_weight=0.5, num_classes=4)


def test_class_objective_errors_name_the_fix(data):
    from vlhooks.errors import TrainingError

    with pytest.raises(TrainingError, match="projection"):
        _module(ADAPTERS["kv"], class_weight=0.1)
    module = _module(ADAPTERS["projection"], class_weight=0.1, num_classes=2, drop_image=0.0, drop_text=0.0,
                     drop_both=0.0)
    module.handle = vh.apply_injection(module.dit, None, module.injection, adapter=module.adapter)
    try:
        with pytest.raises(TrainingError, match="model.num_classes to at least 4"):
            module.compute_loss(_batch(data), torch.Generator().manual_seed(0))
    finally:
        module.release()


class _FixedNoise(AdapterModule):
    """Overfitting a fixed batch: the same noise and noise levels at every step."""

    def _step_generator(self):
        return torch.Generator().manual_seed(7)


class _Losses(L.Callback):
    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"]))


def _fit(module, dm, steps, **trainer_kw):
    rec = _Losses()
    L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[rec], **trainer_kw).fit(module, dm)
    return rec.values


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    """4 real skimage photos (16x16 grey) with their real docstring captions as MiniLM tokens, and the real
    DINOv2-S features of each photo as the reference."""
    dm = PairsDataModule(source="skimage", limit=4, image_encoder={"name": "dinov2-small"},
                         caption_encoder={"name": "minilm"}, latents={"name": "pixels", "size": 16, "channels": 1},
                         batch_size=4, shuffle=False, cache_dir=str(tmp_path_factory.mktemp("toycache")))
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.mark.slow
@pytest.mark.parametrize("kind,lr", [("projection", 3e-3), ("lora", 1e-2)])
def test_overfit_fixed_batch_halves_the_loss_and_leaves_the_dit_untouched(toy_data, kind, lr):
    """The shipped toy DiT (its conditioning means something; on a random-weight DiT the injected path barely
    steers the output, and a projection only lowered the loss by 3-14 %). 200 steps on a fixed batch."""
    adapter = ({"type": "projection", "kind": "linear", "feature_width": 384} if kind == "projection"
               else {"type": "lora", "rank": 8, "alpha": 8.0})
    module = _FixedNoise(dit={"class_name": "ZImageTransformer2DModel", "checkpoint": str(ROOT / "checkpoints/toy-dit/final")},
                         adapter=adapter, injection={"blocks": "all"}, lr=lr, drop_image=0.0, drop_text=0.0,
                         drop_both=0.0)
    before = {k: v.clone() for k, v in module.dit.state_dict().items()}
    losses = _fit(module, toy_data, 200)
    assert losses[-1] <= 0.5 * losses[0], (losses[0], losses[-1])
    assert all(torch.equal(before[k], v) for k, v in module.dit.state_dict().items())


@pytest.mark.slow
@pytest.mark.parametrize("kind,extra", [("lora", {}), ("projection", {"class_weight": 1.0, "num_classes": 4})])
def test_resume_gives_the_same_adapter(data, tmp_path, kind, extra):
    """(With `class_weight` the training-only head is in the checkpoint too: the resumed adapter is the same.)"""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(steps, ckpt_dir, resume=False):
        L.seed_everything(0)
        module = _module(ADAPTERS[kind], lr=1e-2, **extra)
        ckpt = ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, save_top_k=0)
        L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                  enable_model_summary=False, callbacks=[ckpt], plugins=[SafetensorsCheckpointIO()]).fit(
            module, data, ckpt_path="last" if resume else None)
        return {k: v.clone() for k, v in module.adapter.trainable_state_dict().items()}

    straight = run(20, tmp_path / "a")
    run(10, tmp_path / "b")
    resumed = run(20, tmp_path / "b", resume=True)
    assert straight.keys() == resumed.keys()
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], atol=1e-6, rtol=0)
    assert any(not torch.equal(v, _module(ADAPTERS[kind]).adapter.trainable_state_dict()[k]) or "lora_A" in k
               for k, v in straight.items())


def _train_cmd(tmp_path, recipe, steps, *extra, env=None):
    args = [sys.executable, "-m", "vlhooks", "train", "--config", str(ROOT / recipe), "--trainer.max_steps",
            str(steps), "--model.checkpoint_root", str(tmp_path / "ckpt"), "--data.cache_dir", str(tmp_path / "cache"),
            "--trainer.enable_progress_bar", "false", *extra]
    base = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}  # a user not logged in
    return subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=tmp_path,
                          env={**base, "WANDB_SILENT": "true", **(env or {})})


@pytest.mark.slow
def test_train_command_writes_a_loadable_adapter(tmp_path):
    r = _train_cmd(tmp_path, "configs/tiny/lora.yaml", 4)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "ckpt" / "tiny-lora"
    assert sorted(p.name for p in (run / "final").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (run / "lightning" / "last.ckpt").is_file()
    assert glob.glob(str(run / "wandb" / "offline-run-*")), "wandb runs offline when not logged in"
    assert list((run / "logs").rglob("metrics.csv"))
    from PIL import Image

    sample = Image.open(run / "samples" / "step-4.png")  # fixed-seed samples at the end of training
    assert sample.size == (4 * 16 * 4, 2 * 16 * 4)
    adapter = vh.load_adapter(run / "final")
    dit = build_dit(TINY["model"]["dit"])
    kw = dict(x=[torch.randn(3, 1, 16, 16)], t=torch.tensor([0.5]), cap_feats=[torch.randn(5, 16)], return_dict=False)
    with torch.no_grad():
        base = dit(**kw)[0][0]
        with vh.inject(dit, vh.VLFeatures(torch.randn(1, 16, 16)), adapter=adapter) as h:
            assert h.config.blocks == "all"
            out = dit(**kw)[0][0]
    assert not torch.equal(out, base)
    r = _train_cmd(tmp_path, "configs/tiny/lora.yaml", 6, "--ckpt_path", "last")
    assert r.returncode == 0 and "Restored all states" in r.stdout + r.stderr, r.stderr[-3000:]
    r = _train_cmd(tmp_path, "configs/tiny/lora.yaml", 2, "--model.run_name", "no-samples", "--model.sample_count", "0")
    assert r.returncode == 0, r.stderr[-3000:]  # no samples asked for: none drawn, the adapter written
    assert not (tmp_path / "ckpt" / "no-samples" / "samples").exists()
    assert (tmp_path / "ckpt" / "no-samples" / "final" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_training_without_wandb_warns_and_completes(tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['wandb'] = None\n")
    r = _train_cmd(tmp_path, "configs/tiny/projection.yaml", 2, env={"PYTHONPATH": str(shim)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wandb is not importable" in r.stderr
    run = tmp_path / "ckpt" / "tiny-projection"
    assert (run / "final" / "adapter_model.safetensors").is_file() and list((run / "logs").rglob("metrics.csv"))
    assert not (run / "wandb").exists()


@pytest.mark.parametrize("recipe", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")
                                          if p.parent.name != "toy" and "compare" not in p.name))
def test_every_recipe_parses_and_builds_on_meta(recipe):
    from lightning.pytorch.cli import LightningArgumentParser

    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_lightning_class_args(AdapterModule, "model")
    parser.add_lightning_class_args(PairsDataModule, "data")
    parser.add_class_arguments(L.Trainer, "trainer")
    parser.add_argument("--seed_everything", type=int)
    cfg = parser.parse_path(str(ROOT / recipe))  # unknown or ill-typed keys fail here
    with torch.device("meta"):
        module = AdapterModule(**cfg.model.as_dict())
    assert next(module.dit.parameters()).device.type == "meta"
    assert module.adapter.trainable_parameters(), "an adapter with nothing to train"
    sites = vh.family_for(module.dit).select(module.dit, module.injection.blocks)
    module.adapter.check_target(vh.family_for(module.dit), module.dit, sites)
    PairsDataModule(**cfg.data.as_dict())


@pytest.mark.slow
def test_pretrain_command_trains_every_weight_and_saves_a_loadable_dit(tmp_path):
    """`vlhooks pretrain` on the toy recipe, shrunk to 4 skimage photos and 3 steps."""
    from diffusers import ZImageTransformer2DModel

    args = [sys.executable, "-m", "vlhooks", "pretrain", "--config", str(ROOT / "configs/toy/pretrain.yaml"),
            "--trainer.max_steps", "3", "--trainer.enable_progress_bar", "false", "--model.checkpoint_root",
            str(tmp_path / "ckpt"), "--model.ema_decay", "0.5", "--data.source", "skimage", "--data.limit", "4",
            "--data.batch_size", "4", "--data.caption_encoder", "{name: hash-words, width: 384}",
            "--data.cache_dir", str(tmp_path / "cache"), "--data.split", "null"]  # the recipe's split is MNIST's
    r = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=tmp_path,
                       env={**os.environ, "WANDB_MODE": "disabled"})
    assert r.returncode == 0, r.stderr[-3000:]
    final = tmp_path / "ckpt" / "toy-dit" / "final"
    assert (final / "diffusion_pytorch_model.safetensors").is_file()
    trained = ZImageTransformer2DModel.from_pretrained(final)
    cfg = yaml.safe_load((ROOT / "configs/toy/pretrain.yaml").read_text())["model"]["dit"]
    fresh = build_dit(cfg)  # the same seeded initialisation the run started from
    changed = [n for n, p in fresh.named_parameters() if not torch.equal(p, trained.state_dict()[n])]
    assert len(changed) > 0.9 * len(list(fresh.parameters())), "every weight trains in pretraining"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "z_image"])
def test_real_recipe_path_on_a_saved_pipeline_folder(tmp_path, family):
    """The real recipes' route, on a tiny pipeline saved to disk: the DiT from the folder's `transformer`,
    latents from its VAE, captions (and Flux's pooled CLIP embedding) from the pipeline's own `encode_prompt`."""
    from offline_pipelines import build_flux_pipeline, build_zimage_pipeline

    pipe = (build_flux_pipeline if family == "flux" else build_zimage_pipeline)()
    pipe.save_pretrained(tmp_path / "pipe")
    cls = type(pipe.transformer).__name__
    dm = PairsDataModule(source="skimage", limit=4, image_encoder={"name": "patches", "width": 16},
                         caption_encoder={"name": "pipeline", "path": str(tmp_path / "pipe"), "max_sequence_length": 64},
                         latents={"name": "vae", "path": str(tmp_path / "pipe"), "size": 32},
                         max_caption_tokens=64, batch_size=4, cache_dir=str(tmp_path / "cache"))
    module = AdapterModule(dit={"class_name": cls, "pretrained": str(tmp_path / "pipe"), "subfolder": "transformer"},
                           adapter={"type": "projection", "kind": "mlp", "feature_width": 16}, drop_text=0.5)
    losses = _fit(module, dm, 3)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    row = dm.dataset[0]
    assert ("pooled" in row) == (family == "flux")
    assert row["latents"].shape[0] == pipe.vae.config.latent_channels


@pytest.mark.parametrize("family,switched", [("flux", True), ("z_image", False)])
def test_cudnn_attention_is_off_for_a_flux_fit_on_cuda_and_restored_after(family, switched, monkeypatch):
    """`DiTFamily.cudnn_attention_training`: Flux.1's training step breaks cuDNN's SDPA backward on CUDA, so the
    module switches that kernel off for the fit and back to what it was on release; other families keep it."""
    from vlhooks.testing import tiny
    from vlhooks.train.module import AdapterModule

    t = tiny(family)
    mod = AdapterModule(dit={"class_name": t.class_name, "config": t.config}, adapter={"type": "projection"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the switch is a flag: no GPU needed to set it
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        mod.training_attention(True)
        assert torch.backends.cuda.cudnn_sdp_enabled() is (not switched)
        mod.training_attention(True)  # twice (on_fit_start after a resume): still restored to the first state
        mod.release()
        assert torch.backends.cuda.cudnn_sdp_enabled() is True
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def test_the_cache_holds_the_encoders_outputs_as_fixed_shape_arrays(toy_data):
    """Every padded column reads as one `Array{n}D` block, and holds what the encoders give for the same inputs."""
    import datasets

    from vlhooks.train.data import load_source
    from vlhooks.train.encoders import image_encoder, latent_encoder

    ds = toy_data.dataset
    assert isinstance(ds.features["features"], datasets.Array2D)  # [N, D] per row
    assert isinstance(ds.features["latents"], datasets.Array3D)  # [1, 16, 16]
    assert isinstance(ds.features["caption"], datasets.Array2D)  # [L_max, C]
    raw = load_source("skimage", None, 4, None)
    feats, _ = image_encoder({"name": "dinov2-small"})(raw["image"][:4])  # [4, N, D]
    latents = latent_encoder({"name": "pixels", "size": 16, "channels": 1})(raw["image"][:4])
    rows = ds[:4]
    assert torch.allclose(rows["features"], feats.float(), atol=1e-6)
    assert torch.equal(rows["latents"], latents.float())


def test_columns_in_memory_give_the_caches_rows():
    """The training loader's in-memory rows (`ColumnsInMemory`, for caches up to `IN_MEMORY_BYTES`) are the cache's
    own rows: every column, every row, the same values and dtypes as reading the `datasets` cache."""
    import datasets

    from vlhooks.train.data import ColumnsInMemory

    ds = datasets.Dataset.from_dict({"x": np.random.default_rng(0).normal(size=(6, 3, 2)).astype(np.float32),
                                     "n": list(range(6)), "m": [[True, False]] * 6})
    ds = ds.cast(datasets.Features({"x": datasets.Array2D((3, 2), "float32"), "n": datasets.Value("int64"),
                                    "m": datasets.Sequence(datasets.Value("bool"), length=2)})).with_format("torch")
    rows = ColumnsInMemory(ds)
    assert len(rows) == len(ds)
    for i in range(len(ds)):
        a, b = ds[i], rows[i]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
