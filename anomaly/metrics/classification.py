"""Threshold-free binary classification metrics: AUROC, average precision (AP) and F1-max.

The same functions serve image level (one score and one label per image) and pixel level (every pixel of
every map pooled, ALGORITHMS.md §5.2). Higher score = more anomalous; label 1 = anomalous.

Semantics are exactly scikit-learn's (``roc_auc_score``, step-wise ``average_precision_score``, max F1 over
``precision_recall_curve``): every distinct score is a threshold, a pixel is positive iff ``score >= t`` and
tied scores form one step. Computation is O(n log n) and memory-lean: the negative scores are sorted once in
their own dtype (float32 stays float32, no int64 argsort of all samples); every curve quantity is then a
``searchsorted`` of the few distinct positive scores into them (§5.7). Only thresholds equal to a positive
score can change TP, so AP and F1-max need no other threshold, and AUROC is the Mann-Whitney sum counted in
integers, hence exact for any number of samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeGuard

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["ClassificationResult", "auroc", "average_precision", "classification_metrics", "f1_max"]

_CHUNK = 1 << 22

ScoresLike = ArrayLike | Sequence[ArrayLike]
"""An array of any shape, or a sequence of arrays of different shapes (e.g. per-image maps)."""


@dataclass(frozen=True, slots=True)
class ClassificationResult:
    """Threshold-free metrics of one scoring of a binary problem.

    Attributes:
        auroc: area under the ROC curve (Mann-Whitney, ties count one half).
        average_precision: step-wise AP, ``sum_k (R_k - R_{k-1}) * P_k``.
        f1_max: largest F1 over all thresholds.
        f1_threshold: the score threshold (predict anomalous iff ``score >= f1_threshold``) reaching ``f1_max``.
    """

    auroc: float
    average_precision: float
    f1_max: float
    f1_threshold: float


def classification_metrics(scores: ScoresLike, labels: ScoresLike) -> ClassificationResult:
    """Compute AUROC, AP and F1-max with a single sort.

    Args:
        scores: real scores, higher = more anomalous. Any shape, or a sequence of arrays of different
            shapes (e.g. per-image anomaly maps (H_i, W_i)) whose pixels are pooled.
        labels: bool or integer 0/1 labels with the same structure and shapes as ``scores``.

    Returns:
        The three metrics and the F1-max threshold.

    Raises:
        TypeError: non-numeric scores, or labels that are neither bool nor integer.
        ValueError: shape mismatch, NaN scores, labels other than 0/1, or labels of a single class.

    Example:
        >>> r = classification_metrics([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
        >>> round(r.auroc, 4), round(r.average_precision, 4), round(r.f1_max, 4)
        (0.75, 0.8333, 0.8)
    """
    neg, pos = _pool(_as_pairs(scores, labels))
    return _metrics_from_sorted(_sort_in_place(neg), _sort_in_place(pos))


def auroc(scores: ScoresLike, labels: ScoresLike) -> float:
    """Area under the ROC curve (= sklearn ``roc_auc_score``). Arguments as :func:`classification_metrics`.

    Example:
        >>> auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
        0.75
    """
    return classification_metrics(scores, labels).auroc


def average_precision(scores: ScoresLike, labels: ScoresLike) -> float:
    """Step-wise average precision (= sklearn ``average_precision_score``). Arguments as :func:`classification_metrics`.

    Example:
        >>> round(average_precision([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]), 6)
        0.833333
    """
    return classification_metrics(scores, labels).average_precision


def f1_max(scores: ScoresLike, labels: ScoresLike) -> float:
    """Largest F1 score over all thresholds ``score >= t``. Arguments as :func:`classification_metrics`.

    Example:
        >>> round(f1_max([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]), 6)
        0.8
    """
    return classification_metrics(scores, labels).f1_max


def _metrics_from_sorted(neg: NDArray[np.generic], pos: NDArray[np.generic]) -> ClassificationResult:
    """Metrics from ascending-sorted negative and positive scores (both non-empty, NaN-free)."""
    n_neg, n_pos = neg.size, pos.size
    starts = np.flatnonzero(np.r_[True, pos[1:] != pos[:-1]])  # first index of each distinct positive score
    values = pos[starts]
    counts = np.diff(np.r_[starts, n_pos])  # positives equal to each value
    tp = n_pos - starts  # positives >= value
    neg_below = np.searchsorted(neg, values, side="left")  # negatives < value
    neg_below_or_equal = np.searchsorted(neg, values, side="right")
    fp = n_neg - neg_below  # negatives >= value
    # Mann-Whitney: each positive beats the negatives below it and ties half of the equal ones.
    twice_wins = int(np.dot(counts, neg_below + neg_below_or_equal))
    precision = tp / (tp + fp)
    f1 = 2.0 * tp / (tp + fp + n_pos)
    best = int(np.argmax(f1))
    return ClassificationResult(
        auroc=twice_wins / (2 * n_pos * n_neg),
        average_precision=float(np.dot(counts, precision) / n_pos),
        f1_max=float(f1[best]),
        f1_threshold=float(values[best]),
    )


def _as_pairs(scores: ScoresLike, labels: ScoresLike) -> list[tuple[NDArray[np.generic], NDArray[np.bool_]]]:
    """Validate and return ``(scores, bool labels)`` pairs: one pair, or one per item of a ragged sequence."""
    if _is_sequence_of_arrays(scores):
        label_list = list(labels)  # type: ignore[arg-type]
        if len(label_list) != len(scores):
            raise ValueError(
                f"Expected as many label arrays as score arrays, but got {len(label_list)} and {len(scores)}."
            )
        pairs = [_as_pair(s, lab) for s, lab in zip(scores, label_list, strict=True)]
    else:
        pairs = [_as_pair(scores, labels)]  # type: ignore[arg-type]
    if sum(s.size for s, _ in pairs) == 0:
        raise ValueError("Expected at least one score, but got none.")
    return pairs


def _is_sequence_of_arrays(x: object) -> TypeGuard[Sequence[ArrayLike]]:
    """Tell whether ``x`` is a list/tuple whose first item is itself an array (not a scalar)."""
    return isinstance(x, list | tuple) and len(x) > 0 and np.ndim(x[0]) > 0


def _as_pair(scores: ArrayLike, labels: ArrayLike) -> tuple[NDArray[np.generic], NDArray[np.bool_]]:
    """One validated ``(scores, bool labels)`` pair of equal shapes."""
    s = _as_scores(scores)
    m = _as_binary(labels)
    if s.shape != m.shape:
        raise ValueError(f"Expected scores and labels of the same shape, but got {s.shape} and {m.shape}.")
    return s, m


def _as_scores(scores: ArrayLike) -> NDArray[np.generic]:
    """Scores as a numpy array of real numbers (no copy when already one)."""
    s = np.asarray(scores)
    if s.dtype.kind not in "iuf":
        raise TypeError(f"Expected real-valued (integer or floating) scores, but got dtype {s.dtype}.")
    return s


def _as_binary(labels: ArrayLike) -> NDArray[np.bool_]:
    """Labels/masks as a bool array; accepts bool or integer arrays containing only 0 and 1."""
    m = np.asarray(labels)
    if m.dtype == np.bool_:
        return m
    if m.dtype.kind not in "iu":
        raise TypeError(f"Expected bool or integer 0/1 labels (masks), but got dtype {m.dtype}.")
    if m.size and (m.min() < 0 or m.max() > 1):
        raise ValueError(f"Expected *binary* labels (masks) with values in {{0, 1}}, but got {np.unique(m)}.")
    return np.asarray(m != 0, dtype=np.bool_)


def _as_image_pairs(maps: ScoresLike, masks: ScoresLike) -> list[tuple[NDArray[np.generic], NDArray[np.bool_]]]:
    """Validate per-image ``(map, bool mask)`` 2-D pairs from an (N, H, W) array or a sequence of (H_i, W_i)."""
    if _is_sequence_of_arrays(maps):
        pairs = _as_pairs(maps, masks)
    else:
        stacked_map, stacked_mask = _as_pair(maps, masks)  # type: ignore[arg-type]
        if stacked_map.ndim != 3:
            raise ValueError(f"Expected maps of shape (N, H, W), but got {stacked_map.shape}.")
        pairs = list(zip(stacked_map, stacked_mask, strict=True))
    if any(s.ndim != 2 for s, _ in pairs):
        raise ValueError(f"Expected 2-D (H, W) maps, but got shapes {sorted({s.shape for s, _ in pairs})}.")
    return pairs


def _pool(
    pairs: list[tuple[NDArray[np.generic], NDArray[np.bool_]]],
) -> tuple[NDArray[np.generic], NDArray[np.generic]]:
    """Pool all pairs into flat ``(negative scores, positive scores)`` arrays, in raster then image order.

    Copies in chunks of at most ``_CHUNK`` samples, so the extra memory is the two output arrays.

    Raises:
        ValueError: if one of the two classes is absent.
    """
    dtype = np.result_type(*(s.dtype for s, _ in pairs))
    n_pos = sum(int(np.count_nonzero(m)) for _, m in pairs)
    n_total = sum(m.size for _, m in pairs)
    if n_pos in (0, n_total):
        kind = "positive (anomalous)" if n_pos == 0 else "negative (normal)"
        raise ValueError(f"Expected both classes in the labels, but found no {kind} sample.")
    neg = np.empty(n_total - n_pos, dtype=dtype)
    pos = np.empty(n_pos, dtype=dtype)
    i_neg = i_pos = 0
    for s, m in pairs:
        flat_s, flat_m = s.ravel(), m.ravel()
        for start in range(0, flat_s.size, _CHUNK):
            chunk_s, chunk_m = flat_s[start : start + _CHUNK], flat_m[start : start + _CHUNK]
            k = int(np.count_nonzero(chunk_m))
            pos[i_pos : i_pos + k] = chunk_s[chunk_m]
            neg[i_neg : i_neg + chunk_m.size - k] = chunk_s[~chunk_m]
            i_pos, i_neg = i_pos + k, i_neg + chunk_m.size - k
    return neg, pos


def _sort_in_place(x: NDArray[np.generic]) -> NDArray[np.generic]:
    """Sort ``x`` ascending in place and return it; raise ValueError if it holds NaN (sorted last)."""
    x.sort()
    if x.size and np.isnan(x[-1]):
        raise ValueError("Expected scores without NaN values.")
    return x
