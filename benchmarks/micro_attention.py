"""Attention micro-benchmark (one H200, bf16): where does the joint-mode attention cost come from?

- every SDPA backend (cuDNN, flash, efficient) at the plain key length and with 64 / 128 / 256 extra keys;
- cuDNN with the extra keys padded to a multiple of 128 and a -inf bias on the padding;
- the two-pass form: the block's own attention with its log-sum-exp, a second small pass over the extra keys,
  merged by `lerp(o_main, o_extra, sigmoid(lse_extra - lse_main))` (checked against the concatenated attention).

    python benchmarks/micro_attention.py
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


if __name__ == "__main__":
    main()
