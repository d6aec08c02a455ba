"""The embedding route: blend vision-language hidden states into a text encoder's caption embeddings.

Owns `blend` (the baseline that mixes VL tokens, e.g. Qwen3-VL hidden states, into the caption embeddings a
pipeline takes as `prompt_embeds`), its modes (`BLEND_MODES`), the explicit token-length policy that pairs text
tokens with VL tokens, and `resample_tokens`. It does not extract, rescale or normalise VL features (bring both
sequences in the caption space, same width `D`) and never touches a model or a hook.

Length policy (`length=`), for the modes that pair text and VL tokens position by position
(`linear`, `slerp`, `style_only`, `graduated`, `attention_weighted`, `adain`, `style_delta`):

- `"truncate"`: output length `Lt`; the VL sequence is cut to its first `Lt` tokens. Needs `Lv >= Lt`.
- `"interpolate"`: output length `Lt`; the VL sequence is resampled to `Lt` tokens (`resample_tokens`).
- `"pad"`: output length `max(Lt, Lv)`; the shorter sequence is zero-padded at the end, and the mode's formula
  runs on the padded inputs. For `linear` the padded region is therefore `alpha * vl` (text missing) or
  `(1 - alpha) * text` (VL missing).

There is no default: when `Lt != Lv`, `length` must be given (the original code silently truncated VL to the
text length, keeping about 11 of 1041 tokens). When `Lt == Lv` all three policies are the identity.
`interpolate`, `adain_per_dim` and `gram` do not pair tokens by position: they always return `Lt` tokens, use
every VL token, and accept but ignore `length`.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import torch
import torch.nn.functional as F

from .errors import ConfigError, FeatureError

__all__ = ["BLEND_MODES", "LENGTH_POLICIES", "RAMPS", "blend", "resample_tokens"]

BLEND_MODES: tuple[str, ...] = (
    "linear",
    "slerp",
    "interpolate",
    "style_only",
    "graduated",
    "attention_weighted",
    "adain",
    "adain_per_dim",
    "style_delta",
    "gram",
)
LENGTH_POLICIES: tuple[str, ...] = ("truncate", "interpolate", "pad")
RAMPS: tuple[str, ...] = ("linear", "ease_in", "ease_out")

# Keyword options each mode accepts (anything else is a typo and raises).
_OPTIONS: dict[str, frozenset[str]] = {
    "linear": frozenset(),
    "slerp": frozenset(),
    "interpolate": frozenset(),
    "style_only": frozenset({"dims", "dim_mask"}),
    "graduated": frozenset({"alpha_start", "alpha_end", "ramp"}),
    "attention_weighted": frozenset({"weights"}),
    "adain": frozenset({"eps"}),
    "adain_per_dim": frozenset({"eps"}),
    "style_delta": frozenset({"vl_neutral", "rescale"}),
    "gram": frozenset({"steps", "lr", "lam"}),
}
# Modes that do not pair text and VL tokens by position: output length is always Lt, `length` is not needed.
_LENGTH_FREE = frozenset({"interpolate", "adain_per_dim", "gram"})
# Modes where `alpha` is not a mixing weight in [0, 1]: style_delta scales a delta (any finite value);
# gram ignores alpha (its trade-off is `lam`).
_ALPHA_NOT_MIXING = frozenset({"style_delta", "gram"})

_SLERP_EPS = 1e-6  # sin(angle) below this (float64): near-parallel -> lerp, near-antiparallel -> a fixed plane


def resample_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    """Linearly resample `x` `[B, L, D]` (or `[L, D]`) along the token axis to `[B, length, D]`.

    Output token `i` sits at source position `p_i = i * (L - 1) / (length - 1)` and is
    `x[floor(p)] * (1 - f) + x[floor(p) + 1] * f`, `f = p - floor(p)` ("align corners"): the first and last tokens
    are copied exactly. `length == 1` samples the centre `p = (L - 1) / 2`; `L == 1` repeats the single token.
    """
    if not isinstance(x, torch.Tensor):
        raise FeatureError(f"resample_tokens expects a torch.Tensor [B, L, D], got {type(x).__name__}.")
    if x.ndim == 2:
        x = x.unsqueeze(0)  # [1, L, D]
    if x.ndim != 3 or x.shape[1] == 0:
        raise FeatureError(f"resample_tokens expects [B, L, D] with L >= 1, got shape {tuple(x.shape)}.")
    if not x.is_floating_point():
        raise FeatureError(f"resample_tokens needs a floating-point tensor, got {x.dtype}; use `x.float()`.")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ConfigError(f"resample_tokens needs an integer length >= 1, got {length!r}.")
    n = x.shape[1]
    if n == length:
        return x.clone()
    if n == 1:
        return x.expand(-1, length, -1).clone()  # [B, length, D]
    if length == 1:
        pos = torch.tensor([(n - 1) / 2], dtype=torch.float64, device=x.device)  # [1]
    else:
        # multiply before dividing: the last position is exactly n - 1
        pos = torch.arange(length, dtype=torch.float64, device=x.device) * (n - 1) / (length - 1)  # [length]
    lo = pos.floor().long().clamp(max=n - 2)  # [length]
    frac = (pos - lo.to(torch.float64)).to(x.dtype).view(1, -1, 1)  # [1, length, 1]
    return x[:, lo] * (1 - frac) + x[:, lo + 1] * frac  # [B, length, D]


def blend(
    text_embeds: torch.Tensor,
    vl_embeds: torch.Tensor,
    mode: str = "linear",
    alpha: float = 0.5,
    *,
    length: str | None = None,
    **options: Any,
) -> torch.Tensor:
    """Blend VL hidden states into caption embeddings; returns `[B, L, D]` for the pipeline's `prompt_embeds`.

    `text_embeds` `[B, Lt, D]` or `[Lt, D]`, `vl_embeds` `[B, Lv, D]` or `[Lv, D]`: same `D`, same device, equal
    batches or a batch of 1 that broadcasts. The result is always 3-D, in `text_embeds`' dtype and device
    (computed in float32, or float64 if an input is float64). Inputs are never modified. `t`, `v` below are one
    text and one VL token (`[D]`), `a = alpha`.

    Modes:
        linear: `(1 - a) * t + a * v`.
        slerp: per token, the direction moves along the great circle,
            `u = sin((1 - a) w) / sin(w) * t^ + sin(a w) / sin(w) * v^` with `w` the angle between `t` and `v`,
            and the norm linearly, `|out| = (1 - a) |t| + a |v|`. Near-parallel tokens (sin w < 1e-6) fall back to
            a linear blend of the unit directions, renormalised (a zero token: plain `linear`); antiparallel tokens
            rotate through a fixed plane spanned by `t^` and the basis vector least aligned with it.
        interpolate: `v` resampled to `Lt` tokens (`resample_tokens`, whatever `length` says), then `linear`.
        style_only: `linear` on the dimensions chosen by `dims=(start, stop)` or a bool `dim_mask` `[D]`;
            every other dimension is `t` bit for bit.
        graduated: `linear` with a per-token weight `a_i = a0 + (a1 - a0) * r(u_i)`, `u_i = i / (L - 1)`,
            `a0 = alpha_start` (default 0), `a1 = alpha_end` (default `alpha`), `r` from `ramp`:
            `linear` `u`, `ease_in` `u^2`, `ease_out` `1 - (1 - u)^2`.
        attention_weighted: `linear` with `a_i = a * w_i / max_j w_j` (per row), `w = weights` `[B, L]` or `[L]`,
            non-negative (e.g. the VLM's attention received by each token). `weights` may have one entry per VL
            token (`Lv`; it is then aligned by the same length policy as the VL tokens) or per output token.
            The max is taken over the weights as used; a row of zeros keeps the text.
        adain: `s = (t - mean(t)) / std(t) * std(v) + mean(v)` with statistics over `D` per token, then
            `(1 - a) * t + a * s` (a = 1 is pure AdaIN).
        adain_per_dim: the same with statistics per dimension over the token axis: text statistics over its `Lt`
            tokens, VL statistics over all `Lv` tokens (no pairing, so no `length`). Output `Lt` tokens.
        style_delta: `o = t + a * (v - n)` with `n = vl_neutral` (required; same shape as `vl_embeds`, batch 1
            broadcasts), e.g. the VL states of a neutral grey image. With `rescale=True` (default) each token is
            then rescaled to the text token's norm, `o * |t| / |o|` (padded text positions are left as is).
            `alpha` is a scale here, any finite value.
        gram: minimise `||G(o) - G(v)||^2 + lam * ||o - t||^2` over the whole sequence `o` `[Lt, D]`, starting from
            `o = t`, with Adam (`lr`, default 0.01) for exactly `steps` iterations (default 50). `G(x) = x^T x / L`
            is the `D x D` Gram matrix over tokens per batch item (VL uses all its `Lv` tokens), `lam` defaults to
            1.0. `alpha` is not used. Runs under `torch.enable_grad()` (also inside `no_grad` / `inference_mode`)
            and returns a detached tensor.

    `length` (`"truncate"`, `"interpolate"`, `"pad"`) pairs the tokens when `Lt != Lv`; see the module docstring.
    Every invalid input raises `ValueError` (`ConfigError` / `FeatureError`) whose message names the fix.
    """
    # ---- options --------------------------------------------------------------------------------------------
    if not isinstance(mode, str) or mode not in BLEND_MODES:
        raise ConfigError(f"Unknown blend mode {mode!r}; choose one of {', '.join(BLEND_MODES)}.")
    unknown = sorted(set(options) - _OPTIONS[mode])
    if unknown:
        accepted = ", ".join(sorted(_OPTIONS[mode])) or "none"
        raise ConfigError(
            f"Mode {mode!r} does not take option(s) {', '.join(unknown)}; it accepts: {accepted}."
        )
    if length is not None and length not in LENGTH_POLICIES:
        raise ConfigError(f"length={length!r} is not a length policy; pass one of {', '.join(LENGTH_POLICIES)}.")
    alpha = _check_alpha(alpha, mode)

    # ---- tensors ----------------------------------------------------------------------------------------------
    text = _as_tokens(text_embeds, "text_embeds")  # [Bt, Lt, D]
    vl = _as_tokens(vl_embeds, "vl_embeds")  # [Bv, Lv, D]
    if text.shape[-1] != vl.shape[-1]:
        raise FeatureError(
            f"text_embeds has width D={text.shape[-1]} but vl_embeds has D={vl.shape[-1]}; blending needs the same "
            "width: project the VL states into the text encoder's caption space first (or pick a VL model whose "
            "hidden size matches)."
        )
    if vl.device != text.device:
        raise FeatureError(
            f"text_embeds is on {text.device} but vl_embeds is on {vl.device}; move both to one device "
            "(e.g. `vl_embeds.to(text_embeds.device)`)."
        )
    batch = _common_batch(("text_embeds", text.shape[0]), ("vl_embeds", vl.shape[0]))
    out_dtype = text.dtype
    cdtype = _compute_dtype(text, vl)
    t = text.to(cdtype).expand(batch, -1, -1)  # [B, Lt, D]
    v = vl.to(cdtype).expand(batch, -1, -1)  # [B, Lv, D]
    lt, lv = t.shape[1], v.shape[1]

    # ---- length-free modes ------------------------------------------------------------------------------------
    if mode == "interpolate":
        v = resample_tokens(v, lt) if lv != lt else v  # [B, Lt, D]
        return _lerp(t, v, alpha).to(out_dtype)
    if mode == "adain_per_dim":
        eps = _check_positive(options.get("eps", 1e-6), "eps")
        mu_t, sd_t = t.mean(1, keepdim=True), t.std(1, correction=0, keepdim=True)  # [B, 1, D]
        mu_v, sd_v = v.mean(1, keepdim=True), v.std(1, correction=0, keepdim=True)  # [B, 1, D]
        styled = (t - mu_t) / sd_t.clamp_min(eps) * sd_v + mu_v  # [B, Lt, D]
        return _lerp(t, styled, alpha).to(out_dtype)
    if mode == "gram":
        return _gram_blend(t, v, **options).to(out_dtype)

    # ---- modes that pair tokens by position -------------------------------------------------------------------
    out_len = _resolve_length(lt, lv, length)
    ta = _fit(t, out_len, length)  # [B, L, D]
    va = _fit(v, out_len, length)  # [B, L, D]

    if mode == "linear":
        out = _lerp(ta, va, alpha)
    elif mode == "slerp":
        out = _slerp(ta, va, alpha)
    elif mode == "style_only":
        sel = _dim_selection(options.get("dims"), options.get("dim_mask"), t.shape[-1], t.device)  # [D] bool
        out = torch.where(sel, _lerp(ta, va, alpha), ta)  # [B, L, D]
    elif mode == "graduated":
        a_tok = _graduated_alpha(out_len, alpha, cdtype, t.device, **options)  # [L]
        out = _lerp(ta, va, a_tok.view(1, -1, 1))
    elif mode == "attention_weighted":
        w = _attention_alpha(options.get("weights"), batch, lv, out_len, length, cdtype, t.device)  # [B, L]
        out = _lerp(ta, va, (alpha * w).unsqueeze(-1))
    elif mode == "adain":
        eps = _check_positive(options.get("eps", 1e-6), "eps")
        mu_t, sd_t = ta.mean(-1, keepdim=True), ta.std(-1, correction=0, keepdim=True)  # [B, L, 1]
        mu_v, sd_v = va.mean(-1, keepdim=True), va.std(-1, correction=0, keepdim=True)  # [B, L, 1]
        styled = (ta - mu_t) / sd_t.clamp_min(eps) * sd_v + mu_v  # [B, L, D]
        out = _lerp(ta, styled, alpha)
    else:  # style_delta
        out = _style_delta(t, v, ta, out_len, length, alpha, batch, cdtype, **options)
    return out.to(out_dtype)


# ---- validation helpers ---------------------------------------------------------------------------------------


def _as_tokens(x: Any, name: str) -> torch.Tensor:
    """`[L, D]` or `[B, L, D]` floating, finite tensor -> `[B, L, D]`."""
    if not isinstance(x, torch.Tensor):
        raise FeatureError(f"{name} must be a torch.Tensor [B, L, D] or [L, D], got {type(x).__name__}.")
    if x.ndim == 2:
        x = x.unsqueeze(0)  # [1, L, D]
    if x.ndim != 3:
        raise FeatureError(f"{name} has shape {tuple(x.shape)}; pass [B, L, D] or [L, D].")
    if 0 in x.shape:
        raise FeatureError(f"{name} has shape {tuple(x.shape)}; it needs at least one row, one token and one dim.")
    if not x.is_floating_point():
        raise FeatureError(f"{name} has dtype {x.dtype}; pass floating-point embeddings (e.g. `{name}.float()`).")
    if not bool(torch.isfinite(x).all()):
        raise FeatureError(
            f"{name} contains NaN or Inf; fix the encoder output (e.g. an fp16 overflow: run it in bfloat16/float32) "
            "or clean it with `torch.nan_to_num` before blending."
        )
    return x


def _check_alpha(alpha: Any, mode: str) -> float:
    if isinstance(alpha, torch.Tensor) and alpha.numel() == 1:
        alpha = alpha.item()
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not math.isfinite(float(alpha)):
        raise ConfigError(f"alpha must be a finite number, got {alpha!r}.")
    alpha = float(alpha)
    if mode not in _ALPHA_NOT_MIXING and not 0.0 <= alpha <= 1.0:
        raise ConfigError(
            f"alpha={alpha} is outside [0, 1] for mode {mode!r}, where it is the VL mixing weight "
            "(0 keeps the text, 1 takes the VL); pass a value in [0, 1]."
        )
    return alpha


def _check_unit(x: Any, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, Real) or not 0.0 <= float(x) <= 1.0:
        raise ConfigError(f"{name}={x!r} must be a number in [0, 1] (a VL mixing weight).")
    return float(x)


def _check_positive(x: Any, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, Real) or not (math.isfinite(float(x)) and float(x) > 0):
        raise ConfigError(f"{name}={x!r} must be a finite number > 0.")
    return float(x)


def _common_batch(*named: tuple[str, int]) -> int:
    sizes = {b for _, b in named if b != 1}
    if len(sizes) > 1:
        desc = ", ".join(f"{n} B={b}" for n, b in named)
        raise FeatureError(f"Batch sizes differ ({desc}); pass equal batches, or a batch of 1 to broadcast.")
    return sizes.pop() if sizes else 1


def _check_batch(name: str, b: int, batch: int) -> None:
    if b not in (1, batch):
        raise FeatureError(
            f"{name} has batch {b} but the embeddings have batch {batch}; pass {batch} rows or 1 to broadcast."
        )


def _compute_dtype(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


# ---- length policy --------------------------------------------------------------------------------------------


def _resolve_length(lt: int, lv: int, length: str | None) -> int:
    """Output length for the token-pairing modes."""
    if lt == lv:
        return lt
    if length is None:
        raise ConfigError(
            f"text_embeds has {lt} tokens but vl_embeds has {lv}; choose how to pair them with "
            "length='truncate' (cut VL to the text length, keeps only the first tokens), "
            "length='interpolate' (resample VL to the text length) or length='pad' (zero-pad the shorter to "
            "max(Lt, Lv)). There is no default."
        )
    if length == "truncate":
        if lv < lt:
            raise ConfigError(
                f"length='truncate' keeps the text length ({lt}) and cuts VL, but vl_embeds has only {lv} tokens; "
                "use length='pad' or length='interpolate'."
            )
        return lt
    if length == "interpolate":
        return lt
    return max(lt, lv)  # pad


def _fit(x: torch.Tensor, out_len: int, length: str | None) -> torch.Tensor:
    """`[B, L, C]` -> `[B, out_len, C]` by the policy (identity when lengths already agree)."""
    n = x.shape[1]
    if n == out_len:
        return x
    if length == "truncate":
        return x[:, :out_len]
    if length == "interpolate":
        return resample_tokens(x, out_len)
    return F.pad(x, (0, 0, 0, out_len - n))  # pad: zeros after the last token


# ---- modes ----------------------------------------------------------------------------------------------------


def _lerp(t: torch.Tensor, v: torch.Tensor, a: float | torch.Tensor) -> torch.Tensor:
    """`(1 - a) * t + a * v`; exact at a = 0 (t) and a = 1 (v)."""
    return (1 - a) * t + a * v  # [B, L, D]


def _slerp(t: torch.Tensor, v: torch.Tensor, a: float) -> torch.Tensor:
    """Per-token slerp of directions with linear interpolation of norms. `t`, `v` `[B, L, D]`.

    Computed in float64. Near-parallel tokens (sin w < 1e-6) lerp the unit directions and renormalise (error
    O(w^3) against slerp, no division by sin w); near-antiparallel ones rotate through a fixed plane; a zero token,
    or antiparallel tokens when D == 1, give `linear`.
    """
    td, vd = t.double(), v.double()
    nt = td.norm(dim=-1, keepdim=True)  # [B, L, 1]
    nv = vd.norm(dim=-1, keepdim=True)  # [B, L, 1]
    tiny = torch.finfo(torch.float64).tiny
    ut = td / nt.clamp_min(tiny)  # [B, L, D]
    uv = vd / nv.clamp_min(tiny)  # [B, L, D]
    # angle, stable near 0 and near pi: w = 2 atan2(|ut - uv|, |ut + uv|)
    w = 2 * torch.atan2((ut - uv).norm(dim=-1, keepdim=True), (ut + uv).norm(dim=-1, keepdim=True))  # [B, L, 1]
    # unit vector orthogonal to ut in the plane of (ut, uv); its raw norm is sin w
    perp = uv - (uv * ut).sum(-1, keepdim=True) * ut  # [B, L, D]
    perp_n = perp.norm(dim=-1, keepdim=True)  # [B, L, 1]
    flat = perp_n < _SLERP_EPS  # [B, L, 1] plane undefined or ill-conditioned
    antiparallel = flat & (w > math.pi / 2)  # [B, L, 1]
    # antiparallel: a fixed plane, from the basis vector least aligned with ut
    k = ut.abs().argmin(dim=-1, keepdim=True)  # [B, L, 1]
    e = torch.zeros_like(ut).scatter_(-1, k, 1.0)  # [B, L, D]
    alt = e - (e * ut).sum(-1, keepdim=True) * ut  # [B, L, D]
    alt = alt / alt.norm(dim=-1, keepdim=True).clamp_min(tiny)  # [B, L, D]
    p = torch.where(antiparallel, alt, perp / perp_n.clamp_min(tiny))  # [B, L, D]
    direction = torch.cos(a * w) * ut + torch.sin(a * w) * p  # [B, L, D]
    # near-parallel: normalised lerp of the directions
    nlerp = (1 - a) * ut + a * uv  # [B, L, D]
    nlerp = nlerp / nlerp.norm(dim=-1, keepdim=True).clamp_min(tiny)
    direction = torch.where(flat & ~antiparallel, nlerp, direction)  # [B, L, D]
    out = ((1 - a) * nt + a * nv) * direction  # [B, L, D]
    linear = (nt <= tiny) | (nv <= tiny)  # [B, L, 1]
    if t.shape[-1] == 1:
        linear = linear | antiparallel  # no orthogonal direction in 1-D
    out = torch.where(linear, _lerp(td, vd, a), out).to(t.dtype)  # [B, L, D]
    if a == 0.0:  # endpoints exactly
        return t.clone()
    if a == 1.0:
        return v.clone()
    return out


def _dim_selection(dims: Any, dim_mask: Any, d: int, device: torch.device) -> torch.Tensor:
    """`dims=(start, stop)` or `dim_mask` `[D]` bool -> `[D]` bool."""
    if (dims is None) == (dim_mask is None):
        raise ConfigError(
            "style_only needs exactly one of dims=(start, stop) (a range of feature dimensions, 0 <= start < stop "
            f"<= D={d}) or dim_mask (a bool tensor of shape [{d}])."
        )
    if dims is not None:
        ok = (
            isinstance(dims, (tuple, list))
            and len(dims) == 2
            and all(isinstance(i, int) and not isinstance(i, bool) for i in dims)
        )
        if not ok or not 0 <= dims[0] < dims[1] <= d:
            raise ConfigError(
                f"dims={dims!r} is not a valid range; pass dims=(start, stop) with integers 0 <= start < stop <= D={d}."
            )
        sel = torch.zeros(d, dtype=torch.bool, device=device)
        sel[dims[0] : dims[1]] = True
        return sel
    if not isinstance(dim_mask, torch.Tensor) or dim_mask.dtype != torch.bool or tuple(dim_mask.shape) != (d,):
        desc = (
            f"{dim_mask.dtype} {tuple(dim_mask.shape)}"
            if isinstance(dim_mask, torch.Tensor)
            else type(dim_mask).__name__
        )
        raise ConfigError(f"dim_mask must be a bool tensor of shape [{d}] (True = blend this dim), got {desc}.")
    if not bool(dim_mask.any()):
        raise ConfigError(
            "dim_mask selects no dimension; set at least one entry True (or use mode='linear' with alpha=0)."
        )
    return dim_mask.to(device)


def _graduated_alpha(
    n: int, alpha: float, dtype: torch.dtype, device: torch.device, *, alpha_start: Any = 0.0,
    alpha_end: Any = None, ramp: str = "linear",
) -> torch.Tensor:
    """`[n]` per-token weights `a0 + (a1 - a0) * r(u)`, `u = i / (n - 1)`."""
    a0 = _check_unit(alpha_start, "alpha_start")
    a1 = _check_unit(alpha if alpha_end is None else alpha_end, "alpha_end")
    if ramp not in RAMPS:
        raise ConfigError(f"ramp={ramp!r} is not a ramp; pass one of {', '.join(RAMPS)}.")
    u = torch.arange(n, dtype=torch.float64, device=device) / max(n - 1, 1)  # [n]
    r = {"linear": u, "ease_in": u * u, "ease_out": 1 - (1 - u) ** 2}[ramp]
    return (a0 + (a1 - a0) * r).to(dtype)  # [n]


def _attention_alpha(
    weights: Any, batch: int, lv: int, out_len: int, length: str | None, dtype: torch.dtype, device: torch.device,
) -> torch.Tensor:
    """VLM attention `[B, Lv]` / `[B, L]` (or 1-D) -> normalised per-token weights `[B, L]` in [0, 1]."""
    if weights is None:
        raise ConfigError(
            "mode='attention_weighted' needs weights=<[B, L] non-negative per-token weights> (e.g. the attention "
            "each VL token receives in the VLM); without them use mode='linear'."
        )
    if not isinstance(weights, torch.Tensor) or weights.ndim not in (1, 2) or not weights.is_floating_point():
        desc = (
            f"{weights.dtype} {tuple(weights.shape)}" if isinstance(weights, torch.Tensor) else type(weights).__name__
        )
        raise ConfigError(f"weights must be a floating tensor [B, L] or [L], got {desc}.")
    w = weights.to(device=device, dtype=dtype)
    w = w.unsqueeze(0) if w.ndim == 1 else w  # [Bw, Lw]
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ConfigError("weights must be finite and non-negative (attention mass per token); clean them first.")
    _check_batch("weights", w.shape[0], batch)
    lw = w.shape[1]
    if lw == out_len:
        pass  # already one weight per output token
    elif lw == lv:
        w = _fit(w.unsqueeze(-1), out_len, length).squeeze(-1)  # aligned like the VL tokens -> [Bw, L]
    else:
        raise ConfigError(
            f"weights has {lw} entries per row; pass one per VL token ({lv}) or one per output token ({out_len})."
        )
    peak = w.amax(dim=1, keepdim=True)  # [Bw, 1]
    w = torch.where(peak > 0, w / peak.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(w))  # [Bw, L]
    return w.expand(batch, -1)  # [B, L]


def _style_delta(
    t: torch.Tensor, v: torch.Tensor, ta: torch.Tensor, out_len: int, length: str | None, alpha: float, batch: int,
    dtype: torch.dtype, *, vl_neutral: Any = None, rescale: bool = True,
) -> torch.Tensor:
    """`t + alpha * (v - n)`, then per-token rescale to `|t|`."""
    if vl_neutral is None:
        raise ConfigError(
            "mode='style_delta' needs vl_neutral=<VL states of a neutral reference> (same shape as vl_embeds, e.g. "
            "from a flat grey image with the same prompt); the delta is vl_embeds - vl_neutral."
        )
    if not isinstance(rescale, bool):
        raise ConfigError(f"rescale must be True or False, got {rescale!r}.")
    n = _as_tokens(vl_neutral, "vl_neutral")  # [Bn, Lv, D]
    if tuple(n.shape[1:]) != tuple(v.shape[1:]):
        raise FeatureError(
            f"vl_neutral has shape {tuple(n.shape)} but vl_embeds is {tuple(v.shape)}; extract both with the same "
            "prompt, layer and token selection so tokens and width match (batch 1 broadcasts)."
        )
    if n.device != v.device:
        raise FeatureError(f"vl_neutral is on {n.device} but vl_embeds is on {v.device}; move it to the same device.")
    _check_batch("vl_neutral", n.shape[0], batch)
    delta = v - n.to(dtype)  # [B, Lv, D]
    out = ta + alpha * _fit(delta, out_len, length)  # [B, L, D]
    if not rescale:
        return out
    lt = t.shape[1]
    target = ta.norm(dim=-1, keepdim=True)  # [B, L, 1]
    current = out.norm(dim=-1, keepdim=True)  # [B, L, 1]
    real_text = (torch.arange(out_len, device=t.device) < lt).view(1, -1, 1)  # [1, L, 1]
    scale = torch.where(real_text & (current > 0), target / current.clamp_min(torch.finfo(dtype).tiny), 1.0)
    return out * scale  # [B, L, D]


def _gram(x: torch.Tensor) -> torch.Tensor:
    """`x^T x / L` per batch item: `[B, L, D]` -> `[B, D, D]`."""
    return x.transpose(1, 2) @ x / x.shape[1]


def _gram_blend(t: torch.Tensor, v: torch.Tensor, *, steps: Any = 50, lr: Any = 0.01, lam: Any = 1.0) -> torch.Tensor:
    """Adam on `o` (init `t`) for `steps` iterations of `||G(o) - G(v)||^2 + lam ||o - t||^2`. Returns `[B, Lt, D]`."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"steps={steps!r} must be an integer >= 0 (the number of Adam iterations).")
    lr = _check_positive(lr, "lr")
    if isinstance(lam, bool) or not isinstance(lam, Real) or not (math.isfinite(float(lam)) and float(lam) >= 0):
        raise ConfigError(f"lam={lam!r} must be a finite number >= 0 (weight of ||out - text||^2).")
    lam = float(lam)
    # clones outside inference mode are ordinary tensors, so this works inside no_grad / inference_mode too
    with torch.inference_mode(False), torch.enable_grad():
        anchor = t.detach().clone()  # [B, Lt, D]
        g_vl = _gram(v.detach().clone())  # [B, D, D]
        o = anchor.clone().requires_grad_(True)  # [B, Lt, D]
        opt = torch.optim.Adam([o], lr=lr)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = (_gram(o) - g_vl).pow(2).sum() + lam * (o - anchor).pow(2).sum()
            loss.backward()
            opt.step()
        return o.detach()
