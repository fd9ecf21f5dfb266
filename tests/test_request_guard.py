"""The app's wrappers of MONAI Label routes (the infer guard, the download prefetch) fit the installed MONAI Label
(the server tests send the requests)."""

import pytest
from fastapi import HTTPException
from monailabel.endpoints import datastore as datastore_route
from monailabel.endpoints import infer as infer_route

from lib.infers import download_prefetch, request_guard


def test_the_route_is_shaped_as_the_guard_expects_and_is_wrapped_once():
    request_guard.check_route()  # fails loudly after a MONAI Label upgrade that moves the worker
    request_guard.install()
    wrapped = infer_route.run_inference
    request_guard.install()
    assert infer_route.run_inference is wrapped and wrapped.checks_requests
    assert wrapped.__wrapped__.__module__ == "monailabel.endpoints.infer"


def test_the_download_route_is_shaped_as_the_prefetch_expects_and_is_wrapped_once():
    download_prefetch.install(print)
    wrapped = datastore_route.download_image
    download_prefetch.install(print)
    assert datastore_route.download_image is wrapped and wrapped.prefetches
    assert wrapped.__wrapped__.__module__ == "monailabel.endpoints.datastore"


@pytest.mark.parametrize("image, params, words", [("a", "{x", "JSON object"), ("a", "3", "got a JSON int"),
                                                  ("", "{}", "an image id")])
def test_malformed_requests_are_refused_with_a_400(image, params, words):
    with pytest.raises(HTTPException) as refused:
        request_guard.check_infer_request(image, "", params, None)
    assert refused.value.status_code == 400 and words in refused.value.detail
    request_guard.check_infer_request("a", "", '{"foreground": []}', None)
