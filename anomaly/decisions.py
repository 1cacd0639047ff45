"""Scorer outputs -> post-processed maps, image scores and verdicts (torch-free, shared by every runtime).

The one place where a score becomes a decision: the Detector (torch) and the exported runtime
(ONNX Runtime / OpenVINO) both call :func:`make_results`, so their verdicts cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from numpy.typing import NDArray

from anomaly.errors import DataError
from anomaly.maps import ViewLayout, resize_map, smooth_maps, stitch
from anomaly.results import DetectionResult
from anomaly.thresholds import Threshold

__all__ = ["frame_maps", "make_results", "map_peaks", "view_max"]


def frame_maps(
    patch_maps: NDArray[np.float32], layouts: Sequence[ViewLayout | None], input_size: tuple[int, int], sigma: float
) -> Iterator[NDArray[np.float32]]:
    """Per image: its views' patch maps smoothed at the input size and stitched on its frame.

    ``patch_maps`` holds the views of all images in order; a ``None`` layout is one stretched view.
    """
    start = 0
    for layout in layouts:
        n = 1 if layout is None else layout.n_views
        smoothed = smooth_maps(patch_maps[start : start + n], input_size, sigma)
        yield smoothed[0] if layout is None else stitch(smoothed, layout)
        start += n


def map_peaks(
    patch_maps: NDArray[np.float32],
    input_size: tuple[int, int],
    sigma: float,
    layouts: Sequence[ViewLayout | None] | None = None,
) -> NDArray[np.float64]:
    """Peak of every image's post-processed map, one image at a time (memory stays at one map)."""
    layouts = [None] * len(patch_maps) if layouts is None else layouts
    return np.array([m.max() for m in frame_maps(patch_maps, layouts, input_size, sigma)], dtype=np.float64)


def view_max(scores: NDArray[np.float64], layouts: Sequence[ViewLayout | None] | None) -> NDArray[np.float64]:
    """Per-view scores -> per-image scores (the maximum over each image's views)."""
    if layouts is None or all(lay is None or lay.n_views == 1 for lay in layouts):
        return np.asarray(scores, dtype=np.float64)
    bounds = np.cumsum([0] + [1 if lay is None else lay.n_views for lay in layouts])
    return np.maximum.reduceat(np.asarray(scores, dtype=np.float64), bounds[:-1])


def make_results(
    patch_maps: NDArray[np.float32] | None,
    image_scores: NDArray[np.float64],
    sizes: Sequence[tuple[int, int]],
    sources: Sequence[str | None],
    decision: Threshold,
    *,
    input_size: tuple[int, int],
    sigma: float,
    score_from_map: bool,
    maps: bool = True,
    layouts: Sequence[ViewLayout | None] | None = None,
) -> list[DetectionResult]:
    """Results for a batch: with ``score_from_map`` the image score is the peak of the stitched, blurred map.

    ``patch_maps`` and ``image_scores`` hold one row per view (``layouts``; None = one view per image).
    Raises DataError on a non-finite score, naming the image.
    """
    layouts = [None] * len(sizes) if layouts is None else layouts
    scores = view_max(image_scores, layouts)
    frames = None if patch_maps is None else frame_maps(patch_maps, layouts, input_size, sigma)
    results = []
    for i, (size, source) in enumerate(zip(sizes, sources)):
        frame = None if frames is None else next(frames)
        peak = scores[i] if frame is None else float(frame.max())
        score = float(peak if score_from_map and frame is not None else scores[i])
        if not np.isfinite(score):
            raise DataError(f"{source or 'image'}: the score is not finite; check backbone.mean/std and the input")
        amap = resize_map(frame, size) if maps and frame is not None else None
        pixel = decision.pixel_for(score, float(peak)) if frame is not None else float("nan")  # no map, no mask
        results.append(DetectionResult(score, decision.is_anomalous(score), decision.image, amap, source, pixel))
    return results
