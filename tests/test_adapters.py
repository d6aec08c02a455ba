"""Adapters: step 0 equals zero-shot, folders round-trip, bad files and wrong models fail clearly, LoRA touches
only the injected tokens."""

import json

import pytest
import torch

import vlhooks as vh
from conftest import snapshot
from tiny import build, caption_width, inputs, output

FAMS = ["z_image", "flux", "sd3", "sd35"]


def _frozen(family):
    model = build(family)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _feats(family, width=None, n=5):
    g = torch.Generator().manual_seed(4)
    return vh.VLFeatures(torch.randn(1, n, width or caption_width(family), generator=g))


def _adapters(model, family):
    w = caption_width(family)
    return {
        "projection-linear": vh.ProjectionAdapter.create(model, w),
        "projection-mlp": vh.ProjectionAdapter.create(model, w, kind="mlp"),
        "projection-mixer": vh.ProjectionAdapter.create(model, w, kind="mlp", mix_depth=2, heads=2),
        "projection-codes": vh.ProjectionAdapter.create(model, w, kind="mlp", codes=4, code_tokens=5),
        "kv": vh.KVAdapter.create(model),
        "kv-double-only": vh.KVAdapter.create(model, blocks=[0, 1]),
        "lora": vh.LoRAAdapter.create(model, rank=4, alpha=8),
        "lora-projection": vh.LoRAAdapter.create(model, rank=4, alpha=8, projection={"kind": "mlp"}),
    }


def _perturb(adapter, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("family", FAMS)
@pytest.mark.parametrize("mode", ["joint", "decoupled"])
@torch.no_grad()
def test_fresh_adapter_equals_zero_shot(family, mode):
    """Bit-identical: identity / zero-init / copied weights compute the same floating-point ops as zero-shot."""
    model = _frozen(family)
    kw = inputs(family, batch=2)
    for name, adapter in _adapters(model, family).items():
        blocks = [0, 1] if name == "kv-double-only" else "all"
        cfg = vh.InjectionConfig(mode=mode, blocks=blocks)
        with vh.inject(model, _feats(family), cfg):
            zero_shot = output(model, kw)
        with vh.inject(model, _feats(family), cfg, adapter=adapter):
            assert torch.equal(output(model, kw), zero_shot), name


@pytest.mark.parametrize("family", ["flux", "z_image"])
@torch.no_grad()
def test_saved_adapter_round_trips(tmp_path, family):
    model = _frozen(family)
    kw = inputs(family)
    for name, adapter in _adapters(model, family).items():
        _perturb(adapter)
        blocks = [0, 1] if name == "kv-double-only" else "all"
        cfg = vh.InjectionConfig(blocks=blocks, scale=0.7)
        adapter.config.injection = cfg.to_dict()
        with vh.inject(model, _feats(family), cfg, adapter=adapter):
            trained = output(model, kw)
        with vh.inject(model, _feats(family), vh.InjectionConfig(blocks=blocks)):
            assert not torch.equal(output(model, kw), trained), f"{name}: perturbed weights must matter"
        adapter.save(tmp_path / name)
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        loaded = vh.load_adapter(tmp_path / name)
        with vh.inject(model, _feats(family), None, adapter=loaded) as h:  # config=None: the adapter's own
            assert h.config == cfg
            assert torch.equal(output(model, kw), trained), name


def test_resampler_and_other_widths(tmp_path):
    model = _frozen("flux")
    kw = inputs("flux")
    with pytest.raises(vh.FeatureError, match=r"width 24 .* use a trained adapter"):
        vh.apply_injection(model, _feats("flux", width=24), vh.InjectionConfig())
    lora = vh.LoRAAdapter.create(model, 24, rank=2)  # another width: a linear projection in front
    assert lora.config.options.projection["kind"] == "linear"
    _perturb(lora)
    with torch.no_grad(), vh.inject(model, _feats("flux", width=24, n=7), vh.InjectionConfig(), adapter=lora):
        out = output(model, kw)
    lora.save(tmp_path / "lora")
    loaded = vh.load_adapter(tmp_path / "lora")
    with torch.no_grad(), vh.inject(model, _feats("flux", width=24, n=7), vh.InjectionConfig(), adapter=loaded):
        assert torch.equal(output(model, kw), out)
    for kind in ("linear", "mlp", "resampler"):
        adapter = vh.ProjectionAdapter.create(model, 24, kind=kind, num_tokens=3)
        with torch.no_grad(), vh.inject(model, _feats("flux", width=24, n=7), vh.InjectionConfig(), adapter=adapter) as h:
            out = output(model, kw)
            if kind == "resampler":  # 3 learned query tokens reach every block
                assert h.injector.embedded(h.injector.sites[0])[0].shape[1] == 3
        assert torch.isfinite(out).all()
        adapter.save(tmp_path / kind)
        assert type(vh.load_adapter(tmp_path / kind)) is vh.ProjectionAdapter


@torch.no_grad()
def test_token_mixer_reads_every_token_and_ignores_padding():
    """A (perturbed) token mixer makes each projected token depend on the reference's other tokens, unlike the
    tokenwise mlp, and a padded token (mask False) changes nothing, whatever its values."""
    model = _frozen("z_image")
    w = caption_width("z_image")
    mixer = vh.ProjectionAdapter.create(model, w, kind="mlp", mix_depth=1, heads=2)
    mlp = vh.ProjectionAdapter.create(model, w, kind="mlp")
    _perturb(mixer)
    _perturb(mlp)
    x = _feats("z_image", n=5).tokens
    y = x.clone()
    y[:, 4] += 3.0  # another last token
    for adapter, mixes in ((mixer, True), (mlp, False)):
        first = adapter.project(x)[:, :4]
        assert torch.equal(first, adapter.project(y)[:, :4]) is not mixes
    mask = torch.tensor([[True, True, True, True, False]])
    assert torch.equal(mixer.project(x, mask)[:, :4], mixer.project(y, mask)[:, :4])
    kw = inputs("z_image")
    with vh.inject(model, vh.VLFeatures(x, mask), vh.InjectionConfig(), adapter=mixer):
        a = output(model, kw)
    with vh.inject(model, vh.VLFeatures(y, mask), vh.InjectionConfig(), adapter=mixer):
        assert torch.equal(output(model, kw), a)
    with pytest.raises(vh.AdapterError, match="mix_depth applies to the linear and mlp"):
        vh.ProjectionAdapter.create(model, w, kind="resampler", mix_depth=1)
    with pytest.raises(vh.AdapterError, match="must divide the feature width"):
        vh.ProjectionAdapter.create(model, w, kind="mlp", mix_depth=1, heads=w + 1)


@torch.no_grad()
def test_codebook_adds_the_routed_mix_of_codes():
    """`codes`: the projection's output is the mlp's plus softmax(router(LN(flatten(tokens, padding zeroed)))) @
    codebook, written out here by hand; a wrong token count and a resampler with codes fail with the fix."""
    model = _frozen("z_image")
    w = caption_width("z_image")
    adapter = vh.ProjectionAdapter.create(model, w, kind="mlp", codes=3, code_tokens=5)
    _perturb(adapter)
    x = _feats("z_image", n=5).tokens  # [1, 5, C]
    mask = torch.tensor([[True, True, True, False, False]])
    cb = adapter.codebook
    flat = (x * mask[..., None]).flatten(1)  # [1, 5C]
    flat = (flat - flat.mean(-1, keepdim=True)) / torch.sqrt(flat.var(-1, unbiased=False, keepdim=True) + 1e-5)
    flat = flat * cb.norm.weight + cb.norm.bias
    weights = torch.softmax(flat @ cb.router.weight.T + cb.router.bias, -1)  # [1, 3]
    codes = (weights[:, :, None, None] * cb.codebook[None]).sum(1)  # [1, 5, C]
    mlp = vh.ProjectionAdapter.create(model, w, kind="mlp")
    mlp.load_state_dict({k: v for k, v in adapter.state_dict().items() if not k.startswith("codebook.")})
    torch.testing.assert_close(adapter.project(x, mask), mlp.project(x, mask) + codes, rtol=1e-5, atol=1e-5)
    assert codes.abs().max() > 1e-3  # the perturbed codebook matters
    with pytest.raises(vh.AdapterError, match="reads 5 tokens per reference, got 7"):
        adapter.project(_feats("z_image", n=7).tokens)
    with pytest.raises(vh.AdapterError, match="codes applies to the linear and mlp"):
        vh.ProjectionAdapter.create(model, w, kind="resampler", codes=4)


def test_lora_changes_only_the_injected_tokens():
    """The block's own text keys are the same with a (non-zero) LoRA adapter as without: LoRA sits on the
    injected path only, and the model's modules are never replaced."""
    model = _frozen("flux")
    kw = inputs("flux", cap_len=8)
    adapter = vh.LoRAAdapter.create(model, rank=2)
    _perturb(adapter)
    before = snapshot(model)
    seen = []
    hook = model.transformer_blocks[0].attn.add_k_proj.register_forward_hook(
        lambda m, a, o: seen.append(o.clone()) if a[0].shape[1] == 8 else None)
    with torch.no_grad():
        output(model, kw)
        with vh.inject(model, _feats("flux"), vh.InjectionConfig(), adapter=adapter):
            assert type(model.transformer_blocks[0].attn.add_k_proj) is torch.nn.Linear
            output(model, kw)
    hook.remove()
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])
    assert snapshot(model) == before


def test_bad_adapter_files_and_models(tmp_path):
    model = _frozen("flux")
    kw = inputs("flux")
    with torch.no_grad():
        base = output(model, kw)
    before = snapshot(model)
    adapter = vh.LoRAAdapter.create(model, rank=2)
    adapter.save(tmp_path / "ok")

    with pytest.raises(vh.AdapterError, match="not an adapter folder"):
        vh.load_adapter(tmp_path / "missing")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "adapter_config.json").write_text((tmp_path / "ok" / "adapter_config.json").read_text())
    (tmp_path / "corrupt" / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(vh.AdapterError, match="corrupt or not a safetensors"):
        vh.load_adapter(tmp_path / "corrupt")
    cfg = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())
    cfg["options"]["rank"] = 3
    (tmp_path / "ok" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(vh.AdapterError, match="options"):
        vh.load_adapter(tmp_path / "ok")
    (tmp_path / "ok" / "adapter_config.json").write_text("{not json")
    with pytest.raises(vh.AdapterError, match="corrupt"):
        vh.load_adapter(tmp_path / "ok")

    other = vh.KVAdapter.create(build("sd3"))
    with pytest.raises(vh.AdapterError, match="fitted on SD3Transformer2DModel, not FluxTransformer2DModel"):
        vh.apply_injection(model, _feats("flux"), vh.InjectionConfig(), adapter=other)
    partial = vh.KVAdapter.create(model, blocks="double")
    with pytest.raises(vh.AdapterError, match="no weights for blocks"):
        vh.apply_injection(model, _feats("flux"), vh.InjectionConfig(blocks="all"), adapter=partial)
    assert snapshot(model) == before
    with torch.no_grad():
        assert torch.equal(output(model, kw), base)


def test_save_is_atomic(tmp_path, monkeypatch):
    """A crash while saving leaves the previous adapter folder intact."""
    model = _frozen("flux")
    adapter = vh.ProjectionAdapter.create(model, 32)
    adapter.save(tmp_path / "a")
    original = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    _perturb(adapter)
    import vlhooks.adapters.base as base

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(base, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        adapter.save(tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


@torch.no_grad()
def test_lora_delta_is_pefts_forward_after_its_base():
    """`lora._with_delta(w, base_layer(x), x)` is peft's `lora.Linear.forward(x)` bit for bit (the path the LoRA
    adapter takes where its base GEMM runs as another kernel), with trained weights, another dtype for the LoRA,
    and a scaling other than 1; `_plain` says no once the LoRA is merged into its base."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    from vlhooks.adapters import lora

    torch.manual_seed(0)
    base = torch.nn.Linear(16, 12).to(torch.bfloat16)
    w = LoraLinear(base, lora.PEFT_NAME, config=LoraConfig(r=4, lora_alpha=6, target_modules=["_"]), r=4,
                   lora_alpha=6)
    torch.nn.init.normal_(w.lora_B[lora.PEFT_NAME].weight)
    w.lora_A[lora.PEFT_NAME].float()
    w.lora_B[lora.PEFT_NAME].float()  # float32 LoRA on a bf16 base
    x = torch.randn(3, 5, 16).to(torch.bfloat16)
    assert lora._plain(w) and w.scaling[lora.PEFT_NAME] == 1.5
    got = lora._with_delta(w, base(x), x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, w(x))
    assert not torch.equal(got, base(x))
    w.merge()
    assert not lora._plain(w)
