"""Opening an image in a viewer starts embedding it.

3D Slicer's MONAI Label panel fetches the image it opens with ``GET /datastore/image``; the first
click on it comes some seconds later, and on a CPU most of a first request is embedding slices.
:func:`install` wraps the route's worker, ``monailabel.endpoints.datastore.download_image``, so
that a download also queues the image for background embedding (``SPDInfer.prefetch``: along its
coarsest axis, from the middle slice, where viewers open it, outward). Like ``request_guard``, it
refuses to wrap a worker shaped otherwise.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from typing import Callable

from monailabel.endpoints import datastore as datastore_route

from lib.infers.request_guard import RouteMoved

logger = logging.getLogger(__name__)


def install(prefetch: Callable[[str], None]) -> None:
    """After each image download, run ``prefetch(path)`` on a thread of its own (once per process)."""
    worker = datastore_route.download_image
    if getattr(worker, "prefetches", False):
        return
    parameters = tuple(inspect.signature(inspect.unwrap(worker)).parameters)
    if parameters[:2] != ("image", "check_only"):
        raise RouteMoved(f"download_image takes {parameters}, expected (image, check_only, ...)")
    if "download_image" not in datastore_route.api_download_image.__code__.co_names:
        raise RouteMoved("api_download_image no longer calls download_image")

    @functools.wraps(worker)
    def download(image, check_only=False, *args, **kwargs):
        response = worker(image, check_only, *args, **kwargs)
        path = getattr(response, "path", None)  # a FileResponse; a check_only request gets none
        if path:
            threading.Thread(target=_quietly, args=(prefetch, path), name="spd-prefetch", daemon=True).start()
        return response

    download.prefetches = True
    datastore_route.download_image = download
    logger.info("an image download queues the image for background embedding")


def _quietly(prefetch: Callable[[str], None], path: str) -> None:
    try:
        prefetch(path)
    except Exception as error:  # the download has been answered; an image SPD cannot read is simply not embedded
        logger.warning("could not queue %s for background embedding: %s", path, error)
