"""Zero-shot scoring on a production line: each new image is scored against a rolling pool."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np

from anomaly.data.loader import ImageInput
from anomaly.detector import Detector
from anomaly.errors import ConfigError, DataError
from anomaly.results import DetectionResult
from anomaly.scorers.base import ScoreOutput
from anomaly.scorers.musc import RollingPool
from anomaly.thresholds import RELIABLE_POOL_SIZE, pool_threshold

__all__ = ["StreamingDetector"]

_ADMIT = ("normal", "all")


class StreamingDetector:
    """Score a stream of unlabeled images with MuSc against the most recent ``pool_size`` images admitted.

    Few-shot references (``Detector.fit`` on a zero-shot detector) stay in the pool for good; without them,
    the first batch decides the config's ``auto`` preprocessing for the whole stream. The
    threshold follows the zero-shot pool rule (:func:`anomaly.thresholds.pool_threshold`) over the
    scores of the most recent images, flagged ones included.

    ``admit``: which scored images join the pool. ``"normal"`` (default) keeps flagged images out, so a
    defect that recurs on the line (a roller mark on every part) keeps being flagged instead of being
    vouched for by its own earlier copies; a lasting change of the normal look then stays flagged until
    someone looks (restart the stream, or fit new references). Without references the first batch joins
    whole: it seeds the pool. ``"all"`` lets every image in, so the pool follows any drift, defects included.

    Example:
        >>> line = StreamingDetector(Detector("musc").fit(good_images), pool_size=32)  # doctest: +SKIP
        >>> [r.is_anomalous for r in line.predict(new_frames)]  # doctest: +SKIP
    """

    def __init__(self, detector: Detector, pool_size: int = 64, admit: str = "normal") -> None:
        if admit not in _ADMIT:
            raise ConfigError(f"StreamingDetector: admit must be one of {', '.join(_ADMIT)}, got {admit!r}")
        if not detector.zero_shot or not detector.scorer.uses_references:
            raise ConfigError("StreamingDetector needs a zero-shot detector that scores against references (musc)")
        if detector.config.preprocess.tile is not None:
            raise ConfigError("StreamingDetector scores whole images: set preprocess.tile to null")
        if detector.scorer.augment_queries:
            raise ConfigError("StreamingDetector scores each image once: set scorer.params.augment_queries to false")
        self.detector = detector
        self.admit = admit
        device = detector.extractor.device
        reference = None if detector.reference_ is None else [r.to(device) for r in detector.reference_.layers]
        self.pool = RollingPool(detector.scorer, pool_size, reference=reference)  # type: ignore[arg-type]
        # the threshold's window of recent scores: at least RELIABLE_POOL_SIZE, so that a small pool still gets a
        # mixture fit once the stream is under way (below 20 scores: median + 3 MAD, see anomaly.thresholds)
        self._recent: deque[float] = deque(maxlen=max(pool_size, RELIABLE_POOL_SIZE))

    def predict(self, images: Sequence[ImageInput]) -> list[DetectionResult]:
        """Score a batch of new images against the pool (and each other), then add those ``admit`` lets in."""
        items = list(images)
        if not items:
            raise DataError("predict: no images")
        if len(self.pool) == 0 and self.pool.reference is None:  # the first batch decides the ``auto`` settings
            self.detector.resolve_auto(items)
        features = self.detector.extract(items)
        if len(self.pool) + len(items) + (0 if self.pool.reference is None else 1) < 2:
            raise DataError("the first call needs 2 images, or few-shot references")
        out = self.pool.score(features.layers)
        peaks = self.detector.map_peaks(out, features.images)
        out = ScoreOutput(out.patch_maps, peaks)  # no RsCIN on a stream: the image score is the map peak
        self._recent.extend(peaks.tolist())
        target = self.detector.config.threshold.target_fpr
        decision = pool_threshold(np.asarray(self._recent), target, expect_defects=False)  # a line: mostly good
        results = self.detector.finish(out, features.images, decision, maps=True)
        seeding = len(self.pool) == 0 and self.pool.reference is None  # nothing to compare with yet: all join
        keep = [i for i, r in enumerate(results) if self.admit == "all" or seeding or not r.is_anomalous]
        self.pool.add([x[keep] for x in features.layers])
        return results
