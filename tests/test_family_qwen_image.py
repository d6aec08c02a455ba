"""Qwen-Image (`QwenImageTransformer2DModel`, tiny): the extras against independent references written here (explicit
float64 softmax over the block's own projections, RoPE tables computed from the formula), the position policy,
the caption mask, guidance rows, torch.compile, gradient checkpointing, the training objective, a tiny `vlhooks
train` run and `vlhooks compare` through a saved tiny QwenImagePipeline."""

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import vlhooks as vh
from vlhooks.testing import SIZE, TEXT_LEN, build, inputs, output, pipeline, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
NAME = "qwen_image"
THETA = 10000.0


# ------------------------------------------------------------------------------------------- the references
def _heads(x, attn):
    return x.unflatten(-1, (attn.heads, -1))  # [B, L, H, Dh]


def _rope(x, freqs):
    """x [B, L, H, Dh] rotated by complex `freqs` [L, Dh/2] (pairs (2i, 2i + 1) as one complex number), float64."""
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * freqs.to(torch.complex128)[None, :, None]).flatten(3)


def _text_freqs(positions, axes=(8, 4, 4)):
    """RoPE of text tokens at `positions` (the same index on every axis), from the formula: angle
    `p * THETA ** (-2i / d)` per axis of width `d`. `[N, sum(axes) / 2]` complex128."""
    p = torch.as_tensor(positions, dtype=torch.float64)[:, None]
    angles = torch.cat([p * THETA ** (-torch.arange(0, d, 2, dtype=torch.float64) / d) for d in axes], dim=1)
    return torch.polar(torch.ones_like(angles), angles)


class QwenReference:
    """Qwen-Image joint attention from the module's weights, softmax in float64. Keys `[txt, img]`, plus
    `text_bias` `[B, L_txt]` on the text logits; `extra = (k, v, bias)` (`[B, N, H, Dh]` rotated keys, values,
    `[B, N]` logit bias) appended to the keys (joint), or attended alone and added times `decoupled`."""

    def __init__(self, text_bias=None, extra=None, decoupled=None):
        self.text_bias, self.extra, self.decoupled = text_bias, extra, decoupled

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        txt, img = encoder_hidden_states, hidden_states
        B, Lt = txt.shape[:2]
        q = torch.cat([attn.norm_added_q(_heads(attn.add_q_proj(txt), attn)),
                       attn.norm_q(_heads(attn.to_q(img), attn))], 1)  # [B, L, H, Dh], [txt, img]
        k = torch.cat([attn.norm_added_k(_heads(attn.add_k_proj(txt), attn)),
                       attn.norm_k(_heads(attn.to_k(img), attn))], 1)
        v = torch.cat([_heads(attn.add_v_proj(txt), attn), _heads(attn.to_v(img), attn)], 1).double()
        img_freqs, txt_freqs = image_rotary_emb
        freqs = torch.cat([txt_freqs, img_freqs])
        q, k = _rope(q, freqs), _rope(k, freqs)
        bias = torch.zeros(B, k.shape[1], dtype=torch.float64, device=k.device)
        if encoder_hidden_states_mask is not None:
            bias[:, :Lt] = bias[:, :Lt].masked_fill(~encoder_hidden_states_mask, -math.inf)
        if self.text_bias is not None:
            bias[:, :Lt] += self.text_bias.to(bias)
        scale = 1.0 / math.sqrt(q.shape[-1])
        extra = None
        if self.extra is not None:
            ek, ev, eb = self.extra
            extra = ek.double(), ev.double(), eb.double()
        if extra is not None and self.decoupled is None:  # joint: one softmax over [txt, img, extra]
            k, v, bias = torch.cat([k, extra[0]], 1), torch.cat([v, extra[1]], 1), torch.cat([bias, extra[2]], 1)
        logits = torch.einsum("blhd,bmhd->bhlm", q, k) * scale + bias[:, None, None]
        out = torch.einsum("bhlm,bmhd->blhd", logits.softmax(-1), v)
        if extra is not None and self.decoupled is not None:
            logits = torch.einsum("blhd,bmhd->bhlm", q, extra[0]) * scale + extra[2][:, None, None]
            out = out + self.decoupled * torch.einsum("bhlm,bmhd->blhd", logits.softmax(-1), extra[1])
        out = out.flatten(2).to(img.dtype)
        return attn.to_out[0](out[:, Lt:]), attn.to_add_out(out[:, :Lt])


def _block_inputs(model, block, kw):
    """The kwargs block `block` receives in an unpatched run of `kw`."""
    seen = {}
    h = model.transformer_blocks[block].register_forward_pre_hook(
        lambda m, a, k: seen.update(k), with_kwargs=True)
    output(model, kw)
    h.remove()
    return seen


def _with_reference(model, block, proc):
    ref = copy.deepcopy(model)
    ref.transformer_blocks[block].attn.set_processor(proc)
    return ref


def _caption_mask(batch, cap_len):
    """Row 0 all real, row 1 with its last 3 caption tokens padded."""
    mask = torch.ones(batch, cap_len, dtype=torch.bool)
    mask[1, -3:] = False
    return mask


# ------------------------------------------------------------------------------------------- joint: the log-2 oracle
@pytest.mark.parametrize("block", [0, 1])
@pytest.mark.parametrize("masked", [False, True])
@torch.no_grad()
def test_own_text_copy_equals_log2_bias_on_the_text_keys(block, masked):
    """A copy of the caption stream entering the block, injected as hidden-space extras, equals `log 2` on the
    caption's keys; with a padded caption (the model's own mask) the copy carries the same mask and the padded keys
    stay out of both."""
    model = build(NAME)
    kw = inputs(NAME, batch=2, cap_len=8)
    if masked:
        kw["encoder_hidden_states_mask"] = _caption_mask(2, 8)
    text = _block_inputs(model, block, kw)["encoder_hidden_states"]  # [2, 8, D]
    expected = output(_with_reference(model, block, QwenReference(text_bias=torch.full((2, 8), math.log(2.0)))), kw)
    mask = kw["encoder_hidden_states_mask"]
    with vh.inject(model, vh.VLFeatures(text, mask=mask, space="hidden"), vh.InjectionConfig(blocks=[block])):
        got = output(model, kw)
    unpatched = output(model, kw)
    assert (expected - unpatched).abs().max() > 1e-4, "the oracle must have a visible effect"
    assert (got - expected).abs().max() <= 1e-5


@torch.no_grad()
def test_fractional_scale_on_a_copy_is_log_one_plus_s():
    model = build(NAME)
    kw = inputs(NAME, batch=1, cap_len=8)
    text = _block_inputs(model, 0, kw)["encoder_hidden_states"]
    expected = output(_with_reference(model, 0, QwenReference(text_bias=torch.full((1, 8), math.log(1.3)))), kw)
    with vh.inject(model, vh.VLFeatures(text, space="hidden"), vh.InjectionConfig(blocks=[0], scale=0.3)):
        got = output(model, kw)
    assert (got - expected).abs().max() <= 1e-5


# ------------------------------------------------------------------------------------------- caption-space extras
def _extras_kv(model, block, feats, temb, positions):
    """The extras' K/V written out from the weights: txt_norm + txt_in, LayerNorm, (1 + scale) and shift of the first
    half of txt_mod(temb), add_k_proj / add_v_proj, norm_added_k, RoPE at `positions`."""
    blk = model.transformer_blocks[block]
    attn = blk.attn
    e = model.txt_in(model.txt_norm(feats))  # [B, N, D]
    D = e.shape[-1]
    mod = blk.txt_mod(temb)  # [B, 6D]
    shift, scale = mod[:, :D], mod[:, D:2 * D]
    x = F.layer_norm(e, (D,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    k = _rope(attn.norm_added_k(_heads(attn.add_k_proj(x), attn)), _text_freqs(positions))
    return k, _heads(attn.add_v_proj(x), attn)


CASES = [  # (extra tokens, image shapes of the call, caption mask): caption length 8 throughout
    (5, [(1, 4, 4)], False),
    (12, [(1, 4, 4)], True),  # more extras than caption tokens: positions continue past the caption's
    (6, [(1, 4, 4), (1, 2, 6)], False),  # two images per call (as the edit pipelines): text starts at max = 3
]


@pytest.mark.parametrize("mode", ["joint", "decoupled"])
@pytest.mark.parametrize("n,shapes,masked", CASES)
@torch.no_grad()
def test_caption_space_extras_match_an_independent_reference(mode, n, shapes, masked):
    """Caption-space features with a padded row, strength 0.7, on block 1: joint = one softmax over
    `[txt, img, extra]` with `log 0.7` on the extras; decoupled = the block's own attention + 0.7 times the
    extras' own softmax (before the output projection). Extra token `j` sits at `m + j`,
    `m = max(h // 2, w // 2)` over the call's images (where the model starts its caption)."""
    model = build(NAME)
    B, s = 2, 0.7
    kw = inputs(NAME, batch=B, cap_len=8)
    n_img = sum(f * h * w for f, h, w in shapes)
    kw["hidden_states"] = torch.randn(B, n_img, 16, generator=torch.Generator().manual_seed(5))
    kw["img_shapes"] = [shapes] * B
    if masked:
        kw["encoder_hidden_states_mask"] = _caption_mask(B, 8)
    g = torch.Generator().manual_seed(9)
    feats = torch.randn(B, n, 16, generator=g)
    fmask = torch.ones(B, n, dtype=torch.bool)
    fmask[1, -2:] = False
    temb = _block_inputs(model, 1, kw)["temb"]
    m = max(max(h // 2, w // 2) for _, h, w in shapes)
    ek, ev = _extras_kv(model, 1, feats, temb, [m + j for j in range(n)])
    eb = torch.full((B, n), 0.0 if mode == "decoupled" else math.log(s)).masked_fill(~fmask, -math.inf)
    ref = QwenReference(extra=(ek, ev, eb), decoupled=s if mode == "decoupled" else None)
    expected = output(_with_reference(model, 1, ref), kw)
    with vh.inject(model, vh.VLFeatures(feats, mask=fmask), vh.InjectionConfig(blocks=[1], mode=mode, scale=s)):
        got = output(model, kw)
    assert (expected - output(model, kw)).abs().max() > 1e-4
    assert (got - expected).abs().max() <= 1e-5


@torch.no_grad()
def test_presets_and_sites():
    model = build(NAME)
    assert vh.list_sites(model) == ["transformer_blocks.0", "transformer_blocks.1"]
    presets = vh.list_presets(model)
    assert presets["all"] == presets["double"] == vh.list_sites(model)
    fam = vh.family_for(model)
    assert fam.modulation_module(model, fam.sites(model)[1]) is model.transformer_blocks[1].txt_mod


def _image_attention(model, refs, cfg, kw):
    """Block 1's attention output over the image tokens `[B, 16, D]` (its first output; the second is the text's)."""
    seen = {}

    def keep(module, args, out):
        seen.setdefault("out", out[0])

    h = model.transformer_blocks[1].attn.register_forward_hook(keep)
    try:
        with torch.no_grad():
            if refs is None:
                output(model, kw)
            else:
                with vh.inject(model, refs, cfg):
                    output(model, kw)
    finally:
        h.remove()
    return seen["out"]


@pytest.mark.parametrize("mode", ["joint", "decoupled"])
def test_disjoint_masks_give_each_region_its_own_reference(mode):
    """Spatial masks over the 4 x 4 image-token grid (`img_shapes`): each region sees its own reference as if alone,
    a region outside every mask is unpatched."""
    model = build(NAME)
    kw = inputs(NAME, batch=1)
    left = torch.zeros(4, 4, dtype=torch.bool)
    left[:, :2] = True
    g = torch.Generator().manual_seed(1)
    a, b = (vh.VLFeatures(torch.randn(1, 4, 16, generator=g)) for _ in range(2))
    cfg = vh.InjectionConfig(blocks=[1], mode=mode, guidance="none")
    both = _image_attention(model, [vh.Reference(a, mask=left), vh.Reference(b, mask=~left)], cfg, kw)
    alone_a = _image_attention(model, [vh.Reference(a)], cfg, kw)
    alone_b = _image_attention(model, [vh.Reference(b)], cfg, kw)
    masked_a = _image_attention(model, [vh.Reference(a, mask=left)], cfg, kw)
    plain = _image_attention(model, None, cfg, kw)
    L, R = left.flatten(), ~left.flatten()
    torch.testing.assert_close(both[:, L], alone_a[:, L], rtol=0, atol=1e-5)
    torch.testing.assert_close(both[:, R], alone_b[:, R], rtol=0, atol=1e-5)
    torch.testing.assert_close(masked_a[:, R], plain[:, R], rtol=0, atol=1e-5)
    assert (masked_a[:, L] - plain[:, L]).abs().max() > 1e-4


def test_masks_cover_the_generated_image_of_an_edit_call():
    """Two images per call (an edit pipeline's: the generated 4 x 4 image, then a 2 x 6 condition image): the mask
    is over the first image's tokens; the condition image's tokens see the reference fully."""
    model = build(NAME)
    kw = inputs(NAME, batch=1)
    kw["hidden_states"] = torch.randn(1, 28, 16, generator=torch.Generator().manual_seed(3))
    kw["img_shapes"] = [[(1, 4, 4), (1, 2, 6)]]
    left = torch.zeros(4, 4, dtype=torch.bool)
    left[:, :2] = True
    a = vh.VLFeatures(torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(1)))
    cfg = vh.InjectionConfig(blocks=[1], guidance="none")
    masked = _image_attention(model, [vh.Reference(a, mask=left)], cfg, kw)
    alone = _image_attention(model, [vh.Reference(a)], cfg, kw)
    plain = _image_attention(model, None, cfg, kw)
    L, R = left.flatten(), ~left.flatten()
    torch.testing.assert_close(masked[:, :16][:, R], plain[:, :16][:, R], rtol=0, atol=1e-5)
    assert (masked[:, :16][:, L] - plain[:, :16][:, L]).abs().max() > 1e-4
    assert (alone[:, 16:] - plain[:, 16:]).abs().max() > 1e-4
    kw["img_shapes"] = [[(1, 4, 4)]]  # shapes that do not cover the 28 tokens: refused
    with vh.inject(model, [vh.Reference(a, mask=left)], cfg), pytest.raises(vh.ConfigError, match="single-frame"):
        output(model, kw)


# ------------------------------------------------------------------------------------------- the model's conventions
@torch.no_grad()
def test_velocity_packs_as_the_pipeline_does():
    """`velocity` on `[B, C, H, W]` latents = the transformer on the pipeline's own packing, unpacked by the
    pipeline's own `_unpack_latents`, at timestep sigma; an all-real caption mask is dropped as the pipeline drops
    it."""
    from diffusers import QwenImagePipeline

    model = build(NAME)
    fam = vh.family_for(model)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g)
    cap = torch.randn(2, 6, 16, generator=g)
    sigma = torch.tensor([0.3, 0.8])
    packed = QwenImagePipeline._pack_latents(x[:, None], 2, 4, 8, 8)  # [B, 16, 16]
    out = model(hidden_states=packed, encoder_hidden_states=cap, timestep=sigma, img_shapes=[[(1, 4, 4)]] * 2,
                return_dict=False)[0]
    want = QwenImagePipeline._unpack_latents(out, 32, 32, 4)[:, :, 0]  # vae scale factor 4: 32 px = 8 latents
    assert torch.equal(fam.velocity(model, x, sigma, cap), want)
    assert torch.equal(fam.velocity(model, x, sigma, cap, torch.ones(2, 6, dtype=torch.bool)), want)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    masked = fam.velocity(model, x, sigma, cap, mask)
    assert not torch.equal(masked[0], want[0]) and torch.equal(masked[1], want[1])
    assert fam.to_progress(0.25) == 0.75


@torch.no_grad()
def test_pipeline_prompt_embeddings_round_trip():
    """`encode_prompt` gives one `[L_i, 16]` per prompt, padding cut (the prompt's tokens, then the 13 of
    `<|im_end|>`, `<|im_start|>assistant`; one token per byte, " of" one token); `prompt_kwargs` of the
    pipeline's own embeddings generate the same image as the prompt, bit for bit."""
    pipe = pipeline(NAME)
    fam = vh.family_for(pipe.transformer)
    enc = fam.encode_prompt(pipe, ["a cat", "a photo of a dog"], "cpu", 64)
    assert [e.shape for e in enc.sequences] == [(5 + 13, 16), (14 + 13, 16)] and enc.pooled is None
    assert not torch.equal(enc.sequences[0], enc.sequences[1][:5]), "the tokens after the template are the prompt's"
    call = dict(num_inference_steps=2, height=SIZE, width=SIZE, max_sequence_length=TEXT_LEN, true_cfg_scale=1.0,
                output_type="pt")
    base = pipe("a photo of a dog", generator=torch.Generator().manual_seed(0), **call).images
    emb = fam.encode_prompt(pipe, ["a photo of a dog"], "cpu", TEXT_LEN).sequences[0][None]
    again = pipe(generator=torch.Generator().manual_seed(0), **fam.prompt_kwargs(emb, None), **call).images
    assert torch.equal(again, base)


# ------------------------------------------------------------------------------------------- pipeline: guidance rows
@pytest.mark.parametrize("mode", ["joint", "decoupled"])
@torch.no_grad()
def test_guidance_leaves_the_unconditional_calls_untouched(mode):
    """True CFG makes a conditional then an unconditional call per step, the second inside
    `cache_context("uncond")`: the unconditional calls are bit-identical to the same calls unpatched, every
    conditional one changes."""
    pipe = pipeline(NAME)
    calls = []

    def record(module, args, kwargs, out):
        calls.append((copy.deepcopy(kwargs), out[0].clone()))

    h = pipe.transformer.register_forward_hook(record, with_kwargs=True)
    feats = vh.VLFeatures(torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(0)))
    with vh.inject(pipe, feats, vh.InjectionConfig(mode=mode)):
        run_pipeline(pipe, NAME, steps=3, cfg=True)
    h.remove()
    assert len(calls) == 6 and vh.get_injection(pipe) is None
    for i, (kwargs, patched) in enumerate(calls):
        plain = pipe.transformer(**kwargs)[0]
        if i % 2:
            assert torch.equal(patched, plain), f"unconditional call {i}"
        else:
            assert not torch.equal(patched, plain), f"conditional call {i}"


# ------------------------------------------------------------------------------------------- compile, checkpointing
@torch.no_grad()
def test_compiled_equals_eager_without_new_graph_breaks():
    import torch._dynamo

    model = build(NAME)
    kw = inputs(NAME, batch=2)
    kw["encoder_hidden_states_mask"] = _caption_mask(2, 8)

    def breaks():
        torch._dynamo.reset()
        return torch._dynamo.explain(model)(**kw).graph_break_count

    output(model, kw)  # warm the RoPE caches
    plain = breaks()
    feats = vh.VLFeatures(torch.randn(1, 11, 16, generator=torch.Generator().manual_seed(0)))
    try:
        with vh.inject(model, feats, vh.InjectionConfig(scale={0: 0.5, 1: 1.0})):
            eager = output(model, kw)
            patched = breaks()
            torch._dynamo.reset()
            got = output(torch.compile(model, backend="aot_eager"), kw)
    finally:
        torch._dynamo.reset()
    assert patched == plain
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["joint", "decoupled"])
def test_gradient_checkpointing_gives_the_same_feature_gradients(mode):
    """Under checkpointing the blocks are called positionally (temb, image_rotary_emb by position)."""
    grads = []
    for ckpt in (False, True):
        model = build(NAME).requires_grad_(False)
        if ckpt:
            model.enable_gradient_checkpointing()
        feats = vh.VLFeatures(torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(0)).requires_grad_())
        with vh.inject(model, feats, vh.InjectionConfig(mode=mode)):
            output(model, inputs(NAME, batch=2)).square().mean().backward()
        grads.append(feats.tokens.grad.clone())
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-7, rtol=0)


# ------------------------------------------------------------------------------------------- train and compare
@pytest.mark.slow
def test_train_command_writes_a_loadable_adapter(tmp_path, monkeypatch):
    """`vlhooks train` on the tiny recipe for 3 steps; the saved adapter loads, applies to the recipe's DiT and
    changes its output."""
    from vlhooks.__main__ import main
    from vlhooks.train.module import build_dit

    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    recipe = ROOT / "configs/tiny/qwen_image.yaml"
    assert main(["train", "--config", str(recipe), "--trainer.max_steps", "3", "--model.checkpoint_root",
                 str(tmp_path / "ckpt"), "--data.cache_dir", str(tmp_path / "cache"),
                 "--trainer.enable_progress_bar", "false"]) == 0
    final = tmp_path / "ckpt" / "tiny-qwen_image-projection" / "final"
    adapter = vh.load_adapter(final)
    dit = build_dit(yaml.safe_load(recipe.read_text())["model"]["dit"])
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(1, 64, 12, generator=g),
              encoder_hidden_states=torch.randn(1, 5, 16, generator=g),
              timestep=torch.tensor([0.5]), img_shapes=[[(1, 8, 8)]], return_dict=False)  # 16 px pixels: 8x8 tokens
    with torch.no_grad():
        base = dit(**kw)[0]
        with vh.inject(dit, vh.VLFeatures(torch.randn(1, 16, 16, generator=g)), adapter=adapter) as h:
            assert h.config.blocks == "all"
            out = dit(**kw)[0]
    assert not torch.equal(out, base)


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    """The tiny QwenImagePipeline, saved with `save_pretrained`: (the in-memory pipeline, its folder)."""
    pipe = pipeline(NAME)
    folder = tmp_path_factory.mktemp("qwen_image") / "pipe"
    pipe.save_pretrained(folder)
    return pipe, folder


@torch.no_grad()
def test_recipe_caption_encoder_reads_a_saved_pipeline(saved_pipeline):
    """The real recipe's caption route (`caption_encoder: {name: pipeline, path: ...}`) on the saved folder: the
    pipeline's own `encode_prompt`, padding cut, equal to the in-memory pipeline's."""
    from vlhooks.train.encoders import caption_encoder

    pipe, folder = saved_pipeline
    enc = caption_encoder({"name": "pipeline", "path": str(folder), "max_sequence_length": 64})
    got = enc(["a cat", "a photo of a dog"])
    want = vh.family_for(pipe.transformer).encode_prompt(pipe, ["a cat", "a photo of a dog"], "cpu", 64)
    assert got["pooled"] is None and len(got["sequences"]) == 2
    for a, b in zip(got["sequences"], want.sequences):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_compare_on_a_saved_tiny_pipeline(tmp_path, saved_pipeline):
    """`vlhooks compare` through the pipeline world: arm `none` (the plain pipeline) and `zero-shot` on a saved tiny
    QwenImagePipeline, with true CFG on."""
    import json

    import skimage.data
    from PIL import Image

    from vlhooks.__main__ import main

    _, folder = saved_pipeline
    refs = tmp_path / "refs"
    refs.mkdir()
    Image.fromarray(skimage.data.astronaut()).convert("RGB").save(refs / "astronaut.png")
    cfg = dict(world="pipeline", out=str(tmp_path / "out"), seeds=[0], prompts=["a cat"], arms=["none", "zero-shot"],
               pipeline={"path": str(folder), "device": "cpu", "metric_size": 32},
               generate={"num_inference_steps": 2, "height": 32, "width": 32, "true_cfg_scale": 2.0,
                         "negative_prompt": "blurry", "max_sequence_length": 64},
               encoder={"name": "patches", "width": 16, "size": 32, "patch": 8},
               references={"folder": str(refs)}, injection={"blocks": "all", "mode": "joint"})
    (tmp_path / "compare.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["compare", "--config", str(tmp_path / "compare.yaml")]) == 0
    data = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert list(data["arms"]) == ["none", "zero-shot"]
    assert data["arms"]["none"] != data["arms"]["zero-shot"], "zero-shot injection changes the images"
    assert (tmp_path / "out" / "grid.png").is_file()
