"""Reading images and writing label volumes with their geometry (SimpleITK)."""

from __future__ import annotations

import atexit
import functools
import hashlib
import os
import re
import shutil
import socket
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

RESULT_DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "int16": np.int16, "int32": np.int32, "float32": np.float32}
RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha")


class ImageReadError(ValueError):
    """The image cannot be read or is not a 3D scalar volume."""


@dataclass
class LoadedVolume:
    """A volume as an (I, J, K) array (a view on ITK's buffer) with the ITK image for geometry."""

    image: sitk.Image
    array: np.ndarray
    spacing: tuple[float, float, float]
    volume_id: str


class VolumeReader:
    """Reads volumes, keeping the most recent few in memory keyed by path, size and mtime."""

    def __init__(self, keep: int = 2):
        self.keep = keep
        self._cache: OrderedDict[tuple, LoadedVolume] = OrderedDict()
        self._lock = threading.Lock()

    def read(self, path: str) -> LoadedVolume:
        """Load ``path`` (any format ITK reads).

        Raises:
            ImageReadError: unreadable file, 2D or 4D/vector images.
        """
        key = _file_identity(path)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        try:
            image = sitk.ReadImage(path)
        except RuntimeError as error:
            raise ImageReadError(f"cannot read image {os.path.basename(path)}: {str(error).strip()[:200]}") from None
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise ImageReadError(
                f"expected a 3D scalar volume, got {image.GetDimension()}D with "
                f"{image.GetNumberOfComponentsPerPixel()} component(s) per voxel"
            )
        array = sitk.GetArrayViewFromImage(image).transpose(2, 1, 0)
        loaded = LoadedVolume(image, array, tuple(float(s) for s in image.GetSpacing()), _identity_id(key))
        with self._lock:
            self._cache[key] = loaded
            while len(self._cache) > self.keep:
                self._cache.popitem(last=False)
        return loaded


def _file_identity(path: str) -> tuple[str, int, int]:
    stat = os.stat(path)
    return os.path.realpath(path), stat.st_size, stat.st_mtime_ns


def _identity_id(identity: tuple) -> str:
    return hashlib.sha1(repr(identity).encode()).hexdigest()[:16]


def volume_id(path: str) -> str:
    """The id of the volume in ``path`` as it is now (its real path, size and mtime): a replaced file gets a new id."""
    return _identity_id(_file_identity(path))


@functools.cache
def results_dir() -> str:
    """This process's own temp folder for result files.

    MONAI Label deletes a result file once it is sent, and MONAILabelClient saves what it receives
    under the same file name in the system temp folder by default: on one machine, a result written
    straight into that folder could be deleted from under the client. (Made again if a temp cleaner
    removed it while the server ran.) Removed when the process exits; a served process ends by a
    signal that skips exit handlers (uvicorn re-raises SIGTERM, kill -9), so the folders of processes
    that are gone are removed when the next one on the same host makes its own.
    """
    parent = tempfile.gettempdir()
    _remove_orphaned_results(parent)
    path = tempfile.mkdtemp(prefix=f"{results_prefix()}{os.getpid()}_", dir=parent)
    atexit.register(shutil.rmtree, path, True)
    return path


def results_prefix() -> str:
    """How result folders of processes on this host begin (the pid follows): a temp folder shared between
    containers holds folders whose pids this host cannot see."""
    return f"spd_sam_results_{re.sub(r'[^A-Za-z0-9]', '', socket.gethostname())}_"


def _remove_orphaned_results(parent: str) -> None:
    """Remove this host's result folders in ``parent`` whose process no longer runs."""
    for entry in os.scandir(parent):
        found = re.fullmatch(rf"{re.escape(results_prefix())}(\d+)_\w+", entry.name)
        if found and entry.is_dir(follow_symlinks=False) and not _running(int(found[1])):
            shutil.rmtree(entry.path, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_label(mask: np.ndarray, reference: sitk.Image, extension: str, dtype: str, compress: bool) -> str:
    """Write an (I, J, K) label array with the reference image's geometry to a temp file in :func:`results_dir`.

    Args:
        mask: label values, (I, J, K).
        reference: image whose origin, spacing and direction the label takes.
        extension: one of ``RESULT_EXTENSIONS``.
        dtype: one of ``RESULT_DTYPES``.
        compress: gzip/zlib compression (OHIF asks for none, for speed).
    """
    out = sitk.GetImageFromArray(np.ascontiguousarray(mask.astype(RESULT_DTYPES[dtype]).transpose(2, 1, 0)))
    out.CopyInformation(reference)
    os.makedirs(results_dir(), mode=0o700, exist_ok=True)
    fd, path = tempfile.mkstemp(suffix=extension, prefix="spd_sam_", dir=results_dir())
    os.close(fd)
    sitk.WriteImage(out, path, useCompression=compress)
    return path
