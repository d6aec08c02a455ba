"""Flux.2 (`Flux2Transformer2DModel`): the family's facts against independent references.

The references here are plain re-implementations of Flux.2's two attention processors from the blocks' weights
(explicit `softmax(q k^T / sqrt(d) + bias) v` in float64, Flux.2's 4-axis RoPE written out from its formula), not
vlhooks' code: the joint log-2 oracle, the decoupled formula, and the extras' text path with the position policy
`(0, 0, 0, j)`. Then the fused single-block projection (`FusedRows`), the adapters on it, the velocity against the
pipeline's own packing, the Klein pipeline's guidance rows, torch.compile, gradient checkpointing, the KV-cache
refusal, the tiny training recipe and `vlhooks compare` on a saved tiny pipeline."""

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import vlhooks as vh
from conftest import snapshot
from vlhooks.models.flux2 import FusedRows
from vlhooks.testing import PROMPT, SIZE, TEXT_LEN, build, caption_width, inputs, output, pipeline
from vlhooks.testing.flux2 import dev_pipeline, ids

ROOT = Path(__file__).resolve().parents[1]
NAME = "flux2"
CAP = 8  # caption tokens of `inputs`
SITES = {0: "transformer_blocks.0", 1: "transformer_blocks.1", 2: "single_transformer_blocks.0",
         3: "single_transformer_blocks.1"}


# ------------------------------------------------------------------------------------------- independent references
def _rope_angles(pos: torch.Tensor, axes: list[int], theta: float) -> torch.Tensor:
    """Flux.2's RoPE angles `[L, Dh/2]` (float64): per axis `i` of width `d`, pair `m` turns by
    `pos_i / theta^(2m/d)`; the axes' pairs are concatenated."""
    out = []
    for i, d in enumerate(axes):
        freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        out.append(pos[:, i].double()[:, None] * freqs[None, :])
    return torch.cat(out, dim=1)


def _rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs `(x[2m], x[2m+1])` of `x` `[B, L, H, Dh]` by `angles` `[L, Dh/2]` (float64)."""
    x = x.double()
    a, b = x[..., 0::2], x[..., 1::2]
    c, s = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)


def _rms(x: torch.Tensor, norm: torch.nn.RMSNorm) -> torch.Tensor:
    x = x.double()
    y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + norm.eps)
    return y if norm.weight is None else y * norm.weight.double()


def _softmax_attention(q, k, v, bias):
    """`q, k, v` `[B, L, H, Dh]` float64, `bias` `[Lk]` (or `[B, Lk]`) added to every query's logits."""
    logits = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(q.shape[-1])
    logits = logits + (bias[None, None, None, :] if bias.ndim == 1 else bias[:, None, None, :])
    return torch.einsum("bhlm,bmhd->blhd", logits.softmax(-1), v)


class Reference:
    """Flux.2 attention re-implemented from the weights, positions `pos` `[L_txt + L_img, 4]` (text first):
    `log_bias` on the first `n_text` keys (joint oracle), or `extra = (k_e, v_e, s)` (`[B, N, H, Dh]` after norm and
    RoPE) added as `s * softmax(q k_e^T / sqrt(d)) v_e` (decoupled). Double blocks get `(attn, img, txt, ...)`,
    single blocks `(attn, [txt, img], ...)`, as Flux.2's attention modules call their processors."""

    def __init__(self, pos, axes, theta, n_text=0, log_bias=0.0, extra=None):
        self.angles = _rope_angles(pos, axes, theta)
        self.n_text, self.log_bias, self.extra = n_text, log_bias, extra

    def attend(self, q, k, v):
        q, k = _rotate(q, self.angles), _rotate(k, self.angles)
        bias = torch.zeros(k.shape[1], dtype=torch.float64)
        bias[: self.n_text] = self.log_bias
        out = _softmax_attention(q, k, v.double(), bias)
        if self.extra is not None:
            ke, ve, s = self.extra
            out = out + s * _softmax_attention(q, ke.double(), ve.double(), torch.zeros(ke.shape[1],
                                                                                      dtype=torch.float64))
        return out.flatten(2).float()


class DoubleReference(Reference):
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        def heads(x):
            return x.unflatten(-1, (-1, attn.head_dim))

        img, txt = hidden_states, encoder_hidden_states
        q = torch.cat([_rms(heads(attn.add_q_proj(txt)), attn.norm_added_q),
                       _rms(heads(attn.to_q(img)), attn.norm_q)], 1)  # [txt, img]
        k = torch.cat([_rms(heads(attn.add_k_proj(txt)), attn.norm_added_k),
                       _rms(heads(attn.to_k(img)), attn.norm_k)], 1)
        v = torch.cat([heads(attn.add_v_proj(txt)), heads(attn.to_v(img))], 1)
        out = self.attend(q, k, v)
        n = txt.shape[1]
        return attn.to_out[0](out[:, n:]), attn.to_add_out(out[:, :n])


class SingleReference(Reference):
    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        inner, mlp = attn.inner_dim, attn.mlp_hidden_dim
        w = attn.to_qkv_mlp_proj.weight  # [3 inner + 2 mlp, D]: q, k, v, gate, up
        x = hidden_states

        def heads(t):
            return t.unflatten(-1, (-1, attn.head_dim))

        q = _rms(heads(x @ w[:inner].T), attn.norm_q)
        k = _rms(heads(x @ w[inner:2 * inner].T), attn.norm_k)
        v = heads(x @ w[2 * inner:3 * inner].T)
        gate, up = x @ w[3 * inner:3 * inner + mlp].T, x @ w[3 * inner + mlp:].T
        out = self.attend(q, k, v)
        return attn.to_out(torch.cat([out, F.silu(gate) * up], -1))


def _positions(kw) -> torch.Tensor:
    return torch.cat([kw["txt_ids"], kw["img_ids"]])  # [txt, img], as the model concatenates them


def _reference_model(model, site, kw, **ref):
    cfg = model.config
    cls = DoubleReference if site < 2 else SingleReference
    reference = copy.deepcopy(model)
    reference.get_submodule(SITES[site]).attn.set_processor(
        cls(_positions(kw), list(cfg.axes_dims_rope), cfg.rope_theta, **ref))
    return reference


def _block_input(model, name, kw):
    """(args, kwargs) the block received in an unpatched run."""
    seen = {}
    h = model.get_submodule(name).register_forward_pre_hook(
        lambda m, a, k: seen.update(args=a, kwargs=k), with_kwargs=True)
    output(model, kw)
    h.remove()
    return seen["args"], seen["kwargs"]


def _extras_reference(model, site, bkw, feats):
    """The extras' K/V `[B, N, H, Dh]` written out from the weights: `context_embedder`, the block's weightless
    LayerNorm and its text modulation chunk (from the block's `temb_mod_txt` / `temb_mod` argument), the text K/V
    rows, the key RMSNorm, RoPE at `(0, 0, 0, j)`."""
    block = model.get_submodule(SITES[site])
    attn = block.attn
    e = model.context_embedder(feats).double()  # [1, N, D]
    if site < 2:
        shift, scale = bkw["temb_mod_txt"].double().chunk(6, dim=-1)[:2]
        wk, wv, knorm = attn.add_k_proj.weight, attn.add_v_proj.weight, attn.norm_added_k
    else:
        shift, scale = bkw["temb_mod"].double().chunk(3, dim=-1)[:2]
        inner = attn.inner_dim
        w = attn.to_qkv_mlp_proj.weight
        wk, wv, knorm = w[inner:2 * inner], w[2 * inner:3 * inner], attn.norm_k
    x = F.layer_norm(e, e.shape[-1:], eps=1e-6)
    x = x * (1 + scale[:, None]) + shift[:, None]  # [B, N, D]
    k = (x @ wk.double().T).unflatten(-1, (-1, attn.head_dim))
    v = (x @ wv.double().T).unflatten(-1, (-1, attn.head_dim))
    n = feats.shape[1]
    k = _rotate(_rms(k, knorm), _rope_angles(ids(1, 1, 1, n), list(model.config.axes_dims_rope),
                                             model.config.rope_theta))
    return k, v


def _feats(n=5, seed=4):
    return vh.VLFeatures(torch.randn(1, n, caption_width(NAME), generator=torch.Generator().manual_seed(seed)))


# ------------------------------------------------------------------------------------------- the oracles
@pytest.mark.parametrize("site", [0, 1, 2, 3])  # double 0, 1; single 2, 3
@torch.no_grad()
def test_own_text_copy_equals_log2_bias(site):
    """Joint mode: a copy of the caption stream entering the block, injected there, equals a log 2 bias on the
    caption's keys: the extras' pre-norm, modulation, K/V rows (the fused ones in single blocks), key norm and
    position policy `(0, 0, 0, j)` all reproduce the caption's own keys."""
    model = build(NAME)
    kw = inputs(NAME, batch=2, cap_len=CAP)
    _, bkw = _block_input(model, SITES[site], kw)
    text = bkw["encoder_hidden_states"] if site < 2 else bkw["hidden_states"][:, :CAP]  # [B, 8, D]
    expected = output(_reference_model(model, site, kw, n_text=CAP, log_bias=math.log(2.0)), kw)
    unpatched = output(model, kw)
    with vh.inject(model, vh.VLFeatures(text, space="hidden"), vh.InjectionConfig(blocks=[site])):
        got = output(model, kw)
    assert (expected - unpatched).abs().max() > 1e-4, "the oracle must have a visible effect"
    assert (got - expected).abs().max() <= 1e-5
    # the reference itself, without the bias, is the model
    assert (output(_reference_model(model, site, kw, n_text=CAP, log_bias=0.0), kw) - unpatched).abs().max() <= 1e-5


@pytest.mark.parametrize("site", [1, 2])  # a double block and a single block
@torch.no_grad()
def test_decoupled_equals_the_independent_formula(site):
    """Decoupled mode at scale 0.7 on caption-space features: every query of the block gets
    `0.7 * softmax(q k_e^T / sqrt(d)) v_e` added before the output projections, with `k_e, v_e` from the
    independent text path (`_extras_reference`)."""
    model = build(NAME)
    kw = inputs(NAME, batch=2, cap_len=CAP)
    feats = _feats()
    _, bkw = _block_input(model, SITES[site], kw)
    ke, ve = _extras_reference(model, site, bkw, feats.tokens)
    expected = output(_reference_model(model, site, kw, extra=(ke, ve, 0.7)), kw)
    with vh.inject(model, feats, vh.InjectionConfig(mode="decoupled", blocks=[site], scale=0.7)):
        got = output(model, kw)
    assert (expected - output(model, kw)).abs().max() > 1e-4
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("site", [0, 3])
@torch.no_grad()
def test_text_kv_equals_the_independent_text_path(site):
    """`text_kv` (modulation read from the block's own arguments, the extras' RoPE) against `_extras_reference`."""
    model = build(NAME)
    kw = inputs(NAME, batch=2, cap_len=CAP)
    feats = _feats(n=6)
    _, bkw = _block_input(model, SITES[site], kw)
    fam = vh.family_for(model)
    assert fam.modulation_module(model, fam.sites(model)[site]) is None  # read from the block's arguments
    seen = {}
    with vh.inject(model, feats, vh.InjectionConfig(blocks=[site])) as h:
        own = h.injector.projector.kv
        h.injector.projector.kv = lambda call: seen.setdefault("kv", own(call))  # the K/V the block received
        output(model, kw)
    k, v = seen["kv"]
    ke, ve = _extras_reference(model, site, bkw, feats.tokens)
    torch.testing.assert_close(k.double(), ke, atol=1e-5, rtol=0)
    torch.testing.assert_close(v.double(), ve, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- the fused projection
@torch.no_grad()
def test_single_block_kv_linears_are_views_of_the_fused_rows():
    model = build(NAME)
    fam = vh.family_for(model)
    site = fam.sites(model)[2]
    attn = site.attention(model)
    fused, inner = attn.to_qkv_mlp_proj, attn.inner_dim
    k, v = fam.kv_linears(model, site)
    assert isinstance(k, FusedRows) and isinstance(k, torch.nn.Linear)
    assert list(k.parameters()) == [] and list(k.children()) == []  # the DiT owns the weights
    assert k.weight._base is fused.weight and v.weight.data_ptr() == fused.weight[2 * inner].data_ptr()
    assert (k.in_features, k.out_features, k.bias) == (fused.in_features, inner, None)
    x = torch.randn(2, 7, fused.in_features)
    assert torch.equal(k(x), fused(x)[..., inner:2 * inner]) and torch.equal(v(x), fused(x)[..., 2 * inner:3 * inner])
    sd = k.state_dict()
    assert list(sd) == ["weight"] and torch.equal(sd["weight"], fused.weight[inner:2 * inner])
    assert sd["weight"].untyped_storage().nbytes() == inner * fused.in_features * 4, "compact copy, not the storage"
    fused.weight[inner].add_(1.0)  # the module follows the fused weight
    assert torch.equal(k.weight[0], fused.weight[inner])


def test_fused_rows_match_the_fused_projection_at_a_larger_size():
    """Float32 on the CPU: `F.linear` with the weight's rows gives the fused projection's columns (to 1e-6; bit for
    bit wherever tried). A GEMM of another output width may take another kernel and round differently: seen once
    in CPU bf16 (one bf16 ulp) and on an H200 in float32 (about 3e-6 relative); H200 bf16 was bit for bit at
    FLUX.2-dev's width."""
    g = torch.Generator().manual_seed(0)
    fused = torch.nn.Linear(256, 3 * 128 + 2 * 384, bias=False)
    with torch.no_grad():
        fused.weight.copy_(torch.randn(fused.weight.shape, generator=g) / 16)
        x = torch.randn(2, 333, 256, generator=g)
        rows = FusedRows(fused, 128, 256)
        torch.testing.assert_close(rows(x), fused(x)[..., 128:256], atol=1e-6, rtol=0)


@torch.no_grad()
def test_kv_and_lora_adapters_on_the_fused_rows_start_at_zero_shot():
    """A `kv` adapter copies the K/V projections (the fused rows in single blocks) and a fresh LoRA wraps them:
    both reproduce zero-shot exactly; a changed LoRA weight moves the output; the DiT is left as it was."""
    model = build(NAME)
    before = snapshot(model)
    kw = inputs(NAME, batch=2)
    feats = _feats()
    with vh.inject(model, feats, vh.InjectionConfig()):
        zero_shot = output(model, kw)
    kv = vh.KVAdapter.create(model)
    assert sorted(kv.k) == sorted(kv.v) and len(kv.k) == 4
    with vh.inject(model, feats, adapter=kv):
        assert torch.equal(output(model, kw), zero_shot)
    lora = vh.LoRAAdapter.create(model, rank=2)
    with vh.inject(model, feats, adapter=lora):
        assert torch.equal(output(model, kw), zero_shot)
        for p in lora.lora_B.parameters():
            p.normal_()
        assert not torch.equal(output(model, kw), zero_shot)
    assert snapshot(model) == before
    assert torch.equal(output(model, kw), output(build(NAME), kw))


@torch.no_grad()
def test_cached_pre_norm_equals_recomputing(monkeypatch):
    """The injector's cached `text_norm` (one weightless LayerNorm for every block) gives what recomputing it in
    `text_input` gives, bit for bit."""
    from vlhooks.injector import Injector

    model = build(NAME)
    kw = inputs(NAME, batch=2)
    with vh.inject(model, _feats(), vh.InjectionConfig()):
        cached = output(model, kw)
    block_call = Injector.block_call

    def recomputing(self, site, args, kwargs):
        call = block_call(self, site, args, kwargs)
        if call is not None:
            call.pre_normed = None
        return call

    monkeypatch.setattr(Injector, "block_call", recomputing)
    with vh.inject(model, _feats(), vh.InjectionConfig()):
        assert torch.equal(output(model, kw), cached)


# ------------------------------------------------------------------------------------------- calls
@torch.no_grad()
def test_velocity_uses_the_pipeline_packing_and_positions():
    """`velocity` on the pipeline's latent grid equals the transformer called as `Flux2Pipeline` calls it:
    `_pack_latents`, `_prepare_latent_ids`, `_prepare_text_ids`, sigma, guidance 4, `_unpack_latents_with_ids`."""
    from diffusers import Flux2Pipeline

    model = build(NAME)
    g = torch.Generator().manual_seed(0)
    latents, caption = torch.randn(2, 16, 4, 6, generator=g), torch.randn(2, 5, caption_width(NAME), generator=g)
    sigma = torch.tensor([0.3, 0.8])
    latent_ids = Flux2Pipeline._prepare_latent_ids(latents)
    out = model(hidden_states=Flux2Pipeline._pack_latents(latents), encoder_hidden_states=caption, timestep=sigma,
                guidance=torch.full([2], 4.0), txt_ids=Flux2Pipeline._prepare_text_ids(caption), img_ids=latent_ids,
                return_dict=False)[0]
    expected = Flux2Pipeline._unpack_latents_with_ids(out, latent_ids)
    assert torch.equal(vh.family_for(model).velocity(model, latents, sigma, caption), expected)
    assert vh.family_for(model).to_progress(0.25) == 0.75


@torch.no_grad()
def test_kv_cache_calls_pass_through_when_inactive_and_are_refused_when_injecting():
    from diffusers.models.transformers.transformer_flux2 import Flux2KVAttnProcessor, Flux2KVParallelSelfAttnProcessor

    model = build(NAME)
    for b in model.transformer_blocks:
        b.attn.set_processor(Flux2KVAttnProcessor())
    for b in model.single_transformer_blocks:
        b.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    kw = dict(inputs(NAME), kv_cache_mode="extract", num_ref_tokens=4)
    base, cache = model(**kw)
    handle = vh.apply_injection(model, None)  # installed, nothing to inject: the processors pass the KV args on
    got, got_cache = model(**kw)
    assert torch.equal(got, base)
    assert torch.equal(got_cache.get_single(1).get()[0], cache.get_single(1).get()[0])
    handle.set_features(_feats())
    with pytest.raises(vh.TargetError, match="kv_cache_mode='extract'"):
        model(**kw)
    handle.remove()


@torch.no_grad()
def test_compiled_equals_eager_in_one_graph():
    """`torch.compile(backend="aot_eager", fullgraph=True)` of the patched model (a double block at strength 0.5, a
    single block at 1): no graph break (the unpatched tiny Flux.2 has none either) and the eager output to 1e-5."""
    import torch._dynamo

    model = build(NAME)
    kw = inputs(NAME, batch=2)
    with vh.inject(model, _feats(), vh.InjectionConfig(scale={0: 0.5, 2: 1.0}, blocks=[0, 2])):
        eager = output(model, kw)
        torch._dynamo.reset()
        got = output(torch.compile(model, backend="aot_eager", fullgraph=True), kw)
    torch._dynamo.reset()
    assert not torch.equal(eager, output(model, kw))
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=0)


def test_gradient_checkpointing_gives_the_same_feature_gradients():
    """Under checkpointing the blocks are called positionally: the modulation is read by position then."""
    grads = []
    for ckpt in (False, True):
        model = build(NAME).requires_grad_(False)
        if ckpt:
            model.enable_gradient_checkpointing()
        feats = vh.VLFeatures(_feats().tokens.requires_grad_(True))
        with vh.inject(model, feats, vh.InjectionConfig(mode="joint")):
            output(model, inputs(NAME, batch=2)).square().mean().backward()
        grads.append(feats.tokens.grad.clone())
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-7, rtol=0)


# ------------------------------------------------------------------------------------------- the tiny pipeline
def _run(pipe, steps=3, guidance_scale=2.0):
    """Flux.2 pipelines take `image` first: the prompt goes by keyword."""
    return pipe(prompt=PROMPT, num_inference_steps=steps, height=SIZE, width=SIZE, max_sequence_length=TEXT_LEN,
                generator=torch.Generator().manual_seed(0), output_type="pt", guidance_scale=guidance_scale).images


@torch.no_grad()
def test_guidance_leaves_the_unconditional_calls_untouched():
    """Flux2KleinPipeline with CFG: per step a `cache_context("cond")` call then an `"uncond"` one. The
    unconditional calls are bit-identical to the unpatched transformer's; every conditional one changes."""
    pipe = pipeline(NAME)
    calls = []
    h = pipe.transformer.register_forward_hook(
        lambda m, a, k, out: calls.append((copy.deepcopy(a), copy.deepcopy(k), out[0].clone())), with_kwargs=True)
    with vh.inject(pipe, _feats(), vh.InjectionConfig()):
        _run(pipe, steps=3, guidance_scale=2.0)  # Klein: CFG when > 1
    h.remove()
    assert vh.get_injection(pipe) is None and len(calls) == 6
    for i, (args, kwargs, patched) in enumerate(calls):
        plain = pipe.transformer(*args, **kwargs)[0]
        assert torch.equal(patched, plain) == (i % 2 == 1), i


@pytest.mark.parametrize("which", ["klein", "dev"])
@torch.no_grad()
def test_encode_prompt_is_the_pipelines_own(which):
    pipe = pipeline(NAME) if which == "klein" else dev_pipeline()
    fam = vh.family_for(pipe.transformer)
    assert type(pipe).__name__ in fam.pipeline_classes
    enc = fam.encode_prompt(pipe, [PROMPT, "a dog"], "cpu", TEXT_LEN)
    own, _ = pipe.encode_prompt([PROMPT, "a dog"], device="cpu", max_sequence_length=TEXT_LEN)
    assert enc.pooled is None and len(enc.sequences) == 2
    assert torch.equal(torch.stack(enc.sequences), own.float())
    assert own.shape[-1] == caption_width(NAME) == fam.caption_width(pipe.transformer)


@torch.no_grad()
def test_dev_pipeline_injects_on_exactly_the_window_steps():
    """FLUX.2-dev's `Flux2Pipeline` (embedded guidance, one call a step): the window fires on the steps whose
    progress `1 - sigma` it holds, the image changes, and removal gives the unpatched image back bit for bit."""
    pipe = dev_pipeline()
    steps = 4
    base = _run(pipe, steps=steps, guidance_scale=4.0)
    with vh.inject(pipe, _feats(), vh.InjectionConfig(window=(0.1, 1.0))) as handle:
        patched = _run(pipe, steps=steps, guidance_scale=4.0)
        progress = (1.0 - pipe.scheduler.sigmas[:steps].double()).tolist()
        expected = sum(p >= 0.1 for p in progress)  # the shifted schedule of 16 tokens: 0, 0.05, 0.13, 0.30
        assert 0 < expected < steps and all(abs(p - 0.1) > 1e-4 for p in progress)
        assert (handle.injector.calls, handle.injector.injected_calls) == (steps, expected)
    assert not torch.equal(patched, base)
    assert torch.equal(_run(pipe, steps=steps, guidance_scale=4.0), base)


@pytest.mark.slow
def test_compare_on_a_saved_tiny_pipeline(tmp_path):
    """`vlhooks compare` (pipeline world, arms none and zero-shot) on a saved tiny Flux2KleinPipeline with CFG."""
    import skimage.data
    from PIL import Image

    from vlhooks.eval.compare import main

    pipeline(NAME).save_pretrained(tmp_path / "pipe")
    refs = tmp_path / "refs"
    refs.mkdir()
    for name in ("astronaut", "coffee"):
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(refs / f"{name}.png")
    cfg = {"world": "pipeline", "out": str(tmp_path / "out"), "seeds": [0], "prompts": ["a cat"],
           "pipeline": {"path": str(tmp_path / "pipe"), "device": "cpu", "metric_size": 32},
           "generate": {"num_inference_steps": 2, "height": SIZE, "width": SIZE, "guidance_scale": 2.0,
                        "max_sequence_length": TEXT_LEN},
           "encoder": {"name": "patches", "width": caption_width(NAME), "size": 32, "patch": 8},
           "references": {"folder": str(refs)}, "injection": {"blocks": "all", "mode": "joint"},
           "arms": ["none", "zero-shot"]}
    (tmp_path / "compare.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(tmp_path / "compare.yaml")]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert list(metrics["arms"]) == ["none", "zero-shot"]
    assert metrics["arms"]["none"]["ref_similarity"] != metrics["arms"]["zero-shot"]["ref_similarity"]
    assert (tmp_path / "out" / "grid.png").is_file() and (tmp_path / "out" / "report.html").is_file()


# ------------------------------------------------------------------------------------------- training
@pytest.mark.slow
def test_tiny_recipe_trains_and_writes_a_loadable_adapter(tmp_path):
    from vlhooks.train.module import build_dit

    recipe = ROOT / "configs/tiny/flux2.yaml"
    args = [sys.executable, "-m", "vlhooks", "train", "--config", str(recipe), "--trainer.max_steps", "3",
            "--model.checkpoint_root", str(tmp_path / "ckpt"), "--data.cache_dir", str(tmp_path / "cache"),
            "--trainer.enable_progress_bar", "false"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                       env={**os.environ, "WANDB_MODE": "disabled"})
    assert r.returncode == 0, r.stderr[-3000:]
    spec = yaml.safe_load(recipe.read_text())["model"]
    adapter = vh.load_adapter(tmp_path / "ckpt" / spec["run_name"] / "final")
    dit = build_dit(spec["dit"])
    c = dit.config
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, c.in_channels, 16, 16, generator=g)
    caption = torch.randn(1, 6, c.joint_attention_dim, generator=g)
    fam = vh.family_for(dit)
    with torch.no_grad():
        base = fam.velocity(dit, latents, torch.tensor([0.5]), caption)
        with vh.inject(dit, vh.VLFeatures(torch.randn(1, 16, adapter.config.feature_width, generator=g)),
                       adapter=adapter) as h:
            assert h.config.blocks == "all"
            out = fam.velocity(dit, latents, torch.tensor([0.5]), caption)
    assert not torch.equal(out, base)
