"""`vlhooks.blending`: every mode against a reference computed here, the length policy, and every validation error."""

from __future__ import annotations

import math

import pytest
import torch

from vlhooks.blending import BLEND_MODES, blend, resample_tokens

D = 8


def rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def pair(b: int = 2, lt: int = 5, lv: int = 5, d: int = D) -> tuple[torch.Tensor, torch.Tensor]:
    return rand(b, lt, d, seed=1), rand(b, lv, d, seed=2) * 3 + 1


def ref_resample(x: torch.Tensor, n: int) -> torch.Tensor:
    """Loop reference for align-corners linear resampling of `[B, L, D]` to n tokens (float64)."""
    L = x.shape[1]
    rows = []
    for i in range(n):
        p = i * (L - 1) / (n - 1)
        lo = min(int(math.floor(p)), L - 2)
        f = p - lo
        rows.append(x[:, lo] * (1 - f) + x[:, lo + 1] * f)
    return torch.stack(rows, 1)


def gram_dist(x: torch.Tensor, v: torch.Tensor) -> float:
    gx = torch.einsum("bld,ble->bde", x, x) / x.shape[1]
    gv = torch.einsum("bld,ble->bde", v, v) / v.shape[1]
    return float(((gx - gv) ** 2).sum())


# ---- linear ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_linear_formula(alpha):
    t, v = pair()
    out = blend(t, v, "linear", alpha)
    assert out.shape == (2, 5, D)
    torch.testing.assert_close(out, (1 - alpha) * t + alpha * v)


def test_linear_endpoints_exact_and_batch_broadcast():
    t, v = pair(b=3)
    assert torch.equal(blend(t, v, "linear", 0.0), t)
    assert torch.equal(blend(t, v, "linear", 1.0), v)
    out = blend(t, v[:1], "linear", 0.25)  # VL batch 1 broadcasts
    torch.testing.assert_close(out, 0.75 * t + 0.25 * v[:1].expand(3, -1, -1))
    out = blend(t[0], v[0], "linear", 0.25)  # 2-D inputs -> [1, L, D]
    assert out.shape == (1, 5, D)


def test_bf16_in_bf16_out():
    t, v = pair()
    out = blend(t.bfloat16(), v.bfloat16(), "linear", 0.5)
    assert out.dtype == torch.bfloat16
    ref = (0.5 * t.bfloat16().float() + 0.5 * v.bfloat16().float()).bfloat16()
    assert torch.equal(out, ref)


# ---- slerp ----------------------------------------------------------------------------------------------------


def angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angle between 3-vectors, via atan2(|a x b|, a.b)."""
    return torch.atan2(torch.linalg.cross(a, b).norm(dim=-1), (a * b).sum(-1))


def test_slerp_right_angle_unit_vectors():
    t = torch.tensor([[[1.0, 0.0, 0.0]]])
    v = torch.tensor([[[0.0, 1.0, 0.0]]])
    out = blend(t, v, "slerp", 0.5)
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(out, torch.tensor([[[s, s, 0.0]]]))
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(1, 1))
    torch.testing.assert_close(angle(out, t), torch.full((1, 1), math.pi / 4))
    torch.testing.assert_close(angle(out, v), torch.full((1, 1), math.pi / 4))
    out = blend(t, v, "slerp", 1 / 3)  # 30 degrees from text
    torch.testing.assert_close(out, torch.tensor([[[math.cos(math.pi / 6), math.sin(math.pi / 6), 0.0]]]))


def test_slerp_norm_interpolates_linearly_at_known_angle():
    theta = math.radians(60)
    t = torch.tensor([[[2.0, 0.0, 0.0]]])
    v = 4.0 * torch.tensor([[[math.cos(theta), math.sin(theta), 0.0]]])
    out = blend(t, v, "slerp", 0.25)
    norm = 0.75 * 2.0 + 0.25 * 4.0
    expected = norm * torch.tensor([[[math.cos(theta / 4), math.sin(theta / 4), 0.0]]])
    torch.testing.assert_close(out, expected)


def test_slerp_near_parallel_is_finite_and_close_to_linear():
    eps = 1e-7
    t = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]], dtype=torch.float32)
    v = torch.tensor([[[math.cos(eps), math.sin(eps), 0.0], [0.0, 3 * math.cos(eps), 3 * math.sin(eps)]]])
    for a in (0.1, 0.5, 0.9):
        out = blend(t, v, "slerp", a)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, (1 - a) * t + a * v, atol=1e-6, rtol=1e-6)
    # identical tokens: exactly the input direction
    torch.testing.assert_close(blend(t, t, "slerp", 0.3), t)


@pytest.mark.parametrize("theta", [1e-9, 1e-5, 1e-3])
def test_slerp_small_angle_with_different_norms_follows_the_arc(theta):
    t = torch.tensor([[[1.0, 0.0, 0.0]]], dtype=torch.float64)
    v = 2.0 * torch.tensor([[[math.cos(theta), math.sin(theta), 0.0]]], dtype=torch.float64)
    out = blend(t, v, "slerp", 0.3)
    expected = 1.3 * torch.tensor([[[math.cos(0.3 * theta), math.sin(0.3 * theta), 0.0]]], dtype=torch.float64)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


def test_slerp_antiparallel_is_defined():
    t = torch.tensor([[[1.0, 2.0, -1.0, 0.5]]])
    v = -2.0 * t
    for a in (0.25, 0.5, 0.75):
        out = blend(t, v, "slerp", a)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.norm(dim=-1), (1 - a) * t.norm(dim=-1) + a * v.norm(dim=-1))
        cos = (out * t).sum(-1) / (out.norm(dim=-1) * t.norm(dim=-1))
        torch.testing.assert_close(cos, torch.full((1, 1), math.cos(a * math.pi)), atol=1e-5, rtol=0)


def test_slerp_endpoints_and_zero_token():
    t, v = pair()
    torch.testing.assert_close(blend(t, v, "slerp", 0.0), t)
    torch.testing.assert_close(blend(t, v, "slerp", 1.0), v)
    z = torch.zeros(1, 1, D)
    w = rand(1, 1, D, seed=5)
    torch.testing.assert_close(blend(z, w, "slerp", 0.3), 0.3 * w)  # zero text: norm 0.3|v|, direction of v


def test_slerp_matches_textbook_formula_on_random_tokens():
    t, v = pair(lt=6, lv=6)
    a = 0.37
    tt, vv = t.double(), v.double()
    nt, nv = tt.norm(dim=-1, keepdim=True), vv.norm(dim=-1, keepdim=True)
    ut, uv = tt / nt, vv / nv
    w = torch.acos((ut * uv).sum(-1, keepdim=True).clamp(-1, 1))
    direction = (torch.sin((1 - a) * w) * ut + torch.sin(a * w) * uv) / torch.sin(w)
    expected = ((1 - a) * nt + a * nv) * direction
    torch.testing.assert_close(blend(t, v, "slerp", a), expected.float(), atol=1e-5, rtol=1e-5)


# ---- resampling / interpolate ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n_in,n_out", [(9, 5), (5, 9), (4, 13), (1041, 11), (7, 2)])
def test_resample_linear_ramp_is_exact(n_in, n_out):
    i = torch.arange(n_in, dtype=torch.float64)
    x = torch.stack([2.0 + 0.5 * i, -3.0 * i], -1).unsqueeze(0)  # [1, n_in, 2], a ramp per dim
    out = resample_tokens(x, n_out)
    j = torch.arange(n_out, dtype=torch.float64) * (n_in - 1) / (n_out - 1)
    expected = torch.stack([2.0 + 0.5 * j, -3.0 * j], -1).unsqueeze(0)
    assert out.shape == (1, n_out, 2)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    assert torch.equal(out[:, 0], x[:, 0]) and torch.equal(out[:, -1], x[:, -1])


def test_resample_random_against_loop_reference():
    x = rand(2, 7, D, dtype=torch.float64)
    torch.testing.assert_close(resample_tokens(x, 12), ref_resample(x, 12))
    assert resample_tokens(x[0], 3).shape == (1, 3, D)


def test_interpolate_mode_resamples_vl_to_text_length():
    t = rand(1, 4, 2, dtype=torch.float64)
    i = torch.arange(10, dtype=torch.float64)
    v = torch.stack([i, 10 - 2 * i], -1).unsqueeze(0)  # ramp
    j = torch.arange(4, dtype=torch.float64) * 9 / 3
    v_ref = torch.stack([j, 10 - 2 * j], -1).unsqueeze(0)
    for length in (None, "pad", "truncate"):  # ignored by this mode
        out = blend(t, v, "interpolate", 0.4, length=length)
        assert out.shape == (1, 4, 2)
        torch.testing.assert_close(out, 0.6 * t + 0.4 * v_ref)


# ---- style_only -----------------------------------------------------------------------------------------------


def test_style_only_range():
    t, v = pair()
    out = blend(t, v, "style_only", 0.3, dims=(2, 6))
    assert torch.equal(out[..., :2], t[..., :2]) and torch.equal(out[..., 6:], t[..., 6:])
    torch.testing.assert_close(out[..., 2:6], 0.7 * t[..., 2:6] + 0.3 * v[..., 2:6])


def test_style_only_mask_and_bf16_bits():
    t, v = pair()
    mask = torch.tensor([True, False, False, True, False, True, False, False])
    out = blend(t, v, "style_only", 0.6, dim_mask=mask)
    assert torch.equal(out[..., ~mask], t[..., ~mask])
    torch.testing.assert_close(out[..., mask], 0.4 * t[..., mask] + 0.6 * v[..., mask])
    tb = t.bfloat16()
    outb = blend(tb, v.bfloat16(), "style_only", 0.6, dim_mask=mask)
    assert torch.equal(outb[..., ~mask], tb[..., ~mask])


# ---- graduated ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ramp,f", [("linear", lambda u: u), ("ease_in", lambda u: u * u), ("ease_out", lambda u: 1 - (1 - u) ** 2)]
)
def test_graduated_ramps(ramp, f):
    t, v = pair(lt=6, lv=6)
    n = 6
    # defaults: 0 -> alpha
    out = blend(t, v, "graduated", 0.8, ramp=ramp)
    a = torch.tensor([0.8 * f(i / (n - 1)) for i in range(n)]).view(1, n, 1)
    torch.testing.assert_close(out, (1 - a) * t + a * v)
    # explicit start / end
    out = blend(t, v, "graduated", 0.5, alpha_start=0.9, alpha_end=0.1, ramp=ramp)
    a = torch.tensor([0.9 + (0.1 - 0.9) * f(i / (n - 1)) for i in range(n)]).view(1, n, 1)
    torch.testing.assert_close(out, (1 - a) * t + a * v)
    assert torch.equal(blend(t, v, "graduated", 0.8, ramp=ramp)[:, 0], t[:, 0])  # alpha 0 at the first token


# ---- attention_weighted ---------------------------------------------------------------------------------------


def test_attention_weighted_zero_weight_keeps_text_and_normalises_by_row_max():
    t, v = pair(lt=5, lv=5)
    w = torch.tensor([[0.0, 2.0, 4.0, 0.0, 1.0], [3.0, 0.0, 0.0, 6.0, 6.0]])
    out = blend(t, v, "attention_weighted", 0.6, weights=w)
    zero = w == 0
    assert torch.equal(out[zero], t[zero])
    a = (0.6 * w / w.max(dim=1, keepdim=True).values).unsqueeze(-1)
    torch.testing.assert_close(out, (1 - a) * t + a * v)
    out1 = blend(t, v, "attention_weighted", 0.6, weights=w[0])  # [L] broadcasts over the batch
    a1 = (0.6 * w[0] / 4.0).view(1, 5, 1)
    torch.testing.assert_close(out1, (1 - a1) * t + a1 * v)
    allzero = blend(t, v, "attention_weighted", 0.6, weights=torch.zeros(5))
    assert torch.equal(allzero, t)


def test_attention_weighted_vl_length_weights_follow_the_length_policy():
    t, v = pair(b=1, lt=3, lv=6)
    w = torch.tensor([1.0, 0.0, 2.0, 4.0, 0.5, 8.0])  # one per VL token
    out = blend(t, v, "attention_weighted", 0.5, weights=w, length="truncate")
    wt = w[:3] / 2.0  # max over the weights used
    a = (0.5 * wt).view(1, 3, 1)
    torch.testing.assert_close(out, (1 - a) * t + a * v[:, :3])
    out = blend(t, v, "attention_weighted", 0.5, weights=w, length="pad")
    tp = torch.cat([t, torch.zeros(1, 3, D)], 1)
    a = (0.5 * w / 8.0).view(1, 6, 1)
    torch.testing.assert_close(out, (1 - a) * tp + a * v)


# ---- adain ----------------------------------------------------------------------------------------------------


def test_adain_per_token_stats_match_vl():
    t, v = pair(lt=7, lv=7)
    out = blend(t, v, "adain", 1.0)
    torch.testing.assert_close(out.mean(-1), v.mean(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.std(-1, correction=0), v.std(-1, correction=0), atol=1e-5, rtol=1e-5)
    # alpha blends with text
    s = (t - t.mean(-1, keepdim=True)) / t.std(-1, correction=0, keepdim=True)
    s = s * v.std(-1, correction=0, keepdim=True) + v.mean(-1, keepdim=True)
    torch.testing.assert_close(blend(t, v, "adain", 0.3), 0.7 * t + 0.3 * s)


def test_adain_per_dim_stats_match_vl_over_all_vl_tokens():
    t, v = pair(lt=7, lv=7)
    out = blend(t, v, "adain_per_dim", 1.0)
    torch.testing.assert_close(out.mean(1), v.mean(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.std(1, correction=0), v.std(1, correction=0), atol=1e-5, rtol=1e-5)
    # lengths differ: every VL token feeds the statistics, output keeps the text length, no `length` needed
    t2, v2 = pair(lt=4, lv=30)
    out = blend(t2, v2, "adain_per_dim", 1.0)
    assert out.shape == (2, 4, D)
    torch.testing.assert_close(out.mean(1), v2.mean(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.std(1, correction=0), v2.std(1, correction=0), atol=1e-5, rtol=1e-5)


# ---- style_delta ----------------------------------------------------------------------------------------------


def test_style_delta_formula_and_rescale():
    t, v = pair()
    n = rand(1, 5, D, seed=9)  # neutral, batch 1 broadcasts
    out = blend(t, v, "style_delta", 0.4, vl_neutral=n, rescale=False)
    raw = t + 0.4 * (v - n)
    torch.testing.assert_close(out, raw)
    out = blend(t, v, "style_delta", 0.4, vl_neutral=n)
    torch.testing.assert_close(out.norm(dim=-1), t.norm(dim=-1))
    torch.testing.assert_close(out, raw / raw.norm(dim=-1, keepdim=True) * t.norm(dim=-1, keepdim=True))
    big = blend(t, v, "style_delta", 2.5, vl_neutral=n, rescale=False)  # alpha is a scale: > 1 allowed
    torch.testing.assert_close(big, t + 2.5 * (v - n))


def test_style_delta_with_interpolated_length():
    t, v = pair(lt=4, lv=10)
    n = rand(2, 10, D, seed=11)
    out = blend(t, v, "style_delta", 0.5, vl_neutral=n, rescale=False, length="interpolate")
    delta = ref_resample((v - n).double(), 4).float()
    torch.testing.assert_close(out, t + 0.5 * delta)


# ---- gram -----------------------------------------------------------------------------------------------------


def test_gram_lowers_gram_distance_and_leaves_inputs_alone():
    t, v = pair(lt=6, lv=11)  # lengths may differ: Gram is D x D
    t0, v0 = t.clone(), v.clone()
    out = blend(t, v, "gram", steps=40, lr=0.05)
    assert out.shape == t.shape and not out.requires_grad
    assert gram_dist(out, v) < 0.9 * gram_dist(t, v)
    assert torch.equal(t, t0) and torch.equal(v, v0)


def test_gram_steps_are_bounded(monkeypatch):
    t, v = pair()
    calls = []
    orig = torch.optim.Adam.step

    def counting_step(self, *a, **k):
        calls.append(1)
        return orig(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", counting_step)
    blend(t, v, "gram", steps=7)
    assert len(calls) == 7
    calls.clear()
    blend(t, v, "gram")  # default 50
    assert len(calls) == 50
    monkeypatch.undo()
    assert torch.equal(blend(t, v, "gram", steps=0), t)
    one = blend(t, v, "gram", steps=1, lr=0.01)  # Adam's first step moves each entry by at most lr
    assert 0 < float((one - t).abs().max()) <= 0.01 + 1e-6


def test_gram_works_under_no_grad_and_inference_mode_and_with_grad_inputs():
    t, v = pair()
    ref = blend(t, v, "gram", steps=5)
    with torch.no_grad():
        torch.testing.assert_close(blend(t, v, "gram", steps=5), ref)
    with torch.inference_mode():
        ti, vi = t.clone(), v.clone()
        torch.testing.assert_close(blend(ti, vi, "gram", steps=5), ref)
    tg = t.clone().requires_grad_(True)
    out = blend(tg, v, "gram", steps=5)
    assert not out.requires_grad and tg.grad is None


def test_gram_lam_pulls_to_text():
    t, v = pair()
    loose = blend(t, v, "gram", steps=30, lr=0.05, lam=0.0)
    tight = blend(t, v, "gram", steps=30, lr=0.05, lam=1e6)
    assert (tight - t).norm() < (loose - t).norm()


# ---- length policy --------------------------------------------------------------------------------------------


POSITIONAL = ["linear", "slerp", "style_only", "graduated", "attention_weighted", "adain", "style_delta"]


def extra(mode: str, lv: int) -> dict:
    return {
        "style_only": {"dims": (0, 4)},
        "attention_weighted": {"weights": torch.ones(lv)},
        "style_delta": {"vl_neutral": torch.zeros(2, lv, D)},
    }.get(mode, {})


@pytest.mark.parametrize("mode", POSITIONAL)
def test_lengths_differ_without_policy_raises(mode):
    t, v = pair(lt=5, lv=9)
    with pytest.raises(ValueError, match=r"(?s)truncate.*interpolate.*pad"):
        blend(t, v, mode, 0.5, **extra(mode, 9))


@pytest.mark.parametrize("mode", POSITIONAL)
@pytest.mark.parametrize("length,expected", [("truncate", 5), ("interpolate", 5), ("pad", 9)])
def test_policy_output_lengths(mode, length, expected):
    t, v = pair(lt=5, lv=9)
    assert blend(t, v, mode, 0.5, length=length, **extra(mode, 9)).shape == (2, expected, D)


def test_truncate_uses_first_vl_tokens_and_refuses_short_vl():
    t, v = pair(lt=5, lv=9)
    torch.testing.assert_close(blend(t, v, "linear", 0.3, length="truncate"), 0.7 * t + 0.3 * v[:, :5])
    with pytest.raises(ValueError, match="length='pad' or length='interpolate'"):
        blend(v, t, "linear", 0.3, length="truncate")  # VL (5) shorter than text (9)


def test_interpolate_policy_matches_reference():
    t, v = pair(lt=5, lv=9)
    out = blend(t.double(), v.double(), "linear", 0.3, length="interpolate")
    torch.testing.assert_close(out, 0.7 * t.double() + 0.3 * ref_resample(v.double(), 5))


def test_pad_region_is_blend_with_zeros():
    t, v = pair(lt=5, lv=9)
    out = blend(t, v, "linear", 0.3, length="pad")  # text shorter
    torch.testing.assert_close(out[:, :5], 0.7 * t + 0.3 * v[:, :5])
    torch.testing.assert_close(out[:, 5:], 0.3 * v[:, 5:])
    out = blend(v, t, "linear", 0.3, length="pad")  # VL shorter
    assert out.shape == (2, 9, D)
    torch.testing.assert_close(out[:, :5], 0.7 * v[:, :5] + 0.3 * t)
    torch.testing.assert_close(out[:, 5:], 0.7 * v[:, 5:])
    out = blend(t, v, "style_only", 0.3, length="pad", dims=(0, 4))
    assert torch.equal(out[:, 5:, 4:], torch.zeros(2, 4, 4))  # outside dims: the (zero) padded text


def test_equal_lengths_need_no_policy_and_policies_agree():
    t, v = pair()
    ref = 0.6 * t + 0.4 * v
    for length in (None, "truncate", "interpolate", "pad"):
        torch.testing.assert_close(blend(t, v, "linear", 0.4, length=length), ref)


# ---- inputs are never modified --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", BLEND_MODES)
def test_inputs_untouched(mode):
    t, v = pair(lt=5, lv=9)
    t0, v0 = t.clone(), v.clone()
    kw = {"length": "pad"} if mode in POSITIONAL else {}
    kw.update(extra(mode, 9))
    if mode == "gram":
        kw["steps"] = 3
    out = blend(t, v, mode, 0.5, **kw)
    assert torch.equal(t, t0) and torch.equal(v, v0)
    assert torch.isfinite(out).all()


def test_blend_modes_exported():
    assert set(BLEND_MODES) == {
        "linear", "slerp", "interpolate", "style_only", "graduated", "attention_weighted", "adain", "adain_per_dim",
        "style_delta", "gram",
    }


# ---- validation errors ----------------------------------------------------------------------------------------


def test_unknown_mode_lists_modes():
    t, v = pair()
    with pytest.raises(ValueError, match="choose one of linear, slerp, interpolate.*gram"):
        blend(t, v, "lerp")


@pytest.mark.parametrize("mode", ["linear", "slerp", "interpolate", "graduated", "adain", "adain_per_dim"])
@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_alpha_out_of_range(mode, alpha):
    t, v = pair()
    with pytest.raises(ValueError, match=r"outside \[0, 1\].*pass a value in \[0, 1\]"):
        blend(t, v, mode, alpha)


def test_alpha_non_finite_and_graduated_bounds():
    t, v = pair()
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        blend(t, v, "style_delta", float("nan"), vl_neutral=v)
    with pytest.raises(ValueError, match=r"alpha_end=1.5 must be a number in \[0, 1\]"):
        blend(t, v, "graduated", 0.5, alpha_end=1.5)
    with pytest.raises(ValueError, match="ramp='cubic'.*linear, ease_in, ease_out"):
        blend(t, v, "graduated", 0.5, ramp="cubic")


@pytest.mark.parametrize("which", ["text", "vl"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inputs(which, bad):
    t, v = pair()
    (t if which == "text" else v)[0, 1, 2] = bad
    with pytest.raises(ValueError, match=r"(text|vl)_embeds contains NaN or Inf.*nan_to_num"):
        blend(t, v, "linear", 0.5)


def test_batch_mismatch():
    t, v = pair(b=2)
    v3 = rand(3, 5, D)
    with pytest.raises(ValueError, match=r"Batch sizes differ \(text_embeds B=2, vl_embeds B=3\).*batch of 1"):
        blend(t, v3, "linear", 0.5)
    with pytest.raises(ValueError, match="weights has batch 3.*pass 2 rows or 1"):
        blend(t, v, "attention_weighted", 0.5, weights=torch.ones(3, 5))
    with pytest.raises(ValueError, match="vl_neutral has batch 3"):
        blend(t, v, "style_delta", 0.5, vl_neutral=rand(3, 5, D))


def test_width_mismatch_names_projection():
    t = rand(1, 5, D)
    v = rand(1, 5, D + 1)
    with pytest.raises(ValueError, match=r"D=8 but vl_embeds has D=9.*project the VL states"):
        blend(t, v)


def test_bad_shapes_and_dtypes():
    t, v = pair()
    with pytest.raises(ValueError, match=r"pass \[B, L, D\] or \[L, D\]"):
        blend(t[0, 0], v)
    with pytest.raises(ValueError, match="floating-point"):
        blend(t.long(), v)
    with pytest.raises(ValueError, match="at least one row, one token"):
        blend(t[:, :0], v)
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        blend(t.tolist(), v)


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({}, "needs exactly one of dims=\\(start, stop\\)"),
        ({"dims": (2, 4), "dim_mask": torch.ones(D, dtype=torch.bool)}, "needs exactly one of"),
        ({"dims": (4, 4)}, "not a valid range.*0 <= start < stop <= D=8"),
        ({"dims": (0, 9)}, "not a valid range"),
        ({"dims": (-1, 3)}, "not a valid range"),
        ({"dims": (0.5, 3)}, "not a valid range"),
        ({"dims": 3}, "not a valid range"),
        ({"dim_mask": torch.ones(D)}, r"dim_mask must be a bool tensor of shape \[8\]"),
        ({"dim_mask": torch.ones(D + 1, dtype=torch.bool)}, r"dim_mask must be a bool tensor of shape \[8\]"),
        ({"dim_mask": torch.zeros(D, dtype=torch.bool)}, "selects no dimension"),
    ],
)
def test_bad_dims(kw, msg):
    t, v = pair()
    with pytest.raises(ValueError, match=msg):
        blend(t, v, "style_only", 0.5, **kw)


def test_attention_weighted_errors():
    t, v = pair(lt=5, lv=9)
    with pytest.raises(ValueError, match="needs weights=.*without them use mode='linear'"):
        blend(t, v, "attention_weighted", 0.5, length="pad")
    with pytest.raises(ValueError, match=r"one per VL token \(9\) or one per output token \(5\)"):
        blend(t, v, "attention_weighted", 0.5, length="truncate", weights=torch.ones(7))
    with pytest.raises(ValueError, match="finite and non-negative"):
        blend(t, v, "attention_weighted", 0.5, length="pad", weights=-torch.ones(9))


def test_style_delta_errors():
    t, v = pair()
    with pytest.raises(ValueError, match="needs vl_neutral="):
        blend(t, v, "style_delta", 0.5)
    with pytest.raises(ValueError, match="vl_neutral has shape .* same prompt, layer and token selection"):
        blend(t, v, "style_delta", 0.5, vl_neutral=rand(2, 6, D))


def test_gram_option_errors():
    t, v = pair()
    with pytest.raises(ValueError, match="steps=-1 must be an integer >= 0"):
        blend(t, v, "gram", steps=-1)
    with pytest.raises(ValueError, match="lr=0 must be a finite number > 0"):
        blend(t, v, "gram", lr=0)
    with pytest.raises(ValueError, match="lam=-1.0 must be a finite number >= 0"):
        blend(t, v, "gram", lam=-1.0)


def test_unknown_option_and_bad_length_value():
    t, v = pair()
    with pytest.raises(ValueError, match="does not take option\\(s\\) dims; it accepts: none"):
        blend(t, v, "linear", 0.5, dims=(0, 2))
    with pytest.raises(ValueError, match="length='crop' is not a length policy; pass one of truncate, interpolate"):
        blend(t, v, "linear", 0.5, length="crop")


def test_resample_errors():
    with pytest.raises(ValueError, match="integer length >= 1"):
        resample_tokens(rand(1, 4, D), 0)
    with pytest.raises(ValueError, match="floating-point"):
        resample_tokens(torch.ones(1, 4, D, dtype=torch.long), 3)
