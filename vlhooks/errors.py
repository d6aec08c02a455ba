"""Every error vlhooks raises on bad input. Each message names the fix; when one is raised during patching the
model is left unpatched, and no file a user already has is changed.

`docs/errors.md` lists the bad inputs each class covers, with the test that checks it.
"""


class VLHooksError(ValueError):
    """Base class of every vlhooks input error (a `ValueError`, so `except ValueError` also catches it)."""


class FeatureError(VLHooksError):
    """Bad `VLFeatures`, references or images (shape, width, dtype, device, mask, values)."""


class ConfigError(VLHooksError):
    """Bad `InjectionConfig` (blocks, window, schedule, scale, mode, placement)."""


class TargetError(VLHooksError):
    """The target is not a supported DiT or pipeline, or is already patched."""


class AdapterError(VLHooksError):
    """A missing, corrupt or mismatched adapter folder, or an adapter used on the wrong model."""


class EncoderError(VLHooksError):
    """An unknown or unusable feature encoder, or a feature / statistics file that does not fit it."""


class DataError(VLHooksError):
    """A training data source, caption file, image file or dataset cache that cannot be read."""


class TrainingError(VLHooksError):
    """A bad training recipe or option (learning rate, steps, drop rates, adapter type, output folder)."""


class CheckpointError(VLHooksError):
    """A training checkpoint that is missing, truncated, foreign, or of another run's adapter."""


class CompareError(VLHooksError):
    """A bad `vlhooks compare` configuration."""
