"""The attention math shared by every family's injection processor.

Owns `BlockCall` (what a block hook hands to its processor) and `attend_with_extras`, which extends one attention
call with extra keys/values in joint or decoupled mode. The family processors own everything before (projections,
norms, RoPE) and after (output projections); this module never touches a module's weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

if TYPE_CHECKING:
    from .models.base import DiTFamily, Site

Sdpa = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass
class BlockCall:
    """One targeted block in one forward call: what the block hook hands to the block's processor.

    The block hook (`hooks.BlockHook`) builds it before the block runs, from the injector's plan; the
    modulation hook fills in `modulation` (the block's own modulation output, which the extras' text path
    reuses instead of computing it twice); the attention hook passes it to the processor as its `block_call`
    argument; the processor computes the extra K/V through `extra_kv()` (the projector's `kv(call)`, which may
    call the family's text path with this same object) and, for placement `"block_output"`, leaves `block_output`
    for the block hook to add after the block.

    `rows` are the model rows that receive extras (every row when `None`, in order); `strength` their strength:
    Python floats (eager) or a `[R]` tensor (under `torch.compile`, where nothing may sync with the host).
    `embedded` is the extra tokens as the caption stream entering this block, `pre_normed` the family's
    timestep-independent pre-norm of exactly that tensor (both cached per generation). `cache` lives as long as
    the features (timestep-independent tensors); `scratch` as long as one forward call.
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
    cache: dict = field(default_factory=dict)
    scratch: dict | None = None
    modulation: Any = None  # the block's own modulation output of this call, `[B or 1, ...]`
    block_output: tuple[torch.Tensor, list[int] | None] | None = None  # (added [R, L_img, D], rows)
    k: torch.Tensor | None = None  # [R, N, H, Dh]
    v: torch.Tensor | None = None  # [R, N, H, Dh]

    def extra_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The extra K/V `[R, N, H, Dh]`, computed once (by the projector) on first use."""
        if self.k is None:
            self.k, self.v = self.projector.kv(self)
        return self.k, self.v

    def strength_is_one(self) -> bool:
        return isinstance(self.strength, list) and all(x == 1.0 for x in self.strength)


def decoupled_output(q: torch.Tensor, call: BlockCall, sdpa: Sdpa, seq_dim: int = 1) -> torch.Tensor:
    """The decoupled attention of queries `q` (`[B, L, H, Dh]`, or `[B, H, L, Dh]` with `seq_dim` 2) over the
    extra K/V alone, times the strength; `q`'s layout, for the rows `call.rows` (every row when `None`)."""
    ek, ev = call.extra_kv()  # [R, N, H, Dh]
    if seq_dim == 2:
        ek, ev = ek.transpose(1, 2), ev.transpose(1, 2)  # [R, H, N, Dh]
    q_a = _take(q, call.rows)
    bias = None
    if call.key_mask is not None:
        bias = torch.zeros(call.key_mask.shape, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill(~call.key_mask, float("-inf"))[:, None, None, :]  # [R, 1, 1, N]
    added = sdpa(q_a, ek.to(q.dtype), ev.to(q.dtype), bias)
    if isinstance(call.strength, list) and len(set(call.strength)) == 1:
        if call.strength[0] != 1.0:  # strength 1: no multiply
            added = added * call.strength[0]
    else:
        added = added * _strength_tensor(call.strength, added).view(-1, 1, 1, 1)
    return added


def add_rows(x: torch.Tensor, added: torch.Tensor, rows: list[int] | None) -> torch.Tensor:
    """`x + added` on the batch rows `rows` (all rows when `None`); other rows are returned untouched."""
    if rows is None:
        return x + added
    x = x.clone()
    x[rows] = x[rows] + added
    return x


def appendable(call: BlockCall, base_mask: torch.Tensor | None) -> bool:
    """Whether joint attention needs nothing but the extra keys appended to the block's own: every row,
    strength 1, no padding, no mask of the block's own (so no bias)."""
    return (
        call.mode == "joint" and call.rows is None and call.key_mask is None and call.strength_is_one()
        and base_mask is None
    )


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
    return torch.tensor(strength, device=like.device, dtype=like.dtype)


def _extra_bias(call: BlockCall, like: torch.Tensor) -> torch.Tensor:
    """Additive logit bias for the extra keys: `log(strength)` per row, `-inf` on padded tokens. `[R, N]`."""
    R, N = call.k.shape[0], call.k.shape[1]
    strength = _strength_tensor(call.strength, like)  # [R]
    bias = torch.log(strength)[:, None].expand(R, N)  # log(0) = -inf: the row is excluded
    if call.key_mask is not None:
        bias = bias.masked_fill(~call.key_mask, float("-inf"))
    return bias


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
    if mask_a is None and call.key_mask is None and call.strength_is_one():
        bias = None
    else:
        L = k_a.shape[seq_dim]
        base = _base_bias(mask_a, R, L, q)  # [R, 1, 1, L]
        ext = _extra_bias(call, q)[:, None, None, :]  # [R, 1, 1, N]
        bias = torch.cat([base, ext.expand(R, 1, 1, ext.shape[-1])], dim=-1)
    out_a = sdpa(q_a, k_cat, v_cat, bias)
    if rows is None:
        return out_a
    others = [i for i in range(B) if i not in set(rows)]
    out = out_a.new_empty((B, *out_a.shape[1:]))
    out[rows] = out_a
    if others:
        out[others] = sdpa(q[others], k[others], v[others], _take(base_mask, others))
    return out
