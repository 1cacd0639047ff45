from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from anomaly import ConfigError, Detector
from anomaly.config import apply_overrides, load_config
from anomaly.streaming import StreamingDetector


def _musc():
    return Detector(apply_overrides(load_config("musc"), ["backbone.image_size=[128,128]"]))


def test_stream_scores_defects_higher_with_a_bounded_pool(synthetic_root: Path) -> None:
    train = sorted((synthetic_root / "train" / "good").glob("*.png"))
    bad = sorted(p for p in (synthetic_root / "test").glob("*/*.png") if p.parent.name != "good")
    line = StreamingDetector(_musc().fit(train[:3]), pool_size=5)
    normal_scores, defect_scores = [], []
    for good_image, bad_image in zip(train[3:], bad):
        normal_scores += [r.image_score for r in line.predict([good_image])]
        defect_scores += [r.image_score for r in line.predict([bad_image])]
        assert len(line.pool) <= 5
    assert np.median(defect_scores) > np.median(normal_scores)
    assert all(np.isfinite(normal_scores + defect_scores))


def test_stream_needs_a_zero_shot_detector() -> None:
    with pytest.raises(ConfigError, match="zero-shot"):
        StreamingDetector(Detector("patchcore"))


def test_stream_threshold_treats_its_window_as_mostly_normal(synthetic_root: Path, monkeypatch) -> None:
    import anomaly.streaming

    seen: list[bool] = []
    real = anomaly.streaming.pool_threshold

    def spy(*args, **kwargs):
        seen.append(kwargs.get("expect_defects", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(anomaly.streaming, "pool_threshold", spy)
    train = sorted((synthetic_root / "train" / "good").glob("*.png"))
    StreamingDetector(_musc().fit(train[:2]), pool_size=4).predict(train[2:4])
    assert seen == [False]
