"""Fixtures shared by the export, runtime and serve tests: one small fitted model and its ONNX export."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def patchcore_model(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A patchcore model directory fitted on the synthetic category at 128 px."""
    from anomaly import Detector
    from anomaly.config import apply_overrides, load_config

    config = apply_overrides(load_config("patchcore"), ["backbone.image_size=[128,128]", "batch_size=4"])
    train = sorted((synthetic_root / "train" / "good").glob("*.png"))
    return Detector(config).fit(train).save(tmp_path_factory.mktemp("deploy") / "model")


@pytest.fixture(scope="session")
def patchcore_export(patchcore_model: Path) -> Path:
    """``patchcore_model`` exported to ONNX."""
    pytest.importorskip("onnxruntime")
    from anomaly.export import export_model

    return export_model(patchcore_model, patchcore_model.parent / "export", "ONNX")  # as spelt: was refused


@pytest.fixture(scope="session")
def assert_parity() -> Callable[..., None]:
    """Compare torch Detector results with runtime results at the acceptance tolerances."""
    return _assert_parity


def _assert_parity(torch_results: list, runtime_results: list) -> None:  # type: ignore[type-arg]
    """The acceptance tolerances: image scores 1e-4 relative, maps 1e-3 absolute, identical verdicts."""
    for a, b in zip(torch_results, runtime_results, strict=True):
        assert b.image_score == pytest.approx(a.image_score, rel=1e-4)
        assert a.is_anomalous == b.is_anomalous and a.threshold == b.threshold
        assert a.pixel_threshold == pytest.approx(b.pixel_threshold, rel=1e-6, nan_ok=True)  # capped at a map peak
        if a.anomaly_map is None:
            assert b.anomaly_map is None
        else:
            assert b.anomaly_map.shape == a.anomaly_map.shape and b.anomaly_map.dtype == np.float32
            assert np.abs(a.anomaly_map - b.anomaly_map).max() <= 1e-3
