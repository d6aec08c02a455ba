"""`DiTFamily`: the per-architecture facts injection needs, and the registry of families.

A family file (`z_image.py`, `flux.py`, `sd3.py`, ...) subclasses `DiTFamily` and registers it; it holds every fact
of its DiT that vlhooks uses:
- structure: which blocks are sites (`sites`, `presets`), the caption and hidden widths;
- calls: the batch size, how the denoiser's timestep maps to progress, the pipeline's guidance layout;
- the text path: what the model does to its caption tokens before attention (`embed` once per generation,
  `text_kv` per block and step, for a `BlockCall`), and the processor that extends the block's attention;
- training: the flow-matching objective (`velocity`) and the FSDP units (`fsdp_children`);
- the pipeline: its classes, how it encodes prompts (`encode_prompt`) and takes caption embeddings
  (`prompt_kwargs`), and the family's command-line `name`.
Code outside `vlhooks/models/` asks the family; it never branches on a class name. Adding an architecture is
adding one file here, its import in `__init__.py`, its tests and a tiny recipe.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Hashable

import torch
from torch import nn

from .. import fused_text
from ..errors import ConfigError, TargetError

if TYPE_CHECKING:
    from ..attention import BlockCall


@dataclass(frozen=True)
class Site:
    """One targetable block: `name` is its module path (e.g. `"transformer_blocks.3"`), `index` its position in
    `list_sites`, `kind` the family's block kind (`"double"`, `"single"`, `"main"`, ...)."""

    name: str
    index: int
    kind: str
    attn_name: str  # attribute of the block holding the attention module

    def block(self, transformer: nn.Module) -> nn.Module:
        return _submodule(transformer, self.name)

    def attention(self, transformer: nn.Module) -> nn.Module:
        return _submodule(_submodule(transformer, self.name), self.attn_name)


def _submodule(module: nn.Module, path: str) -> nn.Module:
    """`module.get_submodule(path)` through the children dicts directly: several times per block and step, where
    `get_submodule`'s attribute lookups were a measurable share of the injection's host time."""
    m = module
    try:
        for part in path.split("."):
            m = m._modules[part]
    except (KeyError, AttributeError):
        return module.get_submodule(path)  # its own error names what is missing
    if m is None:
        return module.get_submodule(path)
    return m


def arg(args: tuple, kwargs: dict, name: str, position: int, default: Any = None) -> Any:
    """Read a forward argument that may come by keyword or by position (blocks under gradient checkpointing are
    always called positionally)."""
    if name in kwargs:
        return kwargs[name]
    if len(args) > position:
        return args[position]
    return default


def per_reference(call: "BlockCall", n: int, make, dim: int = 0, key: Hashable | None = None):
    """The extra tokens' positional table (RoPE) for a call: `make(n)` for `n` tokens; for a call over several
    references' concatenated tokens (`call.segment_lengths`, see `BlockCall.batched`), each reference's own table
    `make(n_s)` (its positions start over), concatenated along `dim` (tensors or tuples of tensors). With `key`,
    the concatenation is cached in `call.cache`."""
    lengths = call.segment_lengths
    if not lengths or len(lengths) == 1:
        return make(n)
    cache_key = None if key is None or torch.compiler.is_compiling() else ("per_reference", key, tuple(lengths))
    if cache_key is not None and cache_key in call.cache:
        return call.cache[cache_key]
    parts = [make(m) for m in lengths]
    out = tuple(torch.cat(p, dim) for p in zip(*parts)) if isinstance(parts[0], tuple) else torch.cat(parts, dim)
    if cache_key is not None:
        call.cache[cache_key] = out
    return out


class DiTFamily:
    """Per-architecture facts. Subclasses set the class attributes and implement the methods."""

    name: str = ""  # the command-line name (`vlhooks sites NAME`)
    title: str = ""  # the model's name for people (tables, errors)
    transformer_classes: tuple[str, ...] = ()
    # Layout of batched classifier-free guidance in this family's pipeline, or None when the pipeline makes
    # separate conditional / unconditional calls.
    batched_guidance: str | None = None
    # preset name -> regex over site names; "all" is the family's main blocks
    presets: dict[str, str] = {}
    # `InjectionConfig.mode` values the family's processors implement exactly
    modes: tuple[str, ...] = ("joint", "decoupled")
    mode_note: str = ""  # why a mode is missing, for the error
    # `InjectionConfig.placement` values the family's processors implement
    placements: tuple[str, ...] = ("attention",)
    # diffusers pipeline classes whose transformer is of this family
    pipeline_classes: tuple[str, ...] = ()
    # site kinds whose attention has no image queries (caption tokens only): a reference's spatial mask cannot
    # apply there (`image_span` is None), which `Injector.set_references` warns about
    caption_only_kinds: tuple[str, ...] = ()
    # whether several references' extra tokens may go through one text-path call (`BlockCall.batched`): the text
    # path maps tokens one by one, and the extra tokens' positions (RoPE) are either absent or restart per reference
    # (`finish_kv` reads `BlockCall.segment_lengths`)
    batched_segments: bool = False
    # whether training may use cuDNN's SDPA kernel on CUDA (False where its backward fails on the family's training
    # shapes: `AdapterModule` then switches that kernel off for the fit; flash / memory-efficient serve instead)
    cudnn_attention_training: bool = True

    # ------------------------------------------------------------------ structure
    def matches(self, transformer: nn.Module) -> bool:
        """Whether `transformer` is an instance (or subclass instance) of one of `transformer_classes`."""
        import diffusers

        return any(isinstance(transformer, c) for c in
                   (getattr(diffusers, n, None) for n in self.transformer_classes) if c is not None)

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

    def pipeline_guides(self, pipeline: Any, args: tuple, kwargs: dict) -> bool:
        """Whether `pipeline` runs classifier-free guidance in this call (its `do_classifier_free_guidance`
        property; families whose pipelines keep it local decide from the call)."""
        return bool(getattr(pipeline, "do_classifier_free_guidance", False))

    def text_guidance(self, call: dict[str, Any]) -> float | None:
        """The effective text guidance scale `s` (`v_u + s (v_c - v_u)`; 1 without guidance) of a pipeline call
        with arguments `call` (its `__call__` defaults updated by the given ones); None where this family's
        pipelines have no convention for it. Default: diffusers' `guidance_scale`, guiding when above 1."""
        if "guidance_scale" not in call:
            return None
        w = float(call["guidance_scale"] or 1.0)
        return w if w > 1 else 1.0

    def call_role(self, args: tuple, kwargs: dict, memo: dict) -> str | None:
        """For pipelines that make separate conditional / unconditional calls WITHOUT diffusers'
        `cache_context("uncond")`: `"uncond"` when this call is the unconditional one, else None. Asked only while
        a guiding pipeline drives the model; `memo` is the injector's, kept between calls (cleared with new
        references) for what the family needs to remember of the previous call."""
        return None

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

    # The text path, per block and step, for the extra tokens of one `BlockCall` (`call.embedded` `[R, N, D]`,
    # model rows `call.rows`). Two parts are shared with the block's own run, for speed: the pre-norm does not
    # depend on the timestep, so the injector caches it per generation (`text_norm`, shared by sites with one
    # `norm_key`) and hands it over as `call.pre_normed`; the block's own modulation output is recorded from the
    # module `modulation_module` names while the block runs (`call.modulation`), so it is not computed twice.
    def text_input(self, call: "BlockCall") -> torch.Tensor:
        """The block's pre-attention norm and modulation of the extra tokens at this step. `[R, N, D]`."""
        raise NotImplementedError

    def text_norm(self, transformer: nn.Module, site: Site, hidden: torch.Tensor) -> torch.Tensor:
        """The timestep-independent pre-norm of `text_input` (`[R, N, D]`); the identity if the family has none."""
        return hidden

    def norm_key(self, transformer: nn.Module, site: Site) -> Hashable:
        """Sites with the same key share one cached `text_norm` of the features."""
        return site.name

    def modulation_module(self, transformer: nn.Module, site: Site) -> nn.Module | None:
        """The block's submodule whose output is the modulation `text_input` needs (recorded while the block
        runs), or None."""
        return None

    def kv_linears(self, transformer: nn.Module, site: Site) -> tuple[nn.Module, nn.Module]:
        """The block's text-side K and V projections (the modules a `kv` adapter copies and LoRA wraps)."""
        raise NotImplementedError

    def finish_kv(self, call: "BlockCall", k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected `k, v` `[R, N, H*Dh]` -> `[R, N, H, Dh]` with the block's qk-norm and the extra tokens' RoPE."""
        raise NotImplementedError

    def text_kv(self, call: "BlockCall") -> tuple[torch.Tensor, torch.Tensor]:
        """The block's own text path up to attention: pre-norm and modulation, text K/V projections, qk-norm,
        RoPE. Returns `k, v` as `[R, N, H, Dh]`."""
        x = self.text_input(call)
        k_proj, v_proj = self.kv_linears(call.transformer, call.site)
        kv = fused_text.linear_pair(x, k_proj, v_proj)  # one kernel on CUDA where it serves, else None
        return self.finish_kv(call, *(kv or (k_proj(x), v_proj(x))))

    # ------------------------------------------------------------------ training objective
    def prediction_and_target(
        self,
        transformer: nn.Module,
        x0: torch.Tensor,
        noise: torch.Tensor,
        sigma: torch.Tensor,
        caption: torch.Tensor,
        caption_mask: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's own training objective at noise level `sigma` `[B]` in (0, 1): `(prediction, target)` for a
        mean-squared error. `x0`, `noise` `[B, C, H, W]` (float32; the noisy input is cast to the model's dtype).
        The default is flow matching: the model sees `(1 - sigma) x0 + sigma noise` and predicts `noise - x0`
        (`velocity`); families trained otherwise (e.g. epsilon prediction) override it."""
        s = sigma.view(-1, 1, 1, 1)
        x_t = (1.0 - s) * x0 + s * noise
        dtype = next(transformer.parameters()).dtype
        return self.velocity(transformer, x_t.to(dtype), sigma, caption, caption_mask, pooled), noise - x0

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

    # ------------------------------------------------------------------ image tokens (spatial masks)
    def image_grid(self, transformer: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int]:
        """`(h, w)` of the image-token grid of one denoiser call (row-major: token `i` is at `(i // w, i % w)`)."""
        raise ConfigError(f"spatial masks (vh.Reference(mask=...)) are not implemented for {self.name}; "
                          "drop the mask.")

    def image_span(self, site: Site, block_args: tuple, block_kwargs: dict,
                   grid: tuple[int, int]) -> tuple[int, int] | None:
        """`(start, length)` of the image tokens in the site's attention query sequence (None: it has none);
        `grid` is this call's `image_grid`."""
        raise ConfigError(f"spatial masks (vh.Reference(mask=...)) are not implemented for {self.name}; "
                          "drop the mask.")

    def supports_masks(self) -> bool:
        return type(self).image_grid is not DiTFamily.image_grid

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

    # ------------------------------------------------------------------ the pipeline (training data, compare)
    def transformer_class(self) -> type:
        """The diffusers class of this family's transformer (the first of `transformer_classes`)."""
        return self.transformer_class_named(self.transformer_classes[0])

    def transformer_class_named(self, class_name: str) -> type:
        import diffusers

        if class_name not in self.transformer_classes:
            raise TargetError(f"{class_name} is not a transformer class of family {self.name!r} "
                              f"({list(self.transformer_classes)}).")
        return getattr(diffusers, class_name)

    def encode_prompt(self, pipe: Any, prompts: list[str], device: Any, max_sequence_length: int) -> PromptEmbeds:
        """`prompts` through the pipeline's own `encode_prompt` (its text encoders, templates and layers), without
        guidance rows. `sequences`: one `[L_i, C]` per prompt (float32, CPU); `pooled`: `[B, P]` or None."""
        raise NotImplementedError

    def encode_latents(self, vae: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """Training latents of `pixels` `[B, 3, H, W]` in [-1, 1] through the pipeline's VAE, as its pipeline
        makes them (what `velocity` takes): `(mode - shift_factor) * scaling_factor` by default. `[B, C, h, w]`."""
        z = vae.encode(pixels).latent_dist.mode()
        cfg = vae.config
        return (z - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor

    def prompt_kwargs(self, embeds: torch.Tensor, pooled: torch.Tensor | None) -> dict[str, Any]:
        """The pipeline `__call__` arguments that pass caption embeddings `embeds` `[B, L, C]` (and `pooled`
        `[B, P]`) instead of a prompt (the embedding route's blended captions)."""
        out: dict[str, Any] = {"prompt_embeds": embeds}
        if pooled is not None:
            out["pooled_prompt_embeds"] = pooled
        return out

    # children of a site block that `vlhooks train --trainer.strategy fsdp` makes FSDP units, per site kind: the
    # modules that run inside the block's forward only (attention, feed-forwards), never its norms or modulation,
    # which the injection also runs on the extra tokens outside the block's forward
    fsdp_children: dict[str, tuple[str, ...]] = {}

    def fsdp_units(self, transformer: nn.Module, skip: set[int] = frozenset()) -> list[nn.Module]:
        """The DiT's FSDP units: the transformer itself, then `fsdp_children` of every site block whose `id` is
        not in `skip` (the blocks the extras' embedding runs, which stay in the transformer's unit)."""
        units = [transformer]
        for site in self.sites(transformer):
            block = site.block(transformer)
            if id(block) in skip:
                continue
            for name in self.fsdp_children.get(site.kind, ()):
                child = getattr(block, name, None)
                if child is not None and any(True for _ in child.parameters()):
                    units.append(child)
        return units


def grid_of(length: int, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> tuple[int, int]:
    """The `(h, w)` grid of `length` image tokens: from integer row / column positions when given (the pipeline's
    position ids), else a square; raises naming the fix when neither fits."""
    if rows is not None and cols is not None and rows.numel() == length:
        if bool((rows == rows.round()).all()) and bool((cols == cols.round()).all()):
            h, w = int(rows.max()) + 1 - int(rows.min()), int(cols.max()) + 1 - int(cols.min())
            if h * w == length:
                return h, w
    side = int(round(length ** 0.5))
    if side * side == length:
        return side, side
    raise ConfigError(f"cannot tell the image-token grid of {length} tokens (no integer position ids and not a "
                      "square); give masks through the pipeline, or pass position ids as the pipeline makes them.")


def true_cfg_guidance(call: dict[str, Any]) -> float:
    """`s` of the pipelines with "true CFG" (FluxPipeline, QwenImagePipeline): `true_cfg_scale` when above 1 and
    a negative prompt (or its embeddings) is given, else 1 (their `guidance_scale` is a distilled embedding)."""
    w = float(call.get("true_cfg_scale") or 1.0)
    negative = call.get("negative_prompt") is not None or call.get("negative_prompt_embeds") is not None
    return w if w > 1 and negative else 1.0


class DoubleSingleStreamFamily(DiTFamily):
    """The structure Flux.1, Flux.2 and Chroma share: double-stream blocks `transformer_blocks.{i}` (indices
    0..D-1) then single-stream blocks `single_transformer_blocks.{i}` (D..D+S-1), both attending over `[txt, img]`;
    caption width `joint_attention_dim`, hidden width `inner_dim`; the pipelines pass sigma as the timestep and
    position ids `img_ids` whose axes 1 and 2 are the packed latent grid's row and column."""

    presets = {
        "all": r"(single_)?transformer_blocks\.\d+",
        "double": r"transformer_blocks\.\d+",
        "single": r"single_transformer_blocks\.\d+",
    }
    img_ids_arg: tuple[str, int] = ("img_ids", 4)  # (keyword, position) in the transformer's forward

    def sites(self, transformer):
        out = [Site(f"transformer_blocks.{i}", i, "double", "attn") for i in range(len(transformer.transformer_blocks))]
        d = len(out)
        out += [Site(f"single_transformer_blocks.{i}", d + i, "single", "attn")
                for i in range(len(transformer.single_transformer_blocks))]
        return out

    def caption_width(self, transformer):
        return int(transformer.config.joint_attention_dim)

    def hidden_width(self, transformer):
        return int(transformer.inner_dim)

    def batch_size(self, args, kwargs):
        return int(arg(args, kwargs, "hidden_states", 0).shape[0])

    def to_progress(self, t):
        return 1.0 - t  # sigma in [0, 1]

    def image_grid(self, transformer, args, kwargs):
        n = int(arg(args, kwargs, "hidden_states", 0).shape[1])  # packed latent tokens
        ids = arg(args, kwargs, *self.img_ids_arg)
        if ids is None:
            return grid_of(n)
        ids = ids.reshape(-1, ids.shape[-1])
        return grid_of(n, ids[:, 1], ids[:, 2])


@dataclass
class PromptEmbeds:
    """Caption embeddings as a family's pipeline makes them: one `[L_i, C]` per prompt, and `[B, P]` pooled ones
    (Flux, SD3) or None."""

    sequences: list[torch.Tensor]
    pooled: torch.Tensor | None = None


_FAMILIES: list[DiTFamily] = []


def register_family(family: DiTFamily) -> DiTFamily:
    """Register a `DiTFamily` instance (one per architecture file)."""
    _FAMILIES.append(family)
    return family


def families() -> list[DiTFamily]:
    """Every registered family, by name."""
    return sorted(_FAMILIES, key=lambda f: f.name)


def supported_table() -> str:
    """The Markdown table of every registered family: its classes, sites and presets at full size (built on the
    meta device), modes, placements and spatial masks. The README's supported-models table is this (a test checks
    it)."""
    rows = ["| family | transformer | sites (full size) | presets | modes | placements | masks |",
            "|---|---|---|---|---|---|---|"]
    for fam in families():
        with torch.device("meta"):
            model = fam.transformer_class()()
        sites = fam.sites(model)
        kinds: dict[str, int] = {}
        for s in sites:
            kinds[s.kind] = kinds.get(s.kind, 0) + 1
        shown = ", ".join(f"{n} {k}" for k, n in kinds.items())
        rows.append(f"| {fam.title} (`{fam.name}`) | `{fam.transformer_classes[0]}` | {len(sites)}: {shown} | "
                    f"{', '.join(f'`{p}`' for p in fam.presets)} | {', '.join(fam.modes)} | "
                    f"{', '.join(fam.placements)} | {'yes' if fam.supports_masks() else 'no'} |")
    return "\n".join(rows)


def family_named(name: str) -> DiTFamily:
    """The family whose `name` (its command-line name, e.g. `"flux"`) is `name`."""
    for fam in _FAMILIES:
        if fam.name == name:
            return fam
    raise TargetError(f"unknown DiT family {name!r}; known: {[f.name for f in _FAMILIES]}.")


def family_for_class(class_name: str) -> DiTFamily:
    """The family of a transformer or pipeline class name (e.g. from a saved `config.json`'s `_class_name`)."""
    for fam in _FAMILIES:
        if class_name in fam.transformer_classes or class_name in fam.pipeline_classes:
            return fam
    known = sorted(c for f in _FAMILIES for c in (*f.transformer_classes, *f.pipeline_classes))
    raise TargetError(f"{class_name} is not a supported DiT or DiT pipeline class. Supported: {known}.")


def load_transformer(path: str, subfolder: str | None = None, **kwargs: Any) -> nn.Module:
    """A saved diffusers transformer folder of any registered family (its class read from `config.json`'s
    `_class_name`), loaded with `from_pretrained(path, subfolder=..., **kwargs)`, in eval mode."""
    import json
    from pathlib import Path

    cfg_file = Path(path) / (subfolder or "") / "config.json"
    if not cfg_file.is_file():
        raise TargetError(f"{cfg_file} does not exist; point at a diffusers transformer folder (with config.json).")
    class_name = json.loads(cfg_file.read_text()).get("_class_name", "?")
    cls = family_for_class(class_name).transformer_class_named(class_name)
    return cls.from_pretrained(path, subfolder=subfolder, **kwargs).eval()


def family_for(transformer: nn.Module) -> DiTFamily:
    for fam in _FAMILIES:
        if fam.matches(transformer):
            return fam
    known = sorted(c for f in _FAMILIES for c in f.transformer_classes)
    raise TargetError(
        f"{type(transformer).__name__} is not a supported DiT. Supported: {known}. Pass a diffusers pipeline or its "
        "`.transformer`; to add an architecture, write a `DiTFamily` and call `vh.register_family`."
    )


def rows_of(x: torch.Tensor, rows: list[int] | None) -> torch.Tensor:
    """Select batch rows of a per-row conditioning tensor (a batch of 1 broadcasts)."""
    if rows is None or x.shape[0] == 1:
        return x
    return x[rows]
