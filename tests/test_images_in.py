"""Images wherever features go, and adapters from a Hub id: each against the long route it replaces."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import vlhooks as vh
from conftest import snapshot
from vlhooks.testing import build, inputs, output, pipeline, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
PATCHES = {"name": "patches", "width": 32, "size": 32, "patch": 8}


def _image(seed=0, size=32):
    return (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)


def _adapter(model, width=32):
    a = vh.ProjectionAdapter.create(model, width, kind="mlp")
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    a.config.feature_source = dict(PATCHES)
    return a


@torch.no_grad()
def test_an_image_equals_the_long_route_on_a_tiny_pipeline():
    pipe = pipeline("flux")
    adapter = _adapter(pipe.transformer)
    image = _image()
    with vh.inject(pipe, image, adapter=adapter):
        short = run_pipeline(pipe, "flux")
    from vlhooks.encoders.patches import PatchImageEncoder

    tokens, _ = PatchImageEncoder(32, size=32, patch=8)([image])  # the encoder, called by hand
    with vh.inject(pipe, vh.VLFeatures(tokens), adapter=adapter):
        long = run_pipeline(pipe, "flux")
    assert torch.equal(short, long)
    with vh.inject(pipe, [image, image], adapter=adapter) as h:  # a list: one reference, a row per image
        assert h.injector.references[0].features.batch_size == 2


@torch.no_grad()
def test_explicit_encoder_and_references_of_images():
    model = build("flux")
    kw = inputs("flux")
    image, other = _image(0), _image(1)
    with vh.inject(model, image, encoder=PATCHES):
        short = output(model, kw)
    with vh.inject(model, vh.encode(image, PATCHES)):
        assert torch.equal(output(model, kw), short)
    with vh.inject(model, [vh.Reference(image, scale=0.5), vh.Reference(other)], encoder=PATCHES):
        both = output(model, kw)
    with vh.inject(model, [vh.Reference(vh.encode(image, PATCHES), scale=0.5),
                           vh.Reference(vh.encode(other, PATCHES))]):
        assert torch.equal(output(model, kw), both)


def test_an_image_without_an_encoder_is_a_named_error():
    model = build("flux")
    before = snapshot(model)
    with pytest.raises(vh.FeatureError, match="encoder="):
        vh.apply_injection(model, _image())
    with pytest.raises(vh.FeatureError, match="encoder="):
        vh.apply_injection(model, _image(), adapter=vh.ProjectionAdapter.create(model, 32))  # records no encoder
    assert snapshot(model) == before and vh.get_injection(model) is None


def test_encode_caches_per_image_and_settings(monkeypatch):
    from vlhooks import encoding

    calls = []
    enc = encoding.image_encoder(PATCHES)
    real = type(enc).__call__
    monkeypatch.setattr(type(enc), "__call__", lambda self, items: calls.append(len(items)) or real(self, items))
    a = vh.encode(_image(5), PATCHES)
    b = vh.encode(_image(5), PATCHES)
    assert torch.equal(a.tokens, b.tokens) and calls == [1]
    vh.encode(_image(5), {**PATCHES, "seed": 1})  # other settings: encoded again
    assert calls == [1, 1]


@pytest.mark.slow
@torch.no_grad()
def test_an_image_equals_the_long_route_in_the_toy_world():
    """The shipped toy adapter records DINOv2-S at 56 px, CLS, layer 6; an image in equals extracting it by hand."""
    from vlhooks.encoders import load_extractor
    from vlhooks.models import load_transformer
    from vlhooks.train.data import load_source

    dit = load_transformer(str(ROOT / "checkpoints/toy-dit/final"))
    adapter = vh.load_adapter(ROOT / "checkpoints/toy-projection/final")
    digit = load_source("mnist", split="heldout")["image"][0]
    fam = vh.family_for(dit)
    x = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    caption = torch.randn(1, 6, 384, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.6])
    with vh.inject(dit, digit, adapter=adapter):
        short = fam.velocity(dit, x, sigma, caption)
    feats = load_extractor("dinov2-small", image_size=56, include_cls=True, layer=6)([digit])
    with vh.inject(dit, feats, adapter=adapter):
        assert torch.equal(fam.velocity(dit, x, sigma, caption), short)


def _seed_hub_cache(cache: Path, repo: str, folder: Path, commit: str = "0" * 40) -> None:
    """A Hugging Face cache entry as `huggingface_hub` writes it (blobs aside: plain files in the snapshot)."""
    entry = cache / f"models--{repo.replace('/', '--')}"
    snap = entry / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        shutil.copy(f, snap / f.name)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(commit)


def test_load_adapter_from_a_hub_id_through_a_seeded_offline_cache(tmp_path):
    model = build("flux")
    saved = _adapter(model).save(tmp_path / "adapter")
    cache = tmp_path / "hub"
    _seed_hub_cache(cache, "someone/tiny-flux-adapter", saved)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    code = ("import json, torch, vlhooks as vh; a = vh.load_adapter('someone/tiny-flux-adapter'); "
            "b = vh.load_adapter(r'%s'); "
            "print(json.dumps({'equal': all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items()), "
            "'source': a.config.feature_source}))" % saved)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"equal": True, "source": PATCHES}
    missing = subprocess.run([sys.executable, "-c", "import vlhooks as vh; vh.load_adapter('someone/not-there')"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0
    assert "AdapterError" in missing.stderr and "HF_HUB_OFFLINE" in missing.stderr
