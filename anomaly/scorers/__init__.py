"""Scorers: feature maps of normal (or unlabeled) images in, patch maps and image scores out."""

from __future__ import annotations

from anomaly.scorers import gaussian, memory_bank, musc  # noqa: F401  (built-ins register themselves)
from anomaly.scorers.base import ScoreOutput, Scorer
from anomaly.scorers.registry import get_scorer, list_scorers, register_scorer, scorer_class

__all__ = ["ScoreOutput", "Scorer", "get_scorer", "list_scorers", "register_scorer", "scorer_class"]
