"""vlhooks: condition text-to-image diffusion transformers on a reference image through hooks.

The public contract (see README): `VLFeatures`, `InjectionConfig`, `inject`, `apply_injection` (returns an
`InjectionHandle`), `remove_injection`, `list_sites`, `list_presets`, `load_adapter`. Names are imported on first
use (PEP 562), so `import vlhooks` costs little; importing the core never needs Lightning or wandb.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

# public name -> the module that defines it
_EXPORTS = {
    "VLFeatures": "features",
    "InjectionConfig": "config",
    "Reference": "references",
    "InjectionHandle": "injection",
    "inject": "injection",
    "apply_injection": "injection",
    "remove_injection": "injection",
    "get_injection": "injection",
    "list_sites": "injection",
    "list_presets": "injection",
    "encode": "encoding",
    "load_features": "encoding",
    "Projector": "projector",
    "ZeroShotProjector": "projector",
    "load_adapter": "adapters",
    "create_adapter": "adapters",
    "ProjectionAdapter": "adapters",
    "KVAdapter": "adapters",
    "LoRAAdapter": "adapters",
    "IPAdapter": "adapters",
    "import_ip_adapter": "adapters",
    "blend": "blending",
    "BLEND_MODES": "blending",
    "resample_tokens": "blending",
    "DiTFamily": "models",
    "Site": "models",
    "family_for": "models",
    "register_family": "models",
    "VLHooksError": "errors",
    "FeatureError": "errors",
    "ConfigError": "errors",
    "TargetError": "errors",
    "AdapterError": "errors",
    "EncoderError": "errors",
    "DataError": "errors",
    "TrainingError": "errors",
    "CheckpointError": "errors",
    "CompareError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vlhooks' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .adapters import (
        IPAdapter,
        KVAdapter,
        LoRAAdapter,
        ProjectionAdapter,
        create_adapter,
        import_ip_adapter,
        load_adapter,
    )
    from .blending import BLEND_MODES, blend, resample_tokens
    from .config import InjectionConfig
    from .encoding import encode, load_features
    from .errors import (
        AdapterError,
        CheckpointError,
        CompareError,
        ConfigError,
        DataError,
        EncoderError,
        FeatureError,
        TargetError,
        TrainingError,
        VLHooksError,
    )
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
    from .projector import Projector, ZeroShotProjector
    from .references import Reference
