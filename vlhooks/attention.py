"""The attention math shared by every family's injection processor.

Owns `BlockCall` (what a block hook hands to its processor) and `attend_with_extras`, which extends one attention
call with extra keys/values in joint or decoupled mode. The family processors own everything before (projections,
norms, RoPE) and after (output projections); this module never touches a module's weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from . import fused_attention

if TYPE_CHECKING:
    from .models.base import DiTFamily, Site

Sdpa = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass
class Segment:
    """One reference's share of a block's extra tokens in one call, over the call's rows.

    `embedded` `[R, N, D]` (the reference's tokens as the caption stream entering the block) and `pre_normed`
    (their cached pre-norm) are what the projector turns into K/V; `key_mask` `[R, N]` marks real tokens;
    `strength` `[R]` is this reference's strength per row (0: the row does not see it); `query_mask` `[R, L_img]`
    in [0, 1] weights the block's image queries (None: every query sees it fully)."""

    reference: int
    embedded: torch.Tensor  # [R, N, D]
    pre_normed: torch.Tensor | None  # [R, N, D]
    key_mask: torch.Tensor | None  # [R, N] bool
    strength: list[float] | torch.Tensor  # [R]
    query_mask: torch.Tensor | None = None  # [R, L_img] float


@dataclass
class BlockCall:
    """One targeted block in one forward call: what the block hook hands to the block's processor.

    The block hook (`hooks.BlockHook`) builds it before the block runs, from the injector's plan; the
    modulation hook fills in `modulation` (the block's own modulation output, which the extras' text path
    reuses instead of computing it twice); the attention hook passes it to the processor as its `block_call`
    argument; the processor computes the extra K/V through `extra_kv()` (the projector's `kv(call)`, which may
    call the family's text path with this same object) and, for placement `"block_output"`, leaves `block_output`
    for the block hook to add after the block.

    `rows` are the model rows that receive extras (every row when `None`, in order). `segments` holds one
    `Segment` per reference that reaches this block; `embedded`, `pre_normed`, `key_mask` and `strength` are the
    tokens the projector projects (the first segment's; `for_segment` gives the call of another). Strengths are
    Python floats (eager) or `[R]` tensors (under `torch.compile`, where nothing may sync with the host).
    `embedded` is the extra tokens as the caption stream entering this block, `pre_normed` the family's
    timestep-independent pre-norm of exactly that tensor (both cached per generation). `image_span` is
    `(start, length)` of the image tokens in the block's attention sequence (for spatial masks). `cache` lives as
    long as the features (timestep-independent tensors); `scratch` as long as one forward call.
    """

    site: Site
    transformer: nn.Module
    family: "DiTFamily"
    projector: Any
    block_args: tuple
    block_kwargs: dict
    rows: list[int] | None
    strength: list[float] | torch.Tensor  # [R]
    embedded: torch.Tensor  # [R, N, D]
    pre_normed: torch.Tensor | None  # [R, N, D]
    key_mask: torch.Tensor | None  # [R, N] bool, True = real extra token
    mode: str  # "joint" | "decoupled"
    placement: str = "attention"  # "attention" | "block_output" (see `InjectionConfig.placement`)
    image_len: int | None = None  # image tokens, last in the block's sequence (placement "block_output")
    timestep: torch.Tensor | None = None  # the denoiser's own timestep argument of this call, `[B]` or `[1]`
    cache: dict = field(default_factory=dict)
    scratch: dict | None = None
    segments: list[Segment] = field(default_factory=list)
    kv_scaling: str = "kv"  # see `InjectionConfig.kv_scaling`
    image_span: tuple[int, int] | None = None  # (start, length) of the image queries in the attention sequence
    modulation: Any = None  # the block's own modulation output of this call, `[B or 1, ...]`
    block_output: tuple[torch.Tensor, list[int] | None] | None = None  # (added [R, L_img, D], rows)
    k: torch.Tensor | None = None  # [R, N, H, Dh], every segment's, concatenated
    v: torch.Tensor | None = None  # [R, N, H, Dh]
    # set on a call whose tokens are several references' concatenated (`batched`): each one's token count, so that
    # a family's extra-token positions restart per reference (`DiTFamily.batched_segments`)
    segment_lengths: tuple[int, ...] | None = None

    def for_segment(self, segment: Segment) -> "BlockCall":
        """This call with `segment`'s tokens as the ones to project (for the projector's `kv`)."""
        return replace(self, embedded=segment.embedded, pre_normed=segment.pre_normed, key_mask=segment.key_mask,
                       strength=segment.strength, segments=[segment], k=None, v=None)

    def batched(self, segments: list[Segment]) -> "BlockCall | None":
        """One call over every segment's tokens, concatenated `[R, sum N_s, D]`, where the projector maps tokens one
        by one (`tokenwise`) and the family restarts the extra tokens' positions per reference
        (`DiTFamily.batched_segments`): one text path per block instead of one per reference (fewer, larger GEMMs
        and far less host time). None where that does not hold."""
        if not (getattr(self.projector, "tokenwise", False) and getattr(self.family, "batched_segments", False)):
            return None
        rows = {s.embedded.shape[0] for s in segments}
        pre = [s.pre_normed is None for s in segments]
        if len(rows) != 1 or len({s.embedded.dtype for s in segments}) != 1 or len(set(pre)) != 1:
            return None
        embedded = torch.cat([s.embedded for s in segments], dim=1)  # [R, sum N_s, D]
        pre_normed = None if pre[0] else torch.cat([s.pre_normed for s in segments], dim=1)
        key_mask = None
        if any(s.key_mask is not None for s in segments):
            key_mask = torch.cat([s.key_mask if s.key_mask is not None else
                                  torch.ones(s.embedded.shape[:2], dtype=torch.bool, device=s.embedded.device)
                                  for s in segments], dim=1)
        first = segments[0]
        return replace(self, embedded=embedded, pre_normed=pre_normed, key_mask=key_mask, strength=first.strength,
                       segments=[Segment(first.reference, embedded, pre_normed, key_mask, first.strength)],
                       segment_lengths=tuple(s.embedded.shape[1] for s in segments), k=None, v=None)

    def extra_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The extra K/V `[R, N, H, Dh]` of every segment, concatenated, computed once (by the projector) on
        first use, with the strength applied to them where `kv_scaling` says so."""
        if self.k is None:
            segments = self.segments or [Segment(0, self.embedded, self.pre_normed, self.key_mask, self.strength)]
            merged = self.batched(segments) if len(segments) > 1 else None
            if merged is not None:
                k, v = self.projector.kv(merged)  # [R, sum N_s, H, Dh]
                sizes = list(merged.segment_lengths)
                parts = list(zip(k.split(sizes, dim=1), v.split(sizes, dim=1)))
                if self.kv_scaling == "kv":
                    self.k, self.v = k, v
                    return self.k, self.v
            elif len(segments) == 1:
                parts = [self.projector.kv(self)]
            else:
                parts = [self.projector.kv(self.for_segment(s)) for s in segments]
            if self.kv_scaling != "kv":
                parts = [scale_kv(k, v, s.strength, self.kv_scaling) for (k, v), s in zip(parts, segments)]
            if len(parts) == 1:
                self.k, self.v = parts[0]
            else:
                self.k = torch.cat([k for k, _ in parts], dim=1)
                self.v = torch.cat([v for _, v in parts], dim=1)
        return self.k, self.v

    def all_segments(self) -> list[Segment]:
        return self.segments or [Segment(0, self.embedded, self.pre_normed, self.key_mask, self.strength)]

    def strength_is_one(self) -> bool:
        return all(isinstance(s.strength, list) and all(x == 1.0 for x in s.strength) for s in self.all_segments())

    def unbiased(self) -> bool:
        """Strength 1, no padding, no spatial mask: the extra keys need no logit bias."""
        return self.strength_is_one() and all(s.key_mask is None and s.query_mask is None
                                              for s in self.all_segments())

    def plain(self) -> bool:
        """Nothing to gate: every row and `unbiased` (joint attention then needs nothing but the extra keys
        appended)."""
        return self.rows is None and self.unbiased()


def scale_kv(k: torch.Tensor, v: torch.Tensor, strength: list[float] | torch.Tensor, how: str
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """A reference's K/V `[R, N, H, Dh]` with its per-row strength applied (`InjectionConfig.kv_scaling`)."""
    s = _strength_tensor(strength, v).view(-1, 1, 1, 1)  # [R, 1, 1, 1]
    if how == "v_only":
        return k, v * s
    if how == "kv_penalty":
        return k * torch.clamp(1.0 / s.clamp_min(1.0), min=0.5), v * s
    if how == "k_mean_v":
        mean = v.mean(dim=1, keepdim=True)  # [R, 1, H, Dh], over the reference's tokens
        return k, (v - mean) + s * mean
    raise ValueError(f"unknown kv_scaling {how!r}")


def decoupled_output(q: torch.Tensor, call: BlockCall, sdpa: Sdpa, seq_dim: int = 1,
                     image_span: tuple[int, int] | None = None) -> torch.Tensor:
    """The decoupled attention of queries `q` (`[B, L, H, Dh]`, or `[B, H, L, Dh]` with `seq_dim` 2) over the
    extra K/V, one separate softmax per reference, each times its strength (and its spatial mask over the image
    queries `image_span` of `q`, default `call.image_span`); `q`'s layout, for the rows `call.rows` (every row when
    `None`)."""
    ek, ev = call.extra_kv()  # [R, N, H, Dh]
    if seq_dim == 2:
        ek, ev = ek.transpose(1, 2), ev.transpose(1, 2)  # [R, H, N, Dh]
    q_a = _take(q, call.rows)
    segments = call.all_segments()
    span = call.image_span if image_span is None else image_span
    added, start = None, 0
    for seg in segments:
        n = seg.embedded.shape[1] if len(segments) > 1 else ek.shape[seq_dim]
        k_s, v_s = (ek, ev) if len(segments) == 1 else (ek.narrow(seq_dim, start, n), ev.narrow(seq_dim, start, n))
        start += n
        bias = None
        if seg.key_mask is not None:
            bias = torch.zeros(seg.key_mask.shape, dtype=q.dtype, device=q.device)
            bias = bias.masked_fill(~seg.key_mask, float("-inf"))[:, None, None, :]  # [R, 1, 1, N]
        out = sdpa(q_a, k_s.to(q.dtype), v_s.to(q.dtype), bias)
        out = _weigh(out, seg, call.kv_scaling, span, q.shape[seq_dim], seq_dim)
        added = out if added is None else added + out
    return added


def _weigh(out: torch.Tensor, seg: Segment, kv_scaling: str, span, length: int, seq_dim: int) -> torch.Tensor:
    """A reference's decoupled attention output times its strength (`"kv"`; other modes carry it in the K/V,
    with strength 0 still switching the row off) and its spatial mask over the image queries."""
    if kv_scaling == "kv":
        if isinstance(seg.strength, list) and len(set(seg.strength)) == 1:
            if seg.strength[0] != 1.0:  # strength 1: no multiply
                out = out * seg.strength[0]
        else:
            out = out * _strength_tensor(seg.strength, out).view(-1, 1, 1, 1)
    elif not (isinstance(seg.strength, list) and all(x > 0 for x in seg.strength)):
        on = _strength_tensor(seg.strength, out) != 0
        out = out * on.to(out.dtype).view(-1, 1, 1, 1)
    if seg.query_mask is not None:
        w = _query_weights(seg.query_mask, span, length, out)  # [R, Lq]
        out = out * (w[:, :, None, None] if seq_dim == 1 else w[:, None, :, None])
    return out


def _query_weights(query_mask: torch.Tensor, span: tuple[int, int] | None, length: int,
                   like: torch.Tensor) -> torch.Tensor:
    """`[R, Lq]` weights of every query: the mask over the image queries `span`, 1 elsewhere (text queries see
    every reference)."""
    if span is None:
        raise ValueError("a spatial mask reached a block whose image queries are unknown")
    start, n = span
    w = torch.ones(query_mask.shape[0], length, dtype=like.dtype, device=like.device)
    w[:, start:start + n] = query_mask.to(like.dtype)
    return w


def add_rows(x: torch.Tensor, added: torch.Tensor, rows: list[int] | None) -> torch.Tensor:
    """`x + added` on the batch rows `rows` (all rows when `None`); other rows are returned untouched."""
    if rows is None:
        return x + added
    x = x.clone()
    x[rows] = x[rows] + added
    return x


def appendable(call: BlockCall, base_mask: torch.Tensor | None) -> bool:
    """Whether joint attention needs nothing but the extra keys appended to the block's own: `call.plain()`
    (every row, strength 1, no padding, no spatial mask) and no mask of the block's own (so no bias)."""
    return call.mode == "joint" and call.plain() and base_mask is None


def plain_joint(call: BlockCall, batch: int, base_mask: torch.Tensor | None) -> bool:
    """`appendable`, and one batch row: a row range of a `[1, L + N, ...]` buffer is then contiguous, so a GEMM
    can write its part of the keys/values in place (see `linear_into`)."""
    return batch == 1 and appendable(call, base_mask)


def joint_buffers(like: torch.Tensor, length: int, call: BlockCall) -> tuple[torch.Tensor, torch.Tensor]:
    """`[1, length + N, H, Dh]` key and value buffers whose last `N` rows already hold the extra K/V; the block
    writes its own `length` rows in place, which saves concatenating K and V afterwards."""
    ek, ev = call.extra_kv()
    n, H, D = ek.shape[1], ek.shape[2], ek.shape[3]
    kbuf = like.new_empty(1, length + n, H, D)
    vbuf = like.new_empty(1, length + n, H, D)
    kbuf[:, length:].copy_(ek)
    vbuf[:, length:].copy_(ev)
    return kbuf, vbuf


def can_write_into(linear: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether `linear_into` can write `linear(x)` in place: a plain `nn.Linear`, contiguous input, eager inference
    (`out=` has no autograd; under `torch.compile` inductor places the concatenation itself)."""
    return (
        type(linear) is torch.nn.Linear and x.is_contiguous() and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    )


def linear_into(out: torch.Tensor, x: torch.Tensor, linear: torch.nn.Module) -> bool:
    """`out[...] = linear(x)` written by the GEMM itself (`out` contiguous); False (nothing written) unless
    `can_write_into`. The same GEMM `F.linear` runs (`addmm` / `mm` on the flattened rows)."""
    if not can_write_into(linear, x) or not out.is_contiguous():
        return False
    x2, o2 = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])
    w = linear.weight.t()
    if linear.bias is None:
        torch.mm(x2, w, out=o2)
    else:
        torch.addmm(linear.bias, x2, w, out=o2)
    return True


def _strength_tensor(strength: list[float] | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if isinstance(strength, torch.Tensor):
        return strength.to(device=like.device, dtype=like.dtype)
    t = torch.tensor(strength, dtype=like.dtype)
    if like.is_cuda:  # pinned + non_blocking: no stream sync per block (a plain copy waits for every queued kernel)
        return t.pin_memory().to(like.device, non_blocking=True)
    return t.to(like.device)


def extra_bias(call: BlockCall, like: torch.Tensor) -> torch.Tensor:
    """Additive logit bias of the extra keys, `[R, N]`: per segment `log(strength)` per row (`kv_scaling` `"kv"`;
    other modes carry the strength in the K/V and only strength 0 gives `-inf`), `-inf` on padded tokens."""
    parts = []
    for seg in call.all_segments():
        R, N = seg.embedded.shape[0], seg.embedded.shape[1]
        strength = _strength_tensor(seg.strength, like)  # [R]
        if call.kv_scaling == "kv":
            row = torch.log(strength)  # log(0) = -inf: the row is excluded
        else:
            row = torch.zeros_like(strength).masked_fill(strength == 0, float("-inf"))
        bias = row[:, None].expand(R, N)
        if seg.key_mask is not None:
            bias = bias.masked_fill(~seg.key_mask, float("-inf"))
        parts.append(bias)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def query_bias(call: BlockCall, length: int, like: torch.Tensor) -> torch.Tensor | None:
    """`[R, Lq, N]` logit bias from the spatial masks (`log` of each query's weight for each reference's keys), or
    None when no segment has a mask."""
    segments = call.all_segments()
    if all(s.query_mask is None for s in segments):
        return None
    parts = []
    for seg in segments:
        R, N = seg.embedded.shape[0], seg.embedded.shape[1]
        if seg.query_mask is None:
            parts.append(torch.zeros(R, length, N, dtype=like.dtype, device=like.device))
        else:
            w = _query_weights(seg.query_mask, call.image_span, length, like)  # [R, Lq]
            parts.append(torch.log(w)[:, :, None].expand(R, length, N))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def fused_bias(call: BlockCall, length: int, device: torch.device
               ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The extra keys' logit bias in the factored form the two-pass kernel reads (`fused_attention.joint_attention`):
    `key_bias` `[R, N]` (`extra_bias`: log strength, `-inf` on padding; None when every strength is 1 and nothing is
    padded), `query_bias` `[R, Lq, S]` (log of each reference's spatial-mask weight per query; None without masks)
    and `key_segment` `[N]` int32 (the reference of each extra key). `key_bias[r, n] + query_bias[r, i,
    key_segment[n]]` equals the dense bias `extra_bias + query_bias` of the concatenation. float32, on `device`;
    computed once per forward call (`call.scratch`) for each set of strengths."""
    segments = call.all_segments()
    eager = all(isinstance(s.strength, list) for s in segments)
    key = ("fused_bias", length, call.image_span, call.kv_scaling,
           tuple((s.reference, tuple(s.strength)) for s in segments)) if eager else None
    if key is not None and call.scratch is not None and key in call.scratch:
        return call.scratch[key]
    like = torch.empty(0, dtype=torch.float32, device=device)
    key_bias = None
    if not (call.strength_is_one() and all(s.key_mask is None for s in segments)):
        key_bias = extra_bias(call, like)  # [R, N]
    query_bias, key_segment = None, None
    if any(s.query_mask is not None for s in segments):
        R = segments[0].embedded.shape[0]
        parts = [torch.zeros(R, length, dtype=torch.float32, device=device) if s.query_mask is None
                 else torch.log(_query_weights(s.query_mask, call.image_span, length, like)) for s in segments]
        query_bias = torch.stack(parts, dim=2)  # [R, Lq, S]
        ids = torch.repeat_interleave(torch.arange(len(segments), dtype=torch.int32),
                                      torch.tensor([s.embedded.shape[1] for s in segments]))
        key_segment = ids.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else ids.to(device)
    out = (key_bias, query_bias, key_segment)
    if key is not None and call.scratch is not None:
        call.scratch[key] = out
    return out


def fused_serves(call: BlockCall, backend, like: torch.Tensor, length: int, base_mask: torch.Tensor | None) -> bool:
    """Whether the two-pass kernel (`fused_attention`) serves this block: joint mode on every row, no mask of the
    block's own, and `fused_attention.applies` (CUDA inference, diffusers' default attention backend `backend`
    None, `length` own keys where two passes pay off). `like` is the block's query or input `[B, L, ...]`."""
    if call.mode != "joint" or call.rows is not None or base_mask is not None:
        return False
    return fused_attention.applies(backend, like, length, call.extra_kv()[0], not call.unbiased())


def fused_joint(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: BlockCall) -> torch.Tensor:
    """Joint attention of `q` over the block's own `k, v` and the call's extra K/V, by the two-pass kernel, with
    strengths, padding and spatial masks as its factored bias (`fused_bias`). `[B, L, H, Dh]` in and out; call only
    where `fused_serves`."""
    ek, ev = call.extra_kv()  # [R, N, H, Dh]
    if call.unbiased():
        return fused_attention.joint_attention(q, k, v, ek, ev)
    key_bias, query_bias, key_segment = fused_bias(call, q.shape[1], q.device)
    return fused_attention.joint_attention(q, k, v, ek, ev, key_bias, query_bias, key_segment)


def _base_bias(base_mask: torch.Tensor | None, B: int, L: int, like: torch.Tensor) -> torch.Tensor:
    """The block's own mask as an additive bias `[B, 1, 1, L]`."""
    if base_mask is None:
        return torch.zeros(B, 1, 1, L, dtype=like.dtype, device=like.device)
    if base_mask.dtype == torch.bool:
        m = base_mask.reshape(base_mask.shape[0], 1, 1, -1) if base_mask.ndim == 2 else base_mask
        bias = torch.zeros(m.shape, dtype=like.dtype, device=like.device).masked_fill(~m, float("-inf"))
    else:
        bias = base_mask.to(like.dtype)
        if bias.ndim == 2:
            bias = bias[:, None, None, :]
    return bias.expand(B, *bias.shape[1:]) if bias.shape[0] == 1 else bias


def _take(x: torch.Tensor | None, rows: list[int] | None) -> torch.Tensor | None:
    if x is None or rows is None:
        return x
    if x.shape[0] == 1:
        return x
    return x[rows]


def attend_with_extras(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    base_mask: torch.Tensor | None,
    call: BlockCall,
    sdpa: Sdpa,
    seq_dim: int,
) -> torch.Tensor:
    """One attention call with extra keys/values.

    `q, k, v` are the block's own tensors in its layout (`seq_dim` 1: `[B, L, H, Dh]`, 2: `[B, H, L, Dh]`);
    `sdpa(q, k, v, mask)` is the block's own attention function. Rows outside `call.rows` are computed exactly as
    the unpatched block computes them.
    """
    B = q.shape[0]
    ek, ev = call.extra_kv()  # [R, N, H, Dh]
    if seq_dim == 2:
        ek, ev = ek.transpose(1, 2), ev.transpose(1, 2)  # [R, H, N, Dh]
    ek, ev = ek.to(k.dtype), ev.to(v.dtype)
    rows = call.rows

    if call.mode == "decoupled":
        out = sdpa(q, k, v, base_mask)  # the block's own attention, untouched
        return add_rows(out, decoupled_output(q, call, sdpa, seq_dim), rows)

    # joint: the extra keys join the block's softmax
    q_a, k_a, v_a = _take(q, rows), _take(k, rows), _take(v, rows)
    mask_a = _take(base_mask, rows)
    R = q_a.shape[0]
    k_cat = torch.cat([k_a, ek], dim=seq_dim)
    v_cat = torch.cat([v_a, ev], dim=seq_dim)
    if mask_a is None and call.unbiased():
        bias = None
    else:
        L, Lq = k_a.shape[seq_dim], q_a.shape[seq_dim]
        base = _base_bias(mask_a, R, L, q)  # [R, 1, 1 or Lq, L]
        ext = extra_bias(call, q)[:, None, None, :]  # [R, 1, 1, N]
        per_query = query_bias(call, Lq, q)  # [R, Lq, N] or None
        if per_query is None:
            bias = torch.cat([base, ext.expand(R, 1, base.shape[2], ext.shape[-1])], dim=-1)
        else:
            ext = ext + per_query[:, None]  # [R, 1, Lq, N]
            bias = torch.cat([base.expand(R, 1, Lq, L), ext], dim=-1)
    out_a = sdpa(q_a, k_cat, v_cat, bias)
    if rows is None:
        return out_a
    others = [i for i in range(B) if i not in set(rows)]
    out = out_a.new_empty((B, *out_a.shape[1:]))
    out[rows] = out_a
    if others:
        out[others] = sdpa(q[others], k[others], v[others], _take(base_mask, others))
    return out
