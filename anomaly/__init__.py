"""anomaly: zero/few-shot and trained industrial visual anomaly detection on any timm backbone."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

# Idle OpenMP threads sleep instead of spinning, as the CLI and the Ray workers set it: on cores shared with a
# camera or PLC process a spinning torch stalled single-image predict from 35 to 650 ms (median, 2 cores under
# load). OpenMP reads it when torch loads, so only if torch is not loaded yet; set the variable to keep your own.
# A container's CPU quota below the CPUs it may run on becomes OMP_NUM_THREADS, unless that is set.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from anomaly._runtime import cap_threads_to_quota

    cap_threads_to_quota()

from anomaly.config import DetectorConfig, load_config
from anomaly.errors import (
    AnomalyError,
    BackendError,
    ConfigError,
    DataError,
    NotFittedError,
    ScorerError,
    WeightsUnavailableError,
)
from anomaly.results import DetectionResult

if TYPE_CHECKING:
    from anomaly.detector import Detector
    from anomaly.streaming import StreamingDetector

__version__ = "0.1.0"

__all__ = [
    "AnomalyError",
    "BackendError",
    "ConfigError",
    "DataError",
    "DetectionResult",
    "Detector",
    "DetectorConfig",
    "NotFittedError",
    "ScorerError",
    "StreamingDetector",
    "WeightsUnavailableError",
    "__version__",
    "load_config",
]


def __getattr__(name: str) -> Any:
    """Import the torch-backed detectors on first use, so `anomaly --help` stays fast."""
    if name == "Detector":
        from anomaly.detector import Detector

        return Detector
    if name == "StreamingDetector":
        from anomaly.streaming import StreamingDetector

        return StreamingDetector
    raise AttributeError(f"module 'anomaly' has no attribute {name!r}")
