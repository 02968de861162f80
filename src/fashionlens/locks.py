"""One writer at a time for a folder (an index, a feature cache): an exclusive ``flock`` on
``FOLDER/.lock``, released when the returned file is closed or the process ends."""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import IO

from fashionlens.errors import UserError


def exclusive_lock(folder: Path, what: str) -> IO:
    """Take the folder's writer lock without waiting; UserError when another process has it."""
    fh = open(Path(folder) / ".lock", "w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise UserError(f"{folder}: another fashionlens process is writing this {what}; "
                        "wait for it to finish") from None
    return fh
