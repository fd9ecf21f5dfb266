"""Atomic file writes: a temp file in the target's folder, fsynced, then ``os.replace``d onto the target.

A reader sees either the old file or the complete new one, never part of a write. The target's
folder is created when missing, and the temp file is removed on any error (an interrupt included).
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def replacing(target: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """Yield a temp path beside ``target`` to write; when the block ends without error, it is fsynced
    (unless ``fsync`` is False: a cache whose readers detect damaged files) and replaces ``target``.
    Whatever writes it must have closed it by then."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
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
