"""The tiny models, from `vlhooks.testing` (kept so that test modules import them as `tiny`)."""

from vlhooks.testing import build, caption_width, inputs, output  # noqa: F401
