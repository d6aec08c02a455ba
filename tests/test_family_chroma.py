"""Chroma (`ChromaTransformer2DModel`) on its tiny model and pipeline: the log-2 oracle and the decoupled formula
against reference processors written here (explicit `softmax(q k^T / sqrt(d) + bias) v` on the model's own
weights, under Chroma's attention mask as SDPA reads it), guidance rows through `ChromaPipeline`, torch.compile, the
text path against the blocks' own norms, the training objective against the pipeline's own packing, the tiny
training recipe and `vlhooks compare` on a saved tiny pipeline."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch._dynamo
import yaml
from diffusers.hooks.hooks import CacheContext, _set_cache_context
from diffusers.models.embeddings import apply_rotary_emb

import vlhooks as vh
from vlhooks.testing import build, inputs, output, pipeline, run_pipeline
from vlhooks.testing.chroma import text_mask

ROOT = Path(__file__).resolve().parents[1]
CAP = 8  # caption tokens of `inputs`; row b keeps CAP - 3 - b % 2 tokens and the first padding token
SITES = [0, 1, 2, 3]  # double 0, 1; single 2, 3


def _inputs(mask="float", batch=2, **kw):
    """`inputs("chroma")` with the pipeline's float mask, the same mask as bool, or no mask."""
    kw = inputs("chroma", batch=batch, cap_len=CAP, **kw)
    if mask == "bool":
        kw["attention_mask"] = kw["attention_mask"].bool()
    elif mask is None:
        del kw["attention_mask"]
    return kw


def _capture_block_input(model, block_name, kw):
    seen = {}

    def hook(module, args, kwargs):
        seen["args"], seen["kwargs"] = args, kwargs

    h = model.get_submodule(block_name).register_forward_pre_hook(hook, with_kwargs=True)
    output(model, kw)
    h.remove()
    return seen["args"], seen["kwargs"]


def _block_text(model, name, kw):
    """The caption stream entering block `name` `[B, CAP, D]`, and the block's `temb`."""
    _, bkw = _capture_block_input(model, name, kw)
    if "encoder_hidden_states" in bkw:  # double block
        return bkw["encoder_hidden_states"], bkw["temb"]
    return bkw["hidden_states"][:, :CAP], bkw["temb"]  # single block: [txt, img] in one sequence


def _as_bias(mask):
    """The mask a processor receives, as the additive logits bias SDPA applies (float as is, bool 0 / -inf)."""
    if mask is None:
        return 0.0
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    return mask.double()


def _attention(q, k, v, bias):
    """q, k, v [B, H, L, D] in float64; bias broadcast to [B, H, Lq, Lk]. A query whose every key is masked gets
    0, as SDPA gives it."""
    logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
    return torch.nan_to_num(logits.softmax(-1), nan=0.0) @ v.double()


def _qkv(attn, hidden_states, encoder_hidden_states, rope):
    """The block's own `[txt, img]` queries, keys and values from its weights, `[B, H, S, Dh]`."""
    def heads(x):
        return x.unflatten(-1, (-1, attn.head_dim))

    q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
    q, k = attn.norm_q(q), attn.norm_k(k)
    if encoder_hidden_states is not None:
        eq = attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states)))
        ek = attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states)))
        ev = heads(attn.add_v_proj(encoder_hidden_states))
        q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
    q = apply_rotary_emb(q, rope, sequence_dim=1)
    k = apply_rotary_emb(k, rope, sequence_dim=1)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _out(attn, out, encoder_hidden_states, like):
    out = out.transpose(1, 2).flatten(2).to(like.dtype)  # [B, S, H*Dh]
    if encoder_hidden_states is not None:
        n = encoder_hidden_states.shape[1]
        return attn.to_out[0](out[:, n:]), attn.to_add_out(out[:, :n])
    return out


class ChromaBiasProcessor:
    """Chroma's attention with `log_bias` added on the text keys `[0, CAP)` marked in `keys` (`[B, CAP]` bool, all
    of them when None), on top of the block's own mask."""

    def __init__(self, keys=None, log_bias=math.log(2.0)):
        self.keys, self.log_bias = keys, log_bias

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        q, k, v = _qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        B, S = q.shape[0], k.shape[2]
        extra = torch.zeros(B, 1, 1, S, dtype=torch.float64)
        keys = torch.ones(B, CAP, dtype=torch.bool) if self.keys is None else self.keys
        extra[:, 0, 0, :CAP] = keys.double() * self.log_bias
        out = _attention(q, k, v, _as_bias(attention_mask) + extra)
        return _out(attn, out, encoder_hidden_states, hidden_states)


class DecoupledProcessor:
    """Chroma's attention plus `strength * softmax(q k_e^T / sqrt(d)) v_e` for every query, `k_e, v_e` the
    features through the block's own text path (its LayerNorm with `temb`'s text shift / scale, text K/V
    projections, text qk-norm; position 0), before the output projections."""

    def __init__(self, kind, feats, temb, strength):
        self.kind, self.feats, self.temb, self.strength = kind, feats, temb, strength

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        q, k, v = _qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        out = _attention(q, k, v, _as_bias(attention_mask))
        mod = self.temb[:, 6:8] if self.kind == "double" else self.temb[:, 0:2]  # [B, 2, D]: shift, scale
        x = torch.nn.functional.layer_norm(self.feats, self.feats.shape[-1:], eps=1e-6)
        x = x * (1 + mod[:, 1:2]) + mod[:, 0:1]
        k_proj, v_proj, k_norm = ((attn.add_k_proj, attn.add_v_proj, attn.norm_added_k) if self.kind == "double"
                                  else (attn.to_k, attn.to_v, attn.norm_k))
        ke = k_norm(k_proj(x).unflatten(-1, (-1, attn.head_dim))).transpose(1, 2)
        ve = v_proj(x).unflatten(-1, (-1, attn.head_dim)).transpose(1, 2)
        out = out + self.strength * _attention(q, ke, ve, 0.0)
        return _out(attn, out, encoder_hidden_states, hidden_states)


# ------------------------------------------------------------------------------------------- the oracles
@pytest.mark.parametrize("mask", [None, "float", "bool"])
@pytest.mark.parametrize("site", SITES)
@torch.no_grad()
def test_own_text_copy_equals_log2_bias_on_the_real_text_keys(site, mask):
    """A copy of the block's own text tokens, padded as the block's mask pads them (its 0 entries), equals
    `log 2` on the real text keys: under the pipeline's float mask (an additive +1 between real tokens), a bool
    mask, and none."""
    model = build("chroma")
    kw = _inputs(mask)
    name = vh.list_sites(model)[site]
    text, _ = _block_text(model, name, kw)
    real = None if mask is None else text_mask(2, CAP) > 0  # [B, CAP]
    reference = copy.deepcopy(model)
    reference.get_submodule(name).attn.set_processor(ChromaBiasProcessor(real))
    expected = output(reference, kw)
    with vh.inject(model, vh.VLFeatures(text, mask=real, space="hidden"), vh.InjectionConfig(blocks=[site])):
        got = output(model, kw)
    unpatched = output(model, kw)
    assert (expected - unpatched).abs().max() > 1e-4, "the oracle must have a visible effect"
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("site", [0, 3])
@torch.no_grad()
def test_fractional_scale_is_a_log_bias_under_the_mask(site):
    """Scale s on a copy of the real text tokens equals `log(1 + s)` on those keys (pipeline's float mask)."""
    model = build("chroma")
    kw = _inputs("float")
    name = vh.list_sites(model)[site]
    text, _ = _block_text(model, name, kw)
    real = text_mask(2, CAP) > 0
    reference = copy.deepcopy(model)
    reference.get_submodule(name).attn.set_processor(ChromaBiasProcessor(real, math.log(1.3)))
    with vh.inject(model, vh.VLFeatures(text, mask=real, space="hidden"),
                   vh.InjectionConfig(blocks=[site], scale=0.3)):
        got = output(model, kw)
    assert (got - output(reference, kw)).abs().max() <= 1e-5


@pytest.mark.parametrize("site", [1, 2])
@torch.no_grad()
def test_rows_without_extras_are_exactly_unpatched_under_the_mask(site):
    """`guidance="cond_first"` on a batch of 2: row 0 gets the oracle's result, row 1 is bit-identical."""
    model = build("chroma")
    kw = _inputs("float")
    name = vh.list_sites(model)[site]
    text, _ = _block_text(model, name, kw)
    real = text_mask(2, CAP) > 0
    reference = copy.deepcopy(model)
    reference.get_submodule(name).attn.set_processor(ChromaBiasProcessor(real))
    expected = output(reference, kw)
    base = output(model, kw)
    feats = vh.VLFeatures(text[:1], mask=real[:1], space="hidden")
    with vh.inject(model, feats, vh.InjectionConfig(blocks=[site], guidance="cond_first")):
        got = output(model, kw)
    assert torch.equal(got[1], base[1])
    assert (got[0] - expected[0]).abs().max() <= 1e-5


@pytest.mark.parametrize("site,scale", [(0, 0.7), (3, 1.0)])
@torch.no_grad()
def test_decoupled_equals_the_formula(site, scale):
    model = build("chroma")
    kw = _inputs("float")
    name = vh.list_sites(model)[site]
    kind = "double" if site < 2 else "single"
    _, temb = _block_text(model, name, kw)
    feats = torch.randn(2, 5, model.inner_dim, generator=torch.Generator().manual_seed(3))
    reference = copy.deepcopy(model)
    reference.get_submodule(name).attn.set_processor(DecoupledProcessor(kind, feats, temb, scale))
    expected = output(reference, kw)
    with vh.inject(model, vh.VLFeatures(feats, space="hidden"),
                   vh.InjectionConfig(blocks=[site], mode="decoupled", scale=scale)):
        got = output(model, kw)
    assert (expected - output(model, kw)).abs().max() > 1e-4
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("site", SITES)
@torch.no_grad()
def test_text_input_is_the_blocks_own_norm(site):
    """The family's text path before K/V, on the block's own text, is bit for bit the block's `norm1_context`
    (double) / `norm` (single) output on those tokens, with the `temb` rows the forward gave the block."""
    model = build("chroma")
    kw = _inputs("float")
    name = vh.list_sites(model)[site]
    text, temb = _block_text(model, name, kw)
    block = model.get_submodule(name)
    own = (block.norm1_context(text, emb=temb[:, 6:])[0] if site < 2 else block.norm(text, emb=temb)[0])
    seen = {}
    fam = vh.family_for(model)
    original = fam.text_input

    def spy(call):
        seen["x"] = original(call)
        return seen["x"]

    fam.text_input = spy
    try:
        with vh.inject(model, vh.VLFeatures(text, space="hidden"), vh.InjectionConfig(blocks=[site])):
            output(model, kw)
    finally:
        del fam.text_input
    assert torch.equal(seen["x"], own)


# ------------------------------------------------------------------------------------------- guidance
def _record_calls(transformer):
    calls = []

    def hook(module, args, kwargs, out):
        calls.append((copy.deepcopy(args), copy.deepcopy(kwargs), copy.deepcopy(out[0])))

    return calls, transformer.register_forward_hook(hook, with_kwargs=True)


def _check_branches(pipe, calls):
    """Every second call (ChromaPipeline: conditional first, then unconditional, at every step) is unpatched."""
    assert len(calls) == 6
    changed = 0
    for i, (args, kwargs, patched_out) in enumerate(calls):
        plain = pipe.transformer(*args, **kwargs)[0]
        if i % 2 == 1:
            assert torch.equal(patched_out, plain), f"unconditional call {i} was injected"
        else:
            changed += int(not torch.equal(patched_out, plain))
    assert changed == 3, "every conditional call must be injected"


def _feats():
    return vh.VLFeatures(torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(0)))


@torch.no_grad()
def test_pipeline_guidance_leaves_the_unconditional_call_untouched():
    pipe = pipeline("chroma")
    calls, h = _record_calls(pipe.transformer)
    with vh.inject(pipe, _feats(), vh.InjectionConfig()):
        run_pipeline(pipe, "chroma", steps=3, cfg=True)
    h.remove()
    _check_branches(pipe, calls)


@pytest.mark.parametrize("mode", ["joint", "decoupled"])
@torch.no_grad()
def test_unconditional_call_marked_by_cache_context_is_untouched(mode):
    """Through ChromaPipeline with CFG, its second call of each step marked `cache_context("uncond")` (what the
    Flux pipeline does itself): the unconditional calls are bit-identical, the conditional ones change."""
    pipe = pipeline("chroma")
    count = [0]

    def mark(module, args, kwargs):
        _set_cache_context(module, CacheContext("uncond" if count[0] % 2 else "cond"))
        count[0] += 1

    def unmark(module, args, kwargs, out):
        _set_cache_context(module, None)

    calls, h = _record_calls(pipe.transformer)
    with vh.inject(pipe, _feats(), vh.InjectionConfig(mode=mode)):
        h1 = pipe.transformer.register_forward_pre_hook(mark, with_kwargs=True)
        h2 = pipe.transformer.register_forward_hook(unmark, with_kwargs=True)
        run_pipeline(pipe, "chroma", steps=3, cfg=True)
        h1.remove()
        h2.remove()
    h.remove()
    assert vh.get_injection(pipe) is None
    _check_branches(pipe, calls)


# ------------------------------------------------------------------------------------------- compile
@pytest.mark.parametrize("mode", ["joint", "decoupled"])
@torch.no_grad()
def test_compiled_equals_eager(mode):
    model = build("chroma")
    kw = _inputs("float")
    feats = vh.VLFeatures(torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(0)))
    with vh.inject(model, feats, vh.InjectionConfig(mode=mode, scale={0: 0.5, 2: 1.0}, blocks=[0, 2])):
        eager = output(model, kw)
        torch._dynamo.reset()
        got = output(torch.compile(model, backend="aot_eager"), kw)
    assert not torch.equal(eager, output(model, kw))
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=0)
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["joint", "decoupled"])
def test_gradient_checkpointing_gives_the_same_feature_gradients(mode):
    """Blocks called positionally (`temb` read by position). Without a mask: diffusers calls single blocks
    without the attention mask under checkpointing, so a masked model is itself a different function there."""
    grads = []
    for ckpt in (False, True):
        model = build("chroma").requires_grad_(False)
        if ckpt:
            model.enable_gradient_checkpointing()
        feats = vh.VLFeatures(torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(0)).requires_grad_())
        with vh.inject(model, feats, vh.InjectionConfig(mode=mode)):
            output(model, _inputs(None)).square().mean().backward()
        grads.append(feats.tokens.grad.clone())
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-7, rtol=0)


# ------------------------------------------------------------------------------------------- the pipeline facts
@torch.no_grad()
def test_velocity_is_the_pipelines_call():
    """`velocity` against the model called as ChromaPipeline calls it: its own packing, position ids, attention
    mask (`_prepare_attention_mask` of the float caption mask) and unpacking."""
    from diffusers import ChromaPipeline

    model = build("chroma")
    g = torch.Generator().manual_seed(0)
    latents, caption = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, CAP, 32, generator=g)
    cap_mask = text_mask(2, CAP) > 0
    sigma = torch.tensor([0.3, 0.8])
    got = vh.family_for(model).velocity(model, latents, sigma, caption, cap_mask)
    packed = ChromaPipeline._pack_latents(latents, 2, 1, 8, 8)
    mask = ChromaPipeline._prepare_attention_mask(None, 2, 16, torch.float32, cap_mask.float())
    out = model(hidden_states=packed, timestep=sigma, encoder_hidden_states=caption, txt_ids=torch.zeros(CAP, 3),
                img_ids=ChromaPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32),
                attention_mask=mask, return_dict=False)[0]
    torch.testing.assert_close(got, ChromaPipeline._unpack_latents(out, 32, 32, 4), atol=0, rtol=0)


@torch.no_grad()
def test_encode_prompt_keeps_the_masked_in_tokens_and_prompt_kwargs_run_the_pipeline():
    pipe = pipeline("chroma")
    fam = vh.family_for(pipe.transformer)
    embeds, _, mask, *_ = pipe.encode_prompt(["a cat", "a photo of a red dog"], device="cpu",
                                             do_classifier_free_guidance=False, max_sequence_length=32)
    enc = fam.encode_prompt(pipe, ["a cat", "a photo of a red dog"], "cpu", 32)
    assert enc.pooled is None
    for e, full, m in zip(enc.sequences, embeds, mask):
        n = int(m.sum())
        assert n < 32 and e.shape == (n, 32) and torch.equal(e, full[:n])
        assert m[:n].eq(1).all() and m[n:].eq(0).all()  # the prompt's tokens and the first padding token
    kw = fam.prompt_kwargs(torch.stack([enc.sequences[0]] * 2), None)
    out = pipe(**kw, num_inference_steps=1, height=32, width=32, guidance_scale=2.0, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------- commands
def test_train_command_writes_a_loadable_adapter(tmp_path, monkeypatch):
    """`vlhooks train --config configs/tiny/chroma.yaml` for 3 steps (the command's own entry point, in this
    process: a subprocess would spend most of the test importing), then its adapter loads, applies and changes
    the output."""
    from vlhooks.__main__ import main

    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    args = ["train", "--config", str(ROOT / "configs/tiny/chroma.yaml"), "--trainer.max_steps", "3",
            "--model.checkpoint_root", str(tmp_path / "ckpt"), "--data.cache_dir", str(tmp_path / "cache"),
            "--trainer.enable_progress_bar", "false"]
    assert main(args) == 0
    final = tmp_path / "ckpt" / "tiny-chroma-projection" / "final"
    adapter = vh.load_adapter(final)
    from vlhooks.train.module import build_dit

    dit = build_dit(yaml.safe_load((ROOT / "configs/tiny/chroma.yaml").read_text())["model"]["dit"])
    g = torch.Generator().manual_seed(0)
    mask = torch.cat([text_mask(1, 5), torch.ones(1, 16)], dim=1)  # the pipeline's float mask
    kw = dict(hidden_states=torch.randn(1, 16, 12, generator=g),
              encoder_hidden_states=torch.randn(1, 5, 16, generator=g),
              timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3),
              attention_mask=mask, return_dict=False)
    with torch.no_grad():
        base = dit(**kw)[0]
        with vh.inject(dit, vh.VLFeatures(torch.randn(1, 16, 16, generator=g)), adapter=adapter) as h:
            assert h.config.blocks == "all"
            out = dit(**kw)[0]
    assert not torch.equal(out, base)


def test_compare_on_a_saved_tiny_pipeline(tmp_path):
    """`vlhooks compare --config` on a saved tiny ChromaPipeline (the pipeline world), arms `none` and `zero-shot`:
    the outputs are written and zero-shot's images differ from none's."""
    import numpy as np
    import skimage.data
    from PIL import Image

    from vlhooks.eval.compare import main

    pipeline("chroma").save_pretrained(tmp_path / "pipe")
    refs = tmp_path / "refs"
    refs.mkdir()
    for name in ("astronaut", "coffee"):
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(refs / f"{name}.png")
    cfg = {"world": "pipeline", "pipeline": {"path": str(tmp_path / "pipe"), "device": "cpu", "metric_size": 32},
           "generate": {"num_inference_steps": 2, "height": 32, "width": 32, "guidance_scale": 1.0,
                        "max_sequence_length": 32},
           "encoder": {"name": "patches", "width": 32, "size": 32, "patch": 8}, "references": {"folder": str(refs)},
           "prompts": ["a cat"], "seeds": [0], "injection": {"blocks": "all", "mode": "joint"},
           "arms": ["none", "zero-shot"], "adapters": {}, "batch_size": 1, "out": str(tmp_path / "out")}
    (tmp_path / "compare.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(tmp_path / "compare.yaml")]) == 0
    data = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert list(data["arms"]) == ["none", "zero-shot"]
    for name in ("grid.png", "report.html", "metrics.csv"):
        assert (tmp_path / "out" / name).is_file()
    assert data["arms"]["none"] != data["arms"]["zero-shot"]
    assert np.isfinite([s["mean"] for m in data["arms"].values() for s in m.values()]).all()
