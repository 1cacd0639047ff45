"""Scorer registry: names used in configs and saved models -> scorer classes."""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from anomaly.errors import ConfigError
from anomaly.scorers.base import ScoreOutput, Scorer
from anomaly.scorers.gaussian import GlobalGaussianScorer, PadimScorer
from anomaly.scorers.memory_bank import MemoryBankScorer
from anomaly.scorers.musc import MuScScorer

__all__ = ["ScoreOutput", "Scorer", "get_scorer", "list_scorers"]

_REGISTRY: dict[str, type[Scorer]] = {
    cls.name: cls for cls in (MemoryBankScorer, PadimScorer, GlobalGaussianScorer, MuScScorer)
}


def list_scorers() -> list[str]:
    """Registered scorer names."""
    return sorted(_REGISTRY)


def get_scorer(name: str, params: dict[str, Any] | None = None) -> Scorer:
    """Instantiate scorer ``name`` with ``params``, checking keys against its constructor."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"scorer.name: unknown scorer '{name}'{hint}; available: {', '.join(list_scorers())}")
    cls = _REGISTRY[name]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    for key in params or {}:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"scorer.params.{key}: unknown parameter of '{name}'{hint}")
    try:
        return cls(**(params or {}))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"scorer.params: {exc}") from None
