"""Exception hierarchy. Every user-facing failure is an ``AnomalyError``; the CLI maps it to exit code 2."""

from __future__ import annotations

__all__ = [
    "AnomalyError",
    "BackendError",
    "ConfigError",
    "DataError",
    "NotFittedError",
    "ScorerError",
    "WeightsUnavailableError",
]


class AnomalyError(Exception):
    """Base class of all errors caused by user input or environment, not by a bug."""


class ConfigError(AnomalyError, ValueError):
    """Unknown or invalid configuration key or value, bad YAML."""


class DataError(AnomalyError):
    """Missing or unreadable files, bad dataset layout, mask/image mismatch."""


class NotFittedError(AnomalyError, ValueError, AttributeError):
    """A scorer or detector was used before ``fit``."""


class WeightsUnavailableError(AnomalyError):
    """Pretrained backbone weights could not be found in any source."""


class ScorerError(AnomalyError, RuntimeError):
    """A scorer (a plug-in's, say) returned outputs that break the scorer contract: shapes, NaN scores."""


class BackendError(AnomalyError, RuntimeError):
    """A requested backend (GPU, FAISS index type) is unavailable or misconfigured."""
