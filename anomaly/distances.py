"""Numpy scoring math shared by the torch scorers and the torch-free runtime: one copy, so that an exported model
scores exactly as the fitted one."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from anomaly.index import NNIndex

__all__ = ["knn_scores", "mahalanobis"]


def knn_scores(
    index: NNIndex,
    bank: NDArray[np.float32] | None,
    queries: NDArray[np.float32],
    *,
    k: int,
    distance: str,
    reweight: bool,
    num_neighbors: int,
) -> tuple[NDArray[np.float32], NDArray[np.float64]]:
    """Patch maps (N, h, w): mean distance of each patch of ``queries`` (N, h, w, D) to its ``k`` nearest bank rows
    (squared for ``distance`` ``sql2``); image scores (N,): the map's max, or PatchCore's Eq. 7 with ``reweight``
    (which needs ``bank``, the rows ``index`` holds). With one neighbour (``num_neighbors`` 1, or a bank of one row)
    Eq. 7's weight is 0 for every image, so the image score is the map's max then, as in anomalib."""
    n_img, h, w, d = queries.shape
    per_image = queries.reshape(n_img, h * w, d)
    dist, ids = index.search_images(per_image, k)  # image peaks exact
    if distance == "sql2":
        dist = dist**2
    patch = dist.mean(1).reshape(n_img, h * w)
    if reweight and min(num_neighbors, index.ntotal) > 1:
        if bank is None:
            raise ValueError("reweight needs the bank")
        image_scores = _reweight(index, bank, per_image, patch, dist, ids, distance, num_neighbors)
    else:
        image_scores = patch.max(1).astype(np.float64)
    return patch.reshape(n_img, h, w).astype(np.float32), image_scores


def _reweight(
    index: NNIndex,
    bank: NDArray[np.float32],
    queries: NDArray[np.float32],
    patch: NDArray[np.float32],
    dist: NDArray[np.float32],
    ids: NDArray[np.int64],
    distance: str,
    num_neighbors: int,
) -> NDArray[np.float64]:
    """PatchCore Eq. 7: damp the max score by how typical its nearest bank row's neighbourhood is."""
    n_img, n_patch, _ = queries.shape
    best = patch.argmax(1)
    flat_best = np.arange(n_img) * n_patch + best
    test_star = queries[np.arange(n_img), best]  # (n_img, D)
    nn_star = ids[flat_best, 0]
    s_star = dist[flat_best, 0].astype(np.float64)
    _, neigh = index.search(bank[nn_star], num_neighbors)
    d = np.linalg.norm(test_star[:, None, :] - bank[neigh], axis=2).astype(np.float64)
    if distance == "sql2":
        d = d**2
    log_w = s_star - np.logaddexp.reduce(d, axis=1)  # stable log(exp(s*) / sum exp(d))
    return (1.0 - np.exp(log_w)) * s_star


def mahalanobis(centred: NDArray[np.float64], precision: NDArray[np.float64]) -> NDArray[np.float64]:
    """sqrt(x^T P x) of each row of ``centred`` (N, D) under the precision matrix ``precision`` (D, D)."""
    return np.sqrt(np.maximum(np.einsum("ni,ij,nj->n", centred, precision, centred), 0))
