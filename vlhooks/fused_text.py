"""The extras' text path in fewer kernels on CUDA: the block's modulation of the extra tokens and the key norm with
its rotary embedding, one Triton kernel each instead of 2-3 and 1-11 eager ones per block.

- `modulate(x, scale, shift)` is `x * (1 + scale) + shift` with eager's three bf16 / fp16 roundings (the same bits).
- `norm_rope(norm, k, cos, sin)` is diffusers' `RMSNorm` (two roundings: after the normalisation, after the weight)
  or `torch.nn.RMSNorm` (one rounding), then the rotation of interleaved pairs `(k[2i], k[2i + 1])` by the angle
  whose `cos` / `sin` are given, rounded once: the form of Z-Image's complex RoPE and of diffusers'
  `apply_rotary_emb(use_real=True, use_real_unbind_dim=-1)`. The mean of squares sums in another order than
  PyTorch's, so a normalised value can land one rounding away from eager's.

Both kernels compile with `enable_fp_fusion=False`: otherwise LLVM turns the f32 -> bf16 -> f32 round trips into
bf16 arithmetic and contracts multiply and add into one `fma.rn.bf16`, skipping the middle rounding (a quarter of the
modulated values then differ from eager's by one ulp, measured on an H200 with Triton 3.6).

Used in eager inference on CUDA (no autograd, no `torch.compile`) where Triton is present and the dtypes agree;
everywhere else the families' eager code runs. `VLHOOKS_FUSED_TEXT=0` switches it off.
"""

from __future__ import annotations

import functools
import os

import torch
from diffusers.models.normalization import RMSNorm
from torch import nn


@functools.lru_cache(maxsize=1)
def _kernels():
    """`(modulate, norm_rope)` Triton kernels, compiled on first use; None where Triton is missing."""
    try:
        import triton
        import triton.language as tl
    except Exception:  # CPU wheels of torch ship without Triton
        return None

    @triton.jit
    def modulate_kernel(X, S, T, OUT, sx_r, sx_n, ss_r, st_r, N, D,
                        HAS_SHIFT: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0)  # r * N + n
        r = row // N
        n = row % N
        offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        m = offs < D
        dt = OUT.dtype.element_ty
        x = tl.load(X + r * sx_r + n * sx_n + offs, mask=m, other=0.0).to(tl.float32)
        s = tl.load(S + r * ss_r + offs, mask=m, other=0.0).to(tl.float32)
        t = (1.0 + s).to(dt).to(tl.float32)  # `1 + scale`, rounded as eager rounds it
        y = (x * t).to(dt)
        if HAS_SHIFT:
            sh = tl.load(T + r * st_r + offs, mask=m, other=0.0).to(tl.float32)
            y = (y.to(tl.float32) + sh).to(dt)
        tl.store(OUT + row * D + offs, y, mask=m)

    @triton.jit
    def norm_rope_kernel(K, W, COS, SIN, OUT, sk_r, sk_n, sk_h, sc_n, sc_j, ss_n, ss_j,
                         N, H, V, eps,
                         HALF: tl.constexpr, BLOCK_V: tl.constexpr, HAS_W: tl.constexpr,
                         TWO_ROUNDINGS: tl.constexpr, HAS_ROPE: tl.constexpr):
        v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)  # one head vector of one token of one row each
        mv = v < V
        r = v // (N * H)
        n = (v // H) % N
        h = v % H
        j = tl.arange(0, HALF)
        base = K + (r * sk_r + n * sk_n + h * sk_h)[:, None] + 2 * j[None, :]  # [BLOCK_V, HALF]
        e = tl.load(base, mask=mv[:, None], other=0.0).to(tl.float32)  # k[2j]
        o = tl.load(base + 1, mask=mv[:, None], other=0.0).to(tl.float32)  # k[2j + 1]
        var = (tl.sum(e * e, 1) + tl.sum(o * o, 1)) / (2 * HALF)
        rs = tl.math.rsqrt(var + eps)[:, None]
        dt = OUT.dtype.element_ty
        e = e * rs
        o = o * rs
        if TWO_ROUNDINGS:  # diffusers' RMSNorm: normalised, rounded, times the weight, rounded
            e = e.to(dt).to(tl.float32)
            o = o.to(dt).to(tl.float32)
        if HAS_W:
            e = e * tl.load(W + 2 * j).to(tl.float32)[None, :]
            o = o * tl.load(W + 2 * j + 1).to(tl.float32)[None, :]
        e = e.to(dt).to(tl.float32)
        o = o.to(dt).to(tl.float32)
        if HAS_ROPE:
            c = tl.load(COS + n[:, None] * sc_n + j[None, :] * sc_j, mask=mv[:, None], other=1.0)
            s = tl.load(SIN + n[:, None] * ss_n + j[None, :] * ss_j, mask=mv[:, None], other=0.0)
            e, o = e * c - o * s, o * c + e * s
        out = OUT + v[:, None] * (2 * HALF) + 2 * j[None, :]
        tl.store(out, e.to(dt), mask=mv[:, None])
        tl.store(out + 1, o.to(dt), mask=mv[:, None])

    return modulate_kernel, norm_rope_kernel


def enabled() -> bool:
    """`VLHOOKS_FUSED_TEXT`: `1` (default) or `0` (the eager text path everywhere)."""
    return os.environ.get("VLHOOKS_FUSED_TEXT", "1") != "0"


def _usable(*tensors: torch.Tensor) -> bool:
    t = tensors[0]
    return (t.is_cuda and t.dtype in (torch.bfloat16, torch.float16) and all(x.dtype == t.dtype for x in tensors)
            and enabled() and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and _kernels() is not None)


def modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
    """`x * (1 + scale) + shift` (`shift` optional): `x` `[R or 1, N, D]`, `scale` / `shift` `[R or 1, 1, D]`;
    one kernel where usable, the same bits as eager."""
    parts = (x, scale) if shift is None else (x, scale, shift)
    if not (_usable(*parts) and x.ndim == 3 and all(p.ndim == 3 and p.shape[1] == 1 and p.stride(-1) == 1
                                                    for p in parts[1:]) and x.stride(-1) == 1):
        out = x * (1 + scale)
        return out if shift is None else out + shift
    R = max(p.shape[0] for p in parts)
    _, N, D = x.shape
    out = torch.empty(R, N, D, dtype=x.dtype, device=x.device)

    def row_stride(t):
        return 0 if t.shape[0] == 1 else t.stride(0)

    sh = scale if shift is None else shift
    block = min(1024, 1 << (D - 1).bit_length())
    _kernels()[0][(R * N, -(-D // block))](x, scale, sh, out, row_stride(x), x.stride(1), row_stride(scale),
                                            row_stride(sh), N, D, HAS_SHIFT=shift is not None, BLOCK_D=block,
                                            enable_fp_fusion=False)
    return out


def norm_rope(norm: nn.Module, k: torch.Tensor, cos: torch.Tensor | None = None,
              sin: torch.Tensor | None = None) -> torch.Tensor | None:
    """`norm(k)` then, with `cos` / `sin` (`[N, Dh/2]` float32, any strides), the rotation of each interleaved
    pair of `k`'s last dimension; `k` `[R, N, H, Dh]`. One kernel where usable, else None (the caller runs eager).
    `norm` is diffusers' `RMSNorm` or `torch.nn.RMSNorm` over `Dh`, without bias."""
    if type(norm) is RMSNorm:
        two, w, eps = True, norm.weight, norm.eps
        if getattr(norm, "bias", None) is not None:
            return None
    elif type(norm) is nn.RMSNorm:
        two, w, eps = False, norm.weight, norm.eps
        if eps is None:
            eps = torch.finfo(k.dtype).eps
    else:
        return None
    Dh = k.shape[-1]
    shape = tuple(norm.dim if two else norm.normalized_shape)
    if (k.ndim != 4 or k.stride(-1) != 1 or Dh & (Dh - 1) or Dh < 2 or shape != (Dh,) or not _usable(k)
            or (w is not None and (w.dtype != k.dtype or not w.is_contiguous()))):
        return None
    rope = cos is not None
    if rope and (cos.dtype != torch.float32 or sin.dtype != torch.float32 or cos.shape != (k.shape[1], Dh // 2)
                 or sin.shape != cos.shape):
        return None
    R, N, H, _ = k.shape
    out = torch.empty(R, N, H, Dh, dtype=k.dtype, device=k.device)
    V = R * N * H
    block = 16
    c, s = (cos, sin) if rope else (k, k)
    _kernels()[1][(-(-V // block),)](
        k, k if w is None else w, c, s, out, k.stride(0), k.stride(1), k.stride(2),
        c.stride(0) if rope else 0, c.stride(1) if rope else 0, s.stride(0) if rope else 0, s.stride(1) if rope else 0,
        N, H, V, float(eps), HALF=Dh // 2, BLOCK_V=block, HAS_W=w is not None, TWO_ROUNDINGS=two, HAS_ROPE=rope,
        enable_fp_fusion=False)
    return out
