"""Lumina 2 (`Lumina2Transformer2DModel`, `Lumina2Pipeline`): the log-2 oracle and decoupled mode against reference
attention written here (GQA, complex RoPE and the caption position policy re-implemented, not vlhooks' code), the
extras' embedding against the model's own caption stream, torch.compile, gradient checkpointing, the pipeline's
guidance calls and timestep convention, training and `vlhooks compare` on tiny models."""

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import vlhooks as vh
from vlhooks.testing import PROMPT, build, caption_width, inputs, output, pipeline, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
NAME = "lumina2"
LOG2 = math.log(2.0)


# ------------------------------------------------------------------------------------------- reference attention
def _rope(x, freqs):
    """Complex RoPE in float64: `x` `[B, L, H, Dh]`, `freqs` `[B or 1, L, Dh/2]` complex."""
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * freqs.to(torch.complex128)[:, :, None]).flatten(3)


def _heads(attn, hidden, freqs):
    """The block's q, k, v from its weights, in float64, GQA expanded by index (query head `h` reads kv head
    `h // (H / Hkv)`): `[B, H, L, Dh]` each."""
    B, L, _ = hidden.shape
    H = attn.heads
    Dh = attn.to_q.out_features // H
    Hkv = attn.to_k.out_features // Dh
    q = attn.norm_q(attn.to_q(hidden).view(B, L, H, Dh))
    k = attn.norm_k(attn.to_k(hidden).view(B, L, Hkv, Dh))
    v = attn.to_v(hidden).view(B, L, Hkv, Dh).double()
    if freqs is not None:
        q, k = _rope(q, freqs), _rope(k, freqs)
    group = torch.arange(H) // (H // Hkv)
    return q.double().transpose(1, 2), k.double()[:, :, group].transpose(1, 2), v[:, :, group].transpose(1, 2)


def _softmax_attention(q, k, v, bias):
    """`softmax(q k^T / sqrt(d) + bias) v` in float64; `bias` `[B, Lk]`."""
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias[:, None, None, :]
    return logits.softmax(-1) @ v


def _key_mask_bias(attention_mask, B, L):
    bias = torch.zeros(B, L, dtype=torch.float64)
    if attention_mask is not None:
        bias = bias.masked_fill(~attention_mask.bool().view(B, L), float("-inf"))
    return bias


class BiasProcessor:
    """Lumina 2 attention with `log_bias` on the keys `[0, lengths[i])` of row `i` (the caption at the start of
    the `[cap, img]` sequence), for the queries where `queries` `[L]` is True (every query when None)."""

    def __init__(self, lengths, log_bias=LOG2, queries=None):
        self.lengths, self.log_bias, self.queries = lengths, log_bias, queries

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 base_sequence_length=None):
        B, L, _ = hidden_states.shape
        q, k, v = _heads(attn, hidden_states, image_rotary_emb)
        bias = _key_mask_bias(attention_mask, B, L)[:, None, :].expand(B, L, L).clone()  # [B, Lq, Lk]
        on = torch.ones(L, dtype=torch.bool) if self.queries is None else self.queries
        for i, n in enumerate(self.lengths):
            bias[i, on, :n] += self.log_bias
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias[:, None]
        out = (logits.softmax(-1) @ v).transpose(1, 2).flatten(2).float()
        return attn.to_out[0](out)


def _extra_freqs(n, config):
    """The documented position policy, written out: extra token `j` at `(j, 0, 0)`; axis 0 rotates by
    `j * theta^(-2i/d0)`, axes 1 and 2 sit at position 0 (no rotation). `[1, n, Dh/2]` complex128."""
    d0, d1, d2 = config.axes_dim_rope
    j = torch.arange(n, dtype=torch.float64).clamp(max=config.axes_lens[0] - 1)
    inv = 1.0 / (10000.0 ** (torch.arange(0, d0, 2, dtype=torch.float64) / d0))
    axis0 = torch.polar(torch.ones(n, d0 // 2, dtype=torch.float64), j[:, None] * inv[None])
    rest = torch.ones(n, (d1 + d2) // 2, dtype=torch.complex128)
    return torch.cat([axis0, rest], dim=1)[None]


class DecoupledProcessor:
    """Lumina 2 attention plus `s * softmax(q k_e^T / sqrt(d)) v_e` before the output projection; `k_e, v_e`
    `[1, H, N, Dh]` float64 (already expanded over the head groups)."""

    def __init__(self, ek, ev, s):
        self.ek, self.ev, self.s = ek, ev, s

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 base_sequence_length=None):
        B, L, _ = hidden_states.shape
        q, k, v = _heads(attn, hidden_states, image_rotary_emb)
        own = _softmax_attention(q, k, v, _key_mask_bias(attention_mask, B, L))
        extra = _softmax_attention(q, self.ek, self.ev, torch.zeros(B, self.ek.shape[2], dtype=torch.float64))
        out = (own + self.s * extra).transpose(1, 2).flatten(2).float()
        return attn.to_out[0](out)


def _capture_block_input(model, block_name, kw):
    """Run the unpatched model once; the (args, kwargs) the block received."""
    seen = {}

    def hook(module, args, kwargs):
        seen["args"], seen["kwargs"] = args, kwargs

    h = model.get_submodule(block_name).register_forward_pre_hook(hook, with_kwargs=True)
    output(model, kw)
    h.remove()
    return seen["args"], seen["kwargs"]


def _feats(n=5, seed=4, requires_grad=False):
    t = torch.randn(1, n, caption_width(NAME), generator=torch.Generator().manual_seed(seed))
    return vh.VLFeatures(t.requires_grad_(requires_grad))


# ------------------------------------------------------------------------------------------- facts
def test_sites_presets_and_family_facts():
    model = build(NAME)
    fam = vh.family_for(model)
    assert fam.name == NAME and fam.batched_guidance is None
    assert vh.list_sites(model) == ["layers.0", "layers.1", "noise_refiner.0", "noise_refiner.1",
                                    "context_refiner.0", "context_refiner.1"]
    presets = vh.list_presets(model)
    assert presets["all"] == presets["main"] == ["layers.0", "layers.1"]
    assert presets["context_refiner"] == ["context_refiner.0", "context_refiner.1"]
    assert presets["noise_refiner"] == ["noise_refiner.0", "noise_refiner.1"]
    assert presets["refiners"] == presets["noise_refiner"] + presets["context_refiner"]
    assert fam.read_progress_list((), {"timestep": torch.tensor([0.25, 0.75])}) == [0.25, 0.75]  # 1 - sigma
    assert model.layers[0].attn.heads == 4 and model.layers[0].attn.to_k.out_features == 2 * 8  # GQA 4 over 2


# ------------------------------------------------------------------------------------------- oracles
@pytest.mark.parametrize("layer", [0, 1])
@torch.no_grad()
def test_own_text_copy_equals_log2_bias(layer):
    """Hidden space: a copy of the caption segment entering `layers.{layer}` equals a log-2 bias on it."""
    model = build(NAME)
    kw = inputs(NAME, batch=2, cap_len=8)
    name = f"layers.{layer}"
    args, _ = _capture_block_input(model, name, kw)
    text = args[0][:, :8]  # [B, 8, D]: the caption at the start of [cap, img]
    reference = copy.deepcopy(model)
    reference.get_submodule(name).attn.set_processor(BiasProcessor([8, 8]))
    expected = output(reference, kw)
    with vh.inject(model, vh.VLFeatures(text, space="hidden"), vh.InjectionConfig(blocks=[layer])):
        got = output(model, kw)
    unpatched = output(model, kw)
    assert (expected - unpatched).abs().max() > 1e-4, "the oracle must have a visible effect"
    assert (got - expected).abs().max() <= 1e-5


@torch.no_grad()
def test_extras_embed_like_the_caption():
    """The extras' embedding (caption embedder, then the context refiner at positions (j, 0, 0) with their mask)
    is the model's own caption stream, for every depth of the refiner, also for a padded row."""
    model = build(NAME)
    fam = vh.family_for(model)
    kw = inputs(NAME, batch=2, cap_len=8)
    kw["encoder_attention_mask"][1, 5:] = 0  # row 1: 5 real tokens
    mask = kw["encoder_attention_mask"].bool()
    sites = {s.name: s for s in fam.sites(model)}
    for block, depth in (("context_refiner.0", 0), ("context_refiner.1", 1), ("layers.0", 2)):
        args, _ = _capture_block_input(model, block, kw)
        own = args[0][:, :8]  # the caption stream entering the block
        got = fam.embed(model, kw["encoder_hidden_states"], mask, sites[block], {})
        for i, n in enumerate((8, 5)):
            torch.testing.assert_close(got[i, :n], own[i, :n], atol=1e-6, rtol=0, msg=f"{block} row {i}")


@pytest.mark.parametrize("layer,space", [(0, "caption"), (0, "hidden"), (1, "hidden")])
@torch.no_grad()
def test_padded_copy_equals_log2_bias(layer, space):
    """Rows of different caption lengths (so the model masks the joint sequence): injecting each row's caption
    with its mask equals a log-2 bias on that row's own caption keys. In caption space (the features are the
    model's caption input, embedded by the family) this holds at the first main layer, whose caption stream is
    the refined caption; in hidden space (the caption segment entering the block) at every layer."""
    model = build(NAME)
    kw = inputs(NAME, batch=2, cap_len=8)
    kw["encoder_attention_mask"][1, 6:] = 0
    mask = kw["encoder_attention_mask"].bool()
    if space == "caption":
        feats = vh.VLFeatures(kw["encoder_hidden_states"], mask=mask)
    else:
        args, _ = _capture_block_input(model, f"layers.{layer}", kw)
        assert args[1] is not None and args[1].shape == (2, 8 + 16)  # the joint mask: rows differ in length
        feats = vh.VLFeatures(args[0][:, :8], mask=mask, space="hidden")  # row 1: its 6 tokens, then image ones
    reference = copy.deepcopy(model)
    reference.get_submodule(f"layers.{layer}").attn.set_processor(BiasProcessor([8, 6]))
    expected = output(reference, kw)
    with vh.inject(model, feats, vh.InjectionConfig(blocks=[layer])):
        got = output(model, kw)
    assert (expected - output(model, kw)).abs().max() > 1e-4
    assert (got - expected).abs().max() <= 1e-5


@torch.no_grad()
def test_spatial_mask_limits_the_bias_to_its_image_queries():
    """A bare-transformer mask over the 4 x 4 image-token grid (left half off): the caption queries and the image
    queries inside the mask see the copied caption (log-2 bias), the image queries outside it do not."""
    model = build(NAME)
    kw = inputs(NAME, batch=1, cap_len=8)
    args, _ = _capture_block_input(model, "layers.1", kw)
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[:, :2] = False
    queries = torch.cat([torch.ones(8, dtype=torch.bool), mask.flatten()])  # [cap, img] queries
    reference = copy.deepcopy(model)
    reference.layers[1].attn.set_processor(BiasProcessor([8], queries=queries))
    expected = output(reference, kw)
    ref = vh.Reference(vh.VLFeatures(args[0][:, :8], space="hidden"), mask=mask)
    with vh.inject(model, [ref], vh.InjectionConfig(blocks=[1])):
        got = output(model, kw)
    everywhere = copy.deepcopy(model)
    everywhere.layers[1].attn.set_processor(BiasProcessor([8]))
    assert (expected - output(everywhere, kw)).abs().max() > 1e-4, "the mask must matter"
    assert (got - expected).abs().max() <= 1e-5
    with pytest.raises(vh.ConfigError, match="one caption length"):  # rows whose images start apart
        kw = inputs(NAME, batch=2, cap_len=8)
        kw["encoder_attention_mask"][1, 6:] = 0
        with vh.inject(model, [vh.Reference(_feats(), mask=mask)], vh.InjectionConfig(blocks=[1])):
            output(model, kw)


@pytest.mark.parametrize("site", ["layers.1", "noise_refiner.0", "context_refiner.1"])
@torch.no_grad()
def test_decoupled_equals_the_formula(site):
    """Decoupled mode on one block: `out + s softmax(q k_e^T / sqrt(d)) v_e` before `to_out`, with the extras'
    K/V computed here from the block's weights (pre-norm and modulation, to_k / to_v, norm_k, RoPE at (j, 0, 0),
    GQA expansion)."""
    model = build(NAME)
    kw = inputs(NAME, batch=1, cap_len=8)
    block = model.get_submodule(site)
    args, _ = _capture_block_input(model, site, kw)
    extras = torch.randn(1, 6, model.config.hidden_size, generator=torch.Generator().manual_seed(7))  # hidden space
    if block.modulation:
        scale_msa = block.norm1.linear(torch.nn.functional.silu(args[3])).chunk(4, dim=1)[0]
        x = block.norm1.norm(extras) * (1 + scale_msa[:, None])
    else:
        x = block.norm1(extras)
    attn = block.attn
    H, Dh = attn.heads, attn.to_q.out_features // attn.heads
    Hkv = attn.to_k.out_features // Dh
    group = torch.arange(H) // (H // Hkv)
    ek = _rope(attn.norm_k(attn.to_k(x).view(1, 6, Hkv, Dh)), _extra_freqs(6, model.config))
    ev = attn.to_v(x).view(1, 6, Hkv, Dh).double()
    ek, ev = ek[:, :, group].transpose(1, 2), ev[:, :, group].transpose(1, 2)
    s = 0.7
    reference = copy.deepcopy(model)
    reference.get_submodule(site).attn.set_processor(DecoupledProcessor(ek, ev, s))
    expected = output(reference, kw)
    index = vh.list_sites(model).index(site)
    with vh.inject(model, vh.VLFeatures(extras, space="hidden"),
                   vh.InjectionConfig(blocks=[index], mode="decoupled", scale=s)):
        got = output(model, kw)
    assert (expected - output(model, kw)).abs().max() > 1e-4
    assert (got - expected).abs().max() <= 1e-5


@torch.no_grad()
def test_context_refiner_sites_and_positions_beyond_the_rope_table():
    """A context-refiner site changes the output only through the caption stream (the extras join the
    refiner's attention); features longer than the RoPE table's caption axis take its last position."""
    model = build(NAME)
    kw = inputs(NAME, batch=1)
    base = output(model, kw)
    with vh.inject(model, _feats(), vh.InjectionConfig(blocks="context_refiner")):
        assert not torch.equal(output(model, kw), base)
    long = _feats(n=model.config.axes_lens[0] + 3)
    with vh.inject(model, long, vh.InjectionConfig()):
        assert torch.isfinite(output(model, kw)).all()
    fam = vh.family_for(model)
    freqs = fam._extra_freqs(model, model.config.axes_lens[0] + 3, torch.device("cpu"), {})
    torch.testing.assert_close(freqs, _extra_freqs(model.config.axes_lens[0] + 3, model.config), atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------- compile, checkpointing
@torch.no_grad()
def test_compiled_equals_eager():
    import torch._dynamo

    model = build(NAME)
    kw = inputs(NAME, batch=2)
    with vh.inject(model, _feats(), vh.InjectionConfig(scale={0: 0.5, 1: 1.0}, blocks=[0, 1])):
        eager = output(model, kw)
        torch._dynamo.reset()
        got = output(torch.compile(model, backend="aot_eager"), kw)
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=0)
    assert not torch.equal(eager, output(model, kw))
    torch._dynamo.reset()


def test_gradient_checkpointing_gives_the_same_feature_gradients():
    grads = []
    for ckpt in (False, True):
        model = build(NAME).requires_grad_(False)
        if ckpt:
            model.enable_gradient_checkpointing()
        feats = _feats(requires_grad=True)
        with vh.inject(model, feats, vh.InjectionConfig(blocks=[0, 1, 2, 4])):
            output(model, inputs(NAME, batch=2)).square().mean().backward()
        grads.append(feats.tokens.grad.clone())
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-7, rtol=0)


# ------------------------------------------------------------------------------------------- the pipeline
def _record_calls(transformer):
    calls = []

    def hook(module, args, kwargs, out):
        calls.append((copy.deepcopy(args), copy.deepcopy(kwargs), copy.deepcopy(out[0])))

    return calls, transformer.register_forward_hook(hook, with_kwargs=True)


@torch.no_grad()
def _guided_calls(mode):
    """Per transformer call of a 3-step CFG run under injection: whether it equals the unpatched call."""
    pipe = pipeline(NAME)
    calls, h = _record_calls(pipe.transformer)
    with vh.inject(pipe, _feats(), vh.InjectionConfig(mode=mode)):
        run_pipeline(pipe, NAME, steps=3, cfg=True)
    h.remove()
    assert vh.get_injection(pipe) is None and len(calls) == 6  # cond then uncond, at every step
    return [(torch.equal(out, pipe.transformer(*a, **k)[0])) for a, k, out in calls]


@pytest.fixture(scope="module")
def guided_joint():
    return _guided_calls("joint")


@pytest.mark.parametrize("mode", ["joint", "decoupled"])
def test_guidance_injects_every_conditional_call(mode, guided_joint):
    unchanged = guided_joint if mode == "joint" else _guided_calls(mode)
    assert not any(unchanged[0::2]), "every conditional call must be injected"


def test_guidance_leaves_the_unconditional_calls_untouched(guided_joint):
    assert all(guided_joint[1::2])


@torch.no_grad()
def test_velocity_is_the_pipelines_own_step():
    """One Euler step of the pipeline from its initial noise equals `x + (sigma_1 - sigma_0) * velocity`: the
    timestep the family passes (1 - sigma) and the sign of its prediction are the pipeline's."""
    from diffusers.utils.torch_utils import randn_tensor

    pipe = pipeline(NAME)
    fam = vh.family_for(pipe.transformer)
    got = run_pipeline(pipe, NAME, steps=2, output_type="latent")  # [1, 4, 4, 4]
    pipe_embeds, mask, _, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False, max_sequence_length=64)
    x = randn_tensor((1, 4, 4, 4), generator=torch.Generator().manual_seed(0), dtype=pipe_embeds.dtype)
    sigmas = pipe.scheduler.sigmas.float()  # the schedule the run just used
    for i in range(2):
        v = fam.velocity(pipe.transformer, x, sigmas[i : i + 1], pipe_embeds, mask.bool())
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    torch.testing.assert_close(got, x, atol=1e-5, rtol=0)


@torch.no_grad()
def test_encode_prompt_and_prompt_kwargs_round_trip():
    """`encode_prompt` gives each prompt's real tokens; passed back through `prompt_kwargs` (no padding, every
    token real) the pipeline makes the image it makes from the prompt."""
    pipe = pipeline(NAME)
    fam = vh.family_for(pipe.transformer)
    enc = fam.encode_prompt(pipe, [PROMPT, "a dog"], "cpu", 64)
    _, mask, _, _ = pipe.encode_prompt([PROMPT, "a dog"], do_classifier_free_guidance=False, max_sequence_length=64)
    assert [s.shape[0] for s in enc.sequences] == mask.sum(1).tolist() and enc.pooled is None
    plain = run_pipeline(pipe, NAME, cfg=True)
    kwargs = fam.prompt_kwargs(enc.sequences[0][None], None)
    call = dict(num_inference_steps=2, height=32, width=32, guidance_scale=2.0, max_sequence_length=64,
                generator=torch.Generator().manual_seed(0), output_type="pt")
    again = pipe(**kwargs, **call).images
    torch.testing.assert_close(again, plain, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- training, compare
def _train(tmp_path, steps):
    args = [sys.executable, "-m", "vlhooks", "train", "--config", str(ROOT / "configs/tiny/lumina2.yaml"),
            "--trainer.max_steps", str(steps), "--model.checkpoint_root", str(tmp_path / "ckpt"),
            "--data.cache_dir", str(tmp_path / "cache"), "--trainer.enable_progress_bar", "false"]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.pop("WANDB_API_KEY", None)
    return subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)


def test_train_command_writes_a_loadable_adapter(tmp_path):
    from vlhooks.train.module import build_dit

    r = _train(tmp_path, 3)
    assert r.returncode == 0, r.stderr[-3000:]
    final = tmp_path / "ckpt" / "tiny-lumina2" / "final"
    assert sorted(p.name for p in final.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    recipe = yaml.safe_load((ROOT / "configs/tiny/lumina2.yaml").read_text())
    dit = build_dit(recipe["model"]["dit"])
    kw = dict(hidden_states=torch.randn(1, 3, 16, 16), timestep=torch.tensor([0.5]),
              encoder_hidden_states=torch.randn(1, 5, 16), encoder_attention_mask=torch.ones(1, 5, dtype=torch.long),
              return_dict=False)
    adapter = vh.load_adapter(final)
    with torch.no_grad():
        base = dit(**kw)[0]
        with vh.inject(dit, vh.VLFeatures(torch.randn(1, 16, 16)), adapter=adapter) as h:
            assert h.config.blocks == "all"
            out = dit(**kw)[0]
        assert torch.equal(dit(**kw)[0], base)
    assert not torch.equal(out, base)


@pytest.mark.slow
def test_compare_on_a_saved_tiny_pipeline(tmp_path):
    """`vlhooks compare` in the pipeline world: arms none and zero-shot through a saved tiny Lumina2Pipeline."""
    import json

    import skimage.data
    from PIL import Image

    from vlhooks.eval.compare import main

    pipeline(NAME).save_pretrained(tmp_path / "pipe")
    refs = tmp_path / "refs"
    refs.mkdir()
    for name in ("astronaut", "coffee"):
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(refs / f"{name}.png")
    cfg = {"world": "pipeline", "pipeline": {"path": str(tmp_path / "pipe"), "device": "cpu", "metric_size": 32},
           "generate": {"num_inference_steps": 2, "height": 32, "width": 32, "guidance_scale": 2.0,
                        "max_sequence_length": 64},
           "encoder": {"name": "patches", "width": 16, "size": 32, "patch": 8}, "prompts": ["a cat"],
           "references": {"folder": str(refs)}, "seeds": [0], "injection": {"blocks": "all", "mode": "joint"},
           "arms": ["none", "zero-shot"], "out": str(tmp_path / "out")}
    (tmp_path / "compare.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(tmp_path / "compare.yaml")]) == 0
    data = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert list(data["arms"]) == ["none", "zero-shot"]
    assert data["arms"]["none"]["ref_similarity"] != data["arms"]["zero-shot"]["ref_similarity"]
    for name in ("grid.png", "report.html", "metrics.csv"):
        assert (tmp_path / "out" / name).is_file()
