"""Label uploads (``PUT /datastore/label``) checked before they reach the datastore.

MONAI Label's local datastore copies whatever file it is given under the label folder of any tag:
a label of the wrong shape or a truncated gzip is accepted, and a tag like ``../x`` leaves the
folder. The mixin here answers those with a 4xx naming the problem, and keeps the previous label
of the image when the copy fails half-way (a full disk, a file-size limit).
"""

from __future__ import annotations

import errno
import gzip
import logging
import os
import re
import tempfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import SimpleITK as sitk
from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore

logger = logging.getLogger(__name__)

IMAGE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,255}$")  # datastore ids: no paths, no traversal
LABEL_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")


def check_image_id(datastore, image_id: str) -> None:
    """Raise HTTPException 400 for an id that is not a plain name (a path), 404 for one the datastore lacks."""
    if not IMAGE_ID.match(image_id or ""):
        raise HTTPException(400, f"invalid image id {image_id!r}: ids are names, not paths")
    if image_id not in datastore.list_images():
        raise HTTPException(404, f"unknown image id {image_id!r}")


def image_size(path: str) -> tuple[int, ...]:
    """Voxel grid size of an image, from its header only."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return tuple(reader.GetSize())


def _check_gzip_stream(path: str) -> None:
    """Read a gzip file to its end (raises EOFError, OSError or zlib.error when it is cut short or corrupt)."""
    with open(path, "rb") as handle:
        if handle.read(2) != b"\x1f\x8b":
            return
    with gzip.open(path, "rb") as stream:
        while stream.read(1 << 20):
            pass


def check_label_file(label_path: str, image_path: str) -> None:
    """Raise HTTPException(400) unless ``label_path`` is a readable 3D scalar volume on the image's voxel grid.

    The whole file is decoded, so a truncated or corrupt gzip is caught here (ITK's NIfTI reader
    accepts a gzip stream cut short and fills the missing voxels itself).
    """
    try:
        _check_gzip_stream(label_path)
        label = sitk.ReadImage(label_path)
    except (RuntimeError, OSError, EOFError, zlib.error) as error:
        raise HTTPException(400, f"label file unreadable (truncated, corrupt or not an image): "
                                 f"{(str(error).strip().splitlines() or [type(error).__name__])[-1][:200]}") from None
    if label.GetDimension() != 3 or label.GetNumberOfComponentsPerPixel() != 1:
        raise HTTPException(400, f"label must be a 3D scalar volume, got {label.GetDimension()}D with "
                                 f"{label.GetNumberOfComponentsPerPixel()} component(s) per voxel")
    expected = image_size(image_path)
    if tuple(label.GetSize()) != expected:
        raise HTTPException(400, f"label shape {tuple(label.GetSize())} differs from the image's {expected}")


@contextmanager
def previous_label_kept(folder: str, image_id: str) -> Iterator[None]:
    """Put the image's label files in ``folder`` back as they were if the body fails.

    The previous files are moved aside first (a rename: atomic, no space needed), so the body writes
    new files instead of overwriting them in place; on failure the new, possibly half-written files
    are removed and the previous ones renamed back. An OSError (a full disk) becomes a 507.
    """
    folder_path = Path(folder)
    previous = sorted(folder_path.glob(f"{image_id}.*")) if folder_path.is_dir() else []
    aside = Path(tempfile.mkdtemp(prefix=".previous-", dir=folder)) if previous else None
    for n, path in enumerate(previous):
        os.replace(path, aside / str(n))
    try:
        yield
    except BaseException as error:
        for path in folder_path.glob(f"{image_id}.*"):
            path.unlink(missing_ok=True)
        for n, path in enumerate(previous):
            os.replace(aside / str(n), path)
        logger.error("saving the label of %s failed, previous label kept: %s", image_id, error)
        if isinstance(error, OSError):
            status = 507 if error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else 500
            raise HTTPException(status, f"label not saved ({error.strerror or error}); "
                                        f"the previous label of {image_id} is unchanged") from None
        raise
    finally:
        if aside is not None:
            for kept in aside.iterdir():
                kept.unlink()
            aside.rmdir()


class CheckedLabelSaves:
    """Mixin for MONAI Label's local datastore (and its DICOMweb subclass): checked, all-or-nothing label saves."""

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        if not LABEL_TAG.match(label_tag or ""):
            raise HTTPException(400, f"invalid label tag {label_tag!r}: letters, digits, '_' and '-' only")
        check_image_id(self, image_id)
        check_label_file(label_filename, self.get_image_uri(image_id))
        with previous_label_kept(self._datastore.label_path(label_tag), image_id):
            return super().save_label(image_id, label_filename, label_tag, label_info)


def with_checked_label_saves(datastore):
    """``datastore`` with :class:`CheckedLabelSaves` in front of its own ``save_label`` (local and DICOMweb
    datastores; others are returned as they are, with a warning)."""
    if not isinstance(datastore, LocalDatastore):
        logger.warning("label uploads to %s are not checked by the app", type(datastore).__name__)
        return datastore
    cls = type(datastore)
    datastore.__class__ = type(f"Checked{cls.__name__}", (CheckedLabelSaves, cls), {})
    return datastore
