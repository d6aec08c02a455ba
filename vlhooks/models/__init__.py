"""One file per DiT family; importing this package registers them all."""

from .base import DiTFamily, Site, family_for, register_family
from . import flux, sd3, z_image  # noqa: F401  (registration)

__all__ = ["DiTFamily", "Site", "family_for", "register_family"]
