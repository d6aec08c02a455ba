"""Flux.1 57 blocks x 128 tokens, patched vs plain, for whichever `vlhooks` is on PYTHONPATH: run it once per
commit in the same device call (alternating) to compare two commits on one machine, since fresh machines differ
by more than the effect (1.022-1.028 for one commit on 2026-11-29).

    git worktree add /tmp/old 7081117 && mkdir -p .ab/old && cp -r /tmp/old/vlhooks .ab/old/   # here
    for t in old new old new; do PYTHONPATH=$( [ $t = old ] && echo .ab/old || echo /tmp/pkg ):/tmp/site \\
        python3 benchmarks/ab_flux.py $t; done                                             # there
"""
import statistics
import sys

import torch

import vlhooks as vh

DEV, DT = "cuda", torch.bfloat16
CFG = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
           num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
           axes_dims_rope=[16, 56, 56])


def main(tag: str) -> None:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(DT)
    with torch.device(DEV):
        m = FluxTransformer2DModel(**CFG)
    torch.set_default_dtype(prev)
    m = m.to(DT).eval().requires_grad_(False)

    def rnd(*s):
        return torch.randn(*s, device=DEV, dtype=DT)

    hs, ehs, pooled = rnd(1, 4096, 64), rnd(1, 512, 4096), rnd(1, 768)
    ts, g = torch.full((1,), 0.5, device=DEV, dtype=DT), torch.full((1,), 3.5, device=DEV, dtype=DT)
    img_ids = torch.zeros(4096, 3, device=DEV)
    img_ids[:, 1] = torch.arange(64, device=DEV).repeat_interleave(64)
    img_ids[:, 2] = torch.arange(64, device=DEV).repeat(64)
    txt_ids = torch.zeros(512, 3, device=DEV)

    @torch.no_grad()
    def fwd():
        m(hs, ehs, pooled, ts, img_ids, txt_ids, g, return_dict=False)

    def timed():  # as gpu_bench._time; not imported: this script must run beside an older vlhooks on PYTHONPATH
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fwd()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b)

    feats = vh.VLFeatures(rnd(1, 128, 4096))
    for _ in range(3):
        fwd()
    ratios, plain_ms, patched_ms = [], [], []
    for _ in range(7):  # interleaved: each repeat one plain median and one patched median
        p = statistics.median(timed() for _ in range(3))
        h = vh.apply_injection(m, feats, vh.InjectionConfig())
        fwd()
        q = statistics.median(timed() for _ in range(3))
        h.remove()
        ratios.append(q / p)
        plain_ms.append(p)
        patched_ms.append(q)
    print(f"AB {tag}: flux 57 x 128 ratio {statistics.median(ratios):.4f} [{min(ratios):.4f}-{max(ratios):.4f}] "
          f"(7), plain {statistics.median(plain_ms):.2f} ms, patched {statistics.median(patched_ms):.2f} ms",
          flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
