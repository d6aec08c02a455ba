"""GPU benchmark: vlhooks against the plain model and its peers, side by side in one run (one H200).

Full-size architectures with random weights (speed does not depend on weight values), bf16, 1024x1024, batch 1,
medians of CUDA-event timings. Every ratio is patched / plain measured in the same run, interleaved (plain and
patched alternate rep by rep) so that drift of a shared machine cancels.

    python benchmarks/gpu_bench.py [zimage] [flux] [loop] [train] [compile]      # default: all
Writes benchmarks/results.json (merging with the keys already there) and prints a table last.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

import vlhooks as vh

DEV, DT = "cuda", torch.bfloat16
OUT = Path(__file__).with_name("results.json")
RESULTS: dict[str, float] = {}
ROWS: list[tuple[str, float, float, float]] = []  # name, plain ms, patched ms, ratio


def _time(fn) -> float:
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b)


def paired(name: str, plain, patched, setup=None, teardown=None, warmup=3, reps=12) -> float:
    """Median ms of `plain` and `patched`, alternating rep by rep; records and returns patched / plain."""
    tp, tq = [], []
    for i in range(warmup + reps):
        p = _time(plain)
        if setup:
            setup()
        patched()  # warm: per-generation caches filled outside the timing
        q = _time(patched)
        if teardown:
            teardown()
        if i >= warmup:
            tp.append(p)
            tq.append(q)
    mp, mq = statistics.median(tp), statistics.median(tq)
    ROWS.append((name, mp, mq, mq / mp))
    print(f"{name:48s} plain {mp:8.2f} ms  patched {mq:8.2f} ms  ratio {mq / mp:.4f}", flush=True)
    return mq / mp


def zimage():
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    with torch.device(DEV):
        m = ZImageTransformer2DModel().to(DT).eval()
    lat = torch.randn(16, 1, 128, 128, device=DEV, dtype=DT)
    t = torch.tensor([0.5], device=DEV)
    cap = torch.randn(128, 2560, device=DEV, dtype=DT)

    @torch.no_grad()
    def plain():
        m([lat], t, [cap], return_dict=False)

    state = {}
    for n in (64, 256, 729):
        feats = vh.VLFeatures(torch.randn(1, n, 2560, device=DEV, dtype=DT))
        for mode, adapter in (("joint", None), ("decoupled", "kv")):
            ad = vh.KVAdapter.create(m) if adapter else None

            def setup(feats=feats, mode=mode, ad=ad):
                state["h"] = vh.apply_injection(m, feats, vh.InjectionConfig(mode=mode), adapter=ad)

            def teardown():
                state.pop("h").remove()

            r = paired(f"zimage {mode}{'+kv' if ad else ''} {n} tok x 30 blocks", plain, plain, setup, teardown)
            RESULTS[f"zimage_{mode}{'_kv' if ad else ''}_{n}_ratio"] = round(r, 4)
            if mode == "joint" and n == 64:  # the same with the two-pass kernel off: the concatenation
                os.environ["VLHOOKS_FUSED_ATTENTION"] = "0"
                r = paired("zimage joint 64 tok x 30, two-pass kernel off", plain, plain, setup, teardown)
                RESULTS["zimage_joint_64_concat_ratio"] = round(r, 4)
                del os.environ["VLHOOKS_FUSED_ATTENTION"]
            del ad
        capn = torch.cat([cap, torch.randn(n, 2560, device=DEV, dtype=DT)])

        @torch.no_grad()
        def blend(capn=capn):
            m([lat], t, [capn], return_dict=False)

        RESULTS[f"zimage_blend_{n}_ratio"] = round(paired(f"zimage embedding route +{n} caption tokens", plain, blend), 4)
    del m
    torch.cuda.empty_cache()


def flux():
    from diffusers import FluxTransformer2DModel
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    torch.manual_seed(0)
    with torch.device(DEV):
        m = FluxTransformer2DModel(guidance_embeds=True).to(DT).eval()
    hs = torch.randn(1, 4096, 64, device=DEV, dtype=DT)
    ehs = torch.randn(1, 512, 4096, device=DEV, dtype=DT)
    pooled = torch.randn(1, 768, device=DEV, dtype=DT)
    ts = torch.full((1,), 0.5, device=DEV, dtype=DT)
    g = torch.full((1,), 3.5, device=DEV, dtype=DT)
    img_ids = torch.zeros(4096, 3, device=DEV)
    img_ids[:, 1] = torch.arange(64, device=DEV).repeat_interleave(64)
    img_ids[:, 2] = torch.arange(64, device=DEV).repeat(64)
    txt_ids = torch.zeros(512, 3, device=DEV)

    @torch.no_grad()
    def fwd(jak=None):
        m(hs, ehs, pooled, ts, img_ids, txt_ids, g, joint_attention_kwargs=jak, return_dict=False)

    ip = torch.randn(1, 128, 4096, device=DEV, dtype=DT)
    originals = dict(m.attn_processors)
    ip_procs = {n: (FluxIPAdapterAttnProcessor(3072, 4096, num_tokens=(128,), scale=1.0, device=DEV, dtype=DT)
                    if n.startswith("transformer_blocks.") else p) for n, p in originals.items()}
    r = paired("flux diffusers FluxIPAdapterAttnProcessor 128 x 19", fwd, lambda: fwd({"ip_hidden_states": [ip]}),
               setup=lambda: m.set_attn_processor(dict(ip_procs)), teardown=lambda: m.set_attn_processor(dict(originals)))
    RESULTS["flux_diffusers_ipadapter_ratio"] = round(r, 4)

    feats = vh.VLFeatures(torch.randn(1, 128, 4096, device=DEV, dtype=DT))
    state = {}
    kv = vh.KVAdapter.create(m, blocks="double")
    for key, label, cfg, ad in (
        ("flux_vlhooks_ipadapter_ratio", "flux vlhooks decoupled+kv 128 x 19, block_output", lambda: vh.InjectionConfig(
            blocks="double", mode="decoupled", placement="block_output"), kv),
        ("flux_vlhooks_ipadapter_attention_placement_ratio", "flux vlhooks decoupled+kv 128 x 19, attention",
         lambda: vh.InjectionConfig(blocks="double", mode="decoupled"), kv),
        ("flux_vlhooks_57blocks_128_ratio", "flux vlhooks joint 128 x 57 blocks", lambda: vh.InjectionConfig(), None),
        ("flux_vlhooks_19blocks_128_ratio", "flux vlhooks joint 128 x 19 double",
         lambda: vh.InjectionConfig(blocks="double"), None),
    ):
        try:
            r = paired(label, fwd, fwd,
                       setup=lambda cfg=cfg, ad=ad: state.update(h=vh.apply_injection(m, feats, cfg(), adapter=ad)),
                       teardown=lambda: state.pop("h").remove())
        except Exception as e:  # one row failing (e.g. an option an older vlhooks lacks) leaves the others
            print(f"{label}: FAILED {type(e).__name__}: {e}", flush=True)
            continue
        RESULTS[key] = round(r, 4)
    del m, kv
    torch.cuda.empty_cache()


def loop():
    """A whole 8-step denoising loop (ZImagePipeline, full-size DiT, tiny VAE, precomputed caption embeddings)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    torch.manual_seed(0)
    with torch.device(DEV):
        m = ZImageTransformer2DModel().to(DT).eval()
        vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, norm_num_groups=32,
                            shift_factor=0.0, scaling_factor=1.0).to(DT).eval()
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                          transformer=m)
    pipe.set_progress_bar_config(disable=True)
    cap = [torch.randn(128, 2560, device=DEV, dtype=DT)]

    @torch.no_grad()
    def gen():
        pipe(prompt_embeds=cap, height=1024, width=1024, num_inference_steps=8, guidance_scale=0.0,
             generator=torch.Generator(DEV).manual_seed(0), output_type="latent")

    feats = vh.VLFeatures(torch.randn(1, 64, 2560, device=DEV, dtype=DT))
    state = {}
    # the patched generation includes its per-generation work (embedding the features): set up before each rep
    tp, tq = [], []
    for i in range(6):
        p = _time(gen)
        state["h"] = vh.apply_injection(pipe, feats, vh.InjectionConfig())
        q = _time(gen)
        state.pop("h").remove()
        if i >= 2:
            tp.append(p)
            tq.append(q)
    mp, mq = statistics.median(tp), statistics.median(tq)
    ROWS.append(("zimage 8-step loop, joint 64 tok x 30 (incl. caching)", mp, mq, mq / mp))
    print(ROWS[-1], flush=True)
    RESULTS["loop_8steps_ratio"] = round(mq / mp, 4)
    del pipe, m
    torch.cuda.empty_cache()


def train():
    """One optimizer step of the Lightning module (Z-Image 512^2, batch 4) vs the frozen-DiT floor."""
    from vlhooks.train.module import AdapterModule

    lat = torch.randn(4, 16, 64, 64, device=DEV)
    batch = {"latents": lat, "caption": torch.randn(4, 128, 2560, device=DEV), "caption_len": torch.full((4,), 128, device=DEV),
             "features": torch.randn(4, 64, 2560, device=DEV)}
    dit = {"class_name": "ZImageTransformer2DModel", "config": {}, "dtype": "bfloat16"}
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    with torch.device(DEV):
        m = ZImageTransformer2DModel().to(DT).eval().requires_grad_(False)
    family = vh.family_for(m)
    tiny = torch.nn.Linear(2560, 2560, device=DEV)
    caps = batch["caption"]

    def floor():  # forward + backward of the frozen DiT, gradients into a tiny input adapter only
        with torch.autocast("cuda", dtype=DT):
            c = torch.cat([caps, tiny(batch["features"])], 1)
            out = family.velocity(m, lat.to(DT), torch.full((4,), 0.5, device=DEV), c.to(DT))
        out.float().pow(2).mean().backward()

    for ckpt in (False, True):
        if ckpt:
            m.enable_gradient_checkpointing()
        for kind in ("projection", "lora"):
            spec = {"type": "projection", "kind": "linear"} if kind == "projection" else {"type": "lora", "rank": 16, "alpha": 16.0}
            with torch.device("meta"):  # the module's own DiT is replaced by the one full-size DiT below
                mod = AdapterModule(dit=dit, adapter=spec, drop_image=0.0, drop_text=0.0, drop_both=0.0)
            mod.dit = m  # share the one full-size DiT
            mod.adapter = (vh.ProjectionAdapter.create(m, 2560) if kind == "projection"
                           else vh.LoRAAdapter.create(m, rank=16, alpha=16.0)).to(DEV)
            if kind == "projection":
                mod.adapter.float()
            mod.handle = vh.apply_injection(m, None, mod.injection, adapter=mod.adapter)
            opt = torch.optim.AdamW(mod.adapter.trainable_parameters(), lr=1e-4)
            gen = torch.Generator().manual_seed(0)

            def step():
                with torch.autocast("cuda", dtype=DT):
                    loss = mod.compute_loss(batch, gen)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            torch.cuda.reset_peak_memory_stats()
            r = paired(f"train step 512^2 b4 {kind} ckpt={ckpt} vs floor", floor, step, warmup=2, reps=6)
            peak = torch.cuda.max_memory_allocated() / 2**30
            suffix = "_ckpt" if ckpt else ""
            RESULTS[f"train_{kind}_vs_floor_ratio{suffix}"] = round(r, 4)
            if ckpt:
                RESULTS["train_ckpt_peak_gib"] = round(max(RESULTS.get("train_ckpt_peak_gib", 0), peak), 2)
            else:
                RESULTS[f"train_{kind}_peak_gib"] = round(peak, 2)
            mod.release()
            del mod, opt
            torch.cuda.empty_cache()
    del m, tiny
    torch.cuda.empty_cache()


def compiled():
    """torch.compile: the patched transformer's speed-up over its eager self vs the unpatched model's."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    with torch.device(DEV):
        m = FluxTransformer2DModel(guidance_embeds=True).to(DT).eval()
    args = (torch.randn(1, 4096, 64, device=DEV, dtype=DT), torch.randn(1, 512, 4096, device=DEV, dtype=DT),
            torch.randn(1, 768, device=DEV, dtype=DT), torch.full((1,), 0.5, device=DEV, dtype=DT))
    img_ids = torch.zeros(4096, 3, device=DEV)
    img_ids[:, 1] = torch.arange(64, device=DEV).repeat_interleave(64)
    img_ids[:, 2] = torch.arange(64, device=DEV).repeat(64)
    kw = dict(img_ids=img_ids, txt_ids=torch.zeros(512, 3, device=DEV), guidance=torch.full((1,), 3.5, device=DEV, dtype=DT),
              return_dict=False)

    def med(fn, reps=10):
        with torch.no_grad():
            for _ in range(3):
                fn()
            return statistics.median(_time(fn) for _ in range(reps))

    speedups = {}
    for label in ("plain", "patched"):
        h = None
        if label == "patched":
            h = vh.apply_injection(m, vh.VLFeatures(torch.randn(1, 128, 4096, device=DEV, dtype=DT)), vh.InjectionConfig())
        eager = med(lambda: m(*args, **kw))
        torch._dynamo.reset()
        cm = torch.compile(m)
        t0 = time.time()
        comp = med(lambda: cm(*args, **kw))
        speedups[label] = eager / comp
        print(f"compile {label}: eager {eager:.2f} ms compiled {comp:.2f} ms speed-up {eager / comp:.3f} "
              f"(compile+bench {time.time() - t0:.0f}s)", flush=True)
        ROWS.append((f"flux compile speed-up, {label} (eager -> compiled)", eager, comp, comp / eager))
        if h:
            h.remove()
    RESULTS["compile_speedup_patched_over_unpatched_speedup"] = round(speedups["patched"] / speedups["plain"], 4)
    del m
    torch.cuda.empty_cache()


PARTS = {"zimage": zimage, "flux": flux, "loop": loop, "train": train, "compile": compiled}

if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name(0), flush=True)
    for name in sys.argv[1:] or list(PARTS):
        t0 = time.time()
        try:
            PARTS[name]()
        except Exception:
            traceback.print_exc()
            print(f"PART {name} FAILED", flush=True)
        print(f"[{name}: {time.time() - t0:.0f}s]", flush=True)
    merged = json.loads(OUT.read_text()) if OUT.exists() else {}
    merged.update(RESULTS)
    merged["gpu"] = torch.cuda.get_device_name(0)
    merged["date"] = time.strftime("%Y-%m-%d")
    OUT.write_text(json.dumps(merged, indent=2, sort_keys=True))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "results.json").write_text(json.dumps(merged, indent=2, sort_keys=True))
    print("\n| run | plain ms | patched ms | ratio |\n|---|---|---|---|")
    for name, p, q, r in ROWS:
        print(f"| {name} | {p:.2f} | {q:.2f} | {r:.4f} |")
