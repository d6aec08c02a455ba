"""File helpers that writers share (adapter folders, feature caches, training runs)."""

from __future__ import annotations

import os


def process_alive(pid: int) -> bool:
    """Whether process `pid` still runs (so a temporary it is writing must not be removed). This process counts as
    alive; a process of another user that exists counts as alive too."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
