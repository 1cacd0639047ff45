"""Fixtures shared by the export, runtime and serve tests: one small fitted model and its ONNX export."""

from __future__ import annotations

from pathlib import Path

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

    return export_model(patchcore_model, patchcore_model.parent / "export")
