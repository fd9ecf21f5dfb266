"""DICOMweb series converted to NIfTI once and kept only in the datastore's cache.

MONAI Label's DICOMweb datastore converts a new series (and a DICOM-SEG final label) to NIfTI in the
system temp folder, copies the file into its cache and returns the temp file's path, which nothing
deletes: a server that meets many series fills its temp disk. Here the temp file is removed as soon
as the cache holds its copy, and the copy's path is returned instead.
"""

from __future__ import annotations

import logging
import os
import tempfile

from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag

logger = logging.getLogger(__name__)


def _in_temp_folder(path: str) -> bool:
    return os.path.dirname(os.path.realpath(path)) == os.path.realpath(tempfile.gettempdir())


def _cached_instead(converted: str, cached: str) -> str:
    """``cached`` once it exists in place of a ``converted`` file in the temp folder (which is deleted)."""
    if converted and cached and converted != cached and os.path.isfile(cached) and _in_temp_folder(converted):
        os.remove(converted)
        logger.info("converted series kept as %s; temp copy removed", cached)
        return cached
    return converted


class TempConversionsRemoved(DICOMWebDatastore):
    """MONAI Label's DICOMweb datastore whose NIfTI conversions leave nothing in the temp folder."""

    def get_image_uri(self, image_id: str) -> str:
        return _cached_instead(super().get_image_uri(image_id), LocalDatastore.get_image_uri(self, image_id))

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        uri = super().get_label_uri(label_id, label_tag, image_id)
        if label_tag != DefaultLabelTag.FINAL or not image_id:
            return uri
        return _cached_instead(uri, LocalDatastore.get_label_uri(self, image_id, label_tag))
