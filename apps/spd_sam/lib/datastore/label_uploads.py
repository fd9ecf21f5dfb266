"""Label uploads (``PUT /datastore/label``) checked before they reach the datastore.

MONAI Label's local datastore copies whatever file it is given under the label folder of any tag:
a label of the wrong shape or a truncated gzip is accepted, and a tag like ``../x`` leaves the
folder. The mixin here answers those with a 4xx naming the problem. It also copies the label over the
previous one in place and rewrites ``datastore_v2.json`` in place: a kill -9 in between leaves a cut
label, or an empty datastore file on which the server no longer starts. Here both are written beside
their target and renamed over it, so a failed copy (a full disk) or a crash at any moment leaves the
previous label or the complete new one.
"""

from __future__ import annotations

import errno
import gzip
import json
import logging
import os
import re
import shutil
import time
import zlib
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any, Iterator

import SimpleITK as sitk
from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import DataModel, LocalDatastore
from monailabel.interfaces.exception import ImageNotFoundException

from lib.spd.atomic_files import replacing

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
def save_errors_reported(image_id: str) -> Iterator[None]:
    """An OSError of a label save becomes a 507 (a full disk, a file-size limit; else a 500) that says the
    previous label is unchanged, as :class:`AtomicLabelFiles` leaves it."""
    try:
        yield
    except OSError as error:
        logger.error("saving the label of %s failed, previous label kept: %s", image_id, error)
        status = 507 if error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else 500
        raise HTTPException(status, f"label not saved ({error.strerror or error}); "
                                    f"the previous label of {image_id} is unchanged") from None


class AtomicLabelFiles(LocalDatastore):
    """MONAI Label's local datastore with its label files and ``datastore_v2.json`` written atomically
    (:func:`lib.spd.atomic_files.replacing`: a temp file beside the target, fsynced, renamed over it)."""

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """``LocalDatastore.save_label`` with the copy atomic; the image's label files of other extensions
        (``.nii`` after ``.nii.gz``) are deleted once the datastore file names the new one."""
        obj = self._datastore.objects.get(image_id)
        if not obj:
            raise ImageNotFoundException(f"Image {image_id} not found")
        _, label_ext = self._to_id(os.path.basename(label_filename))
        folder = self._datastore.label_path(label_tag)
        name = self._filename(image_id, label_ext)
        with FileLock(self._lock_file):
            with replacing(os.path.join(folder, name)) as staged:
                shutil.copy(label_filename, staged)
            label_info = label_info if label_info else {}
            label_info.update(ts=int(time.time()), name=name)
            obj.labels[label_tag] = DataModel(info=label_info, ext=label_ext)
            self._update_datastore_file(lock=False)
            for other in Path(folder).iterdir():
                if other.name != name and other.is_file() and self._to_id(other.name)[0] == image_id:
                    other.unlink(missing_ok=True)
        logger.info("label %r of %s saved as %s", label_tag, image_id, name)
        return image_id

    def _update_datastore_file(self, lock: bool = True) -> None:
        """``LocalDatastore._update_datastore_file``, atomic, keeping the file's permissions."""
        with FileLock(self._lock_file) if lock else nullcontext():
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            with replacing(self._datastore_config_path) as staged:
                staged.write_text(text)
                with suppress(OSError):
                    shutil.copymode(self._datastore_config_path, staged)
            self._config_ts = os.stat(self._datastore_config_path).st_mtime


class CheckedLabelSaves:
    """Mixin for MONAI Label's local datastore (and its DICOMweb subclass): checked label saves."""

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        if not LABEL_TAG.match(label_tag or ""):
            raise HTTPException(400, f"invalid label tag {label_tag!r}: letters, digits, '_' and '-' only")
        check_image_id(self, image_id)
        check_label_file(label_filename, self.get_image_uri(image_id))
        with save_errors_reported(image_id):
            return super().save_label(image_id, label_filename, label_tag, label_info)


def checked_class(cls: type) -> type:
    """``cls`` (LocalDatastore or a subclass) with :class:`CheckedLabelSaves` in front and
    :class:`AtomicLabelFiles` just above LocalDatastore, so a subclass's own ``save_label`` (DICOMweb:
    upload a DICOM-SEG, then keep a local copy) still runs and its local copy is atomic too."""
    bases = (CheckedLabelSaves, AtomicLabelFiles) if cls is LocalDatastore else (CheckedLabelSaves, cls, AtomicLabelFiles)
    return type(f"Checked{cls.__name__}", bases, {})


def with_checked_label_saves(datastore):
    """``datastore`` as :func:`checked_class` of its class: checked, atomic label saves (local and DICOMweb
    datastores; others are returned as they are, with a warning). Files it wrote while being built (the
    datastore file, at start) were written by MONAI Label's own code."""
    if not isinstance(datastore, LocalDatastore):
        logger.warning("label uploads to %s are not checked by the app", type(datastore).__name__)
        return datastore
    datastore.__class__ = checked_class(type(datastore))
    return datastore
