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

`linear_pair` / `matmul_pair` compute the extra tokens' K and V projections (at most 128 rows) in one kernel instead
of cuBLAS's two GEMMs (which take 24 us where one GEMM over the two weights stacked takes 19, Z-Image's 64 x 3840:
benchmarks/NOTES.md section 14). In the whole model, kernel minus cuBLAS per repeat (three calls, section 15): Z-Image
joint 64 -0.0036 (every repeat), +0.0010, +0.0030 at the median, Flux.1 +0.0008, -0.0020, -0.0010: within the
machine spread; with it, the decoupled `kv` adapter was faster than diffusers' IP-Adapter processor in every repeat
of both calls that measured it (without it, in one call, not every repeat). It runs for weights up to 4096 wide
(what was measured); `VLHOOKS_FUSED_KV=always` also runs it on wider ones (Flux.2's 6144: +0.0023 [-0.0005,
+0.0041], so not by default), `VLHOOKS_FUSED_KV=0` never.
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

    @triton.jit
    def linear_pair_kernel(X, W, B, OUT, M, NO, KD, sx_m, sw_n, DW, DB,
                           HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr):
        # program (j, w) computes columns [j * BLOCK_N, (j + 1) * BLOCK_N) of x @ W_w^T for all M rows (M <= BLOCK_M),
        # streaming those weight rows once and accumulating in float32; the second weight and bias lie DW / DB
        # elements from the first (an offset, not a branch, so that the loads keep their alignment and vectorise)
        pid_n = tl.program_id(0)
        second = tl.program_id(1).to(tl.int64)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        in_m = offs_m < M
        x_ptr = X + offs_m[:, None] * sx_m + offs_k[None, :]
        w_ptr = W + second * DW + offs_n[:, None] * sw_n + offs_k[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for _ in range(0, KD, BLOCK_K):  # KD % BLOCK_K == 0, NO % BLOCK_N == 0 (the caller checks)
            x = tl.load(x_ptr, mask=in_m[:, None], other=0.0)
            w = tl.load(w_ptr)
            acc = tl.dot(x, tl.trans(w), acc)
            x_ptr += BLOCK_K
            w_ptr += BLOCK_K
        if HAS_BIAS:
            acc = acc + tl.load(B + second * DB + offs_n).to(tl.float32)[None, :]
        o_ptr = OUT + second * M * NO + offs_m[:, None] * NO + offs_n[None, :]
        tl.store(o_ptr, acc.to(OUT.dtype.element_ty), mask=in_m[:, None])

    return modulate_kernel, norm_rope_kernel, linear_pair_kernel


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


def _plain_linear(m: nn.Module) -> bool:
    """`m(x)` is `F.linear(x, m.weight, m.bias)` (an `nn.Linear`, or a view of a fused one's rows that says so)."""
    return isinstance(m, nn.Linear) and (type(m) is nn.Linear or getattr(type(m), "plain_linear", False))


# (BLOCK_N, BLOCK_K, num_warps, num_stages) by the rows' block; `benchmarks/micro_extras.py gemm` times others
_PAIR_CONFIG = {16: (64, 128, 4, 4), 32: (64, 128, 4, 4), 64: (64, 128, 4, 4), 128: (64, 128, 8, 3)}


def linear_pair(x: torch.Tensor, a: nn.Module, b: nn.Module,
                config: tuple[int, int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`(a(x), b(x))` for two plain Linears (`nn.Linear`, or a view of a fused one's rows that says so) through
    `matmul_pair`; None where that does not serve them (the caller runs the Linears)."""
    if not (_plain_linear(a) and _plain_linear(b)):
        return None
    return matmul_pair(x, a.weight, b.weight, a.bias, b.bias, config)


def matmul_pair(x: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor, ba: torch.Tensor | None = None,
                bb: torch.Tensor | None = None,
                config: tuple[int, int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`(F.linear(x, wa, ba), F.linear(x, wb, bb))` for `x` `[..., D]` of at most 128 rows and two `[O, D]` weights
    of one shape (any two tensors, or row ranges of one): one Triton kernel that streams each weight once, over
    twice the programs of one GEMM (each of cuBLAS's two GEMMs of 16-128 rows tiles the output into too few blocks
    to reach the bandwidth, see the module docstring). Float32 accumulation, the bias added before the one rounding, as cuBLAS; the
    order of the sums differs, so an output can land one rounding away. None where not usable."""
    rows = x.numel() // x.shape[-1] if x.ndim else 0
    mode = os.environ.get("VLHOOKS_FUSED_KV", "1")
    if mode == "0" or (mode != "always" and x.shape[-1] > 4096):  # wider weights: not measured in a whole model
        return None
    if (wa.ndim != 2 or wa.shape != wb.shape or wa.shape[1] != x.shape[-1] or not 0 < rows <= 128
            or not _usable(x, wa, wb) or wa.stride(1) != 1 or wb.stride(1) != 1 or (ba is None) != (bb is None)):
        return None
    if ba is not None and not (_usable(x, ba, bb) and ba.is_contiguous() and bb.is_contiguous()):
        return None
    no, kd = wa.shape
    block_m = max(16, 1 << (rows - 1).bit_length())
    bn, bk, warps, stages = config or _PAIR_CONFIG[block_m]
    size = wa.element_size()
    dw, db = wb.data_ptr() - wa.data_ptr(), 0 if ba is None else bb.data_ptr() - ba.data_ptr()
    if no % bn or kd % bk or wa.stride(0) != wb.stride(0) or dw % size or db % size:
        return None
    x2 = x.reshape(rows, kd)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(2, rows, no, dtype=x.dtype, device=x.device)
    _kernels()[2][(no // bn, 2)](
        x2, wa, wa if ba is None else ba, out, rows, no, kd, x2.stride(0), wa.stride(0), dw // size, db // size,
        HAS_BIAS=ba is not None, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    shape = (*x.shape[:-1], no)
    return out[0].view(shape), out[1].view(shape)
