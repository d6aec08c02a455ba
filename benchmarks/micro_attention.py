"""Attention micro-benchmark (one H200, bf16): where does the joint-mode attention cost come from?

- every SDPA backend (cuDNN, flash, efficient) at the plain key length and with 64 / 128 / 256 extra keys;
- cuDNN with the extra keys padded to a multiple of 128 and a -inf bias on the padding;
- the two-pass form: the block's own attention with its log-sum-exp, a second small pass over the extra keys,
  merged by `lerp(o_main, o_extra, sigmoid(lse_extra - lse_main))` (checked against the concatenated attention).

    python benchmarks/micro_attention.py          # everything above
    python benchmarks/micro_attention.py fused    # only: vlhooks' two-pass kernel against the concatenation
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

DEV, DT = "cuda", torch.bfloat16
aten = torch.ops.aten


def timeit(fn, reps=30, warmup=5) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) * 1000)
    return statistics.median(ts)


def qkv(L, S, H):
    # the layout diffusers' native backend hands to SDPA: [B, L, H, D] storage viewed as [B, H, L, D]
    q = torch.randn(1, L, H, 128, device=DEV, dtype=DT).transpose(1, 2)
    k = torch.randn(1, S, H, 128, device=DEV, dtype=DT).transpose(1, 2)
    v = torch.randn(1, S, H, 128, device=DEV, dtype=DT).transpose(1, 2)
    return q, k, v


def lse_of(backend, q, k, v):
    if backend == "cudnn":
        o, lse = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)[:2]
    elif backend == "flash":
        o, lse = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)[:2]
    else:
        o, lse = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False)[:2]
    return o, lse


def main():
    print(torch.__version__, torch.cuda.get_device_name(0), flush=True)
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    for model, L, H in (("zimage", 4224, 30), ("flux", 4608, 24)):
        print(f"== {model}: {L} queries, {H} heads x 128", flush=True)
        for n in (0, 64, 128, 256):
            q, k, v = qkv(L, L + n, H)
            row = []
            for name, be in backends.items():
                with sdpa_kernel([be]):
                    try:
                        row.append(f"{name} {timeit(lambda: F.scaled_dot_product_attention(q, k, v)):7.1f}")
                    except RuntimeError as e:
                        row.append(f"{name} n/a ({str(e)[:40]})")
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                row.append(f"default {timeit(lambda: F.scaled_dot_product_attention(q, k, v)):7.1f}")
            print(f"  keys {L + n} (+{n}): " + " | ".join(row) + " us", flush=True)
        # padding to a multiple of 128 with a -inf bias
        for n in (64,):
            S = ((L + n + 127) // 128) * 128
            q, k, v = qkv(L, S, H)
            bias = torch.zeros(1, 1, 1, S, device=DEV, dtype=DT)
            bias[..., L + n:] = float("-inf")
            for name in ("cudnn", "efficient"):
                with sdpa_kernel([backends[name]]):
                    try:
                        t = timeit(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias.expand(1, H, L, S)))
                        print(f"  padded {L + n}->{S} with bias, {name}: {t:7.1f} us", flush=True)
                    except RuntimeError as e:
                        print(f"  padded {name}: n/a {str(e)[:60]}", flush=True)
        # two passes merged by log-sum-exp
        for n in (64, 128):
            q, k, v = qkv(L, L, H)
            ke = torch.randn(1, n, H, 128, device=DEV, dtype=DT).transpose(1, 2)
            ve = torch.randn(1, n, H, 128, device=DEV, dtype=DT).transpose(1, 2)
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                ref = F.scaled_dot_product_attention(q, torch.cat([k, ke], 2), torch.cat([v, ve], 2)).float()
            for main_be in ("cudnn", "flash"):
                for extra_be in ("cudnn", "flash", "efficient"):
                    try:
                        om, lm = lse_of(main_be, q, k, v)
                        oe, le = lse_of(extra_be, q, ke, ve)
                    except RuntimeError as e:
                        print(f"  two-pass {main_be}+{extra_be}: n/a {str(e)[:60]}", flush=True)
                        continue
                    lm_, le_ = lm.reshape(1, H, L, -1)[..., :1], le.reshape(1, H, -1, 1)[:, :, :L]

                    def merge():
                        w = torch.sigmoid(le_ - lm_).to(om.dtype)
                        return torch.lerp(om, oe, w)

                    err = (merge().float() - ref).abs().max().item()
                    t_main = timeit(lambda: lse_of(main_be, q, k, v))
                    t_extra = timeit(lambda: lse_of(extra_be, q, ke, ve))
                    t_merge = timeit(merge)

                    def full():
                        a, b = lse_of(main_be, q, k, v)
                        c, d = lse_of(extra_be, q, ke, ve)
                        w = torch.sigmoid(d.reshape(1, H, -1, 1)[:, :, :L] - b.reshape(1, H, L, -1)[..., :1])
                        return torch.lerp(a, c, w.to(a.dtype))

                    print(f"  two-pass +{n} {main_be}(lse {tuple(lm.shape)})+{extra_be}(lse {tuple(le.shape)}): "
                          f"main {t_main:6.1f} extra {t_extra:6.1f} merge {t_merge:6.1f} all {timeit(full):6.1f} us; "
                          f"max err vs concat {err:.2e}", flush=True)


def fused():
    """vlhooks' two-pass kernel (`vlhooks.fused_attention`: the block's own keys by cuDNN with its LSE, the extra
    keys and the merge in one Triton kernel) against one SDPA call over the concatenated keys."""
    import sys

    from vlhooks import fused_attention

    print(torch.__version__, torch.cuda.get_device_name(0), flush=True)
    for model, L, H in (("zimage", 4224, 30), ("flux", 4608, 24)):
        for n in (64, 128, 256, 729):
            q, k, v = (t.transpose(1, 2) for t in qkv(L, L, H))  # [1, L, H, D] views, as the processors hold them
            ke = torch.randn(1, n, H, 128, device=DEV, dtype=DT)
            ve = torch.randn(1, n, H, 128, device=DEV, dtype=DT)

            def concat():
                return F.scaled_dot_product_attention(q.transpose(1, 2), torch.cat([k, ke], 1).transpose(1, 2),
                                                      torch.cat([v, ve], 1).transpose(1, 2))

            def two_pass():
                return fused_attention.joint_attention(q, k, v, ke, ve)

            o1, lse1 = fused_attention._main_pass(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            out = torch.empty_like(q)

            def kernel_only():  # the Triton kernel alone (extra pass + merge), main pass precomputed
                B, Lq, Hh, D = q.shape
                fused_attention._kernel()[lambda meta: (B * Hh, -(-Lq // meta["BLOCK_M"]))](
                    q, ke, ve, o1, lse1, out, q, q, q, q.stride(0), q.stride(1), q.stride(2), 0, ke.stride(1),
                    ke.stride(2), 0, ve.stride(1), ve.stride(2), o1.stride(0), o1.stride(2), o1.stride(1),
                    lse1.stride(0), lse1.stride(1), lse1.stride(2), out.stride(0), out.stride(1), out.stride(2),
                    0, 0, 0, 0, 0, Hh, Lq, ke.shape[1], D ** -0.5 * 1.4426950408889634, HEAD_DIM=D, HAS_KB=False,
                    HAS_QW=False, HEADS_FIRST=True)

            with torch.no_grad():
                err = (two_pass().float() - concat().transpose(1, 2).float()).abs().max().item()
                t_kernel = timeit(kernel_only)
                t_main = timeit(lambda: fused_attention._main_pass(q.transpose(1, 2), k.transpose(1, 2),
                                                                   v.transpose(1, 2)))
                t_plain = timeit(lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                                        v.transpose(1, 2)))
                t_cat, t_two = timeit(concat), timeit(two_pass)
            print(f"  {model} {L}+{n}: plain {t_plain:6.1f}  concatenated {t_cat:6.1f}  two-pass {t_two:6.1f} us "
                  f"(+{t_cat - t_plain:5.1f} vs +{t_two - t_plain:5.1f}; main pass with LSE {t_main:6.1f}, kernel "
                  f"{t_kernel:5.1f}); max diff {err:.1e}; "
                  f"pays_off={fused_attention.pays_off(L, n)}", flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    import sys

    fused() if sys.argv[1:] == ["fused"] else main()
