"""Scorer contract (scikit-learn style) shared by every scorer.

Scorers see tensors, never images or paths. Input is a list of per-layer feature maps
``[(N, C_l, h_l, w_l), ...]`` (float32 torch tensors on any device), finest layer first.
Output is a :class:`ScoreOutput`: patch-score maps on the finest layer's grid and image scores,
higher = more anomalous everywhere.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from numpy.typing import NDArray

from anomaly.errors import NotFittedError

__all__ = ["Scorer", "ScoreOutput", "check_is_fitted"]


@dataclass(frozen=True)
class ScoreOutput:
    """What a scorer returns for a batch of N images.

    Attributes:
        patch_maps: (N, h, w) float32 patch scores, or None for image-level scorers.
        image_scores: (N,) float64 image scores.
    """

    patch_maps: NDArray[np.float32] | None = field(repr=False)
    image_scores: NDArray[np.float64]


class Scorer(ABC):
    """Base class: hyper-parameters in ``__init__``, learned state in trailing-underscore attributes."""

    name: ClassVar[str]
    requires_fit: ClassVar[bool] = True
    has_maps: ClassVar[bool] = True

    def get_params(self) -> dict[str, Any]:
        """The constructor keywords, as stored in configs and saved models."""
        import inspect

        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {n: getattr(self, n) for n in names}

    @abstractmethod
    def fit(self, layers: list[torch.Tensor]) -> Scorer:
        """Learn the normal state from features of normal images; returns self."""

    @abstractmethod
    def score(self, layers: list[torch.Tensor]) -> ScoreOutput:
        """Score a batch of images."""

    @abstractmethod
    def state_dict(self) -> dict[str, np.ndarray]:
        """Learned state as plain arrays (saved with safetensors)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore the learned state written by :meth:`state_dict`."""


def check_is_fitted(scorer: Scorer, attribute: str) -> None:
    """Raise NotFittedError unless ``scorer`` has the learned ``attribute``."""
    if getattr(scorer, attribute, None) is None:
        raise NotFittedError(f"{type(scorer).__name__} is not fitted yet: call fit() first")
