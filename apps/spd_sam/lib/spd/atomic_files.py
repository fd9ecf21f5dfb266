"""Atomic file writes: a temp file in the target's folder, fsynced, then ``os.replace``d onto the target.

A reader sees either the old file or the complete new one, never part of a write. The target's
folder is created when missing, and the temp file is removed on any error (an interrupt included);
only a kill leaves it behind, for :func:`remove_stale_temps` to delete at the next start.
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TEMP_SUFFIX = ".tmp"


@contextmanager
def replacing(target: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """Yield a temp path beside ``target`` to write; when the block ends without error, it is fsynced
    (unless ``fsync`` is False: a cache whose readers detect damaged files) and replaces ``target``.
    Whatever writes it must have closed it by then."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    try:
        yield Path(tmp)
        if fsync:
            fd = os.open(tmp, os.O_RDWR)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(target: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically (see :func:`replacing`)."""
    with replacing(target) as tmp:
        tmp.write_bytes(data)


def remove_stale_temps(folder: str | os.PathLike, older_than_s: float = 60.0) -> int:
    """Delete the temp files that :func:`replacing` left under ``folder`` when its process was killed
    (``.<target>.<random>.tmp``), if not modified for ``older_than_s`` (a younger one may be another
    process's write in progress); returns how many were deleted."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    cutoff, removed = time.time() - older_than_s, 0
    for path in folder.rglob(f".*{TEMP_SUFFIX}"):
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except OSError:  # gone already, or not ours to delete
            continue
    return removed
