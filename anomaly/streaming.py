"""Zero-shot scoring on a production line: each new image is scored against a rolling pool."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np

from anomaly.detector import DetectionResult, Detector, ImageInput, _robust_threshold
from anomaly.errors import ConfigError, DataError
from anomaly.scorers.base import ScoreOutput
from anomaly.scorers.musc import MuScScorer, RollingPool

__all__ = ["StreamingDetector"]


class StreamingDetector:
    """Score a stream of unlabeled images with MuSc against the most recent ``pool_size`` images.

    Few-shot references (``Detector.fit`` on a zero-shot detector) stay in the pool for good.
    The threshold follows the zero-shot pool rule over the scores of the recent images.

    Example:
        >>> line = StreamingDetector(Detector("musc").fit(good_images), pool_size=32)  # doctest: +SKIP
        >>> [r.is_anomalous for r in line.predict(new_frames)]  # doctest: +SKIP
    """

    def __init__(self, detector: Detector, pool_size: int = 64) -> None:
        if not isinstance(detector.scorer, MuScScorer):
            raise ConfigError("StreamingDetector needs a zero-shot (musc) detector")
        self.detector = detector
        device = detector.extractor.device
        reference = None if detector.reference_ is None else [r.to(device) for r in detector.reference_[0]]
        self.pool = RollingPool(detector.scorer, pool_size, reference=reference)
        self._recent: deque[float] = deque(maxlen=max(pool_size, 8))

    def predict(self, images: Sequence[ImageInput]) -> list[DetectionResult]:
        """Score a batch of new images against the pool (and each other), then add them to it."""
        items = list(images)
        if not items:
            raise DataError("predict: no images")
        layers, _, batch = self.detector._extract_all(items, None)
        if len(self.pool) + len(items) + (0 if self.pool.reference is None else 1) < 2:
            raise DataError("the first call needs 2 images, or few-shot references")
        device = self.detector.extractor.device
        out: ScoreOutput = self.pool.score([layer.to(device) for layer in layers])
        self._recent.extend(out.image_scores.tolist())
        threshold = _robust_threshold(np.asarray(self._recent), self.detector.config.threshold.mad_k, False)
        return self.detector._results(out, batch, threshold, maps=True)
