"""Joint-mode oracle: injecting a copy of a block's own text tokens into that block equals adding log 2 to those
text keys' logits. The right-hand side is computed by reference processors written here, independently of
vlhooks' attention code: explicit `softmax(q k^T / sqrt(d) + bias) v` on the model's own projections."""

import copy
import math

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb

import vlhooks as vh
from tiny import build, inputs, output


def _attention(q, k, v, bias):
    """q, k, v [B, H, L, D]; bias [Lk] added to every query's logits."""
    logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias.double()
    return (logits.softmax(-1) @ v.double()).to(q.dtype)


class FluxBiasProcessor:
    """Flux attention with `log_bias` on the first `n_text` keys (text comes first in Flux)."""

    def __init__(self, n_text, log_bias=math.log(2.0)):
        self.n_text, self.log_bias = n_text, log_bias

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        def heads(x):
            return x.unflatten(-1, (-1, attn.head_dim))

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:
            eq = attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states)))
            ek = attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states)))
            ev = heads(attn.add_v_proj(encoder_hidden_states))
            q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        bias = torch.zeros(k.shape[1])
        bias[: self.n_text] = self.log_bias
        out = _attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bias).transpose(1, 2).flatten(2)
        if encoder_hidden_states is not None:
            n = encoder_hidden_states.shape[1]
            return attn.to_out[0](out[:, n:]), attn.to_add_out(out[:, :n])
        return out


class ZImageBiasProcessor:
    """Z-Image attention with `log_bias` on keys `[start, stop)` (the caption segment of the unified stream)."""

    def __init__(self, start, stop, log_bias=math.log(2.0)):
        self.start, self.stop, self.log_bias = start, stop, log_bias

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        def heads(x):
            return x.unflatten(-1, (attn.heads, -1))

        def rope(x):
            xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
            return torch.view_as_real(xc * freqs_cis.unsqueeze(2)).flatten(3).type_as(x)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        q, k = rope(attn.norm_q(q)), rope(attn.norm_k(k))
        assert attention_mask is None  # equal-length rows in this test
        bias = torch.zeros(k.shape[1])
        bias[self.start : self.stop] = self.log_bias
        out = _attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bias).transpose(1, 2).flatten(2)
        return attn.to_out[0](out)


class SD3BiasProcessor:
    """SD3 joint attention with `log_bias` on the text keys (image first, text last)."""

    def __init__(self, log_bias=math.log(2.0)):
        self.log_bias = log_bias

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *a, **kw):
        B, n_img = hidden_states.shape[:2]

        def heads(x):
            return x.view(B, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        eq, ek, ev = (heads(attn.add_q_proj(encoder_hidden_states)), heads(attn.add_k_proj(encoder_hidden_states)),
                      heads(attn.add_v_proj(encoder_hidden_states)))
        if attn.norm_added_q is not None:
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
        q, k, v = torch.cat([q, eq], 2), torch.cat([k, ek], 2), torch.cat([v, ev], 2)
        bias = torch.zeros(k.shape[2])
        bias[n_img:] = self.log_bias
        out = _attention(q, k, v, bias).transpose(1, 2).reshape(B, -1, q.shape[1] * q.shape[-1])
        img, txt = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            txt = attn.to_add_out(txt)
        return attn.to_out[0](img), txt


def _capture_block_input(model, block_name, kw):
    """Run the unpatched model once and return (args, kwargs) the block received."""
    seen = {}

    def hook(module, args, kwargs):
        seen["args"], seen["kwargs"] = args, kwargs

    h = model.get_submodule(block_name).register_forward_pre_hook(hook, with_kwargs=True)
    output(model, kw)
    h.remove()
    return seen["args"], seen["kwargs"]


@pytest.mark.parametrize("site", [0, 1, 2, 3])  # double 0, 1; single 2, 3
@torch.no_grad()
def test_flux_own_text_copy_equals_log2_bias(site):
    model = build("flux")
    kw = inputs("flux", batch=2, cap_len=8)
    name = vh.list_sites(model)[site]
    _, bkw = _capture_block_input(model, name, kw)
    text = bkw["encoder_hidden_states"]  # [B, 8, D]: the block's own text tokens
    reference = copy.deepcopy(model)
    reference.get_submodule(name).attn.set_processor(FluxBiasProcessor(n_text=text.shape[1]))
    expected = output(reference, kw)
    with vh.inject(model, vh.VLFeatures(text, space="hidden"), vh.InjectionConfig(blocks=[site])):
        got = output(model, kw)
    unpatched = output(model, kw)
    assert (expected - unpatched).abs().max() > 1e-4, "the oracle must have a visible effect"
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("layer", [0, 1])
@torch.no_grad()
def test_z_image_own_text_copy_equals_log2_bias(layer):
    model = build("z_image")
    kw = inputs("z_image", batch=2, cap_len=32)  # 32 caption tokens: no caption padding
    name = f"layers.{layer}"
    args, _ = _capture_block_input(model, name, kw)
    unified = args[0]  # [B, 32 image (16 + 16 pad) + 32 caption, D]
    n_img = unified.shape[1] - 32
    text = unified[:, n_img:]
    reference = copy.deepcopy(model)
    reference.get_submodule(name).attention.set_processor(ZImageBiasProcessor(n_img, n_img + 32))
    expected = output(reference, kw)
    with vh.inject(model, vh.VLFeatures(text, space="hidden"), vh.InjectionConfig(blocks=[layer])):
        got = output(model, kw)
    unpatched = output(model, kw)
    assert (expected - unpatched).abs().max() > 1e-4
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("variant", ["sd3", "sd35"])
@pytest.mark.parametrize("block", [0, 2])  # block 2 is the last one (context_pre_only)
@torch.no_grad()
def test_sd3_own_text_copy_equals_log2_bias(variant, block):
    model = build(variant)
    kw = inputs(variant, batch=2)
    name = f"transformer_blocks.{block}"
    _, bkw = _capture_block_input(model, name, kw)
    text = bkw["encoder_hidden_states"]
    reference = copy.deepcopy(model)
    reference.get_submodule(name).attn.set_processor(SD3BiasProcessor())
    expected = output(reference, kw)
    with vh.inject(model, vh.VLFeatures(text, space="hidden"), vh.InjectionConfig(blocks=[block])):
        got = output(model, kw)
    unpatched = output(model, kw)
    assert (expected - unpatched).abs().max() > 1e-5
    assert (got - expected).abs().max() <= 1e-5


@torch.no_grad()
def test_fractional_scale_is_log_bias_on_extra_keys():
    """Scale s on a copy of the text equals a log(1 + s) bias on the text keys (Flux double block)."""
    model = build("flux")
    kw = inputs("flux")
    _, bkw = _capture_block_input(model, "transformer_blocks.0", kw)
    text = bkw["encoder_hidden_states"]
    reference = copy.deepcopy(model)
    reference.transformer_blocks[0].attn.set_processor(FluxBiasProcessor(text.shape[1], math.log(1.3)))
    with vh.inject(model, vh.VLFeatures(text, space="hidden"), vh.InjectionConfig(blocks=[0], scale=0.3)):
        got = output(model, kw)
    assert (got - output(reference, kw)).abs().max() <= 1e-5
