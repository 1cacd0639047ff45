"""Per-image verdicts: the torch-free result type shared by the Detector, the runtime and the outputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["DetectionResult"]


@dataclass(frozen=True, slots=True)
class DetectionResult:
    """Verdict for one image. Scores are higher = more anomalous.

    Attributes:
        image_score: image-level anomaly score.
        is_anomalous: ``image_score >= threshold``.
        threshold: the decision threshold in force.
        anomaly_map: (H, W) float32 map at the image's original size, or None (image-level scorer).
        source: the image path, when the input was a path.
        map_threshold: the threshold on the map's own scale (differs from ``threshold`` when image
            scores are re-scored, as MuSc's RsCIN does); None means ``threshold``.
    """

    image_score: float
    is_anomalous: bool
    threshold: float
    anomaly_map: NDArray[np.float32] | None = field(default=None, repr=False)
    source: str | None = None
    map_threshold: float | None = None

    @property
    def pixel_threshold(self) -> float:
        """Threshold that applies to ``anomaly_map`` values."""
        return self.threshold if self.map_threshold is None else self.map_threshold

    @property
    def mask(self) -> NDArray[np.bool_] | None:
        """Pixels whose map value reaches the pixel threshold (H, W), or None without a map."""
        return None if self.anomaly_map is None else self.anomaly_map >= self.pixel_threshold

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (without the map)."""
        return {
            "source": self.source,
            "image_score": self.image_score,
            "is_anomalous": self.is_anomalous,
            "threshold": self.threshold,
        }
