"""Placement `"block_output"` (diffusers' IP-Adapter placement) against diffusers' own `FluxIPAdapterAttnProcessor`.

The reference is diffusers' processor on a plain model (IP K/V from its `to_k_ip` / `to_v_ip`, its output added
after the feed-forward by `FluxTransformerBlock` itself). vlhooks gets the same K/V from a projector that calls
those very linears, and must give the same transformer output bit for bit (float32, CPU): the image queries
before RoPE, the same attention call, the same additions in the same order.
"""

import copy
import math

import pytest
import torch
from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

import vlhooks as vh
from tiny import build, inputs, output
from vlhooks.projector import ZeroShotProjector

N_IP = 5


class IPAdapterProjector(ZeroShotProjector):
    """Extra K/V as diffusers' IP-Adapter makes them: `to_k_ip[0]` / `to_v_ip[0]` of the raw tokens (no caption
    path, no norm, no modulation)."""

    def __init__(self, processors: dict, width: int):
        self.processors, self.width = processors, width

    def feature_width(self, family, transformer):
        return self.width

    def embed(self, family, transformer, tokens, mask, site, cache):
        return tokens

    def kv(self, call):
        p, attn = self.processors[call.site.name], call.site.attention(call.transformer)
        x = call.embedded  # [R, N, F]: the raw tokens (embed is the identity here)
        return p.to_k_ip[0](x).unflatten(-1, (attn.heads, -1)), p.to_v_ip[0](x).unflatten(-1, (attn.heads, -1))


def _ip_model(scale: float, seed: int = 0):
    """A tiny Flux and a copy whose double blocks run diffusers' IP-Adapter processor (random `to_k_ip`/`to_v_ip`)."""
    plain = build("flux", seed)
    ref = copy.deepcopy(plain)
    width = plain.config.joint_attention_dim
    procs = {}
    torch.manual_seed(seed + 1)
    for i, block in enumerate(ref.transformer_blocks):
        p = FluxIPAdapterAttnProcessor(plain.inner_dim, width, num_tokens=(N_IP,), scale=scale)
        block.attn.set_processor(p)
        procs[f"transformer_blocks.{i}"] = p
    return plain, ref, procs, width


@pytest.mark.parametrize("batch,scale", [(1, 1.0), (2, 0.6)])
def test_block_output_equals_diffusers_ip_adapter(batch, scale):
    plain, ref, procs, width = _ip_model(scale)
    kw = inputs("flux", batch=batch)
    ip = torch.randn(batch, N_IP, width, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = output(ref, dict(kw, joint_attention_kwargs={"ip_hidden_states": [ip]}))
        before = output(plain, kw)
        cfg = vh.InjectionConfig(blocks="double", mode="decoupled", placement="block_output", scale=scale,
                                 guidance="none")
        with vh.inject(plain, vh.VLFeatures(ip), cfg, adapter=IPAdapterProjector(procs, width)):
            got = output(plain, kw)
        after = output(plain, kw)
    assert not torch.equal(want, before)  # the IP-Adapter does something at this scale
    assert torch.equal(got, want)
    assert torch.equal(after, before)  # removal restores the model


def test_block_output_on_some_rows_leaves_the_others_exact():
    """Features for row 0 only (the other row switched off): row 1 equals the plain model, row 0 diffusers'."""
    plain, ref, procs, width = _ip_model(1.0)
    kw = inputs("flux", batch=2)
    ip = torch.randn(2, N_IP, width, generator=torch.Generator().manual_seed(7))
    cfg = vh.InjectionConfig(blocks="double", mode="decoupled", placement="block_output", guidance="none")
    with torch.no_grad():
        want = output(ref, dict(kw, joint_attention_kwargs={"ip_hidden_states": [ip]}))
        before = output(plain, kw)
        with vh.inject(plain, None, cfg, adapter=IPAdapterProjector(procs, width)) as handle:
            handle.set_features(vh.VLFeatures(ip), active=[True, False])
            got = output(plain, kw)
    assert torch.equal(got[1], before[1])
    # row 0: diffusers ran the batch of 2; batched GEMMs may round row 0 differently from our row subset
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)


def _capture(module, name):
    seen = {}

    def hook(mod, args, kwargs, out):
        seen[name] = (args, kwargs, out)

    h = module.register_forward_hook(hook, with_kwargs=True)
    return seen, h


def test_single_block_output_is_the_image_queries_attention_added_after_the_block():
    """No diffusers processor covers single blocks; the reference is written here: the block's attention input
    (captured), its image rows' queries after qk-norm without RoPE, explicit softmax over the extra K/V (float64),
    added to the plain block's image-stream output. The text stream is untouched."""
    model = build("flux")
    kw = inputs("flux")
    site = "single_transformer_blocks.0"
    block = model.get_submodule(site)
    feats = torch.randn(1, 3, model.config.joint_attention_dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        seen, h = _capture(block.attn, "attn")
        seen_b, hb = _capture(block, "block")
        output(model, kw)
        h.remove(), hb.remove()
        x = seen["attn"][1]["hidden_states"]  # [1, L_txt + L_img, D], the block's normed input
        plain_txt, plain_img = seen_b["block"][2]
        n_img = plain_img.shape[1]
        cfg = vh.InjectionConfig(blocks=[2], mode="decoupled", placement="block_output", scale=0.5, guidance="none")
        with vh.inject(model, vh.VLFeatures(feats), cfg) as handle:
            kv = {}
            real_kv = handle.injector.projector.kv

            def spy(*a, **k):
                kv["kv"] = real_kv(*a, **k)
                return kv["kv"]

            handle.injector.projector.kv = spy
            seen_b, hb = _capture(block, "block")
            output(model, kw)
            hb.remove()
        got_txt, got_img = seen_b["block"][2]
    attn = block.attn
    q = attn.norm_q(attn.to_q(x).unflatten(-1, (attn.heads, -1)))[:, -n_img:]  # [1, L_img, H, Dh], no RoPE
    k, v = kv["kv"]
    logits = q.double().transpose(1, 2) @ k.double().transpose(1, 2).transpose(-1, -2) / math.sqrt(q.shape[-1])
    ref = (logits.softmax(-1) @ v.double().transpose(1, 2)).transpose(1, 2).flatten(2)  # [1, L_img, D]
    assert torch.equal(got_txt, plain_txt)
    torch.testing.assert_close(got_img.double() - plain_img.double(), 0.5 * ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got_img, plain_img)


def test_block_output_needs_decoupled_mode_and_a_family_that_has_it():
    with pytest.raises(vh.ConfigError, match="mode='decoupled'"):
        vh.InjectionConfig(placement="block_output")
    with pytest.raises(vh.ConfigError, match="placement must be one of"):
        vh.InjectionConfig(mode="decoupled", placement="after_ff")
    model = build("z_image")
    feats = vh.VLFeatures(torch.randn(1, 3, 16))
    cfg = vh.InjectionConfig(mode="decoupled", placement="block_output")
    with pytest.raises(vh.ConfigError, match="use placement='attention'"):
        vh.apply_injection(model, feats, cfg)
    assert vh.get_injection(model) is None
    assert not any(hasattr(m, "_diffusers_hook") for m in model.modules())


def test_placement_round_trips_through_the_config_dict():
    cfg = vh.InjectionConfig(mode="decoupled", placement="block_output", blocks="double")
    assert vh.InjectionConfig.from_dict(cfg.to_dict()) == cfg
    old = {k: v for k, v in vh.InjectionConfig().to_dict().items() if k != "placement"}  # saved before the option
    assert vh.InjectionConfig.from_dict(old).placement == "attention"
