"""anomaly: zero/few-shot and trained industrial visual anomaly detection on any timm backbone."""

from __future__ import annotations

__version__ = "0.1.0"

from anomaly.config import DetectorConfig, load_config  # noqa: E402
from anomaly.detector import DetectionResult, Detector  # noqa: E402
from anomaly.errors import (  # noqa: E402
    AnomalyError,
    BackendError,
    ConfigError,
    DataError,
    NotFittedError,
    WeightsUnavailableError,
)

__all__ = [
    "AnomalyError",
    "BackendError",
    "ConfigError",
    "DataError",
    "DetectionResult",
    "Detector",
    "DetectorConfig",
    "NotFittedError",
    "WeightsUnavailableError",
    "__version__",
    "load_config",
]
