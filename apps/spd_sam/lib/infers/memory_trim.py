"""Give memory that Python and numpy freed back to the operating system (glibc's ``malloc_trim``).

A request frees volumes, slabs and masks of tens of megabytes; glibc keeps freed heap memory in its
per-thread arenas, so without a trim a busy server's resident memory stays at its busiest point.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    library = ctypes.CDLL(name) if name else None
    return getattr(library, "malloc_trim", None)


def release_free_memory() -> bool:
    """Trim the C heap; returns whether anything could be trimmed (False where there is no glibc)."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
