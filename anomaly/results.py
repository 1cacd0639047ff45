"""What a detector returns for one image: score, verdict, thresholds and the map (torch-free)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["DetectionResult", "StageProgress"]

StageProgress = Callable[[str, int, int], None]  # progress(stage, done, total) of fit, predict and their parts


@dataclass(frozen=True, slots=True)
class DetectionResult:
    """Verdict for one image. Scores are higher = more anomalous.

    Attributes:
        image_score: image-level anomaly score (for map scorers: the peak of the post-processed map).
        is_anomalous: ``image_score >= threshold``.
        threshold: the image decision threshold in force.
        anomaly_map: (H, W) float32 map at the image's original size, or None (image-level scorer or
            ``maps=False``).
        source: the image path, when the input was a path.
        pixel_threshold: the value a map pixel must reach to be in the mask. For a flagged image the
            map always reaches it, so verdict and mask agree. NaN for a scorer without maps.
        error: why the image could not be scored (``predict(..., on_error="skip")``); its score is NaN.
    """

    image_score: float
    is_anomalous: bool
    threshold: float
    anomaly_map: NDArray[np.float32] | None = field(default=None, repr=False, compare=False)  # ==, hash: the rest
    source: str | None = None
    pixel_threshold: float = float("nan")
    error: str | None = None

    @classmethod
    def unreadable(cls, source: str | None, error: str, threshold: float, pixel_threshold: float) -> DetectionResult:
        """The result of an input that could not be read (``on_error="skip"``): NaN score, not flagged."""
        return cls(float("nan"), False, threshold, None, source, pixel_threshold, error)

    @property
    def mask(self) -> NDArray[np.bool_] | None:
        """(H, W) pixels in the anomalous region: empty for an image that is not flagged; None without a map."""
        if self.anomaly_map is None:
            return None
        if not self.is_anomalous:
            return np.zeros(self.anomaly_map.shape, dtype=bool)
        return self.anomaly_map >= self.pixel_threshold

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (without the map): NaN (an unreadable input's score) becomes None."""
        return {
            "source": self.source,
            "image_score": _finite_or_none(self.image_score),
            "is_anomalous": self.is_anomalous,
            "threshold": _finite_or_none(self.threshold),
            "pixel_threshold": _finite_or_none(self.pixel_threshold),
            "error": self.error,
        }


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None
