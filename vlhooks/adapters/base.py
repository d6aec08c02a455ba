"""`Adapter`: a trained projector, and its folder format (`adapter_config.json` + `adapter_model.safetensors`).

An adapter is an `nn.Module` that plays the projector role of `apply_injection`: it may replace the feature
projection (`embed`) and / or the per-block K/V projection (`kv`). Whatever it does not replace is zero-shot, so
the one injection code path serves both. Each adapter type is initialised to reproduce zero-shot exactly where a
zero-shot exists (feature width equal to the DiT's caption width).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Hashable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import VLHooksError
from ..models.base import DiTFamily, Site

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1


class AdapterError(VLHooksError):
    """A missing, corrupt or mismatched adapter folder, or an adapter used on the wrong model."""


@dataclass
class AdapterConfig:
    """What an adapter is and what it was fitted on; saved as `adapter_config.json`."""

    adapter_type: str  # "projection" | "kv" | "lora"
    dit_class: str  # e.g. "FluxTransformer2DModel"
    feature_width: int  # width of the VLFeatures it takes
    caption_width: int  # the DiT's caption width
    sites: list[str] = field(default_factory=list)  # blocks with per-block weights (kv, lora); [] = any
    options: dict[str, Any] = field(default_factory=dict)  # type-specific (kind, num_tokens, rank, ...)
    injection: dict[str, Any] | None = None  # the InjectionConfig it was trained with
    feature_source: dict[str, Any] = field(default_factory=dict)  # VLFeatures.source of the training features
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AdapterConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise AdapterError(f"{CONFIG_NAME} has unknown keys {unknown}; it was written by a newer vlhooks?")
        return cls(**d)


_ADAPTER_TYPES: dict[str, type["Adapter"]] = {}


def register_adapter(name: str):
    def deco(cls):
        _ADAPTER_TYPES[name] = cls
        cls.adapter_type = name
        return cls

    return deco


class Adapter(nn.Module):
    """Base class: zero-shot everywhere; subclasses override `project` (features) and / or `kv` (per block)."""

    adapter_type = "base"

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = config

    # ------------------------------------------------------------------ projector protocol
    def feature_width(self, family: DiTFamily, transformer: nn.Module) -> int:
        return self.config.feature_width

    def check_target(self, family: DiTFamily, transformer: nn.Module, sites: list[Site]) -> None:
        """Raise `AdapterError` unless this adapter fits `transformer` and covers `sites`."""
        cls = type(transformer).__name__
        if cls != self.config.dit_class:
            raise AdapterError(f"this adapter was fitted on {self.config.dit_class}, not {cls}; load one made for {cls}.")
        width = family.caption_width(transformer)
        if width != self.config.caption_width:
            raise AdapterError(
                f"this adapter expects a caption width of {self.config.caption_width} but the model has {width}; "
                "it was fitted on a different model size."
            )
        if self.config.sites:
            missing = [s.name for s in sites if s.name not in self.config.sites]
            if missing:
                raise AdapterError(
                    f"this adapter has no weights for blocks {missing}; select among {self.config.sites} "
                    "(e.g. InjectionConfig(blocks=...) or leave config=None to use the adapter's own)."
                )

    def bind(self, family: DiTFamily, transformer: nn.Module) -> None:
        """Attach to a model (adapters that wrap the model's own layers override this)."""

    def embed_key(self, family: DiTFamily, site: Site) -> Hashable:
        return family.embed_key(site)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """Features `[B, N, F]` -> caption-space tokens `[B, M, C]` (identity unless overridden)."""
        return tokens

    def output_mask(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The mask of `project`'s output tokens."""
        return mask

    def embed(self, family, transformer, tokens, mask, site, cache):
        p = next(iter(self.parameters()), None)
        x = tokens if p is None else tokens.to(p.dtype)
        x = self.project(x).to(tokens.dtype)
        return family.embed(transformer, x, self.output_mask(mask), site, cache)

    def kv(self, family, transformer, site, hidden, block_args, block_kwargs, rows, cache):
        return family.text_kv(transformer, site, hidden, block_args, block_kwargs, rows, cache)

    # ------------------------------------------------------------------ weights
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimizer should see (never the DiT's)."""
        return list(self.parameters())

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's own weights (never the DiT's), as saved."""
        return {k: v for k, v in self.state_dict().items()}

    def save(self, path: str | os.PathLike) -> Path:
        """Write `adapter_config.json` + `adapter_model.safetensors` to `path`, atomically (a crash leaves either
        the old folder or the new one, never a half-written one)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            state = {k: v.detach().contiguous().cpu() for k, v in self.trainable_state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "adapter_type": self.adapter_type})
            (tmp / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2, sort_keys=True))
            _publish_modes(tmp)
            old = None
            if path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                os.replace(path, old)
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        own = self.trainable_state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise AdapterError(
                f"{WEIGHTS_NAME} does not match this {self.adapter_type} adapter: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}; the file belongs to a different adapter configuration."
            )
        bad = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
        if bad:
            k = bad[0]
            raise AdapterError(
                f"{WEIGHTS_NAME}: {k} has shape {tuple(state[k].shape)}, expected {tuple(own[k].shape)}; "
                "the file belongs to a different adapter configuration."
            )
        self._assign(state)

    def _assign(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state, strict=True)

    @classmethod
    def from_config(cls, config: AdapterConfig) -> "Adapter":
        raise NotImplementedError


def _publish_modes(folder: Path) -> None:
    """`mkdtemp` makes a private (0700) folder; give the published folder ordinary permissions."""
    os.chmod(folder, 0o755)
    for f in folder.iterdir():
        os.chmod(f, 0o644)


def load_adapter(path: str | os.PathLike) -> Adapter:
    """Load an adapter folder (`adapter_config.json` + `adapter_model.safetensors`).

    Example:
        >>> adapter = vh.load_adapter("checkpoints/flux-projection/final")
        >>> with vh.inject(pipe, feats, adapter=adapter):
        ...     image = pipe(prompt).images[0]
    """
    path = Path(path)
    cfg_file, w_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg_file.is_file() or not w_file.is_file():
        raise AdapterError(
            f"{path} is not an adapter folder: it needs {CONFIG_NAME} and {WEIGHTS_NAME} "
            "(as written by adapter.save(path) or `vlhooks train`)."
        )
    try:
        config = AdapterConfig.from_dict(json.loads(cfg_file.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise AdapterError(f"{cfg_file} is corrupt ({e}); re-save the adapter or restore the file.") from None
    if config.adapter_type not in _ADAPTER_TYPES:
        raise AdapterError(f"unknown adapter_type {config.adapter_type!r} in {cfg_file}; known: {sorted(_ADAPTER_TYPES)}.")
    try:
        state = load_file(str(w_file))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{w_file} is corrupt or not a safetensors file ({e}); re-save the adapter.") from None
    adapter = _ADAPTER_TYPES[config.adapter_type].from_config(config)
    adapter.load_weights(state)
    return adapter.eval()
