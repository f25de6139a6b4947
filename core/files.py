"""Atomic file writes: a reader, or a crash at any point, sees the old file or the new one, never a half.

The bytes go to a hidden temp file in the target's own folder (a rename is atomic only within one
file system), named after the target and this process, so two writers never share a temp file; then
``os.replace`` puts it in place. A failure removes the temp file and leaves the target as it was.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: str | os.PathLike, data: bytes | str, *, fsync: bool = False) -> Path:
    """Write ``data`` (str as UTF-8) to ``path`` atomically; ``fsync`` also flushes it to the disk
    first (for files that must survive a power cut, not only a crash of this process)."""
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(raw)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


__all__ = ["write_atomic"]
