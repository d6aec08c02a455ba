"""`DiTFamily`: the per-architecture facts injection needs, and the registry of families.

A family file (`z_image.py`, `flux.py`, `sd3.py`) subclasses `DiTFamily` and registers it. It says which blocks
are sites, how the denoiser's timestep maps to progress, what the model does to its caption tokens before
attention (`embed` once per generation, `text_kv` per block and step), and which processor extends the block's
attention. Adding an architecture is adding one file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Hashable

import torch
from torch import nn

from ..errors import ConfigError, TargetError


@dataclass(frozen=True)
class Site:
    """One targetable block: `name` is its module path (e.g. `"transformer_blocks.3"`), `index` its position in
    `list_sites`, `kind` the family's block kind (`"double"`, `"single"`, `"main"`, ...)."""

    name: str
    index: int
    kind: str
    attn_name: str  # attribute of the block holding the attention module

    def block(self, transformer: nn.Module) -> nn.Module:
        return transformer.get_submodule(self.name)

    def attention(self, transformer: nn.Module) -> nn.Module:
        return self.block(transformer).get_submodule(self.attn_name)


def arg(args: tuple, kwargs: dict, name: str, position: int, default: Any = None) -> Any:
    """Read a forward argument that may come by keyword or by position (blocks under gradient checkpointing are
    always called positionally)."""
    if name in kwargs:
        return kwargs[name]
    if len(args) > position:
        return args[position]
    return default


class DiTFamily:
    """Per-architecture facts. Subclasses set the class attributes and implement the methods."""

    name: str = ""
    transformer_classes: tuple[str, ...] = ()
    # Layout of batched classifier-free guidance in this family's pipeline, or None when the pipeline makes
    # separate conditional / unconditional calls.
    batched_guidance: str | None = None
    # preset name -> regex over site names; "all" is the family's main blocks
    presets: dict[str, str] = {}
    # `InjectionConfig.placement` values the family's processors implement
    placements: tuple[str, ...] = ("attention",)

    # ------------------------------------------------------------------ structure
    def matches(self, transformer: nn.Module) -> bool:
        return type(transformer).__name__ in self.transformer_classes

    def sites(self, transformer: nn.Module) -> list[Site]:
        raise NotImplementedError

    def caption_width(self, transformer: nn.Module) -> int:
        """Width of the `prompt_embeds` the pipeline passes (the feature space of zero-shot injection)."""
        raise NotImplementedError

    def hidden_width(self, transformer: nn.Module) -> int:
        raise NotImplementedError

    def select(self, transformer: nn.Module, blocks: str | list[int]) -> list[Site]:
        """Resolve an `InjectionConfig.blocks` selector to sites, or raise naming what exists."""
        sites = self.sites(transformer)
        names = [s.name for s in sites]
        if isinstance(blocks, list):
            bad = [i for i in blocks if not 0 <= i < len(sites)]
            if bad:
                raise ConfigError(
                    f"block indices {bad} are out of range: {type(transformer).__name__} has {len(sites)} sites "
                    f"(0..{len(sites) - 1}); see vh.list_sites(model)."
                )
            return [sites[i] for i in sorted(set(blocks))]
        if blocks in self.presets:
            pattern = self.presets[blocks]
        else:
            pattern = blocks
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise ConfigError(
                f"blocks={blocks!r} is neither a preset ({sorted(self.presets)}) nor a valid regex: {e}."
            ) from None
        chosen = [s for s in sites if rx.fullmatch(s.name)]
        if not chosen:
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise ConfigError(
                f"blocks={blocks!r} matches no site of {type(transformer).__name__}. Presets: "
                f"{sorted(self.presets)}; a regex must fully match a site name such as {shown} "
                "(vh.list_sites(model) lists them all)."
            )
        return chosen

    # ------------------------------------------------------------------ calls
    def batch_size(self, args: tuple, kwargs: dict) -> int:
        raise NotImplementedError

    timestep_arg: tuple[str, int] = ("timestep", 3)  # (keyword, position) of the denoiser's timestep

    def to_progress(self, t):
        """Denoising progress `1 - sigma` from the family's timestep value (a float or a tensor)."""
        raise NotImplementedError

    def read_timestep(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The denoiser's timestep argument as a `[B]` or `[1]` tensor."""
        return torch.as_tensor(arg(args, kwargs, *self.timestep_arg)).reshape(-1)

    def read_progress(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """Denoising progress per batch row (`[B]` or `[1]`), as a float32 tensor."""
        return self.to_progress(self.read_timestep(args, kwargs).float())

    def read_progress_list(self, args: tuple, kwargs: dict) -> list[float]:
        """The same as Python floats (one host sync, no tensor arithmetic)."""
        return [self.to_progress(float(x)) for x in self.read_timestep(args, kwargs).tolist()]

    def check_call(self, args: tuple, kwargs: dict) -> None:
        """Raise for a call the injection cannot serve (e.g. an unsupported input mode)."""

    # ------------------------------------------------------------------ the text path, zero-shot
    def embed_key(self, site: Site) -> Hashable:
        """Sites with the same key share one embedding of the features (one per generation)."""
        return "caption"

    def embed(
        self, transformer: nn.Module, tokens: torch.Tensor, mask: torch.Tensor | None, site: Site, cache: dict
    ) -> torch.Tensor:
        """What the model does to caption tokens before the block, independent of the timestep. `[B, N, D]`.
        `cache` lives as long as the features (one generation or more) for timestep-independent tensors."""
        raise NotImplementedError

    def text_input(
        self,
        transformer: nn.Module,
        site: Site,
        hidden: torch.Tensor,
        block_args: tuple,
        block_kwargs: dict,
        rows: list[int] | None,
    ) -> torch.Tensor:
        """The block's pre-attention norm and modulation of text tokens at this step. `[R, N, D]` -> `[R, N, D]`."""
        raise NotImplementedError

    # The text path in two parts, for speed: the pre-norm does not depend on the timestep, so the injector caches
    # it per generation (`text_norm`, shared by sites with one `norm_key`) and hands the cached result to
    # `text_input` through the processor (`pre_normed`). The block's own modulation is captured from the module
    # `modulation_module` names while the block runs (`captured_modulation`), so it is not computed twice.
    def text_norm(self, transformer: nn.Module, site: Site, hidden: torch.Tensor) -> torch.Tensor:
        """The timestep-independent pre-norm of `text_input` (`[R, N, D]`); the identity if the family has none."""
        return hidden

    def norm_key(self, transformer: nn.Module, site: Site) -> Hashable:
        """Sites with the same key share one cached `text_norm` of the features."""
        return site.name

    def modulation_module(self, transformer: nn.Module, site: Site) -> nn.Module | None:
        """The block's submodule whose output is the modulation `text_input` needs (captured while the block runs),
        or None."""
        return None

    @staticmethod
    def pre_normed(transformer: nn.Module, site: Site, hidden: torch.Tensor) -> torch.Tensor | None:
        """The cached `text_norm(hidden)` the injector left on the site's processor for exactly this `hidden`."""
        pre = getattr(site.attention(transformer).processor, "normed", None)
        return pre[1] if pre is not None and pre[0] is hidden else None

    @staticmethod
    def captured_modulation(transformer: nn.Module, site: Site) -> torch.Tensor | None:
        """The block's own modulation output of the current call, while its processor computes the extras."""
        return getattr(site.attention(transformer).processor, "active_mod", None)

    def kv_linears(self, transformer: nn.Module, site: Site) -> tuple[nn.Module, nn.Module]:
        """The block's text-side K and V projections (the modules a `kv` adapter copies and LoRA wraps)."""
        raise NotImplementedError

    def finish_kv(
        self, transformer: nn.Module, site: Site, k: torch.Tensor, v: torch.Tensor, cache: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected `k, v` `[R, N, H*Dh]` -> `[R, N, H, Dh]` with the block's qk-norm and the extra tokens' RoPE."""
        raise NotImplementedError

    def text_kv(
        self,
        transformer: nn.Module,
        site: Site,
        hidden: torch.Tensor,
        block_args: tuple,
        block_kwargs: dict,
        rows: list[int] | None,
        cache: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's own text path up to attention: pre-norm and modulation, text K/V projections, qk-norm,
        RoPE. `hidden` is `[R, N, D]` for batch `rows`; returns `k, v` as `[R, N, H, Dh]`."""
        x = self.text_input(transformer, site, hidden, block_args, block_kwargs, rows)
        k_proj, v_proj = self.kv_linears(transformer, site)
        return self.finish_kv(transformer, site, k_proj(x), v_proj(x), cache)

    # ------------------------------------------------------------------ training objective
    def velocity(
        self,
        transformer: nn.Module,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        caption: torch.Tensor,
        caption_mask: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The model's flow-matching prediction of `noise - x0` for `latents = (1 - sigma) x0 + sigma noise`,
        with the family's own timestep and sign conventions. `latents` `[B, C, H, W]`, `sigma` `[B]`,
        `caption` `[B, L, C]` (`caption_mask` `[B, L]` bool, True = real), `pooled` `[B, P]`."""
        raise NotImplementedError

    def image_tokens(self, block_args: tuple, block_kwargs: dict) -> int:
        """How many image tokens the block's attention sees, last in its sequence (placement `"block_output"`)."""
        raise NotImplementedError

    def add_to_block_output(self, site: Site, output: Any, added: torch.Tensor, rows: list[int] | None) -> Any:
        """The block's `output` with `added` (`[R, L_img, D]`, rows `rows`) added to its image stream
        (placement `"block_output"`). Only families listing that placement implement it."""
        raise NotImplementedError

    def make_processor(self, site: Site, base: Any) -> Any:
        """The processor that replaces `base` on the site's attention module while patched."""
        raise NotImplementedError


_FAMILIES: list[DiTFamily] = []


def register_family(family: DiTFamily) -> DiTFamily:
    """Register a `DiTFamily` instance (one per architecture file)."""
    _FAMILIES.append(family)
    return family


def family_for(transformer: nn.Module) -> DiTFamily:
    for fam in _FAMILIES:
        if fam.matches(transformer):
            return fam
    known = sorted(c for f in _FAMILIES for c in f.transformer_classes)
    raise TargetError(
        f"{type(transformer).__name__} is not a supported DiT. Supported: {known}. Pass a diffusers pipeline or its "
        "`.transformer`; to add an architecture, write a `DiTFamily` and call `vh.register_family`."
    )


class ExtrasState:
    """Mixin for the family processors: the per-call state shared with the injector's hooks.

    `pending` (an `ExtraKV` from the block hook), `captured_mod` (the block's modulation output, from the capture
    hook), `normed` (`(hidden, text_norm(hidden))` from the block hook), `active_mod` (the modulation, while the
    extras' text path runs inside the processor) and `to_block_output` (`(added, rows)` that the block hook adds to
    the block's output, placement `"block_output"`)."""

    def _init_state(self) -> None:
        self.pending = None
        self.captured_mod = None
        self.active_mod = None
        self.normed = None
        self.to_block_output = None

    def take(self):
        """`(extra, modulation)` of this call; clears both, so nothing leaks into a later call."""
        extra, self.pending = self.pending, None
        mod, self.captured_mod = self.captured_mod, None
        return extra, mod

    def text_path(self, fn, mod):
        """Run the extras' text path `fn()` with the captured modulation visible to the family's `text_input`."""
        self.active_mod = mod
        try:
            return fn()
        finally:
            self.active_mod = None
            self.normed = None


def rows_of(x: torch.Tensor, rows: list[int] | None) -> torch.Tensor:
    """Select batch rows of a per-row conditioning tensor (a batch of 1 broadcasts)."""
    if rows is None or x.shape[0] == 1:
        return x
    return x[rows]
