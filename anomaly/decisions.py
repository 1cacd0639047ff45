"""Scorer outputs -> post-processed maps, image scores and verdicts (torch-free, shared by every runtime).

The one place where a score becomes a decision: the Detector (torch) and the exported runtime
(ONNX Runtime / OpenVINO) both call :func:`make_results`, so their verdicts cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from anomaly.maps import resize_map, smooth_maps
from anomaly.results import DetectionResult
from anomaly.thresholds import Threshold

__all__ = ["map_peaks", "make_results"]


def map_peaks(patch_maps: NDArray[np.float32], input_size: tuple[int, int], sigma: float) -> NDArray[np.float64]:
    """Peak of every post-processed map, one map at a time (memory stays at one map)."""
    return np.array([smooth_maps(m[None], input_size, sigma).max() for m in patch_maps], dtype=np.float64)


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
) -> list[DetectionResult]:
    """Results for a batch: with ``score_from_map`` the image score is the peak of the blurred map.

    Raises ValueError on a non-finite score, naming the image.
    """
    smoothed = None if patch_maps is None else smooth_maps(patch_maps, input_size, sigma)
    peaks = image_scores if smoothed is None else smoothed.reshape(len(smoothed), -1).max(1).astype(np.float64)
    results = []
    for i, (size, source) in enumerate(zip(sizes, sources)):
        score = float(peaks[i] if score_from_map and smoothed is not None else image_scores[i])
        if not np.isfinite(score):
            raise ValueError(f"{source or 'image'}: the score is not finite; check backbone.mean/std and the input")
        amap = resize_map(smoothed[i], size) if maps and smoothed is not None else None
        pixel = decision.pixel_for(score, float(peaks[i])) if smoothed is not None else decision.image
        results.append(DetectionResult(score, decision.is_anomalous(score), decision.image, amap, source, pixel))
    return results
