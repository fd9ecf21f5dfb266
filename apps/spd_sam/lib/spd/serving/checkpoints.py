"""Versioned SPD checkpoints, published atomically.

One folder holds every version of the trained model and a pointer to the published one::

    v0003.pt     saliency head + mask decoder weights + metadata (torch.save of plain types and tensors)
    v0003.json   the metadata alone (cheap to read for status pages)
    v0003.png    the training curve
    current      the published checkpoint's file name

Every file is written to a temp file in the same folder and renamed over its target, and the
pointer is replaced last, so a reader sees either the old model or the complete new one. A version
whose pointer was never written (a crash or a stop during training) is never served.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from ..atomic_files import write_atomic

logger = logging.getLogger(__name__)

FORMAT = "spd_sam-checkpoint/1"
POINTER = "current"
_VERSION_FILE = re.compile(r"^v(\d{4,})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says which file and why."""


class CheckpointStore:
    """The folder of versioned checkpoints.

    Args:
        directory: where versions and the pointer live (created on publish).
        keep: versions kept on disk; older ones are deleted after a publish.
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 5):
        self.directory = Path(directory)
        self.keep = keep

    @property
    def pointer(self) -> Path:
        return self.directory / POINTER

    def path(self, version: int, suffix: str = ".pt") -> Path:
        return self.directory / f"v{version:04d}{suffix}"

    def versions(self) -> list[int]:
        """Versions on disk, ascending (published or not)."""
        if not self.directory.is_dir():
            return []
        found = (_VERSION_FILE.match(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def current(self) -> int | None:
        """The published version, or None when nothing is published or the pointer is unreadable."""
        try:
            match = _VERSION_FILE.match(self.pointer.read_text().strip())
        except OSError:
            return None
        return int(match.group(1)) if match else None

    def pointer_stamp(self) -> tuple[int, int, int] | None:
        """Changes whenever a version is published (inode, mtime, size of the pointer); None without one."""
        try:
            stat = self.pointer.stat()
        except OSError:
            return None
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def publish(self, payload: Mapping[str, Any], metadata: Mapping[str, Any], attachments: Mapping[str, bytes] | None = None
                ) -> int:
        """Write a new version and point ``current`` at it; returns the version.

        Args:
            payload: weights and settings (plain types and tensors; loadable with ``weights_only=True``).
            metadata: JSON-able description, stored in the checkpoint and beside it.
            attachments: extra files by suffix (e.g. ``{".png": curve}``), written before the checkpoint.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        version = max(self.versions(), default=0) + 1
        metadata = {**metadata, "format": FORMAT, "version": version}
        buffer = io.BytesIO()
        torch.save({**payload, "metadata": metadata}, buffer)
        for suffix, data in (attachments or {}).items():
            write_atomic(self.path(version, suffix), data)
        write_atomic(self.path(version, ".json"), json.dumps(metadata, indent=2).encode())
        write_atomic(self.path(version), buffer.getvalue())
        write_atomic(self.pointer, f"{self.path(version).name}\n".encode())
        self._prune(version)
        logger.info("published checkpoint %s", self.path(version))
        return version

    def metadata(self, version: int | None = None) -> dict:
        """The JSON metadata of a version (default: the published one); {} when absent."""
        version = self.current() if version is None else version
        try:
            return json.loads(self.path(version, ".json").read_text()) if version is not None else {}
        except (OSError, ValueError):
            return {}

    def load(self, version: int, backbone: str, weights_id: str) -> dict:
        """Read and check one version.

        Raises:
            CheckpointError: unreadable or truncated file, another format, or trained on another backbone.
        """
        path = self.path(version)
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise CheckpointError(f"{path}: unreadable (truncated or not a checkpoint): {error}") from None
        meta = checkpoint.get("metadata") if isinstance(checkpoint, dict) else None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not an SPD-SAM checkpoint of format {FORMAT}")
        if meta.get("version") != version:
            raise CheckpointError(f"{path}: says version {meta.get('version')}, expected {version}")
        if (meta.get("backbone"), meta.get("weights_id")) != (backbone, weights_id):
            raise CheckpointError(f"{path}: trained on backbone {meta.get('backbone')} ({meta.get('weights_id')}), "
                                  f"serving {backbone} ({weights_id})")
        return checkpoint

    def candidates(self) -> list[int]:
        """Versions to try when loading: the published one, then older ones, newest first."""
        current = self.current()
        if current is None:
            return []
        return [current] + [v for v in reversed(self.versions()) if v < current]

    def _prune(self, newest: int) -> None:
        for version in [v for v in self.versions() if v <= newest - self.keep]:
            for path in self.directory.glob(f"v{version:04d}.*"):
                path.unlink(missing_ok=True)
