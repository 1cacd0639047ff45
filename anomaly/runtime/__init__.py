"""Torch-free scoring of exported models (``anomaly export``): numpy, OpenCV, FAISS and ONNX Runtime or OpenVINO.

Nothing under this package imports torch or timm; a test runs it in a fresh process to prove it.
"""

from __future__ import annotations

from anomaly.runtime.manifest import is_export_dir, read_manifest
from anomaly.runtime.predictor import ExportedDetector, RuntimeInput, ScorerInfo

__all__ = ["ExportedDetector", "RuntimeInput", "ScorerInfo", "is_export_dir", "read_manifest"]
