"""Several references: per-reference strength, blocks, window, spatial masks, negatives, K/V scaling, pooling and
averaging, each against an independent reference (the model with one reference alone, the unpatched model, or a
formula written here)."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import vlhooks as vh
from conftest import snapshot
from vlhooks.attention import BlockCall, Segment, attend_with_extras
from vlhooks.references import pool_tokens
from vlhooks.testing import build, caption_width, inputs, output

# one joint block of each family, its attention module, and the image-token grid of the tiny inputs
BLOCKS = {"flux": ([0], "transformer_blocks.0.attn", (4, 4)), "z_image": ([1], "layers.1.attention", (4, 4)),
          "sd3": ([1], "transformer_blocks.1.attn", (8, 8))}


def _feats(family, seed, n=4):
    return vh.VLFeatures(torch.randn(1, n, caption_width(family), generator=torch.Generator().manual_seed(seed)))


def _image_rows(family, attn_out, grid):
    """The attention output of the image tokens `[B, h * w, D]`."""
    n = grid[0] * grid[1]
    if family in ("flux", "sd3"):
        return attn_out[0][:, :n]  # (image stream, text stream)
    return attn_out[:, :n]  # Z-Image: [image (padded), caption]


def _attention_output(model, family, refs, cfg, kw):
    blocks, attn_name, grid = BLOCKS[family]
    seen = {}
    h = model.get_submodule(attn_name).register_forward_hook(lambda m, a, o: seen.setdefault("out", o))
    try:
        with torch.no_grad():
            if refs is None:
                output(model, kw)
            else:
                with vh.inject(model, refs, cfg):
                    output(model, kw)
    finally:
        h.remove()
    return _image_rows(family, seen["out"], grid)


@pytest.mark.parametrize("family", list(BLOCKS))
@pytest.mark.parametrize("mode", ["joint", "decoupled"])
def test_disjoint_masks_give_each_region_its_own_reference(family, mode):
    model = build(family)
    kw = inputs(family, batch=1)
    blocks, _, (h, w) = BLOCKS[family]
    left = torch.zeros(h, w, dtype=torch.bool)
    left[:, : w // 2] = True
    right = ~left
    a, b = _feats(family, 1), _feats(family, 2)
    cfg = vh.InjectionConfig(blocks=blocks, mode=mode, guidance="none")
    both = _attention_output(model, family, [vh.Reference(a, mask=left), vh.Reference(b, mask=right)], cfg, kw)
    alone_a = _attention_output(model, family, [vh.Reference(a)], cfg, kw)
    alone_b = _attention_output(model, family, [vh.Reference(b)], cfg, kw)
    masked_a = _attention_output(model, family, [vh.Reference(a, mask=left)], cfg, kw)
    plain = _attention_output(model, family, None, cfg, kw)
    L, R = left.flatten(), right.flatten()
    torch.testing.assert_close(both[:, L], alone_a[:, L], rtol=0, atol=1e-5)
    torch.testing.assert_close(both[:, R], alone_b[:, R], rtol=0, atol=1e-5)
    torch.testing.assert_close(masked_a[:, R], plain[:, R], rtol=0, atol=1e-5)  # outside its mask: unpatched
    assert (masked_a[:, L] - plain[:, L]).abs().max() > 1e-4  # inside: it acts


@pytest.mark.parametrize("family", ["flux", "z_image", "sd3"])
def test_a_float_mask_scales_the_strength_per_query_in_decoupled_mode(family):
    model = build(family)
    kw = inputs(family, batch=1)
    blocks, _, (h, w) = BLOCKS[family]
    weight = torch.rand(h, w, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.1
    cfg = vh.InjectionConfig(blocks=blocks, mode="decoupled", guidance="none")
    feats = _feats(family, 1)
    plain = _attention_output(model, family, None, cfg, kw)
    full = _attention_output(model, family, [vh.Reference(feats)], cfg, kw)
    weighted = _attention_output(model, family, [vh.Reference(feats, mask=weight)], cfg, kw)
    # decoupled: out = own + m_q * added; to_out is linear, so the added part scales by m_q after it as well
    expected = plain + weight.flatten()[None, :, None] * (full - plain)
    torch.testing.assert_close(weighted, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["flux", "z_image", "sd3"])
@pytest.mark.parametrize("mode", ["joint", "decoupled"])
@torch.no_grad()
def test_a_reference_at_scale_zero_or_outside_its_window_changes_nothing(family, mode):
    model = build(family)
    kw = inputs(family, batch=2, progress=0.3)
    a, b = _feats(family, 1), _feats(family, 2, n=6)
    cfg = vh.InjectionConfig(mode=mode)
    with vh.inject(model, [vh.Reference(a, scale=0.7)], cfg):
        alone = output(model, kw)
    for off in (vh.Reference(b, scale=0.0), vh.Reference(b, window=(0.5, 1.0))):
        with vh.inject(model, [vh.Reference(a, scale=0.7), off], cfg):
            torch.testing.assert_close(output(model, kw), alone, rtol=0, atol=1e-6)
    with vh.inject(model, [vh.Reference(a, scale=0.7), vh.Reference(b, window=(0.2, 0.4))], cfg):
        assert (output(model, kw) - alone).abs().max() > 1e-5  # inside its window it acts


@pytest.mark.parametrize("family", ["flux", "z_image", "sd3"])
@torch.no_grad()
def test_one_reference_equals_the_features_form(family):
    model = build(family)
    kw = inputs(family, batch=2)
    feats = _feats(family, 3)
    for mode in ("joint", "decoupled"):
        with vh.inject(model, feats, vh.InjectionConfig(mode=mode, scale=0.6)):
            plain_form = output(model, kw)
        with vh.inject(model, [vh.Reference(feats, scale=0.5)], vh.InjectionConfig(mode=mode, scale=1.2)):
            assert torch.equal(output(model, kw), plain_form)  # 1.2 x 0.5 = 0.6, the same float
        with vh.inject(model, vh.Reference(feats, scale=0.6), vh.InjectionConfig(mode=mode)):
            assert torch.equal(output(model, kw), plain_form)


@torch.no_grad()
def test_per_reference_blocks_equal_applying_each_block_set_alone():
    """Two references on disjoint blocks equal nesting: each block sees only its own reference."""
    model = build("flux")
    kw = inputs("flux", batch=1)
    a, b = _feats("flux", 1), _feats("flux", 2)
    with vh.inject(model, [vh.Reference(a, blocks=[0]), vh.Reference(b, blocks=[3])], vh.InjectionConfig(blocks=[0])):
        both = output(model, kw)
    with vh.inject(model, [vh.Reference(a, blocks=[0])], vh.InjectionConfig(blocks=[0])):
        only_a = output(model, kw)
    assert not torch.equal(both, only_a)
    # the same patch through the config's blocks for the other reference
    with vh.inject(model, [vh.Reference(a, blocks=[0]), vh.Reference(b)], vh.InjectionConfig(blocks=[3])):
        assert torch.equal(output(model, kw), both)


def _call(q, k_len, segments, mode="joint", kv_scaling="kv", span=None):
    H, D = q.shape[2], q.shape[3]
    first = segments[0]
    return BlockCall(site=None, transformer=None, family=None, projector=None, block_args=(), block_kwargs={},
                     rows=None, strength=first.strength, embedded=first.embedded, pre_normed=None,
                     key_mask=first.key_mask, mode=mode, segments=segments, kv_scaling=kv_scaling, image_span=span)


def _softmax_attn(q, k, v, bias=None):
    """float64 reference: `[B, L, H, D]` layout."""
    logits = torch.einsum("blhd,bnhd->bhln", q.double(), k.double()) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias.double()
    return torch.einsum("bhln,bnhd->blhd", logits.softmax(-1), v.double())


@pytest.mark.parametrize("how", ["kv", "v_only", "kv_penalty", "k_mean_v"])
@pytest.mark.parametrize("mode", ["joint", "decoupled"])
def test_kv_scaling_modes_follow_their_formulas(how, mode):
    g = torch.Generator().manual_seed(0)
    B, L, N, H, D = 2, 5, 3, 2, 4
    q, k, v = (torch.randn(B, L, H, D, generator=g) for _ in range(3))
    ek, ev = torch.randn(B, N, H, D, generator=g), torch.randn(B, N, H, D, generator=g)
    s = [2.5, 0.4]
    seg = Segment(0, torch.zeros(B, N, 1), None, None, s)
    call = _call(q, L, [seg], mode=mode, kv_scaling=how)
    call.k, call.v = ek, ev
    if how != "kv":
        from vlhooks.attention import scale_kv

        call.k, call.v = scale_kv(ek, ev, s, how)  # as `extra_kv` applies it
    sdpa = lambda q_, k_, v_, m: F.scaled_dot_product_attention(  # noqa: E731
        q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2), attn_mask=m).transpose(1, 2)
    got = attend_with_extras(q, k, v, None, call, sdpa, seq_dim=1)
    st = torch.tensor(s, dtype=torch.float64).view(-1, 1, 1, 1)
    if how == "kv":
        k2, v2 = ek, ev
    elif how == "v_only":
        k2, v2 = ek, ev * st
    elif how == "kv_penalty":
        k2, v2 = ek * torch.clamp(1 / torch.clamp(st, min=1.0), min=0.5), ev * st
    else:
        m = ev.double().mean(1, keepdim=True)
        k2, v2 = ek, (ev.double() - m) + st * m
    if mode == "joint":
        bias = torch.zeros(B, 1, 1, L + N, dtype=torch.float64)
        if how == "kv":
            bias[..., L:] = torch.log(st).view(B, 1, 1, 1)
        want = _softmax_attn(q, torch.cat([k, k2.to(k.dtype)], 1), torch.cat([v, v2.to(v.dtype)], 1), bias)
    else:
        own = _softmax_attn(q, k, v)
        added = _softmax_attn(q, k2.to(k.dtype), v2.to(v.dtype))
        want = own + (st * added if how == "kv" else added)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


def test_mean_pooling_of_729_tokens_to_64_follows_the_group_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 729, 8, generator=g, dtype=torch.float64)
    got = pool_tokens(x, None, 64, "mean")
    want = torch.stack([x[:, (j * 729) // 64: -(-(j + 1) * 729 // 64)].mean(1) for j in range(64)], 1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    mask = torch.ones(2, 729, dtype=torch.bool)
    mask[1, 720:] = False  # padded tokens do not count
    got = pool_tokens(x, mask, 64, "mean")
    j = 63  # tokens 717..728, three of them real
    lo, hi = (j * 729) // 64, -(-(j + 1) * 729 // 64)
    torch.testing.assert_close(got[1, j], x[1, lo:hi][mask[1, lo:hi]].mean(0), rtol=0, atol=1e-12)
    att = pool_tokens(x, None, 64, "attention")
    means = pool_tokens(x, None, 64, "mean")
    want = torch.softmax(means @ x.transpose(1, 2) / math.sqrt(8), -1) @ x
    torch.testing.assert_close(att, want, rtol=0, atol=1e-12)
    interp = pool_tokens(x, None, 64, "interpolate")
    assert torch.equal(interp[:, 0], x[:, 0]) and torch.equal(interp[:, -1], x[:, -1])


@torch.no_grad()
def test_max_tokens_pools_a_reference_before_it_is_injected():
    model = build("flux")
    kw = inputs("flux")
    feats = vh.VLFeatures(torch.randn(1, 729, 32, generator=torch.Generator().manual_seed(0)))
    pooled = vh.VLFeatures(pool_tokens(feats.tokens, None, 64, "mean"))
    with vh.inject(model, pooled):
        want = output(model, kw)
    with vh.inject(model, feats, vh.InjectionConfig(max_tokens=64)):
        assert torch.equal(output(model, kw), want)


@torch.no_grad()
def test_negative_features_reach_only_the_unconditional_rows():
    model = build("z_image")
    kw = inputs("z_image", batch=2)  # [cond, uncond]
    pos, neg = _feats("z_image", 1), _feats("z_image", 2)
    cfg = vh.InjectionConfig(guidance="cond_first")
    plain = output(model, kw)
    with vh.inject(model, [vh.Reference(pos)], cfg):
        no_neg = output(model, kw)
    with vh.inject(model, [vh.Reference(pos, negative=neg)], cfg):
        with_neg = output(model, kw)
    assert torch.equal(no_neg[1], plain[1])  # unconditional: untouched without negatives
    assert torch.equal(with_neg[0], no_neg[0])  # conditional: the negative does not reach it
    alone = {k: (v[1:] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == 2 else v) for k, v in kw.items()}
    alone["x"], alone["cap_feats"] = kw["x"][1:], kw["cap_feats"][1:]
    with vh.inject(model, neg, vh.InjectionConfig(guidance="none")):
        torch.testing.assert_close(with_neg[1], output(model, alone)[0], rtol=0, atol=1e-5)  # as if the reference


@torch.no_grad()
def test_average_is_the_weighted_mean_of_the_features():
    model = build("flux")
    kw = inputs("flux")
    a, b = _feats("flux", 1), _feats("flux", 2)
    mean = vh.VLFeatures(0.75 * a.tokens + 0.25 * b.tokens)
    with vh.inject(model, mean):
        want = output(model, kw)
    with vh.inject(model, [vh.Reference(a, scale=3.0), vh.Reference(b, scale=1.0)],
                   vh.InjectionConfig(combine="average")):
        torch.testing.assert_close(output(model, kw), want, rtol=0, atol=1e-6)


def test_live_handle_updates_references_and_their_scales():
    model = build("flux")
    kw = inputs("flux")
    a, b = _feats("flux", 1), _feats("flux", 2)
    with torch.no_grad():
        with vh.inject(model, [vh.Reference(a), vh.Reference(b, scale=0.3)]) as h:
            first = output(model, kw)
            h.set_scale(1, 0.0)
            only_a = output(model, kw)
            h.set_references([vh.Reference(b, scale=0.3), vh.Reference(a)])
            swapped = output(model, kw)
        with vh.inject(model, [vh.Reference(a)]):
            torch.testing.assert_close(only_a, output(model, kw), rtol=0, atol=1e-6)
    torch.testing.assert_close(swapped, first, rtol=0, atol=1e-5)  # order of concatenated keys does not matter
    with pytest.raises(vh.ConfigError, match="out of range"):
        vh.apply_injection(model, a).set_scale(3, 1.0)
    vh.remove_injection(model)


@pytest.mark.parametrize("bad,err,match", [
    (lambda f: [vh.Reference(f, mask=torch.ones(4, dtype=torch.bool))], vh.FeatureError, r"\[H, W\] or \[B, H, W\]"),
    (lambda f: [vh.Reference(f, mask=torch.zeros(4, 4, dtype=torch.bool))], vh.FeatureError, "all False"),
    (lambda f: [vh.Reference(f, mask=torch.full((4, 4), float("nan")))], vh.FeatureError, "NaN"),
    (lambda f: [vh.Reference(f, mask=torch.ones(3, 5, dtype=torch.bool))], vh.FeatureError, "image-token grid"),
    (lambda f: [vh.Reference(f, scale=float("nan"))], vh.ConfigError, "finite"),
    (lambda f: [vh.Reference(f, scale=-1.0)], vh.ConfigError, "joint mode"),
    (lambda f: [vh.Reference(f, window=(0.8, 0.2))], vh.ConfigError, "start > end"),
    (lambda f: [vh.Reference(f, blocks=[99])], vh.ConfigError, "out of range"),
])
def test_bad_references_are_named_errors_and_leave_the_model_unpatched(bad, err, match):
    model = build("flux")
    before = snapshot(model)
    feats = _feats("flux", 1)
    with pytest.raises(err, match=match):
        refs = bad(feats)
        with vh.inject(model, refs):
            output(model, inputs("flux"))
    assert snapshot(model) == before and vh.get_injection(model) is None


def test_average_of_references_of_different_widths_or_lengths_is_refused():
    model = build("flux")
    before = snapshot(model)
    a = _feats("flux", 1)
    b = _feats("flux", 2, n=7)
    with pytest.raises(vh.FeatureError, match="one token count"):
        vh.apply_injection(model, [vh.Reference(a), vh.Reference(b)], vh.InjectionConfig(combine="average"))
    with pytest.raises(vh.ConfigError, match="combine='concat'"):
        vh.apply_injection(model, [vh.Reference(a, mask=torch.ones(4, 4)), vh.Reference(a)],
                           vh.InjectionConfig(combine="average"))
    assert snapshot(model) == before


def _two_pass(q, k, v, ek, ev, key_bias, query_bias, key_segment):
    """float64 model of the two-pass kernel (`fused_attention.joint_attention`): the block's own softmax and its
    log-sum-exp, the extra keys' with the factored bias, merged by the two log-sum-exps."""
    q, k, v, ek, ev = (t.double() for t in (q, k, v, ek, ev))
    s_main = torch.einsum("blhd,bnhd->bhln", q, k) / math.sqrt(q.shape[-1])
    lse_main = s_main.logsumexp(-1)  # [B, H, L]
    o_main = torch.einsum("bhln,bnhd->bhld", s_main.softmax(-1), v)
    s_extra = torch.einsum("blhd,bnhd->bhln", q, ek) / math.sqrt(q.shape[-1])
    bias = torch.zeros(s_extra.shape[0], 1, s_extra.shape[2], s_extra.shape[3], dtype=torch.float64)
    if key_bias is not None:
        bias = bias + key_bias.double()[:, None, None, :]
    if query_bias is not None:
        bias = bias + query_bias.double()[:, None][..., key_segment.long()]  # [B, 1, L, N]
    s_extra = s_extra + bias
    lse_extra = s_extra.logsumexp(-1)  # -inf where a query sees no extra key
    o_extra = torch.einsum("bhln,bnhd->bhld", torch.nan_to_num(s_extra.softmax(-1)), ev)
    w = torch.sigmoid(lse_extra - lse_main)[..., None]
    return (o_main + w * (o_extra - o_main)).transpose(1, 2)  # [B, L, H, D]


def test_the_kernels_factored_bias_equals_the_dense_bias_of_the_concatenation():
    """`attention.fused_bias` (what the two-pass kernel reads on CUDA): strengths per row and reference, a padded
    token, and spatial masks of two references over the image queries, with some queries masked out of every
    reference. Merged as the kernel merges, it equals softmax attention over the concatenated keys with the dense
    bias written out here from its definition."""
    from vlhooks.attention import fused_bias

    g = torch.Generator().manual_seed(0)
    B, L, H, D, n_a, n_b = 2, 9, 2, 4, 3, 2
    q, k, v = (torch.randn(B, L, H, D, generator=g) for _ in range(3))
    span, n_img = (3, 6), 6  # three text queries first, then six image queries
    pad = torch.tensor([[True, True, False], [True, True, True]])
    mask_a = torch.tensor([[1.0, 1.0, 0.5, 0.0, 0.0, 0.0]] * B)
    mask_b = torch.tensor([[0.0, 0.0, 0.5, 1.0, 1.0, 0.0]] * B)  # the last image query sees neither
    seg_a = Segment(0, torch.zeros(B, n_a, 1), None, pad, [2.0, 0.5], mask_a)
    seg_b = Segment(1, torch.zeros(B, n_b, 1), None, None, [1.0, 0.0], mask_b)  # row 1 does not see b
    call = _call(q, L, [seg_a, seg_b], span=span)
    ek, ev = torch.randn(B, n_a + n_b, H, D, generator=g) * 2, torch.randn(B, n_a + n_b, H, D, generator=g)
    key_bias, query_bias, key_segment = fused_bias(call, L, q.device)
    assert query_bias.shape == (B, L, 2) and key_segment.tolist() == [0, 0, 0, 1, 1]
    got = _two_pass(q, k, v, ek, ev, key_bias, query_bias, key_segment)

    dense = torch.zeros(B, L, n_a + n_b, dtype=torch.float64)
    for r, (sa, sb) in enumerate(zip(seg_a.strength, seg_b.strength)):
        wa = torch.ones(L, dtype=torch.float64)
        wb = torch.ones(L, dtype=torch.float64)
        wa[3:], wb[3:] = mask_a[r].double(), mask_b[r].double()
        dense[r, :, :n_a] = torch.log(sa * wa)[:, None]
        dense[r, :, n_a:] = torch.log(sb * wb)[:, None]
        dense[r, :, :n_a][:, ~pad[r]] = float("-inf")
    bias = torch.cat([torch.zeros(B, L, L, dtype=torch.float64), dense], dim=2)[:, None]  # [B, 1, L, L + N]
    want = _softmax_attn(q, torch.cat([k, ek], 1), torch.cat([v, ev], 1), bias)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # the bias is float32, as the kernel reads it
    own = _softmax_attn(q, k, v)
    torch.testing.assert_close(got[:, L - 1], own[:, L - 1], rtol=0, atol=1e-12)  # masked out of every reference
    assert (got[:, :L - 1] - own[:, :L - 1]).abs().max() > 1e-2  # elsewhere the references count


def test_the_kernels_factored_bias_is_computed_once_per_forward_call():
    from vlhooks.attention import fused_bias

    B, L = 1, 4
    seg = Segment(0, torch.zeros(B, 2, 1), None, None, [0.5], torch.tensor([[1.0, 0.0]]))
    call = _call(torch.zeros(B, L, 1, 2), L, [seg], span=(2, 2))
    call.scratch = {}
    first = fused_bias(call, L, torch.device("cpu"))
    assert fused_bias(call, L, torch.device("cpu"))[1] is first[1] and len(call.scratch) == 1
    call.segments = [replace(seg, strength=[0.25])]  # another block's strength: its own entry
    assert not torch.equal(fused_bias(call, L, torch.device("cpu"))[0], first[0]) and len(call.scratch) == 2


@pytest.mark.parametrize("family", ["z_image", "flux", "sd3", "pixart", "sana", "chroma", "qwen_image", "flux2",
                                    "lumina2"])
@pytest.mark.parametrize("adapter", [None, "kv", "lora"])
def test_several_references_in_one_text_path_call_equal_one_call_per_reference(family, adapter, monkeypatch):
    """`BlockCall.batched`: where the family allows it, three references (different token counts, strengths,
    one with padding) go through the block's text path in one call per block; the output equals the same patch
    with one text-path call per reference (`batched_segments` off), and the extra tokens of the families with RoPE
    on them (Z-Image, Qwen-Image, Flux.2, Lumina 2) keep their per-reference positions."""
    from vlhooks.models import family_for

    model = build(family)
    kw = inputs(family)
    width = caption_width(family)
    g = torch.Generator().manual_seed(5)
    pad = torch.ones(1, 6, dtype=torch.bool)
    pad[0, 4:] = False
    refs = [vh.Reference(vh.VLFeatures(torch.randn(1, 3, width, generator=g))),
            vh.Reference(vh.VLFeatures(torch.randn(1, 6, width, generator=g), mask=pad), scale=0.6),
            vh.Reference(vh.VLFeatures(torch.randn(1, 5, width, generator=g)), scale=1.7)]
    ad = None
    if adapter is not None:
        ad = vh.create_adapter(adapter, model, feature_width=width)
        with torch.no_grad():  # away from zero-shot, so the adapter's own weights are exercised
            for p in ad.trainable_parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    fam = type(family_for(model))
    assert fam.batched_segments
    calls = []
    real = fam.finish_kv
    monkeypatch.setattr(fam, "finish_kv", lambda self, call, k, v: calls.append(call.segment_lengths) or
                        real(self, call, k, v))
    with torch.no_grad():
        plain = output(model, kw)
        with vh.inject(model, refs, vh.InjectionConfig(blocks="all"), adapter=ad):
            batched = output(model, kw)
        n_batched = len(calls)
        assert n_batched and all(c == (3, 6, 5) for c in calls)
        monkeypatch.setattr(fam, "batched_segments", False)
        with vh.inject(model, refs, vh.InjectionConfig(blocks="all"), adapter=ad):
            separate = output(model, kw)
    assert len(calls) - n_batched == 3 * n_batched  # one call per reference and block without batching
    torch.testing.assert_close(batched, separate, rtol=1e-5, atol=1e-6)
    assert (batched - plain).abs().max() > 1e-3


@pytest.mark.parametrize("how", ["v_only", "kv_penalty", "k_mean_v"])
@pytest.mark.parametrize("family", ["z_image", "flux"])
def test_batched_references_take_each_ones_strength_in_their_kv(family, how, monkeypatch):
    """`kv_scaling` other than `"kv"` puts each reference's strength into its own K/V: the batched text path splits
    the K/V back per reference before scaling, so it equals one text-path call per reference."""
    from vlhooks.models import family_for

    model = build(family)
    kw = inputs(family)
    g = torch.Generator().manual_seed(6)
    refs = [vh.Reference(vh.VLFeatures(torch.randn(1, 4, caption_width(family), generator=g)), scale=s)
            for s in (0.5, 1.8)]
    cfg = vh.InjectionConfig(blocks="all", kv_scaling=how)
    with torch.no_grad():
        with vh.inject(model, refs, cfg):
            batched = output(model, kw)
        monkeypatch.setattr(type(family_for(model)), "batched_segments", False)
        with vh.inject(model, refs, cfg):
            separate = output(model, kw)
    torch.testing.assert_close(batched, separate, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["z_image", "lumina2"])
def test_a_mask_in_a_caption_only_block_warns_and_a_main_block_one_does_not(family):
    """A spatial mask cannot apply in a caption-only context refiner (no image queries): selecting one for a masked
    reference warns and names the blocks; the main blocks alone do not."""
    import warnings

    model = build(family)
    h, w = 4, 4
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[:, :2] = True
    feats = _feats(family, 1)
    with pytest.warns(UserWarning, match=r"cannot apply in \['context_refiner\.0'.*no image queries"):
        vh.apply_injection(model, [vh.Reference(feats, mask=mask)],
                           vh.InjectionConfig(blocks=r"(layers|context_refiner)\.\d+")).remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails here
        vh.apply_injection(model, [vh.Reference(feats, mask=mask)], vh.InjectionConfig(blocks="all")).remove()
        vh.apply_injection(model, [vh.Reference(feats)],
                           vh.InjectionConfig(blocks=r"(layers|context_refiner)\.\d+")).remove()
