"""One file per DiT family; importing this package imports (and so registers) every family file in it."""

import importlib
import pkgutil

from .base import (
    DiTFamily,
    PromptEmbeds,
    Site,
    families,
    family_for,
    family_for_class,
    family_named,
    load_transformer,
    register_family,
    supported_table,
)

for _m in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base"):
    importlib.import_module(f".{_m}", __name__)

__all__ = ["DiTFamily", "PromptEmbeds", "Site", "families", "family_for", "family_for_class", "family_named",
           "load_transformer", "register_family", "supported_table"]
