"""Scorer contract (scikit-learn style) shared by every scorer.

Scorers see tensors, never images or paths. Input is a list of per-layer feature maps
``[(N, C_l, h_l, w_l), ...]`` (float32 torch tensors on any device), finest layer first.
Output is a :class:`ScoreOutput`: patch-score maps on the finest layer's grid and image scores,
higher = more anomalous everywhere.

What a scorer can do is declared by class attributes, never discovered by reflection:

* ``requires_fit``: False for zero-shot scorers, which score a whole pool in one ``score`` call;
* ``has_maps``: it returns patch maps;
* ``image_score_from_map``: its image score is the peak of the post-processed map (the detector
  computes it from the map, so verdict and mask share one scale); False when the scorer re-scores
  images itself (MuSc's RsCIN, PatchCore's Eq. 7);
* ``uses_references`` / ``uses_embeddings``: ``score`` uses the ``reference=`` / ``embeddings=`` keywords;
* ``augment_references``: few-shot references should be given as rotated and flipped views too;
* ``augment_queries``: a zero-shot pool should also be scored mirrored left-right, the two maps averaged.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from numpy.typing import NDArray

from anomaly._fs import load_tensors, save_tensors
from anomaly.errors import ConfigError, NotFittedError, ScorerError

__all__ = ["Progress", "ScoreOutput", "Scorer", "check_int", "check_is_fitted", "check_number"]

Progress = Callable[[int, int], None]  # (done, total)
STATE_FILE = "scorer.safetensors"


@dataclass(frozen=True)
class ScoreOutput:
    """What a scorer returns for a batch of N images.

    Attributes:
        patch_maps: (N, h, w) float32 patch scores, or None for image-level scorers.
        image_scores: (N,) float64 image scores.
    """

    patch_maps: NDArray[np.float32] | None = field(repr=False)
    image_scores: NDArray[np.float64]

    def checked(self, n: int, scorer: str) -> ScoreOutput:
        """Self, once it holds what the contract promises for ``n`` inputs (rows); else ScorerError naming the
        scorer, rather than an IndexError or a "normal scores are not finite" far from its cause."""
        scores, maps = self.image_scores, self.patch_maps
        if not isinstance(scores, np.ndarray) or scores.shape != (n,):
            got = f"shape {scores.shape}" if isinstance(scores, np.ndarray) else type(scores).__name__
            raise ScorerError(f"scorer {scorer}: image_scores must be an array of shape ({n},), got {got}")
        if maps is not None and (not isinstance(maps, np.ndarray) or maps.ndim != 3 or len(maps) != n):
            got = f"shape {maps.shape}" if isinstance(maps, np.ndarray) else type(maps).__name__
            raise ScorerError(f"scorer {scorer}: patch_maps must be None or an array of shape ({n}, h, w), got {got}")
        if not np.isfinite(scores).all() or (maps is not None and not np.isfinite(maps).all()):
            raise ScorerError(f"scorer {scorer}: returned NaN or infinite scores")
        return self

    def take(self, index: NDArray[np.int64] | slice) -> ScoreOutput:
        """The outputs of a subset of the images."""
        return ScoreOutput(None if self.patch_maps is None else self.patch_maps[index], self.image_scores[index])

    @staticmethod
    def concat(parts: Sequence[ScoreOutput]) -> ScoreOutput:
        """The outputs of consecutive batches as one."""
        if len(parts) == 1:
            return parts[0]
        maps = [p.patch_maps for p in parts if p.patch_maps is not None]
        joined = np.concatenate(maps) if len(maps) == len(parts) else None
        return ScoreOutput(joined, np.concatenate([p.image_scores for p in parts]))


class Scorer(ABC):
    """Base class: hyper-parameters in ``__init__``, learned state in trailing-underscore attributes."""

    name: ClassVar[str]
    requires_fit: ClassVar[bool] = True
    has_maps: ClassVar[bool] = True
    image_score_from_map: bool = True  # an instance may override it from its parameters
    uses_references: ClassVar[bool] = False
    uses_embeddings: ClassVar[bool] = False
    augment_references: bool = False
    augment_queries: bool = False
    min_fold_images: ClassVar[int] = 1  # images each cross-fit fold model (fitted on the other folds) needs

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor keywords, as stored in configs and saved models (scikit-learn's convention; ``deep``
        changes nothing: a scorer holds no nested estimators)."""
        import inspect

        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {n: getattr(self, n) for n in names}

    def set_params(self, **params: Any) -> Scorer:
        """Change constructor keywords, validated as the constructor validates them; any fitted state is dropped
        (a scorer with new parameters must be fitted again). Returns self."""
        current = self.get_params()
        unknown = sorted(set(params) - set(current))
        if unknown:
            raise ConfigError(f"{self.name}: unknown parameter(s) {', '.join(unknown)}; known: {', '.join(current)}")
        self.__dict__.update(type(self)(**{**current, **params}).__dict__)
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.get_params().items())})"

    def clone(self) -> Scorer:
        """A new, unfitted scorer with the same parameters."""
        return type(self)(**self.get_params())

    def check_layer_count(self, n_layers: int) -> None:
        """Refuse parameters that name feature layers beyond the ``n_layers`` the backbone gives (none here)."""
        return None

    def channel_mismatch(self, channels: list[int]) -> str | None:
        """How the fitted state disagrees with features of ``channels`` per layer (finest first), e.g. "the saved
        bank has 192"; None when it agrees or says nothing of them (the default)."""
        return None

    def kept_features(self, layers: list[torch.Tensor]) -> list[torch.Tensor]:
        """The part of a batch's feature maps that ``fit`` and ``score`` read (all of it by default): the detector
        holds only this for every image of a fit or a pool, so a scorer of pooled features keeps no maps."""
        return layers

    @abstractmethod
    def fit(self, layers: list[torch.Tensor], *, progress: Progress | None = None) -> Scorer:
        """Learn the normal state from features of normal images; returns self."""

    @abstractmethod
    def score(
        self,
        layers: list[torch.Tensor],
        *,
        reference: list[torch.Tensor] | None = None,
        embeddings: torch.Tensor | None = None,
        progress: Progress | None = None,
    ) -> ScoreOutput:
        """Score a batch of images (``reference``/``embeddings`` only where declared)."""

    def cross_fit(
        self, layers: list[torch.Tensor], folds: NDArray[np.int64], *, progress: Progress | None = None
    ) -> ScoreOutput:
        """Fit on all images and return out-of-sample scores of every one of them.

        Image ``i`` is scored by a model fitted without fold ``folds[i]``, so its score is what a
        new normal image would get. The default refits a clone per fold; scorers with a cheaper
        exact scheme override it.
        """
        n = layers[0].shape[0]
        maps: NDArray[np.float32] | None = None
        scores = np.empty(n, dtype=np.float64)
        for fold in np.unique(folds):
            held = torch.from_numpy(np.flatnonzero(folds == fold))
            rest = torch.from_numpy(np.flatnonzero(folds != fold))
            twin = self.clone().fit([x[rest.to(x.device)] for x in layers])
            out = twin.score([x[held.to(x.device)] for x in layers])
            scores[held.numpy()] = out.image_scores
            if out.patch_maps is not None:
                if maps is None:
                    maps = np.empty((n, *out.patch_maps.shape[1:]), dtype=np.float32)
                maps[held.numpy()] = out.patch_maps
        self.fit(layers, progress=progress)
        return ScoreOutput(maps, scores)

    def forget(self, rows: NDArray[np.int64]) -> int:
        """Drop the parts of the fitted state that came from the training rows ``rows`` (fit order).

        Called once after every calibration, with the training images found outlying (probable defects; none
        is an empty ``rows``): it also ends the fit, releasing what the fit kept for it. Returns the number of
        parts dropped. A scorer whose state summarises all rows (a Gaussian's mean and covariance, where
        one image of hundreds moves little) keeps it and returns 0.
        """
        return 0

    @abstractmethod
    def state_dict(self) -> dict[str, np.ndarray]:
        """Learned state as plain arrays."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore the learned state written by :meth:`state_dict`; raise KeyError/ValueError if it does not fit."""

    def save(self, directory: Path) -> list[str]:
        """Write the learned state into ``directory``; returns the file names written."""
        save_tensors(self.state_dict(), directory / STATE_FILE)
        return [STATE_FILE]

    def load(self, files: Mapping[str, Path]) -> None:
        """Restore what :meth:`save` wrote from the verified ``files`` (name -> path) of a model directory."""
        self.load_state_dict(load_tensors(files[STATE_FILE]))


def check_int(key: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    """Raise ConfigError unless ``value`` is an integer in [minimum, maximum]."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        bound = f"[{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise ConfigError(f"scorer.params.{key}: expected an integer {bound}, got {value!r}")


def check_number(key: str, value: Any, low: float, high: float, *, low_open: bool = False) -> None:
    """Raise ConfigError unless ``value`` is a finite number in [low, high] (or (low, high])."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > high or value < low or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise ConfigError(f"scorer.params.{key}: expected a number in {interval}, got {value!r}")


def check_is_fitted(scorer: Scorer, attribute: str) -> None:
    """Raise NotFittedError unless ``scorer`` has the learned ``attribute``."""
    if getattr(scorer, attribute, None) is None:
        raise NotFittedError(f"{type(scorer).__name__} is not fitted yet: call fit() first")
