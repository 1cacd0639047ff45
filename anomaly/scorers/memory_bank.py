"""PatchCore-style memory bank: coreset of normal patch embeddings + FAISS k-NN distance."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from anomaly.errors import ConfigError
from anomaly.index import NNIndex
from anomaly.scorers._aggregate import patch_embeddings
from anomaly.scorers._coreset import greedy_coreset
from anomaly.scorers.base import ScoreOutput, Scorer, check_is_fitted

__all__ = ["MemoryBankScorer"]


class MemoryBankScorer(Scorer):
    """Nearest-neighbour distance of each test patch to a coreset of normal patches.

    Args:
        coreset_ratio: fraction of training patches kept (1.0 keeps all).
        max_bank: optional cap on the bank size; with a cap, fit time grows linearly with N.
        projection_dim: random-projection size used only for coreset distances.
        k: neighbours averaged for a patch score.
        distance: ``l2`` (true Euclidean) or ``sql2`` (squared, the official repo's choice).
        reweight: PatchCore Eq. 7 image-score re-weighting with ``num_neighbors`` bank neighbours.
        index: FAISS factory string (``Flat`` exact, ``HNSW32,Flat``, ``IVF256,Flat``) or ``auto``.
        patch_size: local aggregation neighbourhood.
        use_gpu: ``auto`` | true | false for the FAISS index.
        random_state: seed of the coreset.
    """

    name = "memory_bank"

    def __init__(
        self,
        *,
        coreset_ratio: float = 0.1,
        max_bank: int | None = None,
        projection_dim: int = 32,
        k: int = 1,
        distance: str = "l2",
        reweight: bool = False,
        num_neighbors: int = 9,
        index: str = "Flat",
        patch_size: int = 3,
        use_gpu: bool | str = "auto",
        random_state: int = 0,
    ) -> None:
        self.coreset_ratio = coreset_ratio
        self.max_bank = max_bank
        self.projection_dim = projection_dim
        self.k = k
        self.distance = distance
        self.reweight = reweight
        self.num_neighbors = num_neighbors
        self.index = index
        self.patch_size = patch_size
        self.use_gpu = use_gpu
        self.random_state = random_state
        self._validate_params()
        self.bank_: np.ndarray | None = None
        self.bank_image_: np.ndarray | None = None
        self.index_: NNIndex | None = None

    def _validate_params(self) -> None:
        if not 0 < self.coreset_ratio <= 1:
            raise ConfigError(f"scorer.params.coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        if self.max_bank is not None and self.max_bank < 1:
            raise ConfigError(f"scorer.params.max_bank must be >= 1, got {self.max_bank}")
        if self.k < 1 or self.num_neighbors < 1:
            raise ConfigError("scorer.params.k and num_neighbors must be >= 1")
        if self.distance not in ("l2", "sql2"):
            raise ConfigError(f"scorer.params.distance must be 'l2' or 'sql2', got '{self.distance}'")
        if self.patch_size < 1 or self.patch_size % 2 == 0:
            raise ConfigError(f"scorer.params.patch_size must be odd and >= 1, got {self.patch_size}")

    def fit(self, layers: list[torch.Tensor], progress: Callable[[int, int], None] | None = None) -> MemoryBankScorer:
        """Build the bank from features of normal images."""
        self._validate_params()
        emb = patch_embeddings(layers, self.patch_size)
        n_img, h, w, d = emb.shape
        flat = emb.reshape(-1, d)
        n_select = max(1, math.floor(self.coreset_ratio * len(flat)))
        if self.max_bank is not None:
            n_select = min(n_select, self.max_bank)
        if n_select < len(flat):
            picks = greedy_coreset(
                flat, n_select, projection_dim=self.projection_dim, seed=self.random_state, progress=progress
            )
        else:
            picks = np.arange(len(flat))
        self.bank_ = flat[torch.from_numpy(picks).to(flat.device)].cpu().numpy()
        self.bank_image_ = (picks // (h * w)).astype(np.int32)
        self.index_ = NNIndex(self.index, use_gpu=self.use_gpu).build(self.bank_, seed=self.random_state)
        return self

    def score(self, layers: list[torch.Tensor]) -> ScoreOutput:
        """Patch maps = mean distance to the k nearest bank rows; image score = max (or Eq. 7)."""
        check_is_fitted(self, "index_")
        assert self.index_ is not None and self.bank_ is not None
        return self._score_with(self.index_, self.bank_, layers)

    def holdout_score(self, layers: list[torch.Tensor], image_ids: np.ndarray) -> ScoreOutput:
        """Score training images ``image_ids`` against the bank without their own rows (leave-out).

        Gives out-of-sample scores of normal images without a second coreset run; the detector
        chooses its threshold from them.
        """
        check_is_fitted(self, "index_")
        assert self.bank_ is not None and self.bank_image_ is not None
        keep = ~np.isin(self.bank_image_, image_ids)
        if not keep.any():
            raise ConfigError("threshold.holdout: every bank row comes from held-out images")
        bank = self.bank_[keep]
        return self._score_with(NNIndex("Flat", use_gpu=self.use_gpu).build(bank), bank, layers)

    def _score_with(self, index: NNIndex, bank: np.ndarray, layers: list[torch.Tensor]) -> ScoreOutput:
        emb = patch_embeddings(layers, self.patch_size)
        n_img, h, w, d = emb.shape
        queries = emb.reshape(-1, d).cpu().numpy()
        dist, ids = index.search(queries, self.k)
        if self.distance == "sql2":
            dist = dist**2
        patch = dist.mean(1).reshape(n_img, h * w)
        image_scores = patch.max(1).astype(np.float64)
        if self.reweight:
            image_scores = self._reweight(index, bank, queries.reshape(n_img, h * w, d), patch, dist, ids)
        return ScoreOutput(patch_maps=patch.reshape(n_img, h, w).astype(np.float32), image_scores=image_scores)

    def _reweight(self, index, bank, queries, patch, dist, ids) -> np.ndarray:  # type: ignore[no-untyped-def]
        """PatchCore Eq. 7: damp the max score by how typical its nearest bank row's neighbourhood is."""
        n_img, n_patch, _ = queries.shape
        best = patch.argmax(1)
        flat_best = np.arange(n_img) * n_patch + best
        test_star = queries[np.arange(n_img), best]  # (n_img, D)
        nn_star = ids[flat_best, 0]
        s_star = dist[flat_best, 0].astype(np.float64)
        _, neigh = index.search(bank[nn_star], self.num_neighbors)
        d = np.linalg.norm(test_star[:, None, :] - bank[neigh], axis=2).astype(np.float64)
        if self.distance == "sql2":
            d = d**2
        log_w = s_star - np.logaddexp.reduce(d, axis=1)  # stable log(exp(s*) / sum exp(d))
        return (1.0 - np.exp(log_w)) * s_star

    def state_dict(self) -> dict[str, np.ndarray]:
        """Bank, source image of every bank row and the serialised FAISS index."""
        check_is_fitted(self, "index_")
        assert self.index_ is not None and self.bank_ is not None and self.bank_image_ is not None
        return {"bank": self.bank_, "bank_image": self.bank_image_, "index": self.index_.serialize()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore bank and index written by :meth:`state_dict`."""
        self.bank_ = state["bank"]
        self.bank_image_ = state["bank_image"]
        self.index_ = NNIndex(self.index, use_gpu=self.use_gpu).deserialize(state["index"])
