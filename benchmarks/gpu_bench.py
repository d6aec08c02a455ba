"""GPU benchmark: vlhooks against the plain model, its peers and the training floor, side by side in one run.

Full-size architectures with random weights (speed does not depend on weight values), built on the GPU in bf16,
1024x1024, batch 1. Every ratio is patched / plain measured in the same run and interleaved: each repeat times the
plain model, then every variant of its group (each set up, warmed once, timed, removed), so that a repeat's ratios
share one plain timing and drift of the machine cancels. A row's figure is the median of its per-repeat ratios
(CUDA events), with their min-max and the number of repeats (`<key>_minmax`, `<key>_reps` in results.json).

    python benchmarks/gpu_bench.py [parts...]          # default: zimage train lightning throughput flux profile
                                                        #          qwenimage flux2
    python benchmarks/gpu_bench.py --tiny [parts...]   # dry run on the CPU: tiny widths, the same code paths
    python benchmarks/gpu_bench.py --calls 5 --reps 10 flux   # each timing: 5 calls back to back (per-call mean)
    parts also: throughput_zimage, throughput_flux (one family each), zimage_sweep (64/256/729 tokens, embedding
    route), loop (8-step pipeline), compile, peer_profile (the imported IP-Adapter vs diffusers', kernel by kernel),
    clocks (SM clock and power in windows of plain and patched Z-Image forwards), graphs (Qwen-Image, Z-Image and
    Flux.1 joint, plain and patched each replayed as one CUDA graph: the host out of both sides;
    VLHOOKS_BENCH_GRAPHS=qwenimage,zimage,flux picks the models)

Writes benchmarks/results.json (merging with the keys already there; `--tiny` writes $OUT/results_tiny.json or
/tmp instead) and $OUT/results.json, and prints a table last.

The training floor is `shared/bench/gpu_baseline.py`'s own: its `step` and the tensors it builds are read from
`benchmarks/shared_gpu_baseline.py` (a verbatim copy; its sha256 is checked against ../shared/bench/ where that
exists) and executed on the same model object as the module's step.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

import vlhooks as vh

TINY = "--tiny" in sys.argv


def _option(name: str, default: int) -> int:
    """`--name N` from the command line (removed from the parts list)."""
    if name in sys.argv:
        i = sys.argv.index(name)
        value = int(sys.argv[i + 1])
        del sys.argv[i:i + 2]
        return value
    return default


# inference groups: each timing covers CALLS calls back to back and reports their mean, so a repeat's ratio carries
# less of a single forward's jitter (1-2 % on Flux.1), which is what decides a claim against a peer in every repeat
CALLS = _option("--calls", 1)
REPS_OPTION = _option("--reps", 0)
ARGS = [a for a in sys.argv[1:] if a != "--tiny"]
DEV = "cpu" if TINY else "cuda"
DT = torch.float32 if TINY else torch.bfloat16
HERE = Path(__file__).resolve().parent
RESULTS_FILE = HERE / "results.json"
BASELINE_SRC = HERE / "shared_gpu_baseline.py"
WARM, REPS = (1, 2) if TINY else (2, 6)  # repeats: at least 5 per row, interleaved
REPS = REPS_OPTION or REPS
RESULTS: dict[str, object] = {}
ROWS: list[tuple] = []  # (label, key, plain ms, variant ms, median ratio, min, max, n)
NOTES: list[str] = []

# full-size configs are diffusers' defaults; --tiny shrinks widths and depths but keeps every input shape
MODELS = {
    "z_image": ("ZImageTransformer2DModel", {},
                dict(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, axes_dims=[8, 12, 12])),
    "flux": ("FluxTransformer2DModel", {"guidance_embeds": True},
             dict(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                  axes_dims_rope=[4, 6, 6])),
    "qwen_image": ("QwenImageTransformer2DModel", {},
                   dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, axes_dims_rope=(4, 6, 6))),
    "flux2": ("Flux2Transformer2DModel", {},
              dict(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                   axes_dims_rope=[4, 4, 4, 4], timestep_guidance_channels=32)),
}


# ---------------------------------------------------------------------------------------------------- helpers
def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def _time(fn, calls: int = 1) -> float:
    """Milliseconds per call of `calls` calls back to back (CUDA events; wall clock on the CPU)."""
    if DEV != "cuda":
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return 1e3 * (time.perf_counter() - t0) / calls
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(calls):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / calls


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else 0.0


def reset_peak():
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()


def free():
    import gc

    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()


def save():
    """results so far to $OUT (a device call's output survives a later failure or timeout), one file per
    invocation's parts (`results_partial_<parts>.json`), so that a later run in the same call keeps it."""
    if os.environ.get("OUT"):
        tag = "_".join(a for a in ARGS if not a.startswith("-"))[:80] or "default"
        Path(os.environ["OUT"], f"results_partial_{tag}.json").write_text(json.dumps(RESULTS, indent=1,
                                                                                      sort_keys=True))


def record(key: str, ratios: list[float], extra: dict | None = None):
    RESULTS[key] = round(statistics.median(ratios), 4)
    RESULTS[key + "_minmax"] = [round(min(ratios), 4), round(max(ratios), 4)]
    RESULTS[key + "_reps"] = len(ratios)
    RESULTS[key + "_calls_per_timing"] = CALLS
    if extra:
        RESULTS.update(extra)


def group(title: str, plain, variants: list[dict], warm: int = WARM, reps: int = REPS) -> dict[str, list[float]]:
    """Interleaved timing: per repeat, `plain` then each variant (`setup()`, one warm call, `CALLS` timed calls,
    `teardown()`). Records `<key>` = the median of the per-repeat ratios variant / plain, and returns them."""
    tp, tq = [], {v["key"]: [] for v in variants}
    failed: set[str] = set()
    for i in range(warm + reps):
        p = _time(plain, CALLS)
        for v in variants:
            if v["key"] in failed:
                continue
            try:  # a failing variant is dropped (and noted); the others go on
                if v.get("setup"):
                    v["setup"]()
                try:
                    v["fn"]()  # warm: per-generation caches filled, kernels tuned, outside the timing
                    q = _time(v["fn"], CALLS)
                finally:
                    if v.get("teardown"):
                        v["teardown"]()
            except Exception as e:
                traceback.print_exc()
                failed.add(v["key"])
                RESULTS[v["key"]] = None
                NOTES.append(f"{v['key']}: FAILED {type(e).__name__}: {str(e)[:200]}")
                continue
            if i >= warm:
                tq[v["key"]].append(q)
        if i >= warm:
            tp.append(p)
    ratios = {}
    mp = statistics.median(tp)
    for v in variants:
        if v["key"] in failed:
            continue
        r = [q / p for q, p in zip(tq[v["key"]], tp)]
        ratios[v["key"]] = r
        mq = statistics.median(tq[v["key"]])
        record(v["key"], r, {v["key"] + "_ms": [round(mp, 2), round(mq, 2)]})
        ROWS.append((v["label"], v["key"], mp, mq, statistics.median(r), min(r), max(r), len(r)))
        print(f"{title}: {v['label']:60s} plain {mp:8.2f} ms  variant {mq:8.2f} ms  ratio "
              f"{statistics.median(r):.4f} [{min(r):.4f}, {max(r):.4f}] n={len(r)}", flush=True)
    save()
    return ratios


def build(name: str) -> torch.nn.Module:
    """A random-weight transformer built on the device in `DT` (the default dtype while its layers are made:
    no float32 copy of a 20-32B model is ever held)."""
    import diffusers

    cls_name, full, tiny = MODELS[name]
    cfg = dict(full, **(tiny if TINY else {}))
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(DT)
    t0 = time.time()
    try:
        with torch.device(DEV):
            m = getattr(diffusers, cls_name)(**cfg)
    finally:
        torch.set_default_dtype(prev)
    m = m.to(DT).eval().requires_grad_(False)
    if name in ("qwen_image", "flux2"):  # as shared/bench/new_families_baseline.py: N(0, 0.02) weights
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, 0.02)
    n = sum(p.numel() for p in m.parameters())
    print(f"built {cls_name}: {n / 1e9:.2f}B parameters in {time.time() - t0:.1f}s", flush=True)
    RESULTS[f"{name}_params_b"] = round(n / 1e9, 2)
    return m


def rnd(*shape, dtype=None):
    return torch.randn(*shape, device=DEV, dtype=dtype or DT)


def paired(key: str, r: dict[str, list[float]], ours: str, other: str) -> None:
    """Per repeat, one variant's ratio minus another's (the same plain timing under both): median and min-max."""
    if ours not in r or other not in r:
        return
    d = [a - b for a, b in zip(r[ours], r[other])]
    RESULTS[key + "_median"] = round(statistics.median(d), 4)
    RESULTS[key + "_minmax"] = [round(min(d), 4), round(max(d), 4)]
    RESULTS[key + "_below_every_repeat"] = all(x < 0 for x in d)
    print(f"{key}: median {statistics.median(d):+.4f} [{min(d):+.4f}, {max(d):+.4f}]", flush=True)


def injection_variant(key, label, m, feats, cfg=None, adapter=None, env=None):
    """A variant that patches `m` in its setup and removes the patch in its teardown."""
    state = {}

    def setup():
        for k, v in (env or {}).items():
            os.environ[k] = v
        state["h"] = vh.apply_injection(m, feats, cfg() if callable(cfg) else cfg, adapter=adapter)

    def teardown():
        state.pop("h").remove()
        for k in env or {}:
            os.environ.pop(k, None)

    return {"key": key, "label": label, "setup": setup, "teardown": teardown}


def peak_memory(key: str, plain, patch, patched):
    """Inference peak memory (max allocated over one forward, weights included) patched vs plain; the patched
    forward is its first, so per-generation caches are included."""
    if DEV != "cuda":
        plain()
        h = patch()
        patched()
        h.remove()
        return
    free()
    reset_peak()
    plain()
    base = peak_gib()
    h = patch()
    free()
    reset_peak()
    patched()
    got = peak_gib()
    h.remove()
    RESULTS[key] = round(got / base, 4)
    RESULTS[key + "_gib"] = [round(base, 3), round(got, 3)]
    print(f"peak memory {key}: plain {base:.3f} GiB patched {got:.3f} GiB ratio {got / base:.4f}", flush=True)


_MODEL: dict[str, torch.nn.Module] = {}


def model(name: str) -> torch.nn.Module:
    """One full-size model at a time (the previous one is freed)."""
    if name not in _MODEL:
        _MODEL.clear()
        free()
        _MODEL[name] = build(name)
    return _MODEL[name]


# ---------------------------------------------------------------------------------------------------- inference
def zimage_inputs():
    lat = rnd(16, 1, 128, 128)  # 1024^2: 64 x 64 = 4096 image tokens (+ 128 caption tokens = 4224 keys)
    t = torch.tensor([0.5], device=DEV)
    cap = rnd(128, 2560)
    return lat, t, cap


def quadrant_masks() -> list[torch.Tensor]:
    """Four masks, each one quadrant of the 64 x 64 image-token grid (Z-Image at 1024^2)."""
    quads = []
    for i in range(4):
        q = torch.zeros(64, 64, dtype=torch.bool, device=DEV)
        q[(i // 2) * 32:(i // 2 + 1) * 32, (i % 2) * 32:(i % 2 + 1) * 32] = True
        quads.append(q)
    return quads


def zimage():
    m = model("z_image")
    lat, t, cap = zimage_inputs()

    @torch.no_grad()
    def fwd():
        m([lat], t, [cap], return_dict=False)

    f64 = vh.VLFeatures(rnd(1, 64, 2560))
    refs = [vh.Reference(vh.VLFeatures(rnd(1, 64, 2560)), mask=q) for q in quadrant_masks()]
    variants = [
        dict(injection_variant("zimage_joint_64_ratio", "Z-Image joint 64 tok x 30 blocks", m, f64,
                               vh.InjectionConfig()), fn=fwd),
        dict(injection_variant("zimage_joint_64_concat_ratio", "Z-Image joint 64, two-pass kernel off", m, f64,
                               vh.InjectionConfig(), env={"VLHOOKS_FUSED_ATTENTION": "0"}), fn=fwd),
        dict(injection_variant("zimage_joint_64_eager_text_ratio", "Z-Image joint 64, text-path kernels off", m,
                               f64, vh.InjectionConfig(), env={"VLHOOKS_FUSED_TEXT": "0"}), fn=fwd),
        dict(injection_variant("zimage_joint_64_cublas_kv_ratio", "Z-Image joint 64, extras' K/V by cuBLAS", m,
                               f64, vh.InjectionConfig(), env={"VLHOOKS_FUSED_KV": "0"}), fn=fwd),
        dict(injection_variant("zimage_multiref_4x64_ratio", "Z-Image 4 refs x 64 tok, quadrant masks, 30 blocks",
                               m, refs, vh.InjectionConfig()), fn=fwd),
        dict(injection_variant("zimage_multiref_4x64_concat_ratio", "Z-Image 4 x 64 masked, two-pass kernel off",
                               m, refs, vh.InjectionConfig(), env={"VLHOOKS_FUSED_ATTENTION": "0"}), fn=fwd),
    ]
    r = group("zimage", fwd, variants)
    paired("zimage_joint_64_text_kernels_minus_eager", r, "zimage_joint_64_ratio", "zimage_joint_64_eager_text_ratio")
    paired("zimage_joint_64_kv_kernel_minus_cublas", r, "zimage_joint_64_ratio", "zimage_joint_64_cublas_kv_ratio")
    peak_memory("zimage_joint_64_peak_memory_ratio", fwd,
                lambda: vh.apply_injection(m, f64, vh.InjectionConfig()), fwd)
    peak_memory("zimage_multiref_4x64_peak_memory_ratio", fwd,
                lambda: vh.apply_injection(m, refs, vh.InjectionConfig()), fwd)


def flux_inputs(m, n_txt=512):
    hs = rnd(1, 4096, 64)
    ehs = rnd(1, n_txt, 4096)
    pooled = rnd(1, 768)
    ts = torch.full((1,), 0.5, device=DEV, dtype=DT)
    g = torch.full((1,), 3.5, device=DEV, dtype=DT)
    img_ids = torch.zeros(4096, 3, device=DEV)
    img_ids[:, 1] = torch.arange(64, device=DEV).repeat_interleave(64)
    img_ids[:, 2] = torch.arange(64, device=DEV).repeat(64)
    txt_ids = torch.zeros(n_txt, 3, device=DEV)

    @torch.no_grad()
    def fwd(jak=None):
        m(hs, ehs, pooled, ts, img_ids, txt_ids, g, joint_attention_kwargs=jak, return_dict=False)

    return fwd


def xlabs_ip_weights(m, tokens=4, embed=768):
    """An XLabs-architecture Flux IP-Adapter (diffusers' `load_ip_adapter` layout) at the model's widths,
    random N(0, 0.02) weights, on the device: an ImageProjection (768 -> 4 tokens x 4096) and per double block
    `to_k_ip` / `to_v_ip` (4096 -> 3072)."""
    c, inner = m.config.joint_attention_dim, m.inner_dim

    def r(*s):
        return 0.02 * rnd(*s)

    proj = {"proj.weight": r(tokens * c, embed), "proj.bias": r(tokens * c), "norm.weight": 1 + r(c),
            "norm.bias": r(c)}
    ip = {f"{i}.to_{w}_ip.{p}": r(inner, c) if p == "weight" else r(inner)
          for i in range(len(m.transformer_blocks)) for w in "kv" for p in ("weight", "bias")}
    return {"image_proj": proj, "ip_adapter": ip}


def flux():
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    m = model("flux")
    fwd = flux_inputs(m)
    originals = dict(m.attn_processors)

    def restore():
        m.set_attn_processor(dict(originals))

    # diffusers' own IP-Adapter processor on the 19 double blocks, 128 tokens, random weights
    ip = rnd(1, 128, 4096)
    ip_procs = {n: (FluxIPAdapterAttnProcessor(m.inner_dim, 4096, num_tokens=(128,), scale=1.0, device=DEV, dtype=DT)
                    if n.startswith("transformer_blocks.") else p) for n, p in originals.items()}
    # an imported XLabs-style IP-Adapter: installed by diffusers' own loader, then read by vh.import_ip_adapter
    m._load_ip_adapter_weights(xlabs_ip_weights(m), low_cpu_mem_usage=False)
    m.encoder_hid_proj.to(DEV, DT)  # diffusers' loader builds the image projection on the CPU (seen on the H200)
    xl_procs = dict(m.attn_processors)
    imported = vh.import_ip_adapter(m, remove=False).to(DEV, DT)  # its own copy; diffusers' stays installed
    restore()
    emb = rnd(1, 1, 768)  # one image's CLIP embedding, as diffusers' `ip_adapter_image_embeds` takes it

    feats = vh.VLFeatures(rnd(1, 128, 4096))
    kv = vh.KVAdapter.create(m, blocks="double")
    variants = [
        dict(injection_variant("flux_vlhooks_57blocks_128_ratio", "Flux joint 128 tok x 57 blocks", m, feats,
                               vh.InjectionConfig()), fn=fwd),
        dict(injection_variant("flux_vlhooks_57blocks_128_eager_text_ratio", "Flux joint 128 x 57, text-path kernels "
                               "off", m, feats, vh.InjectionConfig(), env={"VLHOOKS_FUSED_TEXT": "0"}), fn=fwd),
        dict(injection_variant("flux_vlhooks_57blocks_128_cublas_kv_ratio", "Flux joint 128 x 57, extras' K/V by "
                               "cuBLAS", m, feats, vh.InjectionConfig(), env={"VLHOOKS_FUSED_KV": "0"}), fn=fwd),
        {"key": "flux_diffusers_ipadapter_ratio", "label": "Flux diffusers FluxIPAdapterAttnProcessor 128 x 19",
         "setup": lambda: m.set_attn_processor(dict(ip_procs)), "teardown": restore,
         "fn": lambda: fwd({"ip_hidden_states": [ip]})},
        dict(injection_variant("flux_vlhooks_ipadapter_ratio", "Flux vlhooks decoupled+kv 128 x 19, block_output", m,
                               feats, vh.InjectionConfig(blocks="double", mode="decoupled", placement="block_output"),
                               adapter=kv), fn=fwd),
        {"key": "flux_imported_ipadapter_diffusers_ratio", "label": "Flux XLabs IP-Adapter (4 tok) via diffusers",
         "setup": lambda: m.set_attn_processor(dict(xl_procs)), "teardown": restore,
         "fn": lambda: fwd({"ip_adapter_image_embeds": [emb]})},
        dict(injection_variant("flux_imported_ipadapter_vlhooks_ratio", "Flux XLabs IP-Adapter via vh.import_ip_adapter",
                               m, vh.VLFeatures(emb), None, adapter=imported), fn=fwd),
    ]
    r = group("flux", fwd, variants)
    paired("flux_57blocks_text_kernels_minus_eager", r, "flux_vlhooks_57blocks_128_ratio",
           "flux_vlhooks_57blocks_128_eager_text_ratio")
    paired("flux_57blocks_kv_kernel_minus_cublas", r, "flux_vlhooks_57blocks_128_ratio",
           "flux_vlhooks_57blocks_128_cublas_kv_ratio")
    paired("flux_vlhooks_minus_diffusers_ipadapter", r, "flux_vlhooks_ipadapter_ratio",
           "flux_diffusers_ipadapter_ratio")
    paired("flux_imported_vlhooks_minus_diffusers", r, "flux_imported_ipadapter_vlhooks_ratio",
           "flux_imported_ipadapter_diffusers_ratio")
    peak_memory("flux_joint_57_128_peak_memory_ratio", fwd, lambda: vh.apply_injection(m, feats, vh.InjectionConfig()),
                fwd)
    del kv, imported
    save()


def qwenimage():
    m = model("qwen_image")
    kw = dict(hidden_states=rnd(1, 4096, 64), encoder_hidden_states=rnd(1, 128, 3584),
              encoder_hidden_states_mask=None,  # the pipelines pass None when every caption token is real
              timestep=torch.tensor([0.5], device=DEV, dtype=DT), img_shapes=[[(1, 64, 64)]], return_dict=False)

    @torch.no_grad()
    def fwd():
        m(**kw)

    feats = vh.VLFeatures(rnd(1, 64, 3584))
    group("qwenimage", fwd, [
        dict(injection_variant("qwenimage_joint_64_ratio", "Qwen-Image joint 64 tok, all blocks", m, feats,
                               vh.InjectionConfig()), fn=fwd),
        dict(injection_variant("qwenimage_joint_64_concat_ratio", "Qwen-Image joint 64, two-pass kernel off", m,
                               feats, vh.InjectionConfig(), env={"VLHOOKS_FUSED_ATTENTION": "0"}), fn=fwd)])
    peak_memory("qwenimage_joint_64_peak_memory_ratio", fwd, lambda: vh.apply_injection(m, feats, vh.InjectionConfig()),
                fwd)
    # wall vs GPU busy time: whether the spread between repeats is the host
    profile_one("qwenimage_joint_64", fwd, lambda: vh.apply_injection(m, feats, vh.InjectionConfig()))


def flux2():
    try:
        from vlhooks.models import family_named

        family_named("flux2")
    except Exception as e:
        RESULTS["flux2_joint_64_ratio"] = None
        NOTES.append(f"flux2 not measured: the family is not importable ({type(e).__name__}: {e})")
        return
    m = model("flux2")
    T = 128
    ids = torch.zeros(4096, 4, device=DEV)
    ids[:, 1] = torch.arange(64, device=DEV).repeat_interleave(64)
    ids[:, 2] = torch.arange(64, device=DEV).repeat(64)
    txt = torch.zeros(T, 4, device=DEV)
    txt[:, 3] = torch.arange(T, device=DEV)
    kw = dict(hidden_states=rnd(1, 4096, 128), encoder_hidden_states=rnd(1, T, 15360),
              timestep=torch.tensor([0.5], device=DEV, dtype=DT), img_ids=ids, txt_ids=txt,
              guidance=torch.tensor([3.5], device=DEV, dtype=DT), return_dict=False)

    @torch.no_grad()
    def fwd():
        m(**kw)

    feats = vh.VLFeatures(rnd(1, 64, 15360))
    r = group("flux2", fwd, [
        dict(injection_variant("flux2_joint_64_ratio", "Flux.2 joint 64 tok, all blocks", m, feats,
                               vh.InjectionConfig()), fn=fwd),
        dict(injection_variant("flux2_joint_64_eager_text_ratio", "Flux.2 joint 64, text-path kernels off", m, feats,
                               vh.InjectionConfig(), env={"VLHOOKS_FUSED_TEXT": "0"}), fn=fwd),
        dict(injection_variant("flux2_joint_64_kv_kernel_ratio", "Flux.2 joint 64, extras' K/V in one kernel", m,
                               feats, vh.InjectionConfig(), env={"VLHOOKS_FUSED_KV": "always"}), fn=fwd)])
    paired("flux2_joint_64_text_kernels_minus_eager", r, "flux2_joint_64_ratio", "flux2_joint_64_eager_text_ratio")
    paired("flux2_joint_64_kv_kernel_minus_cublas", r, "flux2_joint_64_kv_kernel_ratio", "flux2_joint_64_ratio")
    peak_memory("flux2_joint_64_peak_memory_ratio", fwd, lambda: vh.apply_injection(m, feats, vh.InjectionConfig()),
                fwd)


# ---------------------------------------------------------------------------------------------------- training
def baseline_floor(m, ckpt: bool):
    """`shared/bench/gpu_baseline.py`'s training floor, from its own source: the tensors its `zimage_part` builds
    for part C (`t`, `adapter`, `vl`, `cap`, `lat2`: the last assignment of each before `step`) and its `step`
    function, executed with `m` as its model (pure bf16 frozen DiT, forward + backward, gradients into a tiny
    bf16 input adapter whose 64 tokens are appended to the caption; batch 4, 512^2)."""
    src = BASELINE_SRC.read_text()
    shared = HERE.parent.parent / "shared" / "bench" / "gpu_baseline.py"
    digest = hashlib.sha256(src.encode()).hexdigest()
    RESULTS["train_baseline_floor_source_sha256"] = digest
    if shared.exists() and hashlib.sha256(shared.read_bytes()).hexdigest() != digest:
        NOTES.append("benchmarks/shared_gpu_baseline.py differs from ../shared/bench/gpu_baseline.py: copy it again")
    part = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "zimage_part")
    nodes = list(ast.walk(part))
    step_def = next(n for n in nodes if isinstance(n, ast.FunctionDef) and n.name == "step")
    wanted, last = {"t", "adapter", "vl", "cap", "lat2"}, {}
    for n in nodes:
        if (isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name)
                and n.targets[0].id in wanted and n.lineno < step_def.lineno
                and n.lineno > getattr(last.get(n.targets[0].id), "lineno", -1)):
            last[n.targets[0].id] = n  # the last assignment in source order (ast.walk is breadth-first)
    ns = {"torch": torch, "DEV": DEV, "DT": DT, "m": m}
    for n in sorted(last.values(), key=lambda n: n.lineno):
        exec(compile(ast.Module([n], []), str(BASELINE_SRC), "exec"), ns)
    exec(compile(ast.Module([step_def], []), str(BASELINE_SRC), "exec"), ns)

    def setup():  # what the baseline does around its step
        m.requires_grad_(False)
        m.train()
        (m.enable_gradient_checkpointing if ckpt else m.disable_gradient_checkpointing)()

    return {"setup": setup, "fn": ns["step"], "teardown": lambda: m.eval()}


def adapter_module(m, kind: str, ckpt: bool, features: int):
    """`AdapterModule` exactly as `vlhooks train` builds it (its own __init__: adapter, dtypes, checkpointing) around
    the one full-size model `m` (build_dit is pointed at it), and its own optimizer. Not yet injected: `attach`."""
    import vlhooks.train.module as tm

    spec = {"type": "projection", "kind": "linear", "feature_width": features} if kind == "projection" else \
        {"type": "lora", "rank": 16, "alpha": 16.0}
    real = tm.build_dit
    tm.build_dit = lambda s: m
    try:
        mod = tm.AdapterModule(dit={"class_name": type(m).__name__, "config": {}, "dtype": str(DT)[6:]},
                               adapter=spec, drop_image=0.0, drop_text=0.0, drop_both=0.0,
                               gradient_checkpointing=ckpt)
    finally:
        tm.build_dit = real
    mod.adapter.to(DEV)
    return mod, mod.configure_optimizers()["optimizer"]


def attach(m, mod):
    """Inject `mod`'s adapter into `m` as `on_fit_start` does; the model in the module's checkpointing mode."""
    m.eval()
    (m.enable_gradient_checkpointing if mod.hparams.gradient_checkpointing else m.disable_gradient_checkpointing)()
    mod.handle = vh.apply_injection(m, None, mod.injection, adapter=mod.adapter)
    mod.training_attention(True)  # as on_fit_start: cuDNN's SDPA off where the family says (Flux.1)


def detach(mod):
    mod.release()


def module_step(mod, opt, batch, native=True):
    """One optimizer step as Lightning's `bf16-mixed` runs `training_step` (under autocast) with the module's own
    optimizer (fused AdamW on the GPU)."""
    gen = torch.Generator().manual_seed(0)

    def step():
        mod.native_dit_precision = native
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=DEV == "cuda"):
            loss = mod.compute_loss(batch, gen)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def zimage_batch(B, res):
    s = res // 8
    return {"latents": torch.randn(B, 16, s, s, device=DEV), "caption": torch.randn(B, 128, 2560, device=DEV),
            "caption_len": torch.full((B,), 128, device=DEV), "features": torch.randn(B, 64, 2560, device=DEV)}


def flux_batch(B, res):
    s = res // 8
    return {"latents": torch.randn(B, 16, s, s, device=DEV), "caption": torch.randn(B, 512, 4096, device=DEV),
            "caption_len": torch.full((B,), 512, device=DEV), "pooled": torch.randn(B, 768, device=DEV),
            "features": torch.randn(B, 64, 4096, device=DEV)}


def train():
    """The module's step (Z-Image 512^2, batch 4) against the baseline's floor on the same model, interleaved (the
    floor is each repeat's plain run); the step before this change (autocast over the DiT, foreach AdamW) as one
    more variant."""
    m = model("z_image")
    batch = zimage_batch(4, 512)
    for ckpt in (False, True):
        sfx = "_ckpt" if ckpt else ""
        floor = baseline_floor(m, ckpt)
        floor["setup"]()
        reset_peak()
        floor["fn"]()
        sync()
        RESULTS[f"train_baseline_floor_peak_gib{sfx}"] = round(peak_gib(), 2)
        floor["teardown"]()

        def plain(floor=floor):
            floor["setup"]()
            floor["fn"]()
            floor["teardown"]()

        variants = []
        kinds = [("projection", True), ("lora", True), ("projection", False)]
        for kind, native in kinds:
            mod, opt = adapter_module(m, kind, ckpt, 2560)
            if not native:  # the step as it was: autocast over the DiT, foreach AdamW
                opt = torch.optim.AdamW(mod.adapter.trainable_parameters(), lr=1e-4)
            key = (f"train_{kind}_vs_baseline_floor_ratio{sfx}" if native
                   else f"train_projection_autocast_vs_baseline_floor_ratio{sfx}")
            label = f"train {kind} 512^2 b4 ckpt={ckpt}{'' if native else ' (autocast DiT, as before)'} vs floor"
            variants.append({"key": key, "label": label, "fn": module_step(mod, opt, batch, native),
                             "setup": lambda m=m, mod=mod: attach(m, mod), "teardown": lambda mod=mod: detach(mod)})
        group("train", plain, variants, warm=1 if TINY else 2, reps=REPS)
        RESULTS[f"train_baseline_floor_ms{sfx}"] = round(ROWS[-1][2], 2)
        for v in variants:
            v["setup"]()
            v["fn"]()
            sync()
            reset_peak()
            v["fn"]()
            sync()
            RESULTS[v["key"].replace("_vs_baseline_floor_ratio", "_peak_gib")] = round(peak_gib(), 2)
            print(f"peak {v['key']}: {peak_gib():.2f} GiB", flush=True)
            v["teardown"]()
        del variants
        free()
    m.disable_gradient_checkpointing()
    m.eval()


def lightning():
    m = model("z_image")
    m.disable_gradient_checkpointing()
    lightning_overhead(m, zimage_batch(4, 512))


def lightning_overhead(m, batch, steps=10):
    """What Lightning's loop adds: `Trainer.fit` (bf16-mixed, no logger / progress bar / checkpoints) of the
    projection module on a fixed batch, per-step wall time after a synchronize, vs the bare step timed the same
    way, in the same call."""
    import lightning as L

    from vlhooks.injection import get_injection

    if get_injection(m) is not None:
        get_injection(m).remove()
    mod, _ = adapter_module(m, "projection", False, 2560)  # setup / on_fit_start inject it
    m.disable_gradient_checkpointing()
    mod.cpu = lambda: mod  # Lightning's teardown moves the module to the CPU: this one shares the benchmark's model
    cpu_batch = {k: v.cpu() for k, v in batch.items()}
    times = []

    class Clock(L.Callback):
        def on_train_batch_end(self, *a, **k):
            sync()
            times.append(time.perf_counter())

    trainer = L.Trainer(max_steps=steps, accelerator="gpu" if DEV == "cuda" else "cpu", devices=1,
                        precision="bf16-mixed" if DEV == "cuda" else "32-true", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Clock()], num_sanity_val_steps=0)
    loader = torch.utils.data.DataLoader([{k: v[i] for k, v in cpu_batch.items()} for i in range(4)] * steps,
                                         batch_size=4, pin_memory=DEV == "cuda")
    trainer.fit(mod, train_dataloaders=loader)
    if next(m.parameters()).device.type != torch.device(DEV).type:
        m.to(DEV)
    per_step = [1e3 * (b - a) for a, b in zip(times[2:], times[3:])]
    mod.release()
    mod2, opt2 = adapter_module(m, "projection", False, 2560)
    attach(m, mod2)
    step = module_step(mod2, opt2, batch)
    bare = []
    for i in range(len(per_step) + 2):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        if i >= 2:
            bare.append(1e3 * (time.perf_counter() - t0))
    mod2.release()
    r = statistics.median(per_step) / statistics.median(bare)
    RESULTS["train_lightning_loop_vs_bare_step_ratio"] = round(r, 4)
    RESULTS["train_lightning_loop_ms"] = [round(statistics.median(per_step), 2), round(min(per_step), 2),
                                          round(max(per_step), 2)]
    RESULTS["train_bare_step_wall_ms"] = [round(statistics.median(bare), 2), round(min(bare), 2), round(max(bare), 2)]
    print(f"lightning loop {statistics.median(per_step):.2f} ms/step vs bare step {statistics.median(bare):.2f} ms "
          f"(ratio {r:.4f}; {len(per_step)} steps each)", flush=True)
    save()


def throughput(families=("z_image", "flux")):
    """Images/s and peak GiB of the AdapterModule step (bf16-mixed as `vlhooks train` runs it, fused AdamW) for
    Z-Image and Flux.1 at 512^2 and 1024^2, projection and LoRA, batch 4, gradient checkpointing (the recipes'
    setting; at 512^2 without it too where the training part measured it)."""
    reps = 2 if TINY else 5
    one = os.environ.get("THROUGHPUT_ONE")  # e.g. "512,projection": one configuration, one step (a repro)
    for name, batch_fn, width in (("z_image", zimage_batch, 2560), ("flux", flux_batch, 4096)):
        if name not in families:
            continue
        m = model(name)
        from vlhooks.injection import get_injection

        for res in (512, 1024):
            for kind in ("projection", "lora"):
                key = f"throughput_{name}_{res}_{kind}"
                if one and one != f"{res},{kind}":
                    continue
                try:
                    if get_injection(m) is not None:
                        get_injection(m).remove()
                    mod, opt = adapter_module(m, kind, True, width)
                    attach(m, mod)
                    B = 4
                    step = module_step(mod, opt, batch_fn(B, res))
                    step()
                    sync()
                    if one:
                        print(f"{key}: one step ran", flush=True)
                        return
                    reset_peak()
                    ts = [_time(step) for _ in range(reps)]
                    ips = [B / (t / 1e3) for t in ts]
                    RESULTS[key + "_images_per_s"] = round(statistics.median(ips), 3)
                    RESULTS[key + "_images_per_s_minmax"] = [round(min(ips), 3), round(max(ips), 3)]
                    RESULTS[key + "_reps"] = reps
                    RESULTS[key + "_peak_gib"] = round(peak_gib(), 2)
                    RESULTS[key + "_setting"] = f"batch {B}, gradient checkpointing, bf16 DiT, step ms median " \
                                                f"{statistics.median(ts):.1f}"
                    print(f"throughput {name} {res}^2 {kind}: {statistics.median(ips):.2f} img/s "
                          f"[{min(ips):.2f}, {max(ips):.2f}] peak {peak_gib():.1f} GiB", flush=True)
                    mod.release()
                    del mod, opt, step
                except Exception as e:
                    traceback.print_exc()
                    RESULTS[key + "_images_per_s"] = None
                    NOTES.append(f"{key}: FAILED {type(e).__name__}: {str(e)[:200]}")
                free()
                save()
        m.disable_gradient_checkpointing()


def busy(fn, per_kernel: bool = False):
    """GPU busy time (ms: the sum of the kernels' own times) and kernel count of one call (torch.profiler); with
    `per_kernel`, also `{kernel name: (count, ms)}`."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        fn()
        sync()
    kernels = [e for e in p.events() if e.device_type == DeviceType.CUDA]
    def own(e):
        return getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0)

    total = sum(own(e) for e in kernels)
    if not per_kernel:
        return total / 1e3, len(kernels)
    per: dict[str, tuple[int, float]] = {}
    for e in kernels:
        c, t = per.get(e.name, (0, 0.0))
        per[e.name] = (c + 1, t + own(e) / 1e3)
    return total / 1e3, len(kernels), per


def profile_part():
    """Where a patched forward's extra time goes: GPU busy time (kernels) vs wall time, plain vs patched, for
    Z-Image joint 64 x 30 (and 4 x 64 masked) and Flux joint 128 x 57. wall - busy is time the GPU waited for the
    host. (On the CPU dry run the GPU columns are empty.)"""
    for name in ("z_image", "flux"):
        m = model(name)
        if name == "z_image":
            lat, t, cap = zimage_inputs()
            fwd = torch.no_grad()(lambda: m([lat], t, [cap], return_dict=False))
            feats, key = vh.VLFeatures(rnd(1, 64, 2560)), "zimage_joint_64"
        else:
            fwd = flux_inputs(m)
            feats, key = vh.VLFeatures(rnd(1, 128, 4096)), "flux_57blocks_128"
        profile_one(key, fwd, lambda: vh.apply_injection(m, feats, vh.InjectionConfig()))
        if name == "z_image":
            refs = [vh.Reference(vh.VLFeatures(rnd(1, 64, 2560)), mask=q) for q in quadrant_masks()]
            profile_one("zimage_multiref_4x64", fwd, lambda: vh.apply_injection(m, refs, vh.InjectionConfig()))


def profile_one(key, fwd, patch):
    """Wall and GPU busy time, plain vs patched (`patch()` returns the handle), and the kernels the patch adds
    (names with their added count and time, the top 12 by time)."""
    out, kernels = {}, {}
    for label in ("plain", "patched"):
        h = patch() if label == "patched" else None
        fwd()
        wall = statistics.median(_time(fwd) for _ in range(5))
        b, n, per = busy(fwd, per_kernel=True)
        out[label], kernels[label] = (wall, b, n), per
        if h:
            h.remove()
    (pw, pb, pn), (qw, qb, qn) = out["plain"], out["patched"]
    added = {}
    for name in set(kernels["plain"]) | set(kernels["patched"]):
        c0, t0 = kernels["plain"].get(name, (0, 0.0))
        c1, t1 = kernels["patched"].get(name, (0, 0.0))
        if c1 != c0 or abs(t1 - t0) > 0.05:
            added[name[:90]] = (c1 - c0, round(t1 - t0, 3))
    top = sorted(added.items(), key=lambda kv: -abs(kv[1][1]))[:12]
    RESULTS[f"profile_{key}"] = {"plain_wall_ms": round(pw, 2), "plain_busy_ms": round(pb, 2), "plain_kernels": pn,
                                 "patched_wall_ms": round(qw, 2), "patched_busy_ms": round(qb, 2),
                                 "patched_kernels": qn, "added_kernels_top": top}
    print(f"profile {key}: wall {pw:.2f} -> {qw:.2f} ms (+{qw - pw:.2f}), GPU busy {pb:.2f} -> {qb:.2f} ms "
          f"(+{qb - pb:.2f}), idle {pw - pb:.2f} -> {qw - qb:.2f} ms, kernels {pn} -> {qn}", flush=True)
    for name, (dc, dt) in top:
        print(f"    {dc:+5d} kernels {dt:+8.3f} ms  {name}", flush=True)
    save()


def peer_profile():
    """Flux.1 with the same XLabs-style IP-Adapter through diffusers' own processors and through
    `vh.import_ip_adapter`: GPU busy time and kernels of one forward each, and the kernels vlhooks adds or saves
    against diffusers (recorded as `profile_flux_imported_vs_diffusers`)."""
    m = model("flux")
    fwd = flux_inputs(m)
    originals = dict(m.attn_processors)
    m._load_ip_adapter_weights(xlabs_ip_weights(m), low_cpu_mem_usage=False)
    m.encoder_hid_proj.to(DEV, DT)
    xl_procs = dict(m.attn_processors)
    imported = vh.import_ip_adapter(m, remove=False).to(DEV, DT)
    m.set_attn_processor(dict(originals))
    emb = rnd(1, 1, 768)
    runs = {}
    m.set_attn_processor(dict(xl_procs))
    diffusers_fwd = lambda: fwd({"ip_adapter_image_embeds": [emb]})  # noqa: E731
    runs["diffusers"] = (statistics.median(_time(diffusers_fwd, CALLS) for _ in range(5)),) + busy(diffusers_fwd,
                                                                                                   per_kernel=True)
    m.set_attn_processor(dict(originals))
    with vh.inject(m, vh.VLFeatures(emb), None, adapter=imported):
        runs["vlhooks"] = (statistics.median(_time(fwd, CALLS) for _ in range(5)),) + busy(fwd, per_kernel=True)
    (dw, db, dn, dk), (vw, vb, vn, vk) = runs["diffusers"], runs["vlhooks"]
    added = {}
    for name in set(dk) | set(vk):
        c0, t0 = dk.get(name, (0, 0.0))
        c1, t1 = vk.get(name, (0, 0.0))
        if c1 != c0 or abs(t1 - t0) > 0.02:
            added[name[:90]] = (c1 - c0, round(t1 - t0, 3))
    top = sorted(added.items(), key=lambda kv: -abs(kv[1][1]))[:14]
    RESULTS["profile_flux_imported_vs_diffusers"] = {
        "diffusers_wall_ms": round(dw, 2), "diffusers_busy_ms": round(db, 2), "diffusers_kernels": dn,
        "vlhooks_wall_ms": round(vw, 2), "vlhooks_busy_ms": round(vb, 2), "vlhooks_kernels": vn,
        "vlhooks_minus_diffusers_kernels_top": top}
    print(f"peer profile (XLabs IP-Adapter, Flux.1): wall diffusers {dw:.2f} vs vlhooks {vw:.2f} ms, GPU busy "
          f"{db:.2f} vs {vb:.2f} ms, kernels {dn} vs {vn}", flush=True)
    for name, (dc, dt) in top:
        print(f"    {dc:+5d} kernels {dt:+8.3f} ms  {name}", flush=True)
    del imported
    save()


# ---------------------------------------------------------------------------------------------------- earlier parts
def zimage_sweep():
    """Z-Image at 64 / 256 / 729 tokens: joint, decoupled + kv, and the embedding route (tokens in the caption)."""
    m = model("z_image")
    lat, t, cap = zimage_inputs()

    @torch.no_grad()
    def fwd():
        m([lat], t, [cap], return_dict=False)

    for n in (64, 256, 729):
        feats = vh.VLFeatures(rnd(1, n, 2560))
        kv = vh.KVAdapter.create(m)
        capn = torch.cat([cap, rnd(n, 2560)])
        variants = [
            dict(injection_variant(f"zimage_joint_{n}_ratio", f"Z-Image joint {n}", m, feats, vh.InjectionConfig()),
                 fn=fwd),
            dict(injection_variant(f"zimage_decoupled_kv_{n}_ratio", f"Z-Image decoupled+kv {n}", m, feats,
                                   vh.InjectionConfig(mode="decoupled"), adapter=kv), fn=fwd),
            {"key": f"zimage_blend_{n}_ratio", "label": f"Z-Image embedding route +{n} caption tokens",
             "fn": torch.no_grad()(lambda capn=capn: m([lat], t, [capn], return_dict=False))},
        ]
        group("zimage_sweep", fwd, variants)
        del kv


def loop():
    """A whole 8-step denoising loop (ZImagePipeline, full-size DiT, tiny VAE, precomputed caption embeddings),
    the patched one including its per-generation work (set up before each repeat)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline

    m = model("z_image")
    with torch.device(DEV):
        vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, norm_num_groups=32,
                            shift_factor=0.0, scaling_factor=1.0).to(DT).eval()
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                          transformer=m)
    pipe.set_progress_bar_config(disable=True)
    cap = [rnd(128, 2560)]

    @torch.no_grad()
    def gen():
        pipe(prompt_embeds=cap, height=1024, width=1024, num_inference_steps=8, guidance_scale=0.0,
             generator=torch.Generator(DEV).manual_seed(0), output_type="latent")

    feats = vh.VLFeatures(rnd(1, 64, 2560))
    group("loop", gen, [dict(injection_variant("loop_8steps_ratio", "Z-Image 8-step loop, joint 64 (incl. caching)",
                                               pipe, feats, vh.InjectionConfig()), fn=gen)], warm=1, reps=5)


def compiled():
    """torch.compile: the patched transformer's speed-up over its eager self vs the unpatched model's."""
    m = model("flux")
    fwd = flux_inputs(m)

    def med(fn, reps=10):
        with torch.no_grad():
            for _ in range(3):
                fn()
            return statistics.median(_time(fn) for _ in range(reps))

    speedups = {}
    for label in ("plain", "patched"):
        h = vh.apply_injection(m, vh.VLFeatures(rnd(1, 128, 4096)), vh.InjectionConfig()) if label == "patched" \
            else None
        eager = med(fwd)
        torch._dynamo.reset()
        cm = torch.compile(m)
        comp = med(flux_inputs(cm))
        speedups[label] = eager / comp
        print(f"compile {label}: eager {eager:.2f} ms compiled {comp:.2f} ms speed-up {eager / comp:.3f}", flush=True)
        if h:
            h.remove()
    RESULTS["compile_speedup_patched_over_unpatched_speedup"] = round(speedups["patched"] / speedups["plain"], 4)


class _Energy:
    """The GPU's total energy counter (NVML's `nvmlDeviceGetTotalEnergyConsumption`, millijoules since the driver
    loaded), read through ctypes from the driver's own library: no Python package needed."""

    def __init__(self, index: int = 0):
        import ctypes

        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        if self.lib.nvmlInit_v2() != 0:
            raise RuntimeError("nvmlInit_v2 failed")
        self.handle = ctypes.c_void_p()
        if self.lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(self.handle)) != 0:
            raise RuntimeError("nvmlDeviceGetHandleByIndex_v2 failed")
        self.value = ctypes.c_ulonglong()
        self.ctypes = ctypes

    def joules(self) -> float:
        if self.lib.nvmlDeviceGetTotalEnergyConsumption(self.handle, self.ctypes.byref(self.value)) != 0:
            raise RuntimeError("nvmlDeviceGetTotalEnergyConsumption failed")
        return self.value.value / 1e3


def clocks():
    """SM clock, board power and energy while Z-Image's plain and patched forwards run, in alternating windows of
    back-to-back forwards (`nvidia-smi` sampling every 50 ms; NVML's energy counter read around each window): does
    the patched forward run at a lower clock (the block's own kernels take longer patched at the same counts;
    benchmarks/NOTES.md section 15 c), and what does each variant cost in energy?"""
    import datetime
    import subprocess

    if DEV != "cuda":
        print("clocks: needs a GPU and nvidia-smi; skipped", flush=True)
        return
    m = model("z_image")
    lat, t, cap = zimage_inputs()

    @torch.no_grad()
    def fwd():
        m([lat], t, [cap], return_dict=False)

    variants = {"plain": None,
                "joint 64": (vh.VLFeatures(rnd(1, 64, 2560)), {}),
                "joint 8": (vh.VLFeatures(rnd(1, 8, 2560)), {}),
                "joint 64, two-pass off": (vh.VLFeatures(rnd(1, 64, 2560)), {"VLHOOKS_FUSED_ATTENTION": "0"}),
                "joint 64, K/V by cuBLAS": (vh.VLFeatures(rnd(1, 64, 2560)), {"VLHOOKS_FUSED_KV": "0"})}
    try:
        energy = _Energy()
        energy.joules()
    except (OSError, RuntimeError) as e:
        print(f"clocks: no NVML energy counter ({e}); energy not measured", flush=True)
        energy = None
    fields = "timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active"
    log = Path(os.environ.get("OUT", "/tmp"), "clocks_smi.csv")
    smi = subprocess.Popen(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits", "-lms", "50"],
                           stdout=log.open("w"), stderr=subprocess.STDOUT)
    windows = []  # (variant, start, end, ms per forward, joules per forward)
    n = 24
    try:
        for _ in range(REPS):
            for name, spec in variants.items():
                h = None
                if spec is not None:
                    os.environ.update(spec[1])
                    h = vh.apply_injection(m, spec[0], vh.InjectionConfig())
                fwd()
                torch.cuda.synchronize()
                t0 = time.time()
                e0 = energy.joules() if energy else 0.0
                ms = _time(fwd, n)
                e1 = energy.joules() if energy else 0.0
                windows.append((name, t0, time.time(), ms, (e1 - e0) / n))
                if h is not None:
                    h.remove()
                    for k in spec[1]:
                        os.environ.pop(k, None)
    finally:
        time.sleep(0.2)
        smi.terminate()
        smi.wait()
    samples = []
    for line in log.read_text().splitlines():
        parts = [x.strip() for x in line.split(",")]
        try:
            ts = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            samples.append((ts, float(parts[1]), float(parts[2]), float(parts[3]), float(parts[4]), parts[5]))
        except (ValueError, IndexError):
            continue
    print(f"clocks: {len(samples)} nvidia-smi samples", flush=True)
    rows = {name: [] for name in variants}
    for name, a, b, ms, joules in windows:
        inside = [s for s in samples if a + 0.3 <= s[0] <= b]  # the first 0.3 s after a switch left out
        if not inside:
            continue
        sm = statistics.median(s[1] for s in inside)
        pw = statistics.median(s[3] for s in inside)
        reasons = sorted({s[5] for s in inside})
        rows[name].append((ms, sm, pw, joules))
        print(f"clocks: {name:24s} {ms:8.2f} ms/forward {joules:7.2f} J/forward  SM {sm:6.0f} MHz  power {pw:6.1f} W"
              f"  temp {statistics.median(s[4] for s in inside):.0f} C  throttle {reasons} n={len(inside)}", flush=True)
    slug = {"joint 64": "joint_64", "joint 8": "joint_8", "joint 64, two-pass off": "joint_64_concat",
            "joint 64, K/V by cuBLAS": "joint_64_cublas_kv"}
    for name, key in slug.items():
        pairs = list(zip(rows["plain"], rows[name]))
        if not pairs:
            continue
        for i, what in ((0, "time"), (1, "sm_clock"), (2, "power"), (3, "energy")):
            if what == "energy" and energy is None:
                continue
            r = [q[i] / p[i] for p, q in pairs]
            record(f"zimage_{key}_{what}_ratio_in_clock_windows", r)
            print(f"clocks: {name:24s} / plain {what:8s}: {statistics.median(r):.4f} [{min(r):.4f}, {max(r):.4f}] "
                  f"n={len(r)}", flush=True)
    save()


def _outputs(o) -> list[torch.Tensor]:
    """The tensors of a transformer's output (a tuple, a list per sample, or a tensor), flattened in order."""
    if torch.is_tensor(o):
        return [o]
    return [t for x in o for t in _outputs(x)] if isinstance(o, (list, tuple)) else []


def _capture(fn):
    """`fn` (one no-grad forward that returns its output) as a CUDA graph: three warm calls on a side stream (caches
    filled, kernels tuned), then the capture. Returns the graph and the output tensors it writes on replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g), torch.no_grad():
        out = _outputs(fn())
    return g, out


def _graph_pair(key: str, label: str, fwd, patch, env: dict | None = None) -> None:
    """Plain and patched forwards, each captured as a CUDA graph, replayed alternately (`CALLS` replays a timing):
    the device's cost of the patch with the host taken out of both sides. Before timing, each graph's replay is
    checked against the same forward run eagerly (bit for bit, or its largest difference is recorded). `env`: the
    switches set while the patched forward runs eagerly and is captured (the graph keeps the path they chose)."""
    with torch.no_grad():
        eager_plain = [t.clone() for t in _outputs(fwd())]
    g_plain, out_plain = _capture(fwd)
    os.environ.update(env or {})
    handle = patch()
    try:
        try:
            with torch.no_grad():
                eager_patched = [t.clone() for t in _outputs(fwd())]
            g_patched, out_patched = _capture(fwd)
        finally:
            for k in env or {}:
                os.environ.pop(k, None)
        for name, g, out, ref in (("plain", g_plain, out_plain, eager_plain),
                                  ("patched", g_patched, out_patched, eager_patched)):
            g.replay()
            sync()
            diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(out, ref))
            RESULTS[f"{key}_{name}_graph_max_abs_diff_vs_eager"] = diff
            print(f"graphs: {label} {name}: replay vs eager max |diff| {diff:.3g}", flush=True)
        RESULTS[f"{key}_patched_differs_from_plain"] = any(not torch.equal(a, b) for a, b in
                                                           zip(out_patched, out_plain))
        tp, tq = [], []
        for i in range(WARM + REPS):
            p, q = _time(g_plain.replay, CALLS), _time(g_patched.replay, CALLS)
            if i >= WARM:
                tp.append(p)
                tq.append(q)
        r = [q / p for q, p in zip(tq, tp)]
        mp, mq = statistics.median(tp), statistics.median(tq)
        record(key, r, {key + "_ms": [round(mp, 2), round(mq, 2)]})
        ROWS.append((label, key, mp, mq, statistics.median(r), min(r), max(r), len(r)))
        print(f"graphs: {label:60s} plain {mp:8.2f} ms  variant {mq:8.2f} ms  ratio {statistics.median(r):.4f} "
              f"[{min(r):.4f}, {max(r):.4f}] n={len(r)}", flush=True)
    finally:
        handle.remove()
        del g_plain
        free()
    save()


def graphs():
    """Qwen-Image, Z-Image and Flux.1 joint injection, plain and patched forwards each replayed as one CUDA graph.
    Eagerly, Qwen-Image's plain forward leaves the GPU idle on the host for 20-45 ms of its ~175 and its ratio moves
    by tens of points between runs; replayed, the host is out of both sides and the ratio is the device's."""
    if DEV != "cuda":
        return
    sel = os.environ.get("VLHOOKS_BENCH_GRAPHS", "qwenimage,zimage,flux").split(",")
    if "qwenimage" in sel:
        m = model("qwen_image")
        kw = dict(hidden_states=rnd(1, 4096, 64), encoder_hidden_states=rnd(1, 128, 3584),
                  encoder_hidden_states_mask=None, timestep=torch.tensor([0.5], device=DEV, dtype=DT),
                  img_shapes=[[(1, 64, 64)]], return_dict=False)
        feats = vh.VLFeatures(rnd(1, 64, 3584))
        _graph_pair("qwenimage_joint_64_graph_ratio", "Qwen-Image joint 64 tok, all blocks, CUDA graphs",
                    lambda: m(**kw), lambda: vh.apply_injection(m, feats, vh.InjectionConfig()))
        if "qwenimage_variants" in sel:  # where its ~70 us a block go: each kernel switched off in turn
            for name, label, env in (("concat", "two-pass kernel off", {"VLHOOKS_FUSED_ATTENTION": "0"}),
                                     ("cublas_kv", "extras' K/V by cuBLAS", {"VLHOOKS_FUSED_KV": "0"}),
                                     ("eager_text", "text-path kernels off", {"VLHOOKS_FUSED_TEXT": "0"})):
                _graph_pair(f"qwenimage_joint_64_{name}_graph_ratio", f"Qwen-Image joint 64, {label}, CUDA graphs",
                            lambda: m(**kw), lambda: vh.apply_injection(m, feats, vh.InjectionConfig()), env)
    if "zimage" in sel:
        m = model("z_image")
        lat, t, cap = zimage_inputs()
        f64 = vh.VLFeatures(rnd(1, 64, 2560))
        _graph_pair("zimage_joint_64_graph_ratio", "Z-Image joint 64 tok x 30 blocks, CUDA graphs",
                    lambda: m([lat], t, [cap], return_dict=False), lambda: vh.apply_injection(m, f64, vh.InjectionConfig()))
    if "flux" in sel:
        m = model("flux")
        hs, ehs, pooled = rnd(1, 4096, 64), rnd(1, 512, 4096), rnd(1, 768)
        ts, gd = torch.full((1,), 0.5, device=DEV, dtype=DT), torch.full((1,), 3.5, device=DEV, dtype=DT)
        img_ids = torch.zeros(4096, 3, device=DEV)
        img_ids[:, 1] = torch.arange(64, device=DEV).repeat_interleave(64)
        img_ids[:, 2] = torch.arange(64, device=DEV).repeat(64)
        txt_ids = torch.zeros(512, 3, device=DEV)
        feats = vh.VLFeatures(rnd(1, 128, 4096))
        _graph_pair("flux_vlhooks_57blocks_128_graph_ratio", "Flux joint 128 tok x 57 blocks, CUDA graphs",
                    lambda: m(hs, ehs, pooled, ts, img_ids, txt_ids, gd, return_dict=False),
                    lambda: vh.apply_injection(m, feats, vh.InjectionConfig()))


PARTS = {"zimage": zimage, "train": train, "flux": flux, "throughput": throughput, "qwenimage": qwenimage,
         "flux2": flux2, "lightning": lightning, "profile": profile_part, "peer_profile": peer_profile,
         "throughput_zimage": lambda: throughput(("z_image",)), "throughput_flux": lambda: throughput(("flux",)),
         "zimage_sweep": zimage_sweep, "loop": loop, "compile": compiled, "clocks": clocks, "graphs": graphs}
DEFAULT = ["zimage", "train", "lightning", "throughput", "flux", "profile", "qwenimage", "flux2"]

if __name__ == "__main__":
    import diffusers

    dev_name = torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu (dry run, tiny widths)"
    print(torch.__version__, dev_name, "diffusers", diffusers.__version__, flush=True)
    t_all = time.time()
    for name in ARGS or DEFAULT:
        t0 = time.time()
        try:
            PARTS[name]()
        except Exception as e:
            traceback.print_exc()
            NOTES.append(f"PART {name} FAILED: {type(e).__name__}: {str(e)[:300]}")
            print(f"PART {name} FAILED", flush=True)
        print(f"[{name}: {time.time() - t0:.0f}s, total {time.time() - t_all:.0f}s]", flush=True)
        save()
    RESULTS["gpu"] = dev_name
    RESULTS["date"] = time.strftime("%Y-%m-%d")
    RESULTS["torch"] = torch.__version__
    RESULTS["diffusers"] = diffusers.__version__
    if TINY:
        target = Path(os.environ.get("OUT", "/tmp"), "results_tiny.json")
        target.write_text(json.dumps(RESULTS, indent=1, sort_keys=True))
    else:
        merged = json.loads(RESULTS_FILE.read_text()) if RESULTS_FILE.exists() else {}
        merged.update(RESULTS)
        RESULTS_FILE.write_text(json.dumps(merged, indent=2, sort_keys=True))
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "results.json").write_text(json.dumps(merged, indent=2, sort_keys=True))
    print("\n| run | key | plain ms | variant ms | ratio (median) | min-max | repeats |\n|---|---|---|---|---|---|---|")
    for label, key, p, q, r, lo, hi, n in ROWS:
        print(f"| {label} | `{key}` | {p:.2f} | {q:.2f} | {r:.4f} | {lo:.4f}-{hi:.4f} | {n} |")
    for k in sorted(RESULTS):
        if k.startswith("throughput_") and k.endswith("_images_per_s") or "peak_memory_ratio" in k or "minus" in k \
                or "lightning" in k:
            print(f"{k}: {RESULTS[k]} {RESULTS.get(k + '_minmax', '')}")
    for n in NOTES:
        print("NOTE:", n)
