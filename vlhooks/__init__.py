"""vlhooks: condition text-to-image diffusion transformers on a reference image through hooks.

The public contract (see README): `VLFeatures`, `InjectionConfig`, `inject`, `apply_injection` (returns an
`InjectionHandle`), `remove_injection`, `list_sites`. Importing the core needs neither Lightning nor wandb.
"""

from .adapters import AdapterError, KVAdapter, LoRAAdapter, ProjectionAdapter, load_adapter
from .blend import BLEND_MODES, blend, resample_tokens
from .config import InjectionConfig
from .errors import ConfigError, FeatureError, TargetError, VLHooksError
from .features import VLFeatures
from .injection import (
    InjectionHandle,
    apply_injection,
    get_injection,
    inject,
    list_presets,
    list_sites,
    remove_injection,
)
from .models import DiTFamily, Site, family_for, register_family
from .projector import ZeroShotProjector

__version__ = "0.1.0"

__all__ = [
    "VLFeatures",
    "InjectionConfig",
    "InjectionHandle",
    "inject",
    "apply_injection",
    "remove_injection",
    "get_injection",
    "list_sites",
    "list_presets",
    "ZeroShotProjector",
    "load_adapter",
    "ProjectionAdapter",
    "KVAdapter",
    "LoRAAdapter",
    "AdapterError",
    "blend",
    "BLEND_MODES",
    "resample_tokens",
    "DiTFamily",
    "Site",
    "family_for",
    "register_family",
    "VLHooksError",
    "FeatureError",
    "ConfigError",
    "TargetError",
]
