"""Clustering metrics as AnomalyNCD reports them: NMI, ARI and F1 (accuracy after Hungarian matching).

Mirrors ``split_cluster_acc`` of AnomalyNCD (itself from SimGCD): predicted clusters are matched
one-to-one to true classes by ``scipy.optimize.linear_sum_assignment`` on the square contingency
table, and F1 is the micro-averaged F1 of the matched labels, which equals the fraction of samples
whose cluster maps to their class. NMI and ARI are scikit-learn's (arithmetic-mean normalisation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["ClusteringResult", "cluster_accuracy", "clustering_metrics"]


@dataclass(frozen=True, slots=True)
class ClusteringResult:
    """NMI and F1 in [0, 1], ARI in [-1, 1]; ``mapping`` sends each predicted cluster to a true class."""

    nmi: float
    ari: float
    f1: float
    n: int
    mapping: dict[object, object]

    def to_dict(self) -> dict[str, float | int]:
        """JSON-safe metrics (without the mapping)."""
        return {"nmi": self.nmi, "ari": self.ari, "f1": self.f1, "n": self.n}


def _codes(values: Sequence[object] | ArrayLike) -> tuple[NDArray[np.intp], NDArray[np.generic]]:
    uniques, codes = np.unique(np.asarray(values), return_inverse=True)
    return codes.ravel(), uniques


def cluster_accuracy(
    y_true: Sequence[object] | ArrayLike, y_pred: Sequence[object] | ArrayLike
) -> tuple[float, dict[object, object]]:
    """Best one-to-one match of clusters to classes: (fraction matched, cluster -> class).

    Labels may be any hashable values; clusters left without a class (more clusters than classes)
    are absent from the mapping and count as wrong.

    Example:
        >>> acc, mapping = cluster_accuracy(["a", "a", "b", "b"], [1, 1, 1, 0])
        >>> acc, mapping == {1: "a", 0: "b"}
        (0.75, True)
    """
    from scipy.optimize import linear_sum_assignment

    true, classes = _codes(y_true)
    pred, clusters = _codes(y_pred)
    if true.size != pred.size or true.size == 0:
        raise ValueError(f"y_true and y_pred must be non-empty and of equal length, got {true.size} and {pred.size}")
    size = max(len(classes), len(clusters))
    table = np.zeros((size, size), dtype=np.int64)  # rows: clusters, columns: classes (as AnomalyNCD)
    np.add.at(table, (pred, true), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    mapping = {
        clusters[r].item(): classes[c].item() for r, c in zip(rows, cols) if r < len(clusters) and c < len(classes)
    }
    return float(table[rows, cols].sum() / true.size), mapping


def clustering_metrics(y_true: Sequence[object] | ArrayLike, y_pred: Sequence[object] | ArrayLike) -> ClusteringResult:
    """NMI, ARI and F1 of predicted clusters against true classes (see the module docstring).

    Example:
        >>> r = clustering_metrics([0, 0, 1, 1], [5, 5, 7, 7])
        >>> (r.nmi, r.ari, r.f1)
        (1.0, 1.0, 1.0)
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    true, _ = _codes(y_true)
    pred, _ = _codes(y_pred)
    f1, mapping = cluster_accuracy(y_true, y_pred)
    return ClusteringResult(
        nmi=float(normalized_mutual_info_score(true, pred)),
        ari=float(adjusted_rand_score(true, pred)),
        f1=f1,
        n=int(true.size),
        mapping=mapping,
    )
