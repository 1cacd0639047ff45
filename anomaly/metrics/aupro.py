"""AUPRO: area under the per-region-overlap curve up to a false-positive-rate limit (ALGORITHMS.md §5.4).

Exact staircase (every distinct score is a threshold, a pixel is positive iff ``score >= t``), the same curve
that sorting all pixels once and taking two weighted cumulative sums gives, as anomalib 2.7.0 does. We never
sort the defect pixels together with the background: the FPR axis only moves at background scores, so the
trapezoidal area is a sum over background pixels of the (mean of the before/after) PRO at their score, which,
swapped around, is a weighted count for every defect pixel of the background pixels it outranks. With the
background scores sorted once this is a ``searchsorted`` per defect pixel: O(n log n), float64, and the
sorted background is shared with the pixel AUROC/AP/F1 computation in :func:`anomaly.metrics.evaluate`.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from anomaly.metrics.classification import ScoresLike, _as_image_pairs, _pool, _sort_in_place

__all__ = ["aupro"]

_STRUCTURES = {4: ndimage.generate_binary_structure(2, 1), 8: np.ones((3, 3), dtype=bool)}


def aupro(
    anomaly_maps: ScoresLike,
    masks: ScoresLike,
    *,
    fpr_limit: float = 0.3,
    connectivity: int = 8,
) -> float:
    """Normalised area under the PRO curve for ``FPR <= fpr_limit``.

    ``PRO(t)`` is the mean over all ground-truth connected components (of all images) of the fraction of the
    component's pixels scoring ``>= t``; ``FPR(t)`` is the fraction of all defect-free pixels (normal images and
    the background of anomalous ones) scoring ``>= t``. The curve starts at (0, 0), is cut at ``fpr_limit`` by
    linear interpolation, integrated with the trapezoidal rule and divided by ``fpr_limit``.

    Args:
        anomaly_maps: real-valued maps, higher = more anomalous: an (N, H, W) array or a sequence of
            (H_i, W_i) arrays of different sizes.
        masks: bool or integer 0/1 ground truth, same structure and shapes as ``anomaly_maps``.
        fpr_limit: upper FPR integration bound in (0, 1].
        connectivity: 8 (default, as MVTec/anomalib/OpenCV) or 4 for the connected components.

    Returns:
        AUPRO in [0, 1].

    Raises:
        TypeError: non-numeric maps, or masks neither bool nor integer.
        ValueError: invalid ``fpr_limit``/``connectivity``, shape mismatch, NaN scores, non-binary masks,
            no defect pixel or no defect-free pixel.

    Example:
        >>> maps = np.array([[[0.1, 0.9], [0.2, 0.8]]])
        >>> masks = np.array([[[0, 1], [0, 1]]])
        >>> aupro(maps, masks)
        1.0
    """
    _check_params(fpr_limit, connectivity)
    pairs = _as_image_pairs(anomaly_maps, masks)
    neg, pos = _pool(pairs)
    weights = _region_weights([m for _, m in pairs], connectivity)
    order = np.argsort(pos, kind="stable")
    return _aupro_from_sorted(_sort_in_place(neg), _sort_in_place(pos[order]), weights[order], fpr_limit)


def _check_params(fpr_limit: float, connectivity: int) -> None:
    """Validate the scalar arguments of :func:`aupro`."""
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"Expected fpr_limit in (0, 1], but got {fpr_limit}.")
    if connectivity not in _STRUCTURES:
        raise ValueError(f"Expected connectivity 4 or 8, but got {connectivity}.")


def _region_weights(masks: list[NDArray[np.bool_]], connectivity: int) -> NDArray[np.float64]:
    """PRO weight ``1 / (K * |C_k|)`` of every defect pixel, in raster then image order (as ``_pool``)."""
    per_image = []
    n_regions = 0
    for m in masks:
        labels, n = ndimage.label(m, structure=_STRUCTURES[connectivity])
        sizes = np.bincount(labels.ravel())
        per_image.append(1.0 / sizes[labels[m]])
        n_regions += n
    return np.concatenate(per_image) / n_regions


def _aupro_from_sorted(
    neg: NDArray[np.generic],
    pos: NDArray[np.generic],
    weights: NDArray[np.float64],
    fpr_limit: float,
) -> float:
    """AUPRO from ascending background scores ``neg``, ascending defect scores ``pos`` and their PRO weights.

    The curve's segments with a non-zero FPR step are those of the distinct background scores ``v``; the one
    at ``v_cut`` crosses ``fpr_limit``. Every segment above it (``v > v_cut``) contributes
    ``(1/n) * (PRO(>= v) + PRO(> v)) / 2`` per background pixel; summed over those pixels this is, for each
    defect pixel ``u``, ``w_u`` times the number of background scores in ``(v_cut, a_u]`` (resp.
    ``(v_cut, a_u)``).
    """
    n = neg.size
    v_cut = neg[n - min(max(math.ceil(fpr_limit * n), 1), n)]
    n_le_cut = int(np.searchsorted(neg, v_cut, side="right"))
    n_le = np.searchsorted(neg, pos, side="right")
    n_lt = np.searchsorted(neg, pos, side="left")
    outranked = np.maximum(n_le - n_le_cut, 0) + np.maximum(n_lt - n_le_cut, 0)
    area = float(np.dot(weights, outranked)) / (2 * n)
    # Partial segment from (fpr0, pro0) just above v_cut to (fpr1, pro1) at v_cut, cut at fpr_limit.
    fpr0 = (n - n_le_cut) / n
    fpr1 = (n - int(np.searchsorted(neg, v_cut, side="left"))) / n
    pro0 = float(weights[np.searchsorted(pos, v_cut, side="right") :].sum())
    pro1 = float(weights[np.searchsorted(pos, v_cut, side="left") :].sum())
    pro_cut = pro0 + (pro1 - pro0) * (fpr_limit - fpr0) / (fpr1 - fpr0)
    area += (fpr_limit - fpr0) * (pro0 + pro_cut) / 2
    return area / fpr_limit
