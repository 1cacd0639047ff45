"""Anomaly-map post-processing: patch grid -> blurred map at the model input -> original image size."""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["postprocess_maps"]


def postprocess_maps(
    patch_maps: np.ndarray,
    input_size: tuple[int, int],
    out_sizes: list[tuple[int, int]],
    sigma: float = 4.0,
) -> list[np.ndarray]:
    """Turn patch maps (N, h, w) into float32 maps at each image's original (H, W).

    Per map: bilinear upsample (half-pixel centres, as align_corners=False) to the model input
    size, Gaussian blur there (sigma in input pixels, radius 4 sigma, symmetric border as
    scipy's ``reflect``), then bilinear resize to the original size: the same result as blurring
    at full size with a scaled sigma, for a fraction of the cost. OpenCV does all three.
    """
    h_in, w_in = input_size
    radius = int(4 * sigma + 0.5)
    out = []
    for patch, (h, w) in zip(np.asarray(patch_maps, dtype=np.float32), out_sizes):
        amap = cv2.resize(patch, (w_in, h_in), interpolation=cv2.INTER_LINEAR)
        if sigma > 0:
            amap = cv2.GaussianBlur(amap, (2 * radius + 1, 2 * radius + 1), sigma, borderType=cv2.BORDER_REFLECT)
        if (h, w) != (h_in, w_in):
            amap = cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR)
        out.append(amap)
    return out
