"""The attention math shared by every family's injection processor.

Owns `ExtraKV` (what a block hook hands to its processor) and `attend_with_extras`, which extends one attention
call with extra keys/values in joint or decoupled mode. The family processors own everything before (projections,
norms, RoPE) and after (output projections); this module never touches a module's weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Sdpa = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass
class ExtraKV:
    """Extra keys/values for one block and one forward call.

    `k`, `v` are `[R, N, H, Dh]` for the `R` batch rows that receive them (`rows`, or every row when `None`, in
    order). `lam` is the per-row strength: Python floats (eager) or a `[R]` tensor (under `torch.compile`, where
    nothing may sync with the host). `key_mask` marks real extra tokens.

    The block hook may leave `k`, `v` unset and hand over `make_kv` instead: the processor calls it (through
    `materialize`) once the block has computed its own modulation, which the text path then reuses. `scratch` is
    a dict shared by the blocks of one forward call (tables built once per call).
    """

    k: torch.Tensor | None  # [R, N, H, Dh]
    v: torch.Tensor | None  # [R, N, H, Dh]
    rows: list[int] | None
    lam: list[float] | torch.Tensor  # [R]
    key_mask: torch.Tensor | None  # [R, N] bool
    mode: str  # "joint" | "decoupled"
    placement: str = "attention"  # "attention" | "block_output" (see `InjectionConfig.placement`)
    image_len: int | None = None  # image tokens, last in the block's sequence (placement "block_output")
    make_kv: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
    scratch: dict | None = None

    def lam_is_one(self) -> bool:
        return isinstance(self.lam, list) and all(x == 1.0 for x in self.lam)

    def materialize(self) -> "ExtraKV":
        """Compute `k`, `v` from `make_kv` if the hook deferred them."""
        if self.k is None:
            self.k, self.v = self.make_kv()
        return self


def decoupled_output(q: torch.Tensor, extra: ExtraKV, sdpa: Sdpa, seq_dim: int = 1) -> torch.Tensor:
    """The decoupled attention of queries `q` (`[B, L, H, Dh]`, or `[B, H, L, Dh]` with `seq_dim` 2) over the
    extra K/V alone, times the strength; `q`'s layout, for the rows `extra.rows` (every row when `None`)."""
    extra.materialize()
    ek, ev = extra.k, extra.v  # [R, N, H, Dh]
    if seq_dim == 2:
        ek, ev = ek.transpose(1, 2), ev.transpose(1, 2)  # [R, H, N, Dh]
    q_a = _take(q, extra.rows)
    bias = None
    if extra.key_mask is not None:
        bias = torch.zeros(extra.key_mask.shape, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill(~extra.key_mask, float("-inf"))[:, None, None, :]  # [R, 1, 1, N]
    added = sdpa(q_a, ek.to(q.dtype), ev.to(q.dtype), bias)
    if isinstance(extra.lam, list) and len(set(extra.lam)) == 1:
        if extra.lam[0] != 1.0:  # strength 1: no multiply
            added = added * extra.lam[0]
    else:
        added = added * _lam_tensor(extra.lam, added).view(-1, 1, 1, 1)
    return added


def add_rows(x: torch.Tensor, added: torch.Tensor, rows: list[int] | None) -> torch.Tensor:
    """`x + added` on the batch rows `rows` (all rows when `None`); other rows are returned untouched."""
    if rows is None:
        return x + added
    x = x.clone()
    x[rows] = x[rows] + added
    return x


def appendable(extra: ExtraKV, base_mask: torch.Tensor | None) -> bool:
    """Whether joint attention needs nothing but the extra keys appended to the block's own: every row,
    strength 1, no padding, no mask of the block's own (so no bias)."""
    return (
        extra.mode == "joint" and extra.rows is None and extra.key_mask is None and extra.lam_is_one()
        and base_mask is None
    )


def plain_joint(extra: ExtraKV, batch: int, base_mask: torch.Tensor | None) -> bool:
    """`appendable`, and one batch row: a row range of a `[1, L + N, ...]` buffer is then contiguous, so a GEMM
    can write its part of the keys/values in place (see `linear_into`)."""
    return batch == 1 and appendable(extra, base_mask)


def joint_buffers(like: torch.Tensor, length: int, extra: ExtraKV) -> tuple[torch.Tensor, torch.Tensor]:
    """`[1, length + N, H, Dh]` key and value buffers whose last `N` rows already hold the extra K/V; the block
    writes its own `length` rows in place, which saves concatenating K and V afterwards."""
    extra.materialize()
    n, H, D = extra.k.shape[1], extra.k.shape[2], extra.k.shape[3]
    kbuf = like.new_empty(1, length + n, H, D)
    vbuf = like.new_empty(1, length + n, H, D)
    kbuf[:, length:].copy_(extra.k)
    vbuf[:, length:].copy_(extra.v)
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


def _lam_tensor(lam: list[float] | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if isinstance(lam, torch.Tensor):
        return lam.to(device=like.device, dtype=like.dtype)
    return torch.tensor(lam, device=like.device, dtype=like.dtype)


def _extra_bias(extra: ExtraKV, like: torch.Tensor) -> torch.Tensor:
    """Additive logit bias for the extra keys: `log(lam)` per row, `-inf` on padded tokens. `[R, N]`."""
    R, N = extra.k.shape[0], extra.k.shape[1]
    lam = _lam_tensor(extra.lam, like)  # [R]
    bias = torch.log(lam)[:, None].expand(R, N)  # log(0) = -inf: the row is excluded
    if extra.key_mask is not None:
        bias = bias.masked_fill(~extra.key_mask, float("-inf"))
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
    extra: ExtraKV,
    sdpa: Sdpa,
    seq_dim: int,
) -> torch.Tensor:
    """One attention call with extra keys/values.

    `q, k, v` are the block's own tensors in its layout (`seq_dim` 1: `[B, L, H, Dh]`, 2: `[B, H, L, Dh]`);
    `sdpa(q, k, v, mask)` is the block's own attention function. Rows outside `extra.rows` are computed exactly as
    the unpatched block computes them.
    """
    B = q.shape[0]
    extra.materialize()
    ek, ev = extra.k, extra.v  # [R, N, H, Dh]
    if seq_dim == 2:
        ek, ev = ek.transpose(1, 2), ev.transpose(1, 2)  # [R, H, N, Dh]
    ek, ev = ek.to(k.dtype), ev.to(v.dtype)
    rows = extra.rows

    if extra.mode == "decoupled":
        out = sdpa(q, k, v, base_mask)  # the block's own attention, untouched
        return add_rows(out, decoupled_output(q, extra, sdpa, seq_dim), rows)

    # joint: the extra keys join the block's softmax
    q_a, k_a, v_a = _take(q, rows), _take(k, rows), _take(v, rows)
    mask_a = _take(base_mask, rows)
    R = q_a.shape[0]
    k_cat = torch.cat([k_a, ek], dim=seq_dim)
    v_cat = torch.cat([v_a, ev], dim=seq_dim)
    if mask_a is None and extra.key_mask is None and extra.lam_is_one():
        bias = None
    else:
        L = k_a.shape[seq_dim]
        base = _base_bias(mask_a, R, L, q)  # [R, 1, 1, L]
        ext = _extra_bias(extra, q)[:, None, None, :]  # [R, 1, 1, N]
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
