"""PixArt (`PixArtTransformer2DModel`, cross-attention `attn2`): the log-2 oracle against an independent
re-implementation of attn2, decoupled mode against its formula, the guidance rows and the timestep window inside the
tiny `PixArtSigmaPipeline`, the epsilon objective and its flow velocity, torch.compile, the prompt route, the tiny
training recipe and `vlhooks compare` on a saved tiny pipeline."""

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import vlhooks as vh
from vlhooks.testing import build, inputs, output, pipeline, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
NAME = "pixart"


def _heads(x, attn):
    return x.view(x.shape[0], -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)  # [B, H, L, Dh]


def _softmax_attention(q, k, v, bias):
    """float64 `softmax(q k^T / sqrt(d) + bias) v`; q, k, v [B, H, L, Dh], bias broadcast to [B, H, Lq, Lk]."""
    logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
    return logits.softmax(-1) @ v.double()


class ReferenceAttn2:
    """PixArt's attn2 written out from its weights: `key_bias` `[B, L]` added to the caption keys' logits, plus
    (decoupled) `scale * softmax(q k_e^T / sqrt(d)) v_e` over `extra` = (k_e, v_e) `[B, H, N, Dh]`."""

    def __init__(self, key_bias=None, extra=None, scale=1.0):
        self.key_bias, self.extra, self.scale = key_bias, extra, scale

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        q, k, v = (_heads(attn.to_q(hidden_states), attn), _heads(attn.to_k(encoder_hidden_states), attn),
                   _heads(attn.to_v(encoder_hidden_states), attn))
        bias = torch.zeros(1, dtype=torch.float64)
        if self.key_bias is not None:
            bias = bias + self.key_bias.double()[:, None, None, :]
        if attention_mask is not None:
            bias = bias + attention_mask.double()[:, None]  # [B, 1, 1, L]: the model's -10000 bias
        out = _softmax_attention(q, k, v, bias)
        if self.extra is not None:
            ek, ev = self.extra
            out = out + self.scale * _softmax_attention(q, ek, ev, torch.zeros(1, dtype=torch.float64))
        out = out.to(q.dtype).transpose(1, 2).flatten(2)
        return attn.to_out[1](attn.to_out[0](out))


def _attn2_input(model, block, kw):
    """(encoder_hidden_states, attention_mask) entering `transformer_blocks.{block}.attn2` in the unpatched model."""
    seen = {}

    def hook(module, args, kwargs):
        seen.update(kwargs)

    h = model.transformer_blocks[block].attn2.register_forward_pre_hook(hook, with_kwargs=True)
    output(model, kw)
    h.remove()
    return seen["encoder_hidden_states"], seen["attention_mask"]


@pytest.mark.parametrize("block,scale", [(0, 1.0), (1, 1.0), (1, 0.3)])
@torch.no_grad()
def test_copied_caption_tokens_equal_a_log_bias_on_their_keys(block, scale):
    """Injecting copies of some of the caption tokens as they enter attn2 (after caption_projection) at strength s
    equals a log(1 + s) bias on those caption keys (on all of them it would change nothing: a softmax is invariant
    to one bias on every key). Row 1 also has 2 padded caption tokens, which stay masked."""
    model = build(NAME)
    kw = inputs(NAME, batch=2, cap_len=8)
    text, bias = _attn2_input(model, block, kw)  # [2, 8, 16]; [2, 1, 8]
    assert bias is not None and (bias < -1000).any(), "the caption mask must be in play"
    copied = torch.zeros(2, 8, dtype=torch.bool)
    copied[0, [0, 2, 5]] = True
    copied[1, [1, 3]] = True
    reference = copy.deepcopy(model)
    key_bias = torch.where(copied, math.log(1.0 + scale), 0.0)
    reference.transformer_blocks[block].attn2.set_processor(ReferenceAttn2(key_bias=key_bias))
    expected = output(reference, kw)
    feats = vh.VLFeatures(text, mask=copied, space="hidden")
    with vh.inject(model, feats, vh.InjectionConfig(blocks=[block], scale=scale)):
        got = output(model, kw)
    assert (expected - output(model, kw)).abs().max() > 1e-4, "the oracle must have a visible effect"
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("scale", [1.0, 0.6])
@torch.no_grad()
def test_decoupled_adds_a_separate_softmax_over_the_extra_keys(scale):
    model = build(NAME)
    kw = inputs(NAME, batch=2)
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(1, 5, 16, generator=g)  # caption space: through caption_projection, then attn2.to_k/to_v
    attn = model.transformer_blocks[1].attn2
    e = model.caption_projection(feats).expand(2, -1, -1)
    extra = (_heads(attn.to_k(e), attn), _heads(attn.to_v(e), attn))
    reference = copy.deepcopy(model)
    reference.transformer_blocks[1].attn2.set_processor(ReferenceAttn2(extra=extra, scale=scale))
    expected = output(reference, kw)
    with vh.inject(model, vh.VLFeatures(feats), vh.InjectionConfig(blocks=[1], mode="decoupled", scale=scale)):
        got = output(model, kw)
    assert (expected - output(model, kw)).abs().max() > 1e-4
    assert (got - expected).abs().max() <= 1e-5


def _feats(n=6, seed=0):
    return vh.VLFeatures(torch.randn(1, n, 16, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("mode", ["joint", "decoupled"])
@torch.no_grad()
def test_guidance_leaves_the_unconditional_branch_untouched(mode):
    """PixArtSigmaPipeline batches [uncond, cond]; it has no `do_classifier_free_guidance` attribute, so the
    layout is given explicitly."""
    pipe = pipeline(NAME)
    calls = []
    h = pipe.transformer.register_forward_hook(
        lambda m, a, k, out: calls.append((copy.deepcopy(a), copy.deepcopy(k), out[0].clone())), with_kwargs=True)
    with vh.inject(pipe, _feats(), vh.InjectionConfig(mode=mode)):
        run_pipeline(pipe, NAME, steps=3, cfg=True)
    h.remove()
    assert len(calls) == 3
    for args, kwargs, patched in calls:
        plain = pipe.transformer(*args, **kwargs)[0]
        assert patched.shape[0] == 2
        assert torch.equal(patched[0], plain[0]), "the unconditional row is bit-identical"
        assert not torch.equal(patched[1], plain[1]), "the conditional row is injected"


@torch.no_grad()
def test_window_fires_on_the_steps_of_equal_snr():
    """progress = 1 - sigma, sigma the flow sigma of the scheduler's own alphas_cumprod at each step's timestep."""
    pipe = pipeline(NAME)
    steps = 7
    run_pipeline(pipe, NAME, steps=steps)
    ab = pipe.scheduler.alphas_cumprod[pipe.scheduler.timesteps].double()
    progress = (1.0 - (1 - ab).sqrt() / (ab.sqrt() + (1 - ab).sqrt())).tolist()
    for window in [(0.0, 0.45), (0.3, 0.62), (0.55, 1.0)]:
        assert all(abs(p - w) > 1e-4 for p in progress for w in window if 0 < w < 1)
        with vh.inject(pipe, _feats(), vh.InjectionConfig(window=window)) as handle:
            run_pipeline(pipe, NAME, steps=steps)
            assert handle.injector.calls == steps
            assert handle.injector.injected_calls == sum(window[0] <= p <= window[1] for p in progress)
    assert 0 < sum(p <= 0.45 for p in progress) < steps


class EpsOracle(torch.nn.Module):
    """A stand-in transformer that predicts the true noise from a VP input: `(x - sqrt(abar_t) x0) / sqrt(1 -
    abar_t)`, `abar_t` interpolated from diffusers' DDPMScheduler (linear 1e-4..0.02) in log space."""

    use_additional_conditions = False

    def __init__(self, x0):
        super().__init__()
        from diffusers import DDPMScheduler

        self.x0, self.w = x0, torch.nn.Parameter(torch.zeros(1))
        self.log_ab = DDPMScheduler(beta_start=1e-4, beta_end=0.02).alphas_cumprod.double().log().numpy()
        self.seen = []

    def forward(self, x, encoder_hidden_states=None, timestep=None, **kw):
        self.seen.append((x.clone(), timestep.clone()))
        ab = torch.from_numpy(np.exp(np.interp(timestep.double().numpy(), np.arange(1000), self.log_ab)))
        ab = ab.view(-1, 1, 1, 1)
        eps = (x.double() - ab.sqrt() * self.x0.double()) / (1 - ab).sqrt()
        return (torch.cat([eps.float(), torch.zeros_like(x)], 1),)  # learned sigma: [eps, variance]


def test_objective_is_epsilon_at_the_timestep_of_equal_snr():
    fam = vh.family_for(build(NAME))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    sigma = torch.tensor([0.2, 0.5, 0.9])
    oracle = EpsOracle(x0)
    pred, target = fam.prediction_and_target(oracle, x0, noise, sigma, torch.zeros(3, 4, 16))
    assert torch.equal(target, noise)
    torch.testing.assert_close(pred, noise, atol=1e-4, rtol=0)  # the model saw sqrt(ab) x0 + sqrt(1 - ab) noise
    x_t, t = oracle.seen[-1]
    a = (1 - sigma) / ((1 - sigma) ** 2 + sigma ** 2).sqrt()  # equal SNR: a / b = (1 - sigma) / sigma
    b = sigma / ((1 - sigma) ** 2 + sigma ** 2).sqrt()
    torch.testing.assert_close(x_t, a.view(-1, 1, 1, 1) * x0 + b.view(-1, 1, 1, 1) * noise, atol=1e-4, rtol=0)
    assert ((t > 0) & (t < 999)).all()
    # the real model: the epsilon half of its output
    model = build(NAME)
    pred, _ = fam.prediction_and_target(model, x0, noise, sigma, torch.randn(3, 4, 16, generator=g))
    assert pred.shape == x0.shape


def test_velocity_converts_epsilon_to_noise_minus_x0_with_sigma_clamped():
    fam = vh.family_for(build(NAME))
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    sigma = torch.tensor([0.05, 0.3, 0.7, 0.98])
    x = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
    v = fam.velocity(EpsOracle(x0), x, sigma, torch.zeros(4, 4, 16))
    torch.testing.assert_close(v, noise - x0, atol=2e-3, rtol=0)
    at_one = fam.velocity(EpsOracle(x0[:1]), noise[:1], torch.ones(1), torch.zeros(1, 4, 16))  # the first Euler step
    assert torch.isfinite(at_one).all()
    from vlhooks.sampling import euler_sample

    sample = euler_sample(fam, build(NAME), noise[:1], torch.randn(1, 4, 16), steps=3)  # the real model, from sigma 1
    assert sample.shape == (1, 4, 8, 8) and torch.isfinite(sample).all()


@pytest.mark.parametrize("mode", ["joint", "decoupled"])
@torch.no_grad()
def test_compiled_equals_eager(mode):
    import torch._dynamo

    model = build(NAME)
    kw = inputs(NAME, batch=2)
    plain = output(model, kw)
    config = vh.InjectionConfig(mode=mode, scale={0: 0.5, 1: 1.0}, blocks=[0, 1], window=(0.1, 0.9))
    with vh.inject(model, _feats(5), config):  # the window: progress read from the timestep inside the graph
        eager = output(model, kw)
        assert not torch.equal(eager, plain)
        torch._dynamo.reset()
        got = output(torch.compile(model, backend="aot_eager"), kw)
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=0)
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", ["projection", "kv", "lora"])
@torch.no_grad()
def test_fresh_adapters_reproduce_zero_shot(kind):
    """Every adapter type targets the family's K/V path (`kv_linears` are attn2's to_k / to_v) and starts at
    zero-shot, bit for bit."""
    from vlhooks.adapters import create_adapter

    model = build(NAME)
    kw = inputs(NAME, batch=2)
    with vh.inject(model, _feats(5)):
        zero_shot = output(model, kw)
    adapter = create_adapter(kind, model, **({"rank": 2} if kind == "lora" else {}))
    with vh.inject(model, _feats(5), adapter=adapter):
        assert torch.equal(output(model, kw), zero_shot)


@pytest.mark.parametrize("mode", ["joint", "decoupled"])
def test_gradient_checkpointing_gives_the_same_feature_gradients(mode):
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


@torch.no_grad()
def test_encode_prompt_and_prompt_kwargs_reproduce_the_prompt():
    pipe = pipeline(NAME)
    fam = vh.family_for(pipe.transformer)
    enc = fam.encode_prompt(pipe, ["a photo of a cat", "a dog"], "cpu", 64)
    assert [e.shape[0] for e in enc.sequences] == [6, 3]  # the real tokens (T5: words, then </s>)
    call = dict(num_inference_steps=2, height=32, width=32, output_type="pt", max_sequence_length=64,
                guidance_scale=3.0, use_resolution_binning=False, clean_caption=False)
    base = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0), **call).images
    again = pipe(generator=torch.Generator().manual_seed(0),
                 **{**call, **fam.prompt_kwargs(enc.sequences[0][None], None)}).images  # real tokens, unpadded
    torch.testing.assert_close(again, base, atol=1e-5, rtol=0)


def _recipe():
    return yaml.safe_load((ROOT / "configs/tiny/pixart.yaml").read_text())


@pytest.mark.slow
def test_train_command_writes_a_loadable_adapter(tmp_path):
    args = [sys.executable, "-m", "vlhooks", "train", "--config", str(ROOT / "configs/tiny/pixart.yaml"),
            "--trainer.max_steps", "3", "--model.checkpoint_root", str(tmp_path / "ckpt"), "--data.cache_dir",
            str(tmp_path / "cache"), "--trainer.enable_progress_bar", "false"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                       env={**os.environ, "WANDB_MODE": "disabled"})
    assert r.returncode == 0, r.stderr[-3000:]
    recipe = _recipe()["model"]
    adapter = vh.load_adapter(tmp_path / "ckpt" / recipe["run_name"] / "final")
    from vlhooks.train.module import build_dit

    dit = build_dit(recipe["dit"])
    kw = dict(hidden_states=torch.randn(1, 3, 16, 16), encoder_hidden_states=torch.randn(1, 5, 16),
              timestep=torch.tensor([500]), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
              return_dict=False)
    with torch.no_grad():
        base = dit(**kw)[0]
        with vh.inject(dit, vh.VLFeatures(torch.randn(1, 16, 16)), adapter=adapter):
            out = dit(**kw)[0]
    assert not torch.equal(out, base)


@pytest.mark.slow
def test_compare_on_a_saved_tiny_pipeline(tmp_path):
    """`vlhooks compare` in the pipeline world: arms none and zero-shot; `none` is the plain pipeline."""
    import skimage.data
    from PIL import Image

    from vlhooks.eval.compare import main

    pipe = pipeline(NAME)
    pipe.save_pretrained(tmp_path / "pipe")
    refs = tmp_path / "refs"
    refs.mkdir()
    for name in ("astronaut", "coffee"):
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(refs / f"{name}.png")
    cfg = dict(world="pipeline", out=str(tmp_path / "out"), seeds=[0], prompts=["a cat"], arms=["none", "zero-shot"],
               pipeline={"path": str(tmp_path / "pipe"), "device": "cpu", "metric_size": 32},
               generate={"num_inference_steps": 2, "height": 32, "width": 32, "guidance_scale": 1.0,
                         "max_sequence_length": 64, "use_resolution_binning": False, "clean_caption": False},
               encoder={"name": "patches", "width": 16, "size": 32, "patch": 8},
               references={"folder": str(refs)}, injection={"blocks": "all", "mode": "joint"})
    (tmp_path / "compare.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(tmp_path / "compare.yaml")]) == 0
    import json

    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert list(metrics["arms"]) == ["none", "zero-shot"], metrics
    for name in ("grid.png", "report.html", "metrics.json", "metrics.csv"):
        assert (tmp_path / "out" / name).is_file()
