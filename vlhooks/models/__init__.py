"""One file per DiT family; importing this package registers them all."""

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
)
from . import flux, sd3, z_image  # noqa: F401  (registration)

__all__ = ["DiTFamily", "PromptEmbeds", "Site", "families", "family_for", "family_for_class", "family_named",
           "load_transformer", "register_family"]
