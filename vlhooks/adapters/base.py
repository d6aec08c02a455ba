"""`Adapter`: a trained projector; the one registry of adapter types; the adapter folder format.

An adapter is an `nn.Module` that plays the projector role of `apply_injection` (`vh.Projector`): it may replace
the feature projection (`embed`) and / or the per-block K/V projection (`kv`). Whatever it does not replace is
zero-shot, so the one injection code path serves both. Each adapter type is initialised to reproduce zero-shot
exactly where a zero-shot exists (feature width equal to the DiT's caption width).

A folder holds `adapter_config.json` (`AdapterConfig`: the type, its typed options, the DiT class and widths, the
injection config it was trained with, the feature source, the format version and the vlhooks version that wrote
it) and `adapter_model.safetensors` (the adapter's own weights only, never the DiT's; no pickle).

Format versions: 1 (vlhooks 0.1, LoRA keys kept peft's adapter name `.default.`), 2 (this version: LoRA keys as
peft saves them, `<site>.<k|v>.lora_A.weight`; the vlhooks version recorded; a copy of the config in the weights'
metadata, so a half-replaced folder is detected). Older formats are read and converted on load; a newer format
is refused with a message to upgrade vlhooks.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Hashable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import AdapterError
from ..files import process_alive
from ..models.base import DiTFamily, Site

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 2
TMP_MARK = ".vlhooks-tmp-"  # in the names of temporary files and folders `save` makes (then renames)


def _version() -> str:
    from .. import __version__

    return __version__


@dataclass
class Options:
    """Base of the typed per-type options (saved as the `options` dict of `adapter_config.json`)."""

    @classmethod
    def from_dict(cls, d: Any, where: str = CONFIG_NAME) -> "Options":
        if not isinstance(d, dict):
            raise AdapterError(f"{where}: `options` must be a dict of {cls.__name__} fields, got {d!r}; re-save the "
                               "adapter or restore the file.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise AdapterError(f"{where}: unknown options {unknown} for this adapter type (known: {sorted(known)}); "
                               "was it written by a newer vlhooks?")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise AdapterError(f"{where}: bad options {d!r} ({e}).") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AdapterConfig:
    """What an adapter is and what it was fitted on; saved as `adapter_config.json`."""

    adapter_type: str  # a key of `ADAPTER_TYPES`: "projection" | "kv" | "lora"
    dit_class: str  # e.g. "FluxTransformer2DModel"
    feature_width: int  # width of the VLFeatures it takes
    caption_width: int  # the DiT's caption width
    options: Options  # the type's typed options
    sites: list[str] = field(default_factory=list)  # blocks with per-block weights (kv, lora); [] = any
    injection: dict[str, Any] | None = None  # the InjectionConfig it was trained with
    feature_source: dict[str, Any] = field(default_factory=dict)  # VLFeatures.source of the training features
    format_version: int = FORMAT_VERSION
    vlhooks_version: str = field(default_factory=_version)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["options"] = self.options.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = CONFIG_NAME) -> "AdapterConfig":
        """Read a config dict (any format up to `FORMAT_VERSION`), checking every field's type."""
        if not isinstance(d, dict):
            raise AdapterError(f"{where} must hold a JSON object, got {type(d).__name__}; restore the file.")
        d = dict(d)
        version = d.get("format_version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise AdapterError(f"{where}: format_version must be a positive int, got {version!r}.")
        if version > FORMAT_VERSION:
            raise AdapterError(
                f"{where} is in adapter format {version}, written by vlhooks {d.get('vlhooks_version', '?')}; this "
                f"vlhooks ({_version()}) reads formats 1 to {FORMAT_VERSION}. Upgrade vlhooks to load it."
            )
        d.setdefault("vlhooks_version", "unknown (before format 2)")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise AdapterError(f"{where} has unknown keys {unknown}; was it written by a newer vlhooks?")
        missing = sorted(k for k in ("adapter_type", "dit_class", "feature_width", "caption_width", "options")
                         if k not in d)
        if missing:
            raise AdapterError(f"{where} lacks {missing}; it is not an adapter config (re-save the adapter).")
        checks = {"adapter_type": str, "dit_class": str, "feature_width": int, "caption_width": int, "sites": list,
                  "feature_source": dict, "vlhooks_version": str}
        for k, t in checks.items():
            if k in d and (not isinstance(d[k], t) or isinstance(d[k], bool)):
                raise AdapterError(f"{where}: {k} must be {t.__name__}, got {d[k]!r}; restore the file or re-save "
                                   "the adapter.")
        if d.get("injection") is not None and not isinstance(d["injection"], dict):
            raise AdapterError(f"{where}: injection must be a dict of InjectionConfig fields or null.")
        if d["adapter_type"] not in ADAPTER_TYPES:
            raise AdapterError(f"{where}: unknown adapter_type {d['adapter_type']!r}; known: {sorted(ADAPTER_TYPES)}.")
        d["options"] = ADAPTER_TYPES[d["adapter_type"]].options_class.from_dict(d["options"], where)
        d["format_version"] = version
        return cls(**d)


# ---------------------------------------------------------------------------------------------------- registry
ADAPTER_TYPES: dict[str, type["Adapter"]] = {}


def register_adapter(name: str):
    """Class decorator: register an `Adapter` subclass under `name` (its `adapter_type`)."""

    def deco(cls):
        ADAPTER_TYPES[name] = cls
        cls.adapter_type = name
        return cls

    return deco


def create_adapter(adapter_type: str, transformer: nn.Module, feature_width: int | None = None,
                   blocks: str | list[int] = "all", **options: Any) -> "Adapter":
    """A fresh adapter of `adapter_type` for `transformer` (initialised to zero-shot where one exists).
    `feature_width` None is the DiT's caption width; `blocks` selects the blocks of per-block adapters."""
    if adapter_type not in ADAPTER_TYPES:
        raise AdapterError(f"adapter type must be one of {sorted(ADAPTER_TYPES)}, got {adapter_type!r}.")
    return ADAPTER_TYPES[adapter_type].create(transformer, feature_width=feature_width, blocks=blocks, **options)


class Adapter(nn.Module):
    """Base class: zero-shot everywhere; subclasses override `project` (features) and / or `kv` (per block)."""

    adapter_type: ClassVar[str] = "base"
    options_class: ClassVar[type[Options]] = Options
    tokenwise: ClassVar[bool] = True  # `kv` maps each extra token on its own (the block's text path, per token)

    def __init__(self, config: AdapterConfig):
        super().__init__()
        if not isinstance(config.options, self.options_class):
            raise AdapterError(f"a {self.adapter_type} adapter needs {self.options_class.__name__} options, got "
                               f"{type(config.options).__name__}.")
        self.config = config

    @classmethod
    def create(cls, transformer: nn.Module, feature_width: int | None = None, blocks: str | list[int] = "all",
               **options: Any) -> "Adapter":
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: AdapterConfig) -> "Adapter":
        return cls(config)

    # ------------------------------------------------------------------ projector protocol
    def feature_width(self, family: DiTFamily, transformer: nn.Module) -> int:
        return self.config.feature_width

    def check_target(self, family: DiTFamily, transformer: nn.Module, sites: list[Site]) -> None:
        """Raise `AdapterError` unless this adapter fits `transformer`, covers `sites` and has finite weights."""
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
        bad = [n for n, p in self.named_parameters() if p.device.type != "meta" and not bool(torch.isfinite(p).all())]
        if bad:
            raise AdapterError(f"this adapter has non-finite weights in {bad[:4]}; it would give non-finite images. "
                               "Reload it from its folder or retrain it.")

    def bind(self, family: DiTFamily, transformer: nn.Module) -> None:
        """Attach to a model (adapters that use the model's own layers override this)."""

    def embed_key(self, family: DiTFamily, site: Site) -> Hashable:
        return family.embed_key(site)

    def output_mask(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The mask of the embedded tokens."""
        return mask

    def embed(self, family, transformer, tokens, mask, site, cache):
        return family.embed(transformer, tokens, mask, site, cache)

    def kv(self, call):
        return call.family.text_kv(call)

    # ------------------------------------------------------------------ weights
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimizer should see (never the DiT's)."""
        return list(self.parameters())

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's own weights (never the DiT's), under the names they are saved with."""
        return dict(self.state_dict())

    def module_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A state under `trainable_state_dict`'s (saved) names, renamed to the module's own `state_dict` names."""
        return state

    def save(self, path: str | os.PathLike) -> Path:
        """Write `adapter_config.json` + `adapter_model.safetensors` to `path`.

        A new folder is built beside `path` and renamed into place (a crash leaves no folder, or the whole one).
        An existing adapter folder gets the two files replaced, each by a rename, and keeps anything else it
        holds. Anything else at `path` (a file, a folder that is not an adapter folder) is refused: nothing a user
        already has is deleted or overwritten."""
        path = Path(path)
        if path.is_file() or (path.exists() and not path.is_dir()):
            raise AdapterError(f"{path} is a file; save the adapter to a folder path (nothing was written).")
        if path.is_dir() and any(path.iterdir()) and not (path / CONFIG_NAME).is_file():
            raise AdapterError(f"{path} exists and is not an adapter folder (no {CONFIG_NAME}); save to a new or "
                               "empty folder (nothing was written).")
        config_text = json.dumps(self.config.to_dict(), indent=2, sort_keys=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.trainable_state_dict().items()}
        meta = {"format": "pt", "adapter_type": self.adapter_type, "adapter_config": config_text}
        path.parent.mkdir(parents=True, exist_ok=True)
        tag = f"{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
        if not path.exists():
            tmp = path.parent / f".{path.name}{tag}"
            tmp.mkdir()
            try:
                save_file(state, str(tmp / WEIGHTS_NAME), metadata=meta)
                (tmp / CONFIG_NAME).write_text(config_text)
                _publish_modes(tmp)
                os.replace(tmp, path)  # fails if `path` appeared meanwhile (a non-empty folder): nothing is lost
            except BaseException:
                _remove_tree(tmp)
                raise
            return path
        written = []
        try:
            for name, write in ((WEIGHTS_NAME, lambda f: save_file(state, str(f), metadata=meta)),
                                (CONFIG_NAME, lambda f: f.write_text(config_text))):
                tmp = path / f".{name}{tag}"
                written.append(tmp)
                write(tmp)
                os.chmod(tmp, 0o644)
            for tmp, name in zip(written, (WEIGHTS_NAME, CONFIG_NAME)):
                os.replace(tmp, path / name)
        finally:
            for tmp in written:
                tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def upgrade_state(cls, state: dict[str, torch.Tensor], config: AdapterConfig) -> dict[str, torch.Tensor]:
        """A state saved in an older format (`config.format_version`), renamed to this format's names."""
        return state

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a saved state (as `trainable_state_dict` names it) into the adapter, checking names and shapes."""
        own = self.trainable_state_dict()
        check_state(state, {k: tuple(v.shape) for k, v in own.items()}, self.adapter_type)
        self.load_state_dict(state, strict=True)


def check_state(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], adapter_type: str) -> None:
    """Raise `AdapterError` unless `state` has exactly the `expected` names and shapes, floating-point, finite."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise AdapterError(
            f"{WEIGHTS_NAME} does not match this {adapter_type} adapter: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}; the file belongs to a different adapter configuration."
        )
    for k, shape in expected.items():
        t = state[k]
        if tuple(t.shape) != tuple(shape):
            raise AdapterError(f"{WEIGHTS_NAME}: {k} has shape {tuple(t.shape)}, expected {tuple(shape)}; the file "
                               "belongs to a different adapter configuration.")
        if not t.is_floating_point():
            raise AdapterError(f"{WEIGHTS_NAME}: {k} has dtype {t.dtype}; adapter weights are floating point. The "
                               "file is not an adapter written by vlhooks.")
        if not bool(torch.isfinite(t).all()):
            raise AdapterError(f"{WEIGHTS_NAME}: {k} holds NaN or Inf; the adapter would give non-finite images. "
                               "Restore the file or retrain the adapter.")


def _publish_modes(folder: Path) -> None:
    """`mkdir` under a umask, `save_file` and friends: give the published folder ordinary permissions."""
    os.chmod(folder, 0o755)
    for f in folder.iterdir():
        os.chmod(f, 0o644)


def _remove_tree(folder: Path) -> None:
    """Remove a temporary folder this module made (only its own files; nothing else lives there)."""
    if folder.is_dir():
        for f in folder.iterdir():
            f.unlink(missing_ok=True)
        folder.rmdir()


def clean_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove temporaries an interrupted `save` left in `folder` (and in the adapter folders directly below it)
    whose writing process is gone; returns what was removed. Only names carrying `TMP_MARK` are touched."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    dirs = [folder] + [d for d in folder.iterdir() if d.is_dir() and TMP_MARK not in d.name]
    for d in dirs:
        for entry in d.iterdir():
            if TMP_MARK not in entry.name:
                continue
            pid = entry.name.split(TMP_MARK, 1)[1].split("-", 1)[0]
            if pid.isdigit() and process_alive(int(pid)):
                continue
            if entry.is_dir():
                _remove_tree(entry)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed



def read_config(path: str | os.PathLike) -> AdapterConfig:
    """The `AdapterConfig` of an adapter folder (no weights read)."""
    path = Path(path)
    cfg_file, w_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg_file.is_file() or not w_file.is_file():
        raise AdapterError(
            f"{path} is not an adapter folder: it needs {CONFIG_NAME} and {WEIGHTS_NAME} "
            "(as written by adapter.save(path) or `vlhooks train`)."
        )
    try:
        raw = json.loads(cfg_file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{cfg_file} is corrupt: not valid UTF-8 JSON ({e}); re-save the adapter or restore "
                           "the file.") from None
    return AdapterConfig.from_dict(raw, str(cfg_file))


def _weights_facts(d: dict[str, Any]) -> dict[str, str]:
    """The config fields the weights depend on (a user may edit the rest, e.g. the injection config); options
    with their defaults filled in, so a config written before an option existed compares equal to its reading."""
    d = dict(d)
    cls = ADAPTER_TYPES.get(d.get("adapter_type"))
    if cls is not None and isinstance(d.get("options"), dict):
        try:
            d["options"] = cls.options_class.from_dict(d["options"]).to_dict()
        except AdapterError:
            pass  # compared as written: it differs, and the message says so
    return {k: json.dumps(d.get(k), sort_keys=True) for k in
            ("adapter_type", "dit_class", "feature_width", "caption_width", "options", "sites")}


def resolve_adapter_folder(path_or_repo_id: str | os.PathLike, revision: str | None = None,
                           subfolder: str | None = None) -> Path:
    """A local adapter folder, or a Hugging Face Hub repository's, resolved through `huggingface_hub` and its
    cache (offline with `HF_HUB_OFFLINE=1`: the cached snapshot, or an error naming what is missing)."""
    local = Path(path_or_repo_id) / (subfolder or "")
    if local.exists() or revision is None and (Path(path_or_repo_id).is_absolute()
                                               or str(path_or_repo_id).startswith((".", "~"))):
        return local
    repo_id = str(path_or_repo_id)
    if repo_id.count("/") != 1:
        raise AdapterError(f"{repo_id} is neither an adapter folder nor a Hub repository id ('owner/name'); give "
                           "the folder written by adapter.save(path) or `vlhooks train`.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = [f"{subfolder}/{n}" if subfolder else n for n in (CONFIG_NAME, WEIGHTS_NAME)]
    try:
        root = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = ("HF_HUB_OFFLINE is set and it is not in the Hugging Face cache: download it once online, e.g. "
                f"`huggingface-cli download {repo_id}`" if offline else "check the id and your access to it")
        raise AdapterError(f"{repo_id} is not a local adapter folder and could not be resolved on the Hub "
                           f"({type(e).__name__}); {hint}, or give a local folder.") from None
    return Path(root) / (subfolder or "")


def load_adapter(path: str | os.PathLike, revision: str | None = None, subfolder: str | None = None) -> Adapter:
    """Load an adapter folder (`adapter_config.json` + `adapter_model.safetensors`): a local path, or a Hugging
    Face Hub repository id (`revision`, `subfolder` optional; resolved through `huggingface_hub`'s cache, as peft's
    `from_pretrained` does).

    Example:
        >>> adapter = vh.load_adapter("checkpoints/flux-projection/final")
        >>> with vh.inject(pipe, feats, adapter=adapter):
        ...     image = pipe(prompt).images[0]
    """
    path = resolve_adapter_folder(path, revision, subfolder)
    config = read_config(path)
    w_file = path / WEIGHTS_NAME
    try:
        state = load_file(str(w_file))
        with safe_open(str(w_file), "pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{w_file} is corrupt or not a safetensors file ({e}); re-save the adapter.") from None
    saved_config = meta.get("adapter_config")
    if saved_config is not None:
        saved, now = _weights_facts(json.loads(saved_config)), _weights_facts(config.to_dict())
        differ = [k for k in saved if saved[k] != now[k]]
        if differ:
            raise AdapterError(
                f"{path}: {CONFIG_NAME} does not describe {WEIGHTS_NAME}: its {differ} differ from those the weights "
                f"were saved with ({', '.join(f'{k}={saved[k]}' for k in differ)}). Restore the config (only "
                "`injection` and `feature_source` may be edited by hand) or save the adapter again."
            )
    cls = ADAPTER_TYPES[config.adapter_type]
    if config.format_version < FORMAT_VERSION:
        state = cls.upgrade_state(state, config)
        config.format_version = FORMAT_VERSION
    adapter = cls.from_config(config)
    adapter.load_weights(state)
    return adapter.eval()
