"""Evaluation metrics: pure numpy arrays in, floats and frozen dataclasses out (ALGORITHMS.md §5).

Higher score = more anomalous; label/mask 1 = anomalous. Pixel-level inputs are an (N, H, W) array or a
sequence of (H_i, W_i) arrays of different sizes. Invalid inputs raise ``TypeError``/``ValueError``
(``RuntimeError`` for an AUPIMO integration range that cannot be used).
"""

from __future__ import annotations

from anomaly.metrics.aupro import aupro
from anomaly.metrics.classification import (
    ClassificationResult,
    auroc,
    average_precision,
    classification_metrics,
    f1_max,
)
from anomaly.metrics.evaluate import evaluate
from anomaly.metrics.pimo import AupimoResult, PimoCurves, aupimo, pimo_curves

__all__ = [
    # result classes
    "AupimoResult",
    "ClassificationResult",
    "PimoCurves",
    # functional API
    "aupimo",
    "aupro",
    "auroc",
    "average_precision",
    "classification_metrics",
    "evaluate",
    "f1_max",
    "pimo_curves",
]
