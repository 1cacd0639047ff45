"""Anomaly-map post-processing: patch grid -> blurred map at the model input -> original image size.

The image score of a map scorer is the peak of the blurred map on the image's frame (:func:`smooth_maps`
per view, :func:`stitch` the views, then ``max``), and :func:`resize_map` keeps that peak exactly when
it brings the map to the image's size, so a flagged image's map always reaches the threshold.
"""

from __future__ import annotations

from typing import Protocol

import cv2
import numpy as np
from numpy.typing import NDArray

__all__ = ["ViewLayout", "resize_map", "smooth_maps", "stitch"]


class ViewLayout(Protocol):
    """Where an image's model-input views sit on its frame (read-only, as ``anomaly.data.views.Layout``)."""

    @property
    def frame(self) -> tuple[int, int]: ...

    @property
    def origins(self) -> tuple[tuple[int, int], ...]: ...

    @property
    def n_views(self) -> int: ...


def smooth_maps(
    patch_maps: NDArray[np.floating], input_size: tuple[int, int], sigma: float = 4.0
) -> NDArray[np.float32]:
    """(N, h, w) patch maps -> (N, H_in, W_in) float32 maps at the model input size.

    Per map: bilinear upsample (half-pixel centres, as align_corners=False), then a Gaussian blur
    (sigma in input pixels, radius 4 sigma, symmetric border as scipy's ``reflect``). OpenCV does
    both: identical to scipy's gaussian_filter and several times faster.
    """
    h_in, w_in = input_size
    radius = int(4 * sigma + 0.5)
    maps = np.asarray(patch_maps, dtype=np.float32)
    out = np.empty((len(maps), h_in, w_in), dtype=np.float32)
    for i, patch in enumerate(maps):
        amap = cv2.resize(patch, (w_in, h_in), interpolation=cv2.INTER_LINEAR)
        if sigma > 0:
            amap = cv2.GaussianBlur(amap, (2 * radius + 1, 2 * radius + 1), sigma, borderType=cv2.BORDER_REFLECT)
        out[i] = amap
    return out


def resize_map(amap: NDArray[np.float32], size: tuple[int, int]) -> NDArray[np.float32]:
    """Bilinear resize of one smoothed map to (H, W), keeping its peak value exactly.

    Bilinear resampling can step over the single highest pixel (a 256 -> 900 px map peaks up to a
    fraction of a percent lower); the output pixel nearest to the source peak gets the peak back,
    so ``max(resized) == max(amap)``: blurred maps are smooth, the change is invisible.
    """
    h, w = size
    if (h, w) == amap.shape:
        return amap
    out = cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR)
    peak = amap.max()
    if out.max() < peak:
        r, c = np.unravel_index(int(np.argmax(amap)), amap.shape)
        rr = min(h - 1, int((r + 0.5) * h / amap.shape[0]))
        cc = min(w - 1, int((c + 0.5) * w / amap.shape[1]))
        out[rr, cc] = peak
    return out  # type: ignore[return-value]  # cv2's stubs drop the dtype


def stitch(view_maps: NDArray[np.float32], layout: ViewLayout) -> NDArray[np.float32]:
    """(V, H_in, W_in) smoothed maps of one image's views -> one map on its frame (see :mod:`anomaly.data.views`).

    Mirrored padding is cropped away. Overlapping tiles are blended with separable linear ramps over the
    middle half of their overlap (a cross-fade, :func:`_ramp`), so the stitched map is continuous across tile borders.
    """
    h_in, w_in = view_maps.shape[1:]
    fh, fw = layout.frame
    if layout.n_views == 1:
        y, x = layout.origins[0]
        return np.ascontiguousarray(view_maps[0, max(0, -y) : fh - y, max(0, -x) : fw - x])
    weight = np.outer(_ramp(h_in, [y for y, _ in layout.origins]), _ramp(w_in, [x for _, x in layout.origins]))
    total = np.zeros((fh, fw), dtype=np.float32)
    norm = np.zeros((fh, fw), dtype=np.float32)
    for amap, (y, x) in zip(view_maps, layout.origins):
        y0, y1, x0, x1 = max(0, y), min(fh, y + h_in), max(0, x), min(fw, x + w_in)
        w = weight[y0 - y : y1 - y, x0 - x : x1 - x]
        total[y0:y1, x0:x1] += w * amap[y0 - y : y1 - y, x0 - x : x1 - x]
        norm[y0:y1, x0:x1] += w
    return total / norm


def _ramp(window: int, starts: list[int]) -> NDArray[np.float32]:
    """1-D blend weight across a window: rises linearly over the middle half of the overlap with the neighbour.

    The outer quarter of the overlap gets no weight (floor 1e-3, for a frame edge that one tile covers alone): a tile's
    map is off near the tile's own edge, where the backbone's padding, the patch neighbourhood and the blur read
    beyond it, and a ramp starting there left a faint seam (``patchcore``'s gradient at tile borders 1.14x that of
    the same content inside a tile, 1.03x now; ``musc`` 1.25x, 1.08x: benchmarks/README.md section 6, round 28).
    """
    steps = np.diff(sorted(set(starts)))
    overlap = max(1, window - int(steps.min())) if len(steps) else 1
    t = np.arange(window, dtype=np.float32) + 0.5
    return np.clip((np.minimum(t, window - t) - overlap / 4) / (overlap / 2), 1e-3, 1.0)
