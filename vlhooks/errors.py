"""Error types. Every message names the fix; the model is left unpatched when one is raised."""


class VLHooksError(ValueError):
    """Base class for vlhooks input errors."""


class FeatureError(VLHooksError):
    """Bad `VLFeatures` (shape, width, dtype, device, mask, values)."""


class ConfigError(VLHooksError):
    """Bad `InjectionConfig` (blocks, window, schedule, scale, mode)."""


class TargetError(VLHooksError):
    """The target is not a supported DiT or pipeline, or is already patched."""
