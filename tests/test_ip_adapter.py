"""`vh.import_ip_adapter`: the IP-Adapters people have (XLabs / diffusers Flux, InstantX Flux, InstantX SD3.5) as
vlhooks adapters.

The oracle is diffusers itself: its `FluxIPAdapterAttnProcessor` / `SD3IPAdapterJointAttnProcessor2_0`, installed
with random tiny weights through `transformer._load_ip_adapter_weights`, called with
`joint_attention_kwargs={"ip_adapter_image_embeds": ...}`. InstantX's Flux IP-Adapter is not in diffusers; its
reference is its formula (Shakker-Labs' ComfyUI node), written here in float64.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from diffusers.models.attention_processor import JointAttnProcessor2_0, SD3IPAdapterJointAttnProcessor2_0
from diffusers.models.embeddings import IPAdapterTimeImageProjection
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from safetensors.torch import save_file

import vlhooks as vh
from conftest import snapshot
from vlhooks.testing import build, inputs, output, tiny

D_IMG = 12  # image-embedding width of the tiny IP-Adapters


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _model(name, seed=0):
    """A tiny DiT; `"sd35l"`: SD3.5 Large's layout (RMS qk-norm, no dual attention), which InstantX's adapter fits."""
    if name == "sd35l":
        torch.manual_seed(seed)
        return SD3Transformer2DModel(**dict(tiny("sd35").config, dual_attention_layers=())).eval()
    return build(name, seed)


def _randomize(module, g):
    """Every parameter random (norm weights around 1), so that each one shows in the output."""
    with torch.no_grad():
        for n, p in module.named_parameters():
            around = 1.0 if p.ndim == 1 and "norm" in n and not n.endswith("bias") else 0.0
            p.copy_(around + 0.3 * torch.randn(p.shape, generator=g))
    return module


def flux_weights(model, seed=1, tokens=4):
    """XLabs' architecture in diffusers' dict layout (`load_ip_adapter`'s), at the tiny model's widths."""
    g = _gen(seed)
    c, inner = model.config.joint_attention_dim, model.inner_dim

    def r(*s):
        return 0.3 * torch.randn(*s, generator=g)

    proj = {"proj.weight": r(tokens * c, D_IMG), "proj.bias": r(tokens * c), "norm.weight": 1 + r(c), "norm.bias": r(c)}
    ip = {f"{i}.to_{w}_ip.{p}": r(inner, c) if p == "weight" else r(inner)
          for i in range(len(model.transformer_blocks)) for w in "kv" for p in ("weight", "bias")}
    return {"image_proj": proj, "ip_adapter": ip}


def xlabs_layout(sd):
    """The same weights as XLabs publish them (`ip_adapter.safetensors`)."""
    out = {f"ip_adapter_proj_model.{k}": v for k, v in sd["image_proj"].items()}
    for k, v in sd["ip_adapter"].items():
        i, w, p = k.split(".")
        w = {"to_k_ip": "ip_adapter_double_stream_k_proj", "to_v_ip": "ip_adapter_double_stream_v_proj"}[w]
        out[f"double_blocks.{i}.processor.{w}.{p}"] = v
    return out


def sd3_weights(model, seed=1, queries=6):
    """InstantX's SD3.5 architecture in diffusers' names: the resampler (depth 4, dim_head 64, as diffusers' loader
    assumes) and one processor state per attention processor of the model, all at tiny widths."""
    g = _gen(seed)
    inner, hd = model.inner_dim, model.config.attention_head_dim
    torch.manual_seed(seed)
    proj = _randomize(IPAdapterTimeImageProjection(embed_dim=D_IMG, output_dim=inner, hidden_dim=16, depth=4,
                                                   dim_head=64, heads=1, num_queries=queries, timestep_in_dim=8), g)
    ip = {}
    for i in range(len(model.attn_processors)):
        p = _randomize(SD3IPAdapterJointAttnProcessor2_0(inner, inner, hd, timesteps_emb_dim=16), g)
        ip.update({f"{i}.{k}": v for k, v in p.state_dict().items()})
    return {"image_proj": proj.state_dict(), "ip_adapter": ip}


_SD3_NAMES = (("ln0", "0.norm1"), ("ln1", "0.norm2"), ("attn.to_q", "0.to_q"), ("attn.to_kv", "0.to_kv"),
              ("attn.to_out.0", "0.to_out"), ("adaln_norm", "1.0"), ("ff.net.0.proj", "1.1"), ("ff.net.2", "1.3"),
              ("adaln_proj", "2.1"))


def instantx_sd3_layout(sd):
    """The same weights in InstantX's SD3.5 names (what diffusers' `_convert_ip_adapter_image_proj_to_diffusers`
    renames), flattened under `image_proj.` / `ip_adapter.` as a converted single file holds them."""
    out = {}
    for k, v in sd["image_proj"].items():
        if k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            for new, old in _SD3_NAMES:
                if rest.startswith(new + "."):
                    rest = old + rest[len(new):]
                    break
            k = f"layers.{i}.{rest}"
        out[f"image_proj.{k}"] = v
    out.update({f"ip_adapter.{k}": v for k, v in sd["ip_adapter"].items()})
    return out


def instantx_flux_weights(model, seed=2, tokens=3, hidden=20):
    """InstantX's Flux layout (flat, as its ComfyUI node reads it): `image_proj.proj.{0,2}` + `norm`, and
    `ip_adapter.{i}.to_{k,v}_ip.weight` (no bias) for the double blocks then the single blocks."""
    g = _gen(seed)
    c, inner = model.config.joint_attention_dim, model.inner_dim
    n = len(model.transformer_blocks) + len(model.single_transformer_blocks)

    def r(*s):
        return 0.3 * torch.randn(*s, generator=g)

    out = {"image_proj.proj.0.weight": r(hidden, D_IMG), "image_proj.proj.0.bias": r(hidden),
           "image_proj.proj.2.weight": r(tokens * c, hidden), "image_proj.proj.2.bias": r(tokens * c),
           "image_proj.norm.weight": 1 + r(c), "image_proj.norm.bias": r(c)}
    out.update({f"ip_adapter.{i}.to_{w}_ip.weight": r(inner, c) for i in range(n) for w in "kv"})
    return out


def _installed(name, seed=0):
    """A tiny model, and a copy with diffusers' IP-Adapter installed (random tiny weights)."""
    plain = _model(name, seed)
    ref = copy.deepcopy(plain)
    sd = flux_weights(plain) if name == "flux" else sd3_weights(plain)
    ref._load_ip_adapter_weights(sd, low_cpu_mem_usage=False)
    return plain, ref, sd


def _embeds(name, batch=2, seed=5):
    """What diffusers takes as `ip_adapter_image_embeds`: Flux `[B, num_images, D]`, SD3 `[B, N, D]`."""
    return torch.randn(batch, 2 if name == "flux" else 5, D_IMG, generator=_gen(seed))


def _family_inputs(name):
    return "flux" if name == "flux" else "sd3"


def _diffusers(ref, name, emb, kw):
    jak = {"ip_adapter_image_embeds": [emb] if name == "flux" else emb}  # the transformer pops it: a new dict
    return output(ref, dict(kw, joint_attention_kwargs=jak))


def _set_scales(ref, name, scales):
    """diffusers' per-block IP scales (`set_ip_adapter_scale` writes the same attribute)."""
    for i, s in scales.items():
        p = ref.transformer_blocks[i].attn.processor
        p.scale = [s] if name == "flux" else s


FAMILIES = ["flux", "sd3", "sd35l"]


# ---------------------------------------------------------------------------------------------------- 1. oracle
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_imported_adapter_reproduces_diffusers(name, scale):
    plain, ref, _ = _installed(name)
    n = len(ref.transformer_blocks)
    _set_scales(ref, name, {i: scale for i in range(n)})
    emb, kw = _embeds(name), inputs(_family_inputs(name), batch=2)
    with torch.no_grad():
        want = _diffusers(ref, name, emb, kw)
        base = output(plain, kw)
        adapter = vh.import_ip_adapter(ref)  # remove=True: diffusers' IP-Adapter is taken out again
        assert torch.equal(output(ref, kw), base)  # the restored model is the plain model
        plain_proc = FluxAttnProcessor if name == "flux" else JointAttnProcessor2_0
        assert all(type(b.attn.processor) is plain_proc for b in ref.transformer_blocks)
        assert not hasattr(ref, "encoder_hid_proj") and not hasattr(ref, "image_proj")
        assert adapter.config.injection["scale"] == scale
        assert adapter.config.injection["placement"] == ("block_output" if name == "flux" else "image_joint")
        with vh.inject(ref, vh.VLFeatures(emb), None, adapter=adapter):
            got = output(ref, kw)
        assert torch.equal(output(ref, kw), base)  # removal restores the model
    assert (want - base).abs().max() > 1e-2  # the IP-Adapter does something
    assert (got - want).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_set_scale_per_block_scales_and_block_subsets_match_diffusers(name):
    """`handle.set_scale` on an adapter imported at scale 1 equals diffusers' fractional scale; a per-block scale
    dict equals diffusers' per-block scales; a block subset equals diffusers with the other blocks at scale 0."""
    _, ref, _ = _installed(name)
    n = len(ref.transformer_blocks)
    cases = {"fraction": {i: 0.6 for i in range(n)}, "per_block": {i: [0.4, 1.5, 0.9][i] for i in range(n)},
             "subset": {i: 0.0 if i == 0 else 1.0 for i in range(n)}}
    emb, kw = _embeds(name), inputs(_family_inputs(name), batch=2)
    with torch.no_grad():
        wants = {}
        for case, scales in cases.items():
            _set_scales(ref, name, scales)
            wants[case] = _diffusers(ref, name, emb, kw)
        _set_scales(ref, name, {i: 1.0 for i in range(n)})
        adapter = vh.import_ip_adapter(ref)
        stored = adapter.config.injection
        assert stored["scale"] == 1.0 and stored["blocks"] == list(range(n))
        got = {}
        with vh.inject(ref, vh.VLFeatures(emb), vh.InjectionConfig.from_dict(stored), adapter=adapter) as handle:
            handle.set_scale(0.6)
            got["fraction"] = output(ref, kw)
            handle.set_scale(cases["per_block"])
            got["per_block"] = output(ref, kw)
        subset = vh.InjectionConfig.from_dict({**stored, "blocks": list(range(1, n))})
        with vh.inject(ref, vh.VLFeatures(emb), subset, adapter=adapter) as handle:
            assert handle.sites == [f"transformer_blocks.{i}" for i in range(1, n)]
            got["subset"] = output(ref, kw)
    for case in cases:
        assert (got[case] - wants[case]).abs().max() <= 1e-5, case
    assert (got["subset"] - got["per_block"]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_window_outside_is_the_unpatched_model(name):
    """Outside the window the model is bit-identical to the plain one; inside it equals diffusers."""
    plain, ref, _ = _installed(name)
    emb, fam = _embeds(name), _family_inputs(name)
    inside, outside = inputs(fam, batch=2, progress=0.7), inputs(fam, batch=2, progress=0.3)
    with torch.no_grad():
        want = _diffusers(ref, name, emb, inside)
        adapter = vh.import_ip_adapter(ref)
        cfg = vh.InjectionConfig(**{**adapter.config.injection, "window": (0.5, 1.0)})
        base = output(ref, outside)
        with vh.inject(ref, vh.VLFeatures(emb), cfg, adapter=adapter) as handle:
            got_out = output(ref, outside)
            got_in = output(ref, inside)
            assert handle.injector.injected_calls == 1
    assert torch.equal(got_out, base)
    assert (got_in - want).abs().max() <= 1e-5


def test_masked_reference_image_is_left_out():
    """Flux: two images per row, the second masked out, equals the first image alone (its tokens all masked)."""
    _, ref, _ = _installed("flux")
    emb, kw = _embeds("flux", batch=1), inputs("flux")
    with torch.no_grad():
        adapter = vh.import_ip_adapter(ref)
        with vh.inject(ref, vh.VLFeatures(emb[:, :1]), None, adapter=adapter):
            one = output(ref, kw)
        mask = torch.tensor([[True, False]])
        with vh.inject(ref, vh.VLFeatures(emb, mask=mask), None, adapter=adapter):
            masked = output(ref, kw)
    torch.testing.assert_close(masked, one, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["sd3", "instantx"])
def test_rows_switched_off_are_exact(name):
    """Features for row 0 only: row 1 equals the plain model bit for bit, row 0 the all-rows result (placements
    `"image_joint"` and `"pre_rope"` on a row subset)."""
    if name == "instantx":
        model = build("flux")
        adapter, fam = vh.import_ip_adapter(model, weights=instantx_flux_weights(model)), "flux"
    else:
        _, model, _ = _installed(name)
        adapter, fam = vh.import_ip_adapter(model), name
    emb, kw = vh.VLFeatures(_embeds(fam)), inputs(_family_inputs(fam), batch=2)
    with torch.no_grad():
        base = output(model, kw)
        with vh.inject(model, emb, None, adapter=adapter) as handle:
            every = output(model, kw)
            handle.set_features(emb, active=[True, False])
            some = output(model, kw)
    assert torch.equal(some[1], base[1])
    torch.testing.assert_close(some[0], every[0], rtol=0, atol=1e-5)
    assert (some[0] - base[0]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------- 2. InstantX Flux
def _rms(x, eps, weight=None):
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x if weight is None else x * weight.double()


def _instantx_reference(model, sd, site_index, x, emb, scale):
    """InstantX's formula in float64, from the weights: tokens `c = LN(W2 gelu(W0 e + b0) + b2)` per image; per
    block `k = RMS(W_k c)`, `v = RMS(W_v c)` per head (no affine, eps 1e-5); queries `RMS_w(W_q x)` (the block's
    qk-norm, no RoPE); `scale * softmax(q k^T / sqrt(d)) v`, `[1, L, H * Dh]`."""
    w = {k: v.double() for k, v in sd.items()}
    attn = vh.list_sites(model)[site_index]
    attn = model.get_submodule(attn).attn
    hd, c = attn.head_dim, model.config.joint_attention_dim
    e = emb.double()[0]  # [n, D_img]
    h = F.gelu(e @ w["image_proj.proj.0.weight"].T + w["image_proj.proj.0.bias"])
    t = (h @ w["image_proj.proj.2.weight"].T + w["image_proj.proj.2.bias"]).reshape(-1, c)  # [n T, C]
    t = F.layer_norm(t, (c,), w["image_proj.norm.weight"], w["image_proj.norm.bias"], eps=1e-5)
    k = _rms((t @ w[f"ip_adapter.{site_index}.to_k_ip.weight"].T).unflatten(-1, (-1, hd)), 1e-5)  # [N, H, Dh]
    v = _rms((t @ w[f"ip_adapter.{site_index}.to_v_ip.weight"].T).unflatten(-1, (-1, hd)), 1e-5)
    q = (x.double()[0] @ attn.to_q.weight.double().T + attn.to_q.bias.double()).unflatten(-1, (-1, hd))
    q = _rms(q, attn.norm_q.eps, attn.norm_q.weight)  # [L, H, Dh]
    logits = torch.einsum("lhd,nhd->hln", q, k) / math.sqrt(hd)
    return scale * torch.einsum("hln,nhd->lhd", logits.softmax(-1), v).flatten(1)[None]  # [1, L, H Dh]


def _attn_io(module):
    seen = {}

    def hook(mod, args, kwargs, out):
        seen["in"], seen["out"] = kwargs, out

    return seen, module.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("site_index", [1, 2])  # a double block, then a single block
def test_instantx_flux_equals_its_formula(site_index):
    """One block patched: its attention output moves by the formula's term, before the output projection (double:
    `to_out`'s weight times it, the text stream untouched; single: the term itself, into `proj_out`'s input)."""
    model = build("flux")
    sd = instantx_flux_weights(model)
    adapter = vh.import_ip_adapter(model, weights=sd)
    assert adapter.config.injection["placement"] == "pre_rope"
    assert adapter.config.sites == vh.list_sites(model)  # all 2 + 2 blocks
    attn = model.get_submodule(vh.list_sites(model)[site_index]).attn
    emb, kw, scale = _embeds("flux", batch=1), inputs("flux"), 0.7
    cfg = vh.InjectionConfig(blocks=[site_index], mode="decoupled", placement="pre_rope", scale=scale)
    with torch.no_grad():
        seen, h = _attn_io(attn)
        base_full = output(model, kw)
        plain = seen["out"]
        with vh.inject(model, vh.VLFeatures(emb), cfg, adapter=adapter):
            full = output(model, kw)
        h.remove()
        got, x = seen["out"], seen["in"]["hidden_states"]
    ref = _instantx_reference(model, sd, site_index, x, emb, scale)  # [1, L, D]
    if site_index < len(model.transformer_blocks):  # double: (image stream, text stream)
        assert torch.equal(got[1], plain[1])
        want = ref @ attn.to_out[0].weight.double().T
        torch.testing.assert_close(got[0].double() - plain[0].double(), want, rtol=0, atol=1e-5)
    else:  # single: the attention output of [txt, img]
        torch.testing.assert_close(got.double() - plain.double(), ref, rtol=0, atol=1e-5)
    assert (full - base_full).abs().max() > 1e-3


def test_instantx_flux_every_block_and_window():
    model = build("flux")
    adapter = vh.import_ip_adapter(model, weights=instantx_flux_weights(model))
    emb = vh.VLFeatures(_embeds("flux", batch=2))
    inside, outside = inputs("flux", batch=2, progress=0.2), inputs("flux", batch=2, progress=0.8)
    with torch.no_grad():
        base_in, base_out = output(model, inside), output(model, outside)
        cfg = vh.InjectionConfig(**{**adapter.config.injection, "window": (0.0, 0.5)})
        with vh.inject(model, emb, cfg, adapter=adapter):
            got_in, got_out = output(model, inside), output(model, outside)
    assert torch.equal(got_out, base_out)
    assert (got_in - base_in).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------------- 3. layouts
def _outputs(model, adapter, name, emb):
    with torch.no_grad(), vh.inject(model, vh.VLFeatures(emb), None, adapter=adapter):
        return output(model, inputs(_family_inputs(name), batch=2))


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa) and a.config.to_dict() == \
        b.config.to_dict()


def test_xlabs_file_equals_diffusers_layout_and_installed(tmp_path):
    plain, ref, sd = _installed("flux")
    save_file(xlabs_layout(sd), str(tmp_path / "ip_adapter.safetensors"))
    from_file = vh.import_ip_adapter(plain, weights=tmp_path / "ip_adapter.safetensors")
    from_dict = vh.import_ip_adapter(plain, weights=sd)
    from_model = vh.import_ip_adapter(ref)
    assert from_file.config.options.source == "xlabs" and from_dict.config.options.source == "diffusers"
    for a in (from_file, from_dict, from_model):
        a.config.options.source = "diffusers"
    assert _same(from_file, from_dict) and _same(from_dict, from_model)
    emb = _embeds("flux")
    assert torch.equal(_outputs(plain, from_file, "flux", emb), _outputs(ref, from_model, "flux", emb))


@pytest.mark.parametrize("name", ["sd3", "sd35l"])
def test_instantx_sd35_layout_equals_diffusers_layout(name, tmp_path):
    plain, ref, sd = _installed(name)
    save_file(instantx_sd3_layout(sd), str(tmp_path / "ip-adapter.safetensors"))
    from_file = vh.import_ip_adapter(plain, weights=str(tmp_path / "ip-adapter.safetensors"))
    from_dict = vh.import_ip_adapter(plain, weights=sd)
    from_model = vh.import_ip_adapter(ref)
    assert from_file.config.options.source == "instantx"
    from_file.config.options.source = "diffusers"
    assert _same(from_file, from_dict) and _same(from_dict, from_model)
    emb = _embeds(name)
    assert torch.equal(_outputs(plain, from_file, name, emb), _outputs(ref, from_model, name, emb))


def test_instantx_flux_flat_and_nested_layouts_agree():
    model = build("flux")
    flat = instantx_flux_weights(model)
    nested = {g: {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith(g + ".")}
              for g in ("image_proj", "ip_adapter")}
    a, b = vh.import_ip_adapter(model, weights=flat), vh.import_ip_adapter(model, weights=nested)
    assert _same(a, b)
    assert a.config.options.kind == "flux_instantx" and a.config.options.image_proj["num_tokens"] == 3


def test_create_adapter_imports_the_weights():
    model = build("flux")
    sd = flux_weights(model)
    assert _same(vh.create_adapter("ip_adapter", model, weights=sd), vh.import_ip_adapter(model, weights=sd))
    with pytest.raises(vh.AdapterError, match="imported, not created"):
        vh.create_adapter("ip_adapter", model)


# ---------------------------------------------------------------------------------------------------- 4. save, errors
@pytest.mark.parametrize("name", ["flux", "sd35l", "instantx"])
def test_save_load_round_trip(name, tmp_path):
    if name == "instantx":
        model = build("flux")
        adapter, fam = vh.import_ip_adapter(model, weights=instantx_flux_weights(model)), "flux"
    else:
        _, model, _ = _installed(name)
        adapter, fam = vh.import_ip_adapter(model), name
    adapter.save(tmp_path / "ip")
    loaded = vh.load_adapter(tmp_path / "ip")
    assert isinstance(loaded, vh.IPAdapter) and _same(adapter, loaded)
    emb = _embeds(fam if fam == "flux" else name)
    cfg = vh.InjectionConfig(**{**adapter.config.injection, "blocks": [1], "window": (0.0, 0.5)})
    with torch.no_grad():
        a, b = _outputs(model, adapter, fam, emb), _outputs(model, loaded, fam, emb)
        kw = inputs(_family_inputs(fam), batch=2, progress=0.3)
        with vh.inject(model, vh.VLFeatures(emb), cfg, adapter=loaded):
            sub = output(model, kw)
        base = output(model, kw)
    assert torch.equal(a, b)
    assert not torch.equal(sub, base) and not torch.equal(sub, a)


def _bad_shape(model):
    sd = flux_weights(model)
    sd["ip_adapter"]["1.to_k_ip.weight"] = torch.randn(16, model.config.joint_attention_dim)
    return sd


def _bad_bias(model):
    sd = flux_weights(model)
    sd["ip_adapter"]["0.to_v_ip.bias"] = torch.randn(7)
    return sd


@pytest.mark.parametrize("make,match", [
    (_bad_shape, r"to_k_ip.weight is \[16, 32\].*another model size"),
    (_bad_bias, r"to_v_ip.bias is \[7\]"),
    (lambda m: {"something.weight": torch.zeros(3)}, "no known IP-Adapter layout"),
    (lambda m: {"image_proj": {"mystery.weight": torch.zeros(3)}, "ip_adapter": {"0.to_k_ip.weight": torch.zeros(2)}},
     "match no known IP-Adapter layout"),
    (lambda m: sd3_weights(_model("sd3")), "SD3 IP-Adapter weights; the target is a FluxTransformer2DModel"),
    (lambda m: {**flux_weights(m), "ip_adapter": {**flux_weights(m)["ip_adapter"],
                                                   "7.to_k_ip.weight": torch.zeros(32, 32)}}, "up to index 7"),
    (lambda m: "model.bin", "never unpickles"),
    (None, "has no IP-Adapter installed.*load_ip_adapter.*weights="),
])
def test_bad_weights_name_the_fix_and_leave_the_model_unpatched(make, match, tmp_path):
    model = build("flux")
    before = snapshot(model)
    weights = None if make is None else make(model)
    if weights == "model.bin":
        (tmp_path / "model.bin").write_bytes(b"\x80\x04")
        weights = tmp_path / "model.bin"
    with pytest.raises(vh.AdapterError, match=match):
        vh.import_ip_adapter(model, weights=weights)
    assert snapshot(model) == before


def test_dual_attention_sd35_is_refused_with_diffusers_weights_left_in_place():
    """SD3.5 Medium's dual-attention blocks run the IP-Adapter in their image-only `attn2` too; vlhooks injects into
    the joint attention only, so it refuses (and removes nothing)."""
    _, ref, sd = _installed("sd35")
    before = snapshot(ref)
    with pytest.raises(vh.AdapterError, match="attn2.*dual-attention"):
        vh.import_ip_adapter(ref)
    with pytest.raises(vh.AdapterError, match="attn2.*dual-attention"):
        vh.import_ip_adapter(_model("sd35"), weights=sd)
    assert snapshot(ref) == before and isinstance(ref.image_proj, IPAdapterTimeImageProjection)


def test_remove_false_keeps_diffusers_working_and_copies_the_weights():
    _, ref, _ = _installed("flux")
    emb, kw = _embeds("flux"), inputs("flux", batch=2)
    with torch.no_grad():
        want = _diffusers(ref, "flux", emb, kw)
        adapter = vh.import_ip_adapter(ref, remove=False)
        assert torch.equal(_diffusers(ref, "flux", emb, kw), want)  # still installed
        proc = ref.transformer_blocks[0].attn.processor
        assert adapter.blocks["transformer_blocks_0"].to_k_ip.weight.data_ptr() != proc.to_k_ip[0].weight.data_ptr()


def test_wrong_placement_or_mode_is_refused_at_the_first_call():
    _, ref, _ = _installed("flux")
    adapter = vh.import_ip_adapter(ref)
    emb, kw = vh.VLFeatures(_embeds("flux")), inputs("flux", batch=2)
    before = snapshot(ref)
    for cfg in (vh.InjectionConfig(mode="decoupled", blocks="double"), vh.InjectionConfig(blocks="double")):
        with pytest.raises(vh.AdapterError, match="placement='block_output'"), torch.no_grad():
            with vh.inject(ref, emb, cfg, adapter=adapter):
                output(ref, kw)
        assert snapshot(ref) == before
    with pytest.raises(vh.AdapterError, match="no weights for blocks"):  # single blocks have none
        vh.apply_injection(ref, emb, vh.InjectionConfig(mode="decoupled", placement="block_output"), adapter=adapter)
    with pytest.raises(vh.ConfigError, match="placement='image_joint' is not implemented"):
        vh.apply_injection(ref, emb, vh.InjectionConfig(mode="decoupled", placement="image_joint"), adapter=adapter)
    assert snapshot(ref) == before


def test_flux_ip_kv_computed_once_per_generation():
    """A Flux IP-Adapter's K/V are timestep-free: computed once per site for a generation's features (diffusers
    recomputes them at every step), again after `set_features`, and at every forward under autograd (training)."""
    _, ref, _ = _installed("flux")
    adapter = vh.import_ip_adapter(ref)
    calls = []
    hooks = [b.to_k_ip.register_forward_hook(lambda m, a, o: calls.append(1)) for b in adapter.blocks.values()]
    kw = inputs("flux", batch=2)
    emb = _embeds("flux")
    sites = len(adapter.blocks)
    with vh.inject(ref, vh.VLFeatures(emb), None, adapter=adapter) as handle:
        with torch.no_grad():
            first = output(ref, dict(kw, timestep=torch.tensor([0.9, 0.9])))
            assert len(calls) == sites
            second = output(ref, dict(kw, timestep=torch.tensor([0.4, 0.4])))  # another step: reused
            assert len(calls) == sites and not torch.equal(first, second)
            handle.set_features(vh.VLFeatures(emb.flip(0)))
            output(ref, kw)
            assert len(calls) == 2 * sites
        output(ref, kw).sum().backward()
        output(ref, kw)
        assert len(calls) == 4 * sites
        assert adapter.blocks[next(iter(adapter.blocks))].to_k_ip.weight.grad is not None
    for h in hooks:
        h.remove()
