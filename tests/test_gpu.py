"""CUDA-only paths, run on a GPU machine (skipped where there is none; CI has none): the two-pass joint attention
kernel (`vlhooks.fused_attention`) against softmax attention over the concatenated keys in float64, and the Z-Image
and Flux processors that use it against the same processors with it switched off (`VLHOOKS_FUSED_ATTENTION=0`:
the concatenation every other test checks bit for bit).

    python -m pytest -q tests/test_gpu.py      # on a CUDA machine with Triton
"""

import math

import pytest
import torch

import vlhooks as vh
from vlhooks import fused_attention, fused_text
from vlhooks.models import family_for

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
DEV, DT = "cuda", torch.bfloat16


def _reference(q, k, v, ek, ev):
    """float64 softmax attention of `q` over `[k; ek]` (`[B, L, H, Dh]` layouts, extras broadcast over rows)."""
    B = q.shape[0]
    k = torch.cat([k, ek.expand(B, -1, -1, -1)], 1).double().transpose(1, 2)
    v = torch.cat([v, ev.expand(B, -1, -1, -1)], 1).double().transpose(1, 2)
    logits = q.double().transpose(1, 2) @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return (logits.softmax(-1) @ v).transpose(1, 2)  # [B, L, H, Dh]


@pytest.mark.parametrize("B,L,H,D,N,extra_rows", [(1, 1152, 4, 128, 64, 1), (2, 1024, 3, 64, 200, 1),
                                                   (2, 640, 2, 128, 64, 2)])
def test_two_pass_kernel_equals_concatenated_attention(B, L, H, D, N, extra_rows):
    g = torch.Generator(DEV).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=DEV, dtype=DT)

    q, k, v = rnd(B, L, H, D), rnd(B, L, H, D), rnd(B, L, H, D)
    ek, ev = rnd(extra_rows, N, H, D) * 2, rnd(extra_rows, N, H, D)  # * 2: the extra keys take a real share
    with torch.no_grad():
        assert fused_attention.usable(q, ek)
        got = fused_attention.joint_attention(q, k, v, ek, ev)
        concat = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), torch.cat([k, ek.expand(B, -1, -1, -1)], 1).transpose(1, 2),
            torch.cat([v, ev.expand(B, -1, -1, -1)], 1).transpose(1, 2)).transpose(1, 2)
    ref = _reference(q, k, v, ek, ev)
    main_only = _reference(q, k, v, ek[:, :0], ev[:, :0])
    assert got.shape == (B, L, H, D) and got.is_contiguous()
    err, err_concat = (got.double() - ref).abs().max().item(), (concat.double() - ref).abs().max().item()
    assert err <= 2 * err_concat + 1e-3, (err, err_concat)  # as close as the stock kernel on the concatenation
    assert (main_only - ref).abs().max().item() > 50 * err  # the extra keys matter far beyond the error


def _biased_reference(q, k, v, ek, ev, bias):
    """float64 softmax attention of `q` over `[k; ek]` with `bias` `[B, L, N]` on the extra keys only."""
    B, L = q.shape[0], k.shape[1]
    k = torch.cat([k, ek.expand(B, -1, -1, -1)], 1).double().transpose(1, 2)
    v = torch.cat([v, ev.expand(B, -1, -1, -1)], 1).double().transpose(1, 2)
    logits = q.double().transpose(1, 2) @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, H, L, L + N]
    logits[..., L:] += bias.double()[:, None]
    return (logits.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("layout", ["scattered", "regions"])
def test_two_pass_kernel_with_bias_equals_the_biased_concatenation(layout):
    """Strengths per row, a padded key and per-query weights of four references (some queries see none of them):
    the kernel's factored bias against float64 softmax over the concatenation with the dense bias, as close as
    SDPA on the concatenation with that bias (the path the kernel replaces). `regions`: each stretch of queries sees
    one reference (as spatial masks give), so the kernel skips the other references' key tiles."""
    g = torch.Generator(DEV).manual_seed(0)
    B, L, H, D, S, n = 2, 1152, 3, 128, 4, 64

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=DEV, dtype=DT)

    q, k, v = rnd(B, L, H, D), rnd(B, L, H, D), rnd(B, L, H, D)
    ek, ev = rnd(B, S * n, H, D) * 2, rnd(B, S * n, H, D)
    key_bias = torch.log(torch.tensor([[1.0], [0.5]], device=DEV)).expand(B, S * n).clone()
    key_bias[:, 3] = float("-inf")  # a padded token
    key_bias[1, n:2 * n] = float("-inf")  # row 1 does not see reference 1
    weights = torch.rand(B, L, S, generator=g, device=DEV)
    weights[weights < 0.3] = 0.0
    if layout == "regions":  # queries 100-399 see reference 0, 400-799 reference 2, the rest reference 3
        weights.zero_()
        weights[:, 100:400, 0], weights[:, 400:800, 2], weights[:, 800:, 3] = 1.0, 0.6, 1.0
    weights[:, :100] = 0.0  # 100 queries that see no extra key
    query_bias = torch.log(weights)
    key_segment = torch.arange(S, device=DEV, dtype=torch.int32).repeat_interleave(n)
    dense = key_bias[:, None, :] + query_bias[..., key_segment.long()]  # [B, L, N]
    with torch.no_grad():
        got = fused_attention.joint_attention(q, k, v, ek, ev, key_bias, query_bias, key_segment)
        bias = torch.cat([torch.zeros(B, L, L, device=DEV), dense], -1)[:, None].to(DT)  # [B, 1, L, L + N]
        concat = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), torch.cat([k, ek], 1).transpose(1, 2), torch.cat([v, ev], 1).transpose(1, 2),
            attn_mask=bias).transpose(1, 2)
    ref = _biased_reference(q, k, v, ek, ev, dense)
    main_only = _reference(q, k, v, ek[:, :0], ev[:, :0])
    err, err_concat = (got.double() - ref).abs().max().item(), (concat.double() - ref).abs().max().item()
    assert torch.isfinite(got).all()
    assert err <= 2 * err_concat + 1e-3, (err, err_concat)
    assert (got[:, :100].double() - main_only[:, :100]).abs().max().item() <= 2 * err_concat + 1e-3  # main alone
    assert (main_only - ref).abs().max().item() > 50 * err


def _zimage():
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    m = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=256, n_layers=2,
                                 n_refiner_layers=1, n_heads=2, n_kv_heads=2, qk_norm=True, cap_feat_dim=16,
                                 axes_dims=[32, 48, 48], axes_lens=[1024, 64, 64])
    m = m.to(DEV, DT).eval()
    g = torch.Generator(DEV).manual_seed(1)
    x = [torch.randn(16, 1, 64, 64, generator=g, device=DEV, dtype=DT)]  # 1024 image tokens
    cap = [torch.randn(128, 16, generator=g, device=DEV, dtype=DT)]  # 1024 + 128 = 1152 = 9 x 128 keys
    t = torch.tensor([0.4], device=DEV)
    return m, (lambda: m(x, t, cap, return_dict=False)[0][0]), 16


def _flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    m = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=128,
                               num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                               axes_dims_rope=[16, 56, 56]).to(DEV, DT).eval()
    g = torch.Generator(DEV).manual_seed(1)
    hs = torch.randn(1, 1024, 4, generator=g, device=DEV, dtype=DT)
    ehs = torch.randn(1, 128, 32, generator=g, device=DEV, dtype=DT)  # 128 + 1024 = 1152 keys
    pooled = torch.randn(1, 32, generator=g, device=DEV, dtype=DT)
    ids = torch.zeros(1024, 3, device=DEV)
    ids[:, 1], ids[:, 2] = torch.arange(32, device=DEV).repeat_interleave(32), torch.arange(32, device=DEV).repeat(32)
    ts = torch.full((1,), 0.6, device=DEV, dtype=DT)

    def run():
        return m(hs, ehs, pooled, ts, ids, torch.zeros(128, 3, device=DEV), return_dict=False)[0]

    return m, run, 32


def _qwen_image():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    m = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=128,
                                    num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(16, 56, 56))
    m = m.to(DEV, DT).eval()
    g = torch.Generator(DEV).manual_seed(1)
    hs = torch.randn(1, 1024, 16, generator=g, device=DEV, dtype=DT)  # 32 x 32 image tokens
    ehs = torch.randn(1, 128, 32, generator=g, device=DEV, dtype=DT)  # 128 + 1024 = 1152 keys

    def run():
        return m(hidden_states=hs, encoder_hidden_states=ehs, encoder_hidden_states_mask=None,
                 timestep=torch.full((1,), 0.6, device=DEV, dtype=DT), img_shapes=[[(1, 32, 32)]],
                 return_dict=False)[0]

    return m, run, 32


def _flux2():
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    m = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=128,
                                num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=32,
                                axes_dims_rope=[32, 32, 32, 32], guidance_embeds=True).to(DEV, DT).eval()
    g = torch.Generator(DEV).manual_seed(1)
    hs = torch.randn(1, 1024, 16, generator=g, device=DEV, dtype=DT)  # 32 x 32 image tokens
    ehs = torch.randn(1, 128, 32, generator=g, device=DEV, dtype=DT)  # 128 + 1024 = 1152 keys
    img_ids = torch.cartesian_prod(*(torch.arange(n) for n in (1, 32, 32, 1))).to(DEV)
    txt_ids = torch.cartesian_prod(*(torch.arange(n) for n in (1, 1, 1, 128))).to(DEV)

    def run():
        return m(hidden_states=hs, encoder_hidden_states=ehs, timestep=torch.full((1,), 0.6, device=DEV, dtype=DT),
                 img_ids=img_ids, txt_ids=txt_ids, guidance=torch.full((1,), 4.0, device=DEV, dtype=DT),
                 return_dict=False)[0]

    return m, run, 32


def _masked_references(width, dtype):
    """Two references of 256 tokens, one masked to the left half of the 32 x 32 image-token grid at strength 1,
    the other to the right half at strength 0.5: the biased case (a float logit bias on the concatenation)."""
    g = torch.Generator(DEV).manual_seed(3)
    left = torch.zeros(32, 32, dtype=torch.bool, device=DEV)
    left[:, :16] = True
    a, b = (torch.randn(1, 256, width, device=DEV, generator=g) for _ in range(2))
    return [vh.Reference(vh.VLFeatures(a.to(dtype)), mask=left),
            vh.Reference(vh.VLFeatures(b.to(dtype)), mask=~left, scale=0.5)]


def _plain_features(width, dtype, n=960):
    """`n` extra tokens at strength 1: enough to change the block clearly (the kernel forced on: `always`)."""
    tokens = torch.randn(1, n, width, device=DEV, generator=torch.Generator(DEV).manual_seed(2))
    return vh.VLFeatures(tokens.to(dtype))


_REFS = {"plain": (_plain_features, "always"), "masked": (_masked_references, "1")}
_BUILDS = {"z_image": _zimage, "flux": _flux, "qwen_image": _qwen_image, "flux2": _flux2}


# Flux.2 not `masked`: at half strength and half the image each, the two references change its tiny first block by
# only 3.5x the bf16 error of the concatenation itself (the premise below needs 5x)
@pytest.mark.parametrize("build,refs,env", [
    pytest.param(_BUILDS[b], *_REFS[r], id=f"{r}-{b}") for r in _REFS for b in _BUILDS
    if not (b == "flux2" and r == "masked")])
def test_processors_take_the_kernel_and_agree_with_the_concatenation(build, refs, env, monkeypatch):
    """The first patched block's attention output, bf16 through the kernel and bf16 through the concatenation,
    each against the same block in float32 (where the kernel does not apply): the kernel's path must be as close to
    it as the concatenation's, and far closer than leaving the extra keys out. Later blocks run too (every patched
    block takes the kernel) but are not compared: there bf16 drift of the whole model masks the attention.
    `plain`: the kernel forced (`always`); `masked`: two references with spatial masks and strengths take the
    kernel by default (its bias)."""
    model, run, width = build()
    first = family_for(model).sites(model)[0].attention(model)
    seen = []
    first.register_forward_hook(lambda m, a, out: seen.append(
        torch.cat([o.flatten() for o in out]) if isinstance(out, tuple) else out.flatten()))
    calls = []
    real = fused_attention.joint_attention
    monkeypatch.setattr(fused_attention, "joint_attention", lambda *a: calls.append(1) or real(*a))
    cfg = vh.InjectionConfig(guidance="none")
    with torch.no_grad():
        plain_out = run()
        monkeypatch.setenv("VLHOOKS_FUSED_ATTENTION", "0")
        with vh.inject(model, refs(width, DT), cfg):
            run()
        assert not calls
        monkeypatch.setenv("VLHOOKS_FUSED_ATTENTION", env)
        with vh.inject(model, refs(width, DT), cfg):
            run()
        assert torch.equal(run(), plain_out)  # removed: the plain model again
        model.float()  # the same weights in float32; cast the inputs through a pre-hook
        model.register_forward_pre_hook(
            lambda m, a, kw: (tuple(_cast(x) for x in a), {k: _cast(v) for k, v in kw.items()}), with_kwargs=True)
        run()
        with vh.inject(model, refs(width, torch.float32), cfg):
            run()
    plain, concat, fused, _, plain_ref, ref = (x.double() for x in seen)
    n_blocks = 2 if build is _zimage else len(vh.list_sites(model))  # Z-Image: the 2 main layers
    assert len(calls) == n_blocks

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    e_fused, e_concat, effect = rel(fused, ref), rel(concat, ref), rel(plain, ref)
    assert e_fused <= 1.5 * e_concat + 1e-4, (e_fused, e_concat)
    assert effect > 5 * e_fused, (effect, e_fused)
    assert rel(plain_ref, ref) > 5 * e_fused  # the same in float32: the extra keys change this block clearly


def _cast(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.float()
    if isinstance(x, list):
        return [_cast(t) for t in x]
    return x


def _tiny_module(kind="projection"):
    from vlhooks.testing import tiny
    from vlhooks.train.module import AdapterModule

    t = tiny("z_image")
    spec = {"type": "projection", "kind": "linear"} if kind == "projection" else {"type": "lora", "rank": 4, "alpha": 4.0}
    mod = AdapterModule(dit={"class_name": t.class_name, "config": t.config, "dtype": "bfloat16"}, adapter=spec,
                        drop_image=0.0, drop_text=0.0, drop_both=0.0).to(DEV)
    g = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(4, 16, 16, 16, generator=g), "caption": torch.randn(4, 8, t.caption_width, generator=g),
             "caption_len": torch.full((4,), 8), "features": torch.randn(4, 12, t.caption_width, generator=g)}
    return mod, {k: v.to(DEV) for k, v in batch.items()}


@pytest.mark.parametrize("kind", ["projection", "lora"])
def test_training_step_runs_a_bf16_dit_outside_autocast(kind):
    """Under `bf16-mixed` (autocast) the module runs a bf16 DiT in its own dtype (`native_dit_precision`): the DiT's
    forward sees no autocast, the loss and the adapter's gradients agree with the autocast path to bf16 rounding,
    and the optimizer is the fused AdamW."""
    mod, batch = _tiny_module(kind)
    seen = []
    mod.dit.register_forward_pre_hook(lambda m, a: seen.append(torch.is_autocast_enabled("cuda")))
    mod.handle = vh.apply_injection(mod.dit, None, mod.injection, adapter=mod.adapter)
    losses, grads = [], []
    for native in (True, False):
        mod.native_dit_precision = native
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = mod.compute_loss(batch, torch.Generator().manual_seed(3))
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten().float() for p in mod.adapter.trainable_parameters()
                                if p.grad is not None]))
        mod.adapter.zero_grad(set_to_none=True)
    mod.release()
    assert seen == [False, True]
    assert all(math.isfinite(x) for x in losses) and abs(losses[0] - losses[1]) <= 2e-2 * abs(losses[1])
    if kind == "projection":  # LoRA's B starts at zero: only B has a gradient, and it is the one compared too
        assert grads[0].norm() > 0
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0).item()
    assert cos > 0.98, cos
    opt = mod.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults.get("fused") is True


def test_host_to_device_helpers_queue_without_changing_values():
    """The per-block index and strength tensors now come from pinned memory with `non_blocking` (no stream sync):
    the same values as `torch.tensor(..., device=cuda)`."""
    from vlhooks.attention import _strength_tensor
    from vlhooks.injector import _device_index

    like = torch.zeros(2, device=DEV, dtype=DT)
    assert torch.equal(_strength_tensor([0.5, 1.0, 0.3], like), torch.tensor([0.5, 1.0, 0.3], device=DEV, dtype=DT))
    assert torch.equal(_device_index([2, 0, 1], torch.device(DEV)), torch.tensor([2, 0, 1], device=DEV))


@pytest.mark.parametrize("build", [_zimage, _flux], ids=["z_image", "flux"])
def test_patched_forward_adds_no_host_sync(build):
    """With the whole window and a constant schedule a patched forward synchronises with the host no more often
    than the plain one (`torch.cuda.set_sync_debug_mode("warn")` warns at every sync)."""
    import warnings

    model, run, width = build()
    feats = _plain_features(width, DT)

    def syncs():
        run()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with torch.no_grad():
                    run()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in seen)

    with torch.no_grad():
        plain = syncs()
        with vh.inject(model, feats, vh.InjectionConfig(guidance="none")):
            patched = syncs()
    assert patched <= plain, (plain, patched)


@pytest.mark.parametrize("name", list(_BUILDS))
def test_patched_forward_replays_as_a_cuda_graph(name):
    """A patched forward captured in a CUDA graph (what `torch.compile(mode="reduce-overhead")` and the benchmark's
    `graphs` part do) replays to the eager patched output bit for bit, and differs from the plain one."""
    model, run, width = _BUILDS[name]()
    feats = _plain_features(width, DT)
    with torch.no_grad():
        plain = run().clone()
        with vh.inject(model, feats, vh.InjectionConfig(guidance="none")):
            eager = run().clone()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    run()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = run()
            out.zero_()
            g.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, eager)
    assert not torch.equal(eager, plain)


class _Counted:
    """A Triton kernel whose launches are counted."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        launch = self.kernel[grid]
        return lambda *a, **kw: self.calls.append(1) or launch(*a, **kw)


def _count_text_kernels(monkeypatch) -> list:
    calls = []
    real = fused_text._kernels()
    monkeypatch.setattr(fused_text, "_kernels", lambda: tuple(_Counted(k, calls) for k in real))
    return calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_modulation_kernel_gives_the_eager_bits(dtype, monkeypatch):
    """`fused_text.modulate` against `x * (1 + scale) + shift` in eager PyTorch: the same bits, with and without
    the shift, for per-row and broadcast inputs, with scale and shift as the strided chunks of a modulation."""
    calls = _count_text_kernels(monkeypatch)
    g = torch.Generator(DEV).manual_seed(4)
    mod = torch.randn(3, 4 * 3072, generator=g, device=DEV).to(dtype)
    scale, shift = mod.unsqueeze(1).chunk(4, dim=2)[:2]  # [3, 1, D], row stride 4D
    with torch.no_grad():
        for x in (torch.randn(3, 64, 3072, generator=g, device=DEV).to(dtype),
                  torch.randn(1, 64, 3072, generator=g, device=DEV).to(dtype)):
            assert torch.equal(fused_text.modulate(x, scale), x * (1 + scale))
            assert torch.equal(fused_text.modulate(x, scale, shift), x * (1 + scale) + shift)
            assert torch.equal(fused_text.modulate(x, scale[:1], shift[:1]), (1 + scale[:1]) * x + shift[:1])
    assert len(calls) == 6


def _angles(n, half):
    return torch.rand(n, half, device=DEV, generator=torch.Generator(DEV).manual_seed(5)) * 40


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm_kind", ["diffusers", "torch"])
@pytest.mark.parametrize("rope", ["complex", "real", "none"])
def test_key_norm_kernel_is_within_one_rounding_of_eager(dtype, norm_kind, rope, monkeypatch):
    """`fused_text.norm_rope` against the eager key norm (diffusers' `RMSNorm`, two roundings, or
    `torch.nn.RMSNorm`, one) followed by Z-Image's complex RoPE (`complex`), diffusers' `apply_rotary_emb` on
    interleaved pairs (`real`) or nothing: every element within one rounding of eager, and on average no further
    than eager from the same computation in float64."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.normalization import RMSNorm

    from vlhooks.models.z_image import _rope

    calls = _count_text_kernels(monkeypatch)
    R, N, H, Dh = 2, 64, 24, 128
    g = torch.Generator(DEV).manual_seed(6)
    k = (3 * torch.randn(R, N, H * Dh, generator=g, device=DEV)).to(dtype).unflatten(-1, (H, Dh))  # a GEMM's view
    norm = RMSNorm(Dh, eps=1e-6) if norm_kind == "diffusers" else torch.nn.RMSNorm(Dh, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(Dh, generator=torch.Generator().manual_seed(7)) + 0.5)
    norm = norm.to(DEV, dtype)
    angles = _angles(N, Dh // 2)
    k64 = k.double()
    ref = k64 * torch.rsqrt(k64.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.double()
    with torch.no_grad():
        if rope == "complex":
            freqs = torch.polar(torch.ones_like(angles), angles)  # complex64 [N, Dh/2]
            eager = _rope(norm(k), freqs[None])
            cos, sin = torch.view_as_real(freqs).unbind(-1)
        elif rope == "real":
            cos_full, sin_full = angles.cos().repeat_interleave(2, 1), angles.sin().repeat_interleave(2, 1)
            eager = apply_rotary_emb(norm(k), (cos_full, sin_full), sequence_dim=1)
            cos, sin = cos_full[:, ::2], sin_full[:, ::2]
        else:
            eager, cos, sin = norm(k), None, None
        got = fused_text.norm_rope(norm, k, cos, sin)
    assert got is not None and len(calls) == 1
    if rope != "none":
        c, s = angles.double().cos()[None, :, None], angles.double().sin()[None, :, None]
        a, b = ref[..., 0::2], ref[..., 1::2]
        ref = torch.stack([a * c - b * s, a * s + b * c], -1).flatten(-2)
    # a normalised value one rounding off (another summation order) moves by up to 1.5 roundings after the weight
    # (<= 1.5) and the rotation, plus the output's own rounding: measured against the pair's size, which the
    # rotation keeps (a rotated element can cancel to ~0 while its inputs are large)
    step = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)  # one rounding, relative
    pair = eager.float().unflatten(-1, (-1, 2)).norm(dim=-1).repeat_interleave(2, -1)  # |(k[2j], k[2j + 1])|
    off = ((got.float() - eager.float()).abs() / (step * pair + 1e-6)).max().item()  # in roundings of the pair
    assert off <= 3, off
    err_got, err_eager = ((got.double() - ref).abs().mean().item(), (eager.double() - ref).abs().mean().item())
    assert err_got <= 1.1 * err_eager, (err_got, err_eager)


# 64 tokens on Z-Image only: on the tiny Flux models they change the first block by less than 5x its bf16 error
@pytest.mark.parametrize("name,tokens", [("z_image", 960), ("flux", 960), ("flux2", 960), ("z_image", 64)])
def test_processors_take_the_text_kernels_and_agree_with_eager(name, tokens, monkeypatch):
    """The first patched block's attention output, bf16 with the text-path kernels and bf16 with them off
    (`VLHOOKS_FUSED_TEXT=0`, the eager path every CPU test checks against diffusers), each against the same block in
    float32 (where the kernels do not apply): the kernels' path must be as close to it as eager's, and far closer
    than leaving the extra keys out. Per patched block the modulation and the key norm are one kernel each, and
    for at most 128 extra tokens the K and V projections a third (`linear_pair`). Later blocks are not compared:
    there bf16 drift of the whole model masks a one-rounding change of the extra keys."""
    monkeypatch.setenv("VLHOOKS_FUSED_KV", "always")  # also the tiny models' widths on every family
    model, run, width = _BUILDS[name]()
    first = family_for(model).sites(model)[0].attention(model)
    seen = []
    first.register_forward_hook(lambda m, a, out: seen.append(
        torch.cat([o.flatten() for o in out]) if isinstance(out, tuple) else out.flatten()))
    calls = _count_text_kernels(monkeypatch)
    cfg = vh.InjectionConfig(guidance="none")
    with torch.no_grad():
        run()
        monkeypatch.setenv("VLHOOKS_FUSED_TEXT", "0")
        with vh.inject(model, _plain_features(width, DT, tokens), cfg):
            run()
        assert not calls
        monkeypatch.setenv("VLHOOKS_FUSED_TEXT", "1")
        with vh.inject(model, _plain_features(width, DT, tokens), cfg):
            run()
        n_blocks = 2 if name == "z_image" else len(vh.list_sites(model))  # Z-Image: the 2 main layers
        per_block = 3 if tokens <= 128 else 2
        assert len(calls) == per_block * n_blocks
        model.float()  # the same weights in float32; cast the inputs through a pre-hook
        model.register_forward_pre_hook(
            lambda m, a, kw: (tuple(_cast(x) for x in a), {k: _cast(v) for k, v in kw.items()}), with_kwargs=True)
        with vh.inject(model, _plain_features(width, torch.float32, tokens), cfg):
            run()
    assert len(calls) == per_block * n_blocks  # float32: eager
    plain, eager, got, ref = (x.double() for x in seen)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    e_got, e_eager, effect = rel(got, ref), rel(eager, ref), rel(plain, ref)
    assert e_got <= 1.1 * e_eager + 1e-4, (e_got, e_eager)
    assert effect > 5 * e_got, (effect, e_got)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,bias", [(1, False), (17, True), (64, False), (100, True), (128, True)])
def test_linear_pair_kernel_is_within_one_rounding_of_the_exact_product(rows, bias, dtype, monkeypatch):
    """`fused_text.linear_pair` against float64 `x @ W^T + b`: every output within one rounding of the exact value
    and the bound of float32 sums (accumulation in float32, one rounding at the end), and on average no farther from it than cuBLAS's two GEMMs;
    the rows of a fused weight (a view, as Flux.2's single blocks hold K and V) give the same as copies of them."""
    monkeypatch.setenv("VLHOOKS_FUSED_KV", "always")
    torch.manual_seed(rows)
    d, out = 512, 384
    a = torch.nn.Linear(d, out, bias=bias, device="cuda", dtype=dtype)
    b = torch.nn.Linear(d, out, bias=bias, device="cuda", dtype=dtype)
    x = torch.randn(rows, d, device="cuda", dtype=dtype)[None]  # [1, rows, d]
    with torch.no_grad():
        got = fused_text.linear_pair(x, a, b)
        assert got is not None
        for y, lin in zip(got, (a, b)):
            assert y.shape == (1, rows, out) and y.dtype == dtype
            exact = x.double() @ lin.weight.double().T + (0 if lin.bias is None else lin.bias.double())
            ulp = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-30))))
            terms = x.double().abs() @ lin.weight.double().abs().T  # float32 sums: within d * 2^-24 of these
            err = (y.double() - exact).abs()
            assert (err <= ulp + d * 2.0 ** -24 * terms).all(), (err / ulp).max()
            assert err.mean() <= 1.1 * (lin(x).double() - exact).abs().mean() + 1e-12
        fused = torch.nn.Linear(d, 3 * out, bias=bias, device="cuda", dtype=dtype)
        from vlhooks.models.flux2 import FusedRows
        ka, kb = FusedRows(fused, out, 2 * out), FusedRows(fused, 2 * out, 3 * out)
        with torch.no_grad():
            a.weight.copy_(fused.weight[out:2 * out])
            b.weight.copy_(fused.weight[2 * out:])
            if bias:
                a.bias.copy_(fused.bias[out:2 * out])
                b.bias.copy_(fused.bias[2 * out:])
        for y, z in zip(fused_text.linear_pair(x, ka, kb), fused_text.linear_pair(x, a, b)):
            assert torch.equal(y, z)
        assert fused_text.linear_pair(torch.randn(129, d, device="cuda", dtype=dtype), a, b) is None  # cuBLAS then


@pytest.mark.parametrize("name", ["z_image", "flux", "flux2"])
def test_fresh_adapters_equal_zero_shot_with_the_text_kernels(name, monkeypatch):
    """Step 0 of a trained adapter is zero-shot, bit for bit, also where the text path runs its kernels: a fresh
    `kv` adapter (copies of the block's projections) and a fresh LoRA (the base's GEMM by `linear_pair`, then
    peft's zero delta) launch the same kernels as zero-shot and give its output exactly."""
    monkeypatch.setenv("VLHOOKS_FUSED_KV", "always")
    model, run, width = _BUILDS[name]()
    feats = _plain_features(width, DT, 64)
    cfg = vh.InjectionConfig(guidance="none")
    calls = _count_text_kernels(monkeypatch)
    with torch.no_grad():
        with vh.inject(model, feats, cfg):
            zero = run()
        per_run = len(calls)
        assert per_run >= 3
        for adapter in (vh.KVAdapter.create(model), vh.LoRAAdapter.create(model, rank=4, alpha=8)):
            calls.clear()
            with vh.inject(model, feats, cfg, adapter=adapter):
                got = run()
            assert len(calls) == per_run, type(adapter).__name__
            assert torch.equal(got, zero), type(adapter).__name__
