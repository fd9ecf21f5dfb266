"""Malformed infer requests that MONAI Label's own route answers with a 500 get a 400 with a message.

MONAI Label's ``POST /infer/{model}`` parses ``params`` and checks for an image before the app
sees the request: ``params`` that are not JSON, or JSON that is not an object, raise inside the
route (500), and a request with neither an image id nor a file is answered with an explicit 500.
:func:`install` wraps the route's worker, ``monailabel.endpoints.infer.run_inference``, with those
checks; it refuses to wrap anything but the worker it was written for, so a MONAI Label upgrade
that moves it fails the test of this module instead of silently bringing the 500s back.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging

from fastapi import HTTPException
from monailabel.endpoints import infer as infer_route

logger = logging.getLogger(__name__)

WORKER_PARAMETERS = ("background_tasks", "model", "image", "session_id", "params", "file", "label", "output")


class RouteMoved(RuntimeError):
    """A MONAI Label route is not shaped as this app's wrapper of it expects; the message says what differs."""


def check_infer_request(image, session_id, params, file) -> None:
    """Raise a 400 for a request without an image id or file, or with ``params`` that are not a JSON object."""
    if not file and not image and not session_id:
        raise HTTPException(status_code=400, detail="an image id (query parameter 'image') or an uploaded file "
                                                    "is required")
    if isinstance(params, str) and params:
        try:
            parsed = json.loads(params)
        except json.JSONDecodeError as error:
            raise HTTPException(status_code=400, detail=f"params must be a JSON object: {error}") from None
        if not isinstance(parsed, dict):
            raise HTTPException(status_code=400,
                                detail=f"params must be a JSON object, got a JSON {type(parsed).__name__}")


def check_route() -> None:
    """Raise :class:`RouteMoved` unless the route calls a worker ``run_inference`` with the expected parameters."""
    worker = getattr(infer_route, "run_inference", None)
    route = getattr(infer_route, "api_run_inference", None)
    if worker is None or route is None:
        raise RouteMoved("monailabel.endpoints.infer has no run_inference / api_run_inference any more")
    parameters = tuple(inspect.signature(inspect.unwrap(worker)).parameters)
    if parameters != WORKER_PARAMETERS:
        raise RouteMoved(f"run_inference takes {parameters}, expected {WORKER_PARAMETERS}")
    if "run_inference" not in route.__code__.co_names:
        raise RouteMoved("api_run_inference no longer calls run_inference")


def install() -> None:
    """Wrap MONAI Label's infer worker with :func:`check_infer_request` (once per process)."""
    worker = infer_route.run_inference
    if getattr(worker, "checks_requests", False):
        return
    check_route()

    @functools.wraps(worker)
    def checked(background_tasks, model, image="", session_id="", params="{}", file=None, label=None, output=None):
        check_infer_request(image, session_id, params, file)
        return worker(background_tasks, model, image, session_id, params, file, label, output)

    checked.checks_requests = True
    infer_route.run_inference = checked
    logger.info("infer requests without an image or with malformed params get a 400 (MONAI Label's route: 500)")
