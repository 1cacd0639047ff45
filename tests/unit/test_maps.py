from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from anomaly.maps import resize_map, smooth_maps


def test_maps_match_the_official_bilinear_plus_scipy_gaussian() -> None:
    patch = np.random.default_rng(0).random((3, 16, 16)).astype(np.float32)
    maps = smooth_maps(patch, (128, 128), sigma=4.0)
    up = F.interpolate(torch.from_numpy(patch)[:, None], size=(128, 128), mode="bilinear", align_corners=False)
    for amap, ref in zip(maps, up[:, 0].numpy()):
        np.testing.assert_allclose(amap, gaussian_filter(ref, 4.0, mode="reflect", truncate=4.0), atol=1e-6)


def test_maps_come_back_at_each_original_size() -> None:
    patch = np.zeros((2, 8, 8), np.float32)
    patch[0, 4, 4] = 1
    smoothed = smooth_maps(patch, (64, 64), sigma=2.0)
    maps = [resize_map(m, size) for m, size in zip(smoothed, [(90, 70), (33, 200)])]
    assert [m.shape for m in maps] == [(90, 70), (33, 200)] and all(m.dtype == np.float32 for m in maps)
    assert maps[0].max() == smoothed[0].max()  # the peak, hence the verdict, survives the resize
    row, col = np.unravel_index(maps[0].argmax(), maps[0].shape)
    assert abs(row - 4.5 / 8 * 90) <= 2 and abs(col - 4.5 / 8 * 70) <= 2  # the hot cell stays in place


def test_an_overlay_takes_thresholds_past_float32s_range() -> None:
    """`--target-fpr 1e-300` gives a threshold of about 1e149: the float32 map's arithmetic made inf - inf, numpy
    warned "invalid value encountered in cast" and the overlay's colours were whatever NaN cast to."""
    from anomaly.outputs import overlay

    image = np.full((8, 8, 3), 128, np.uint8)
    amap = np.linspace(0, 10, 64, dtype=np.float32).reshape(8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        far = overlay(image, amap, 1e149)
    np.testing.assert_array_equal(far, overlay(image, np.zeros_like(amap), 1.0))  # every pixel at the cold end
    near = overlay(image, amap, 5.0)  # the map spans the scale: cold at 0, hot at 10
    assert not np.array_equal(near[0, 0], near[-1, -1])
