"""Whether a process on this machine still runs: for dead owners' claims, shared servers and test clean-up."""

from __future__ import annotations

import os
from contextlib import suppress
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; on Linux a zombie (exited, not yet reaped) counts as dead (elsewhere, alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True
