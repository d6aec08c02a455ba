"""GPU: where a patched forward waits for the device. Every host-device synchronisation in a forward call drains the
GPU's queue, so the host time of the blocks after it (hooks, processors) shows up as GPU idle time instead of
being hidden behind the GPU work. Runs each of `gpu_bench.py`'s inference variants once warm, then once under
`torch.cuda.set_sync_debug_mode("warn")`, and prints each synchronising call site (the plain forward's too).

    python benchmarks/find_syncs.py [--tiny] [flux zimage qwenimage]
"""

from __future__ import annotations

import collections
import sys
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
parts = [a for a in sys.argv[1:] if a != "--tiny"] or ["flux", "zimage", "qwenimage"]
sys.argv = sys.argv[:1] + (["--tiny"] if "--tiny" in sys.argv else [])  # --tiny: a CPU dry run of the code
import gpu_bench as gb  # noqa: E402

import vlhooks as vh  # noqa: E402


def syncs(fn) -> collections.Counter:
    """Synchronising call sites of one `fn()` (after a warm call): `file:line function` of the innermost frames
    outside torch, with how often each fired."""
    fn()
    seen: collections.Counter = collections.Counter()
    if gb.DEV != "cuda":
        fn()
        return seen
    torch.cuda.synchronize()

    def show(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename
                  and "warnings" not in f.filename and "find_syncs" not in f.filename]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[-3:][::-1])
        seen[where] += 1

    old = warnings.showwarning
    warnings.showwarning = show
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode(0)
    finally:
        warnings.showwarning = old
    return seen


def report(label: str, fn, patch=None):
    h = patch() if patch is not None else None
    try:
        c = syncs(fn)
    finally:
        if h is not None:
            h.remove()
    print(f"== {label}: {sum(c.values())} synchronisations", flush=True)
    for where, n in c.most_common(12):
        print(f"   {n:4d}x  {where}", flush=True)


def flux():
    m = gb.model("flux")
    fwd = gb.flux_inputs(m)
    feats = vh.VLFeatures(gb.rnd(1, 128, 4096))
    report("flux plain", fwd)
    report("flux joint 128 x 57", fwd, lambda: vh.apply_injection(m, feats, vh.InjectionConfig()))
    kv = vh.KVAdapter.create(m, blocks="double")
    report("flux decoupled kv block_output", fwd, lambda: vh.apply_injection(
        m, feats, vh.InjectionConfig(blocks="double", mode="decoupled", placement="block_output"), adapter=kv))
    originals = dict(m.attn_processors)
    m._load_ip_adapter_weights(gb.xlabs_ip_weights(m), low_cpu_mem_usage=False)
    m.encoder_hid_proj.to(gb.DEV, gb.DT)
    imported = vh.import_ip_adapter(m, remove=False).to(gb.DEV, gb.DT)
    emb = gb.rnd(1, 1, 768)
    report("flux XLabs via diffusers", lambda: fwd({"ip_adapter_image_embeds": [emb]}))
    m.set_attn_processor(dict(originals))
    report("flux XLabs via vh.import_ip_adapter", fwd, lambda: vh.apply_injection(m, vh.VLFeatures(emb), None,
                                                                                   adapter=imported))


def zimage():
    m = gb.model("z_image")
    lat, t, cap = gb.zimage_inputs()

    @torch.no_grad()
    def fwd():
        m([lat], t, [cap], return_dict=False)

    report("zimage plain", fwd)
    report("zimage joint 64", fwd, lambda: vh.apply_injection(m, vh.VLFeatures(gb.rnd(1, 64, 2560)), vh.InjectionConfig()))
    refs = [vh.Reference(vh.VLFeatures(gb.rnd(1, 64, 2560)), mask=q) for q in gb.quadrant_masks()]
    report("zimage 4 x 64 masked", fwd, lambda: vh.apply_injection(m, refs, vh.InjectionConfig()))


def qwenimage():
    m = gb.model("qwen_image")
    kw = dict(hidden_states=gb.rnd(1, 4096, 64), encoder_hidden_states=gb.rnd(1, 128, 3584),
              encoder_hidden_states_mask=None, timestep=torch.tensor([0.5], device=gb.DEV, dtype=gb.DT),
              img_shapes=[[(1, 64, 64)]], return_dict=False)  # gpu_bench.qwenimage's inputs

    @torch.no_grad()
    def fwd():
        m(**kw)

    report("qwen plain", fwd)
    report("qwen joint 64", fwd, lambda: vh.apply_injection(m, vh.VLFeatures(gb.rnd(1, 64, 3584)), vh.InjectionConfig()))


if __name__ == "__main__":
    for p in parts:
        {"flux": flux, "zimage": zimage, "qwenimage": qwenimage}[p]()
