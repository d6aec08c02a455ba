"""Micro-benchmark of the extras' per-block GPU work (one H200, bf16), each candidate against the shipped form:

- `gemm`: the extra tokens' K and V projections (16-128 rows): cuBLAS's two GEMMs, cuBLAS on the two weights
  stacked (one GEMM: its bound), and `fused_text.linear_pair` (one Triton kernel) for every tile configuration;
  error of each against float64;
- `merge`: the two-pass kernel's extra pass and merge (`fused_attention.joint_attention`), programs ordered
  tile-first (the earlier grid) against heads-first; then the second pass alone (`merge_extra`) for each tile
  configuration against its memory floor (one element-wise kernel over the same bytes);
- `l2`: whether the extras' K/V GEMMs find the block's K / V weights still in L2 after the block's own projections
  of its L tokens: the block's Q, K, V GEMMs alone, then with the extras' pair before them (Flux.1's order today),
  after K (Z-Image's), after V, or split (the extras' K right after the block's K, their V right after its V), each minus the block
  alone; beside them the pair on cold weights.

- `fold`: a double-stream block's text-side K and V projections (Qwen-Image: 128 caption rows at 3072; Flux.1's
  double blocks: 512 at 3072; Flux.2's: 512 at 6144) with the extras' rows stacked under the caption's in the same
  two GEMMs, against the two GEMMs of the caption alone plus the extras' own pair (cuBLAS and the shipped
  `fused_text.linear_pair`): what folding the extras into the block's own text-side GEMMs would save a block.

Each timing queues 20 calls behind 1.4 ms of other GPU work (4.2 ms for the second pass alone, whose autotuned
dispatch costs the host more), so the GPU's time is measured, not the host's launch cost (a Triton launch takes
~40 us of Python), over rotating copies of the operands (so that no weight or activation sits
in the 50 MB L2 across calls, as in the model, where every block has its own), per-call mean; the median and
min-max of 10 such timings are printed.

    python benchmarks/micro_extras.py            # gemm, merge, l2
    python benchmarks/micro_extras.py gemm       # one part (also: fold)
"""

from __future__ import annotations

import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn

DEV, DT = "cuda", torch.bfloat16
CALLS, REPS = 20, 10


def timed(fn, sets: int, queue: int = 1) -> tuple[float, float, float]:
    """Per-call microseconds (median, min, max over REPS timings of CALLS calls), `fn(i)` on operand set `i % sets`,
    behind `queue` x 1.4 ms of other GPU work (more where the host's launches of CALLS calls take longer)."""
    for i in range(3):
        fn(i % sets)
    torch.cuda.synchronize()
    ts = []
    big = torch.empty(8192, 8192, device=DEV, dtype=DT)
    for _ in range(REPS):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(queue):
            torch.mm(big, big)  # ~1.4 ms of GPU work first: the calls below queue behind it, so the GPU times them
        a.record()          # back to back, not the host's launch cost (as in the model, where the host runs ahead)
        for i in range(CALLS):
            fn(i % sets)
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) * 1000 / CALLS)
    return statistics.median(ts), min(ts), max(ts)


def fmt(t) -> str:
    return f"{t[0]:7.1f} [{t[1]:6.1f}-{t[2]:6.1f}]"


def gemm():
    import os

    from vlhooks import fused_text

    os.environ["VLHOOKS_FUSED_KV"] = "always"  # every shape here, whatever the default

    print("gemm: extra tokens' K and V projections (us per pair of projections)", flush=True)
    rows_out = []
    for name, m, d, bias in (("zimage", 64, 3840, False), ("flux", 128, 3072, True), ("flux2", 64, 6144, False),
                             ("zimage-2x64", 128, 3840, False)):
        sets = max(2, int(400e6 // (2 * d * d * 2)) + 1)  # > 400 MB of weights in rotation
        pairs = []
        for _ in range(sets):
            a = nn.Linear(d, d, bias=bias, device=DEV, dtype=DT)
            b = nn.Linear(d, d, bias=bias, device=DEV, dtype=DT)
            pairs.append((a, b))
        stacked = [(torch.cat([a.weight, b.weight]), None if not bias else torch.cat([a.bias, b.bias]))
                   for a, b in pairs]
        xs = [torch.randn(m, d, device=DEV, dtype=DT) for _ in range(sets)]
        with torch.no_grad():
            a, b = pairs[0]
            x = xs[0]
            ref = [F.linear(x.double(), l.weight.double(), None if l.bias is None else l.bias.double()) for l in (a, b)]

            def err(outs):
                e = torch.cat([(o.double() - r).abs().flatten() for o, r in zip(outs, ref)])
                return e.mean().item(), e.max().item()

            cublas_err = err((a(x), b(x)))
            t_two = timed(lambda i: (pairs[i][0](xs[i]), pairs[i][1](xs[i])), sets)
            t_one = timed(lambda i: F.linear(xs[i], *stacked[i]), sets)
            t_tr = timed(lambda i: tuple(torch.mm(l.weight, xs[i].t()).t().contiguous() for l in pairs[i]), sets)
            print(f"  {name} {m} x {d} -> 2 x {d}{' +bias' if bias else ''}: cuBLAS two {fmt(t_two)}  "
                  f"cuBLAS stacked {fmt(t_one)}  cuBLAS transposed two {fmt(t_tr)}  (mean / max err vs float64 {cublas_err[0]:.2e} / "
                  f"{cublas_err[1]:.2e})", flush=True)
            results = []
            for cfg in ((64, 128, 4, 4), (128, 128, 4, 3), (32, 128, 4, 3), (128, 64, 8, 4), (64, 64, 4, 4),
                        (32, 64, 4, 4), (64, 128, 8, 3)):
                try:
                    e = err(fused_text.linear_pair(x, a, b, config=cfg))
                    t = timed(lambda i: fused_text.linear_pair(xs[i], *pairs[i], config=cfg), sets)
                except Exception as exc:  # a tile configuration past the shared memory
                    print(f"    {cfg}: {type(exc).__name__}", flush=True)
                    continue
                results.append((t[0], cfg, t, e))
            results.sort()
            for _, cfg, t, e in results[:6]:
                print(f"    triton {cfg}: {fmt(t)}  err {e[0]:.2e} / {e[1]:.2e}", flush=True)
            shipped = fused_text._PAIR_CONFIG[max(16, 1 << (m - 1).bit_length())]
            ts = [r for r in results if r[1] == shipped]
            if ts:
                print(f"    shipped {shipped}: {fmt(ts[0][2])}", flush=True)
            rows_out.append((name, t_two[0], results[0][0] if results else float("nan"), results[0][1] if results else None))
        del pairs, stacked, xs
        torch.cuda.empty_cache()
    print("gemm summary (median us): shape, cuBLAS two, best Triton pair, its config")
    for r in rows_out:
        print(f"  {r[0]:12s} {r[1]:7.1f} {r[2]:7.1f} {r[3]}")


def merge():
    from vlhooks import fused_attention

    print("merge: extra pass + merge (us per call; main pass with LSE timed apart)", flush=True)
    for name, L, H, n in (("zimage", 4224, 30, 64), ("flux2", 4608, 48, 64)):
        sets = 4
        ops = []
        for _ in range(sets):
            q, k, v = (torch.randn(1, L, H, 128, device=DEV, dtype=DT) for _ in range(3))
            ke, ve = (torch.randn(1, n, H, 128, device=DEV, dtype=DT) for _ in range(2))
            ops.append((q, k, v, ke, ve))
        with torch.no_grad():
            q, k, v, ke, ve = ops[0]
            cat = F.scaled_dot_product_attention(q.transpose(1, 2), torch.cat([k, ke], 1).transpose(1, 2),
                                                 torch.cat([v, ve], 1).transpose(1, 2)).transpose(1, 2)
            t_main = timed(lambda i: fused_attention._main_pass(*(t.transpose(1, 2) for t in ops[i][:3])), sets)
            line = f"  {name} {L}+{n} x {H} heads: main pass {fmt(t_main)}"
            for order in (False, True):
                o = fused_attention.joint_attention(q, k, v, ke, ve, heads_first=order)
                e = (o.float() - cat.float()).abs().max().item()
                t = timed(lambda i: fused_attention.joint_attention(*ops[i], heads_first=order), sets)
                line += (f"; {'heads-first' if order else 'tile-first'} {fmt(t)} (+{t[0] - t_main[0]:.1f}, "
                         f"max diff vs concat {e:.1e})")
            print(line, flush=True)
            # the second pass alone, per tile configuration, on the main pass's outputs; its memory floor: one
            # element-wise kernel over the same bytes (read q and the main output, write the result)
            mains = [fused_attention._main_pass(*(t.transpose(1, 2) for t in ops[i][:3])) for i in range(sets)]
            floor = timed(lambda i: torch.add(ops[i][0], mains[i][0].transpose(1, 2)), sets)
            auto = timed(lambda i: fused_attention.merge_extra(ops[i][0], *ops[i][3:], *mains[i]), sets, queue=3)
            res = []
            for cfg in ((64, 64, 4, 2), (64, 64, 4, 1), (64, 64, 8, 1), (128, 64, 8, 1), (128, 64, 8, 2),
                        (32, 64, 4, 1), (32, 64, 2, 1), (16, 64, 2, 1), (128, 64, 4, 1), (256, 64, 8, 1)):
                if cfg[1] > max(64, n):
                    continue
                try:
                    t = timed(lambda i: fused_attention.merge_extra(ops[i][0], *ops[i][3:], *mains[i], config=cfg),
                              sets, queue=3)
                except Exception as exc:
                    print(f"    merge {cfg}: {type(exc).__name__}", flush=True)
                    continue
                res.append((t[0], cfg, t))
            res.sort()
            print(f"    second pass alone: autotuned {fmt(auto)}; floor (add over the same bytes) {fmt(floor)}; "
                  + "; ".join(f"{c} {fmt(t)}" for _, c, t in res[:10]), flush=True)
            del mains
        del ops
        torch.cuda.empty_cache()


def l2():
    from vlhooks import fused_text

    print("l2: the extras' K/V GEMMs after the block's own projections (us per block; minus = over the block's "
          "Q, K, V alone)", flush=True)
    # (name, block tokens L, width, extra rows, bias): Z-Image's main block; Flux.1's double block text side
    # (its 512 caption tokens through add_k / add_v, the weights the extras use)
    for name, L, d, m, bias in (("zimage", 4224, 3840, 64, False), ("flux-double-text", 512, 3072, 128, True)):
        sets = max(2, int(400e6 // (3 * d * d * 2)) + 1)
        blocks = [tuple(nn.Linear(d, d, bias=bias, device=DEV, dtype=DT) for _ in range(3)) for _ in range(sets)]
        hs = [torch.randn(1, L, d, device=DEV, dtype=DT) for _ in range(2)]
        xs = [torch.randn(1, m, d, device=DEV, dtype=DT) for _ in range(sets)]

        def pair(i):
            _, wk, wv = blocks[i]
            return fused_text.linear_pair(xs[i], wk, wv) or (wk(xs[i]), wv(xs[i]))

        def seq(order):
            def run(i):
                wq, wk, wv = blocks[i]
                h = hs[i % 2]
                if order == "before":
                    pair(i)
                wq(h)
                wk(h)
                if order == "after_k":
                    pair(i)
                if order == "split":
                    wk(xs[i])
                wv(h)
                if order == "split":
                    wv(xs[i])
                if order == "after_v":
                    pair(i)
            return run

        with torch.no_grad():
            t_cold = timed(pair, sets)
            t_cold_two = timed(lambda i: (blocks[i][1](xs[i]), blocks[i][2](xs[i])), sets)
            t = {o: timed(seq(o), sets) for o in ("alone", "before", "after_k", "after_v", "split")}
        line = (f"  {name} L {L} x {d}, {m} extra rows: block alone {fmt(t['alone'])}; cold: pair {fmt(t_cold)}, "
                f"cuBLAS two {fmt(t_cold_two)}")
        for o in ("before", "after_k", "after_v", "split"):
            line += f"; {o} +{t[o][0] - t['alone'][0]:.1f} (total {fmt(t[o])})"
        print(line, flush=True)
        del blocks, hs, xs
        torch.cuda.empty_cache()


def fold():
    import os

    from vlhooks import fused_text

    os.environ["VLHOOKS_FUSED_KV"] = "always"
    print("fold: text-side K and V GEMMs of a double-stream block, the extras' rows apart or stacked in (us a block)",
          flush=True)
    for name, lt, m, d, bias in (("qwen_image", 128, 64, 3072, True), ("flux", 512, 128, 3072, True),
                                 ("flux2", 512, 64, 6144, False)):
        sets = max(2, int(400e6 // (2 * d * d * 2)) + 1)  # > 400 MB of weights in rotation: cold, as in the model
        pairs = [(nn.Linear(d, d, bias=bias, device=DEV, dtype=DT), nn.Linear(d, d, bias=bias, device=DEV, dtype=DT))
                 for _ in range(sets)]
        txt = [torch.randn(lt, d, device=DEV, dtype=DT) for _ in range(sets)]
        ext = [torch.randn(m, d, device=DEV, dtype=DT) for _ in range(sets)]
        both = [torch.cat([t, e]) for t, e in zip(txt, ext)]
        with torch.no_grad():
            a, b = pairs[0]
            sep = (a(txt[0]), b(txt[0]), *fused_text.linear_pair(ext[0], a, b))
            st = (a(both[0]), b(both[0]))
            diff = max(float((st[0][:lt] - sep[0]).abs().max()), float((st[0][lt:] - sep[2]).abs().max()))
            t_txt = timed(lambda i: (pairs[i][0](txt[i]), pairs[i][1](txt[i])), sets, queue=3)
            t_sep_cublas = timed(lambda i: (pairs[i][0](txt[i]), pairs[i][1](txt[i]), pairs[i][0](ext[i]),
                                            pairs[i][1](ext[i])), sets, queue=3)
            t_sep_kernel = timed(lambda i: (pairs[i][0](txt[i]), pairs[i][1](txt[i]),
                                            fused_text.linear_pair(ext[i], *pairs[i])), sets, queue=3)
            t_stacked = timed(lambda i: (pairs[i][0](both[i]), pairs[i][1](both[i])), sets, queue=3)
            t_cat = timed(lambda i: (torch.cat([txt[i], ext[i]]),), sets, queue=3)
        print(f"  {name} {lt} + {m} rows x {d}: caption alone {fmt(t_txt)}; + extras apart, cuBLAS {fmt(t_sep_cublas)}, "
              f"K/V kernel {fmt(t_sep_kernel)}; stacked {fmt(t_stacked)} (+ the rows' concatenation {fmt(t_cat)}); "
              f"stacked vs apart max |diff| {diff:.3g}", flush=True)
        del pairs, txt, ext, both
        torch.cuda.empty_cache()


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name(0), flush=True)
    parts = sys.argv[1:] or ["gemm", "merge", "l2"]
    for p in parts:
        {"gemm": gemm, "merge": merge, "l2": l2, "fold": fold}[p]()
