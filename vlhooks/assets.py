"""Where the shipped assets are (`checkpoints/`, `configs/`): found wherever a command runs from.

A relative asset path is looked up in the current folder first (a user's own `checkpoints/...` wins), then in the
repository the package runs from (a clone or an editable install: the folder above `vlhooks/`). The error says
every place it looked.
"""

from __future__ import annotations

from pathlib import Path

from .errors import CompareError

ROOT = Path(__file__).resolve().parent.parent  # the repository (a clone, or an editable install's source)


def shipped(path: str | Path, what: str = "asset") -> Path:
    """The first existing of `path` as given (absolute, or relative to the current folder) and under `ROOT`."""
    p = Path(path)
    looked = [p] if p.is_absolute() else [Path.cwd() / p, ROOT / p]
    for candidate in looked:
        if candidate.exists():
            return candidate
    raise CompareError(f"the {what} {path} was not found; looked in " + ", ".join(str(c) for c in looked)
                       + ". Run from the repository, or give its path.")
