"""Intensity windows: the same floats on the host and where a tensor is, for any stored type and byte order."""

import numpy as np
import pytest
import torch

from lib.spd.method import VolumeView
from lib.spd.method.intensity import IntensityWindow

WINDOW = IntensityWindow(-160.0, 240.0, "CT")


@pytest.mark.parametrize("dtype", ["<i2", ">i2", "<u2", ">f4", "<f8", "u1"])
def test_window_is_float32_arithmetic_whatever_the_stored_type(dtype):
    values = np.random.default_rng(0).integers(0, 250, (4, 9, 7)).astype(dtype)
    expected = np.clip((values.astype(np.float32) - np.float32(-160.0)) * np.float32(1 / 400.0), 0, 1)
    got = WINDOW.apply(values)
    assert got.dtype == np.float32 and np.array_equal(got, expected)
    assert np.array_equal(values, np.random.default_rng(0).integers(0, 250, (4, 9, 7)).astype(dtype)), "input kept"


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slices_windowed_on_a_device_equal_those_windowed_on_the_host(axis):
    volume = np.random.default_rng(1).normal(40, 300, (12, 10, 14)).astype(">i2")  # big-endian, as some files store
    view = VolumeView(volume, axis, WINDOW, region=(slice(2, 8), slice(1, 9)), picked=(0, 3, 5, 9))
    on_device = view.on_device([1, 3], torch.device("cpu"))
    assert isinstance(on_device, torch.Tensor) and on_device.dtype == torch.float32
    assert np.array_equal(on_device.numpy(), view.slices([1, 3]))
    assert on_device.shape == (2, 6, 8) and on_device.is_contiguous(), "laid out as slices, whatever the axis"
