"""Joint attention with extra keys as two passes on CUDA: the block's own attention by cuDNN / flash with its
log-sum-exp, then one Triton kernel that attends to the extra keys and merges the two by their log-sum-exps.

Why: appending `N` keys to a block's `L` makes cuDNN's kernel ~10-15 % slower whenever `L + N` leaves a multiple of
128 (partly empty tiles, bounds checks in every tile), far more than the extra keys' FLOPs. Two passes keep the
stock kernel at its own key length; the merge

    o = o_main + sigmoid(lse_extra - lse_main) * (o_extra - o_main)

equals softmax attention over the concatenated keys up to rounding (bf16: about one ulp), and the kernel writes it
in the `[B, L, H, Dh]` layout the block's output projection reads. Strengths, padding and spatial masks are a
logit bias on the extra keys alone, applied inside the extra pass, so the main pass stays on cuDNN without a bias.
Used by the family processors for joint mode on every row with no mask of the block's own
(`attention.fused_joint`), eager inference on CUDA, when `pays_off`; everything else, and any machine without
Triton, takes the concatenation. `VLHOOKS_FUSED_ATTENTION=0` switches it off. The kernel's programs run heads-first
(neighbours read one tile of tokens across all heads); `VLHOOKS_MERGE_ORDER=tiles` runs them tile-first.
"""

from __future__ import annotations

import functools
import os

import torch

aten = torch.ops.aten


@functools.lru_cache(maxsize=1)
def _kernel():
    """The Triton kernel, compiled on first use; None where Triton is missing."""
    try:
        import triton
        import triton.language as tl
    except Exception:  # CPU wheels of torch ship without Triton
        return None

    @triton.autotune(
        configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=2)
                 for m, n, w in ((64, 64, 4), (64, 64, 8), (128, 64, 8), (32, 64, 4), (128, 64, 4), (32, 64, 2),
                                 (64, 128, 4), (128, 128, 8))],
        key=["N", "HEAD_DIM", "HAS_KB", "HAS_QW", "HEADS_FIRST"],
        # key tiles of 128 only where there are more than 64 extra keys (else half of every tile is padding)
        prune_configs_by={"early_config_prune": lambda configs, nargs, **kw: [
            c for c in configs if c.kwargs["BLOCK_N"] <= max(64, nargs["N"])]},
    )
    @triton.jit
    def extra_merge(Q, K, V, O1, LSE1, OUT, KB, QW, SEG,
                    sq_b, sq_l, sq_h, sk_b, sk_n, sk_h, sv_b, sv_n, sv_h,
                    so_b, so_l, so_h, sl_b, sl_h, sl_l, sout_b, sout_l, sout_h,
                    skb_b, skb_n, sqw_b, sqw_l, sqw_s,
                    H, L, N, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    HAS_KB: tl.constexpr, HAS_QW: tl.constexpr, HEADS_FIRST: tl.constexpr):
        if HEADS_FIRST:  # programs side by side read one tile of tokens across all heads: one span of memory
            pid_bh = tl.program_id(0)
            pid_m = tl.program_id(1)
        else:
            pid_m = tl.program_id(0)
            pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        in_m = offs_m < L
        q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_l + offs_d[None, :], mask=in_m[:, None], other=0.0)
        # the main pass's output and LSE are loaded up front, so that their reads overlap the extra pass
        lse_main = tl.load(LSE1 + b * sl_b + h * sl_h + offs_m * sl_l, mask=in_m, other=0.0)
        o_main = tl.load(O1 + b * so_b + h * so_h + offs_m[:, None] * so_l + offs_d[None, :], mask=in_m[:, None],
                         other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for start in range(0, N, BLOCK_N):  # online softmax over the extra keys, in log2 units
            offs_n = start + tl.arange(0, BLOCK_N)
            in_n = offs_n < N
            if HAS_KB or HAS_QW:
                bias = tl.where(in_n[None, :], tl.zeros([BLOCK_M, BLOCK_N], tl.float32), float("-inf"))
                if HAS_KB:  # per row and key: log(strength), -inf on padding (natural log -> log2 units)
                    kb = tl.load(KB + b * skb_b + offs_n * skb_n, mask=in_n, other=0.0)
                    bias = bias + kb[None, :] * 1.4426950408889634
                if HAS_QW:  # per query and reference: log of the spatial mask's weight
                    seg = tl.load(SEG + offs_n, mask=in_n, other=0)
                    qw = tl.load(QW + b * sqw_b + offs_m[:, None] * sqw_l + seg[None, :] * sqw_s,
                                 mask=in_m[:, None] & in_n[None, :], other=0.0)
                    bias = bias + qw * 1.4426950408889634
                # a tile no query here sees (another reference's keys under spatial masks, a row at strength 0)
                live = tl.max(tl.max(bias, 1), 0) > float("-inf")
            else:
                bias = tl.where(in_n, 0.0, float("-inf"))[None, :]  # [1, BLOCK_N]
                live = start < N
            if live:
                k = tl.load(K + b * sk_b + h * sk_h + offs_n[:, None] * sk_n + offs_d[None, :], mask=in_n[:, None],
                            other=0.0)
                s = tl.dot(q, tl.trans(k)) * qk_scale + bias  # [BLOCK_M, BLOCK_N]
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a query that sees no extra key yet
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                v = tl.load(V + b * sv_b + h * sv_h + offs_n[:, None] * sv_n + offs_d[None, :], mask=in_n[:, None],
                            other=0.0)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                m_i = m_new
        seen = l_i > 0.0  # False where every extra key is masked for this query: the main pass alone
        l_safe = tl.where(seen, l_i, 1.0)
        lse_extra = (m_i + tl.log2(l_safe)) * 0.6931471805599453  # natural log, as the main pass returns it
        o_main = o_main.to(tl.float32)
        w = tl.where(seen, 1.0 / (1.0 + tl.exp(lse_main - lse_extra)), 0.0)  # the extra keys' share of the mass
        o = o_main + w[:, None] * (acc / l_safe[:, None] - o_main)
        tl.store(OUT + b * sout_b + h * sout_h + offs_m[:, None] * sout_l + offs_d[None, :],
                 o.to(OUT.dtype.element_ty), mask=in_m[:, None])

    return extra_merge


def enabled() -> bool:
    """`VLHOOKS_FUSED_ATTENTION`: `1` (default) where it pays off, `always` wherever usable, `0` never."""
    return os.environ.get("VLHOOKS_FUSED_ATTENTION", "1") != "0"


def pays_off(length: int, n_extra: int, biased: bool = False) -> bool:
    """Whether two passes beat one concatenated call (measured: `benchmarks/micro_attention.py fused`).

    Unbiased: when the block's own key length is a multiple of 128 and appending would leave it, for up to 128
    extra keys (beyond, the kernel's re-reading of the extra K/V per query tile costs more than the cliff).
    Biased (strengths, padding, spatial masks): for up to 1024 extra keys, since the concatenation then needs a
    dense float bias, which moves SDPA off cuDNN onto the memory-efficient kernel (3.6x slower at 4224 keys)."""
    if os.environ.get("VLHOOKS_FUSED_ATTENTION") == "always" or biased:
        return 0 < n_extra <= 1024
    return 0 < n_extra <= 128 and length % 128 == 0 and (length + n_extra) % 128 != 0


def usable(x: torch.Tensor, extra_k: torch.Tensor) -> bool:
    """Whether `joint_attention` can serve a block whose input is `x` (`[B, L, ...]`) with extra keys `extra_k`
    (`[1 or B, N, H, Dh]`): CUDA, bf16 / fp16, head size 64 or 128, inference, eager, Triton present."""
    return (
        x.is_cuda and enabled() and x.dtype in (torch.bfloat16, torch.float16) and extra_k.shape[-1] in (64, 128)
        and extra_k.dtype == x.dtype and extra_k.shape[0] in (1, x.shape[0])
        and not torch.is_grad_enabled() and not torch.compiler.is_compiling() and _kernel() is not None
    )


def applies(backend, x: torch.Tensor, length: int, extra_k: torch.Tensor, biased: bool = False) -> bool:
    """The processors' one test: the block uses diffusers' default attention backend (`backend` None), the kernel
    can serve these tensors (`usable`), and two passes beat appending the extra keys to `length` own keys."""
    return backend is None and usable(x, extra_k) and pays_off(length, extra_k.shape[1], biased)


def _main_pass(q, k, v):
    """The block's own attention with its log-sum-exp (`[B, H, L]`, natural log): cuDNN, else flash.
    `q, k, v` are `[B, H, L, Dh]` (views of the blocks' `[B, L, H, Dh]` tensors)."""
    try:
        out, lse = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)[:2]
    except RuntimeError:
        out, lse = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)[:2]
    return out, lse.reshape(lse.shape[0], lse.shape[1], -1)


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ek: torch.Tensor, ev: torch.Tensor,
                    key_bias: torch.Tensor | None = None, query_bias: torch.Tensor | None = None,
                    key_segment: torch.Tensor | None = None, heads_first: bool | None = None) -> torch.Tensor:
    """Softmax attention of `q` over `[k; ek]` and `[v; ev]`, as two passes (see the module docstring), with an
    optional additive logit bias on the extra keys only (natural log; `-inf` excludes a key):
    `key_bias[b, n] + query_bias[b, i, key_segment[n]]`.

    `q, k, v` `[B, L, H, Dh]` (the block's own), `ek, ev` `[1 or B, N, H, Dh]`; `key_bias` `[1 or B, N]` float32
    (per row: log strength, `-inf` on padding); `query_bias` `[1 or B, L, S]` float32 (per query: log of each of
    S references' spatial-mask weight) with `key_segment` `[N]` int32 (the reference of each extra key). A query
    that sees no extra key gets the main pass alone. Returns `[B, Lq, H, Dh]` contiguous. Call only where
    `usable`."""
    o1, lse1 = _main_pass(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # [B, H, L, Dh], [B, H, L]
    return merge_extra(q, ek, ev, o1, lse1, key_bias, query_bias, key_segment, heads_first)


def merge_extra(q: torch.Tensor, ek: torch.Tensor, ev: torch.Tensor, o1: torch.Tensor, lse1: torch.Tensor,
                key_bias: torch.Tensor | None = None, query_bias: torch.Tensor | None = None,
                key_segment: torch.Tensor | None = None, heads_first: bool | None = None,
                config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """The second pass alone: `q` `[B, L, H, Dh]` over the extra keys, merged with the main pass's output `o1`
    `[B, H, L, Dh]` and log-sum-exp `lse1` `[B, H, L]` (biases as `joint_attention`). `config` `(BLOCK_M,
    BLOCK_N, num_warps, num_stages)` bypasses the autotuner (for benchmarks)."""
    B, Lq, H, D = q.shape
    N = ek.shape[1]
    out = torch.empty(B, Lq, H, D, dtype=q.dtype, device=q.device)
    q, ek, ev, o1 = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, ek, ev, o1))
    sb_k = 0 if ek.shape[0] == 1 else ek.stride(0)  # one set of extras for every row
    sb_v = 0 if ev.shape[0] == 1 else ev.stride(0)
    has_kb, has_qw = key_bias is not None, query_bias is not None
    if has_qw and key_segment is None:
        raise ValueError("query_bias needs key_segment (the reference of each extra key)")
    kb = key_bias.float().contiguous() if has_kb else q
    qw = query_bias.float() if has_qw else q
    seg = key_segment.to(torch.int32).contiguous() if has_qw else q
    skb = (0 if kb.shape[0] == 1 else kb.stride(0), kb.stride(1)) if has_kb else (0, 0)
    sqw = (0 if qw.shape[0] == 1 else qw.stride(0), qw.stride(1), qw.stride(2)) if has_qw else (0, 0, 0)
    kernel = _kernel()
    meta = {}
    if config is not None:
        kernel = kernel.fn  # the jitted kernel under the autotuner
        meta = dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), config))

    if heads_first is None:
        heads_first = os.environ.get("VLHOOKS_MERGE_ORDER", "heads") == "heads"

    def grid(m):
        tiles = -(-Lq // m["BLOCK_M"])
        return (B * H, tiles) if heads_first else (tiles, B * H)

    kernel[grid](q, ek, ev, o1, lse1, out, kb, qw, seg,
                 q.stride(0), q.stride(1), q.stride(2), sb_k, ek.stride(1), ek.stride(2),
                 sb_v, ev.stride(1), ev.stride(2),
                 o1.stride(0), o1.stride(2), o1.stride(1), lse1.stride(0), lse1.stride(1), lse1.stride(2),
                 out.stride(0), out.stride(1), out.stride(2), *skb, *sqw,
                 H, Lq, N, D ** -0.5 * 1.4426950408889634, HEAD_DIM=D, HAS_KB=has_kb, HAS_QW=has_qw,
                 HEADS_FIRST=bool(heads_first), **meta)
    return out
