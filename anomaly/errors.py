"""Exception hierarchy. Every user-facing failure is an ``AnomalyError``; the CLI maps it to exit code 2."""

from __future__ import annotations

import logging

__all__ = [
    "AnomalyError",
    "BackendError",
    "ConfigError",
    "DataError",
    "LogLines",
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


class LogLines(logging.Formatter):
    """Log records as the CLI and the server print them: warnings start with ``warning:`` and logged errors with
    ``error:``, so they can be found in a log."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if record.levelno >= logging.WARNING:
            line = f"{'error' if record.levelno >= logging.ERROR else 'warning'}: {line}"
        return line
