"""Integration test of the MVTec AD loader and decoders on the real ``bottle`` category."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from anomaly.data import load_mvtec, read_image, read_mask

pytestmark = pytest.mark.integration


def _bottle_root() -> Path:
    """``$ANOMALY_MVTEC_ROOT/bottle`` if the variable is set, else ``<repo>/../shared/datasets/mvtec_ad/bottle``."""
    env = os.environ.get("ANOMALY_MVTEC_ROOT")
    base = Path(env) if env else Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets" / "mvtec_ad"
    return (base / "bottle").resolve()


BOTTLE = _bottle_root()
requires_bottle = pytest.mark.skipif(
    not BOTTLE.is_dir(), reason=f"MVTec AD bottle not found at {BOTTLE} (set ANOMALY_MVTEC_ROOT)"
)


@requires_bottle
def test_bottle_layout() -> None:
    data = load_mvtec(BOTTLE)
    assert data.name == "bottle"
    assert len(data.train) == 209
    assert len(data.test) == 83
    assert len(data.test_anomalous) == 63
    assert sum(s.mask_path is not None for s in data.test) == 63
    assert all(s.mask_path is not None and s.mask_path.is_file() for s in data.test_anomalous)
    assert set(data.defect_types) == {"broken_large", "broken_small", "contamination"}
    assert data.summary()["n_test_normal"] == 20


@requires_bottle
def test_bottle_image_and_mask_decode() -> None:
    data = load_mvtec(BOTTLE)
    sample = data.test_anomalous[0]
    image = read_image(sample.image_path)
    assert image.shape == (900, 900, 3) and image.dtype == np.uint8
    assert sample.mask_path is not None
    mask = read_mask(sample.mask_path)
    assert mask.shape == (900, 900) and mask.dtype == np.bool_
    assert 0 < mask.sum() < mask.size
    assert read_mask(sample.mask_path, size=(256, 256)).shape == (256, 256)
