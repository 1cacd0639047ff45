"""Shared fixtures: a synthetic MVTec-layout category and the real bottle category."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from anomaly.data.synthetic import make_synthetic_category

REPO = Path(__file__).resolve().parents[1]
MVTEC_ROOT = Path(os.environ.get("ANOMALY_MVTEC_ROOT", REPO.parent / "shared" / "datasets" / "mvtec_ad"))
SMALL = ["--set", "backbone.image_size=[128,128]"]


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic category (12 train, 4 good + 6 defective test images, 128 px)."""
    root = tmp_path_factory.mktemp("data")
    return make_synthetic_category(root, "widget", n_train=12, n_test_good=4, n_test_defect=6, size=128, seed=0)


@pytest.fixture(scope="session")
def bottle_root() -> Path:
    """The real MVTec AD bottle category (integration tests)."""
    root = MVTEC_ROOT / "bottle"
    if not (root / "train" / "good").is_dir():
        pytest.skip(f"MVTec AD bottle not found at {root} (set ANOMALY_MVTEC_ROOT)")
    return root
