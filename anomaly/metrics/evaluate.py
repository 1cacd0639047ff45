"""One call for the standard image- and pixel-level metrics of an evaluation run."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

from anomaly.metrics.aupro import _aupro_from_sorted, _check_params, _region_weights
from anomaly.metrics.classification import (
    ScoresLike,
    _as_image_pairs,
    _metrics_from_sorted,
    _pool,
    _sort_in_place,
    classification_metrics,
)
from anomaly.metrics.pimo import AupimoResult, aupimo

__all__ = ["evaluate", "evaluate_detailed", "evaluate_pixels"]


def evaluate(
    image_scores: ArrayLike,
    labels: ArrayLike,
    maps: ScoresLike | None = None,
    masks: ScoresLike | None = None,
    *,
    fpr_limit: float = 0.3,
    fpr_bounds: tuple[float, float] = (1e-5, 1e-4),
) -> dict[str, float | str]:
    """Compute image metrics and, given maps and masks, pixel metrics, AUPRO and AUPIMO.

    Pixel metrics pool every pixel of every image and share one sort of the defect-free pixels (O(n log n),
    memory about one copy of the pixels); AUPIMO sorts each normal image once. Images may have different sizes.

    Args:
        image_scores: (N,) image scores, higher = more anomalous.
        labels: (N,) bool or integer 0/1 image labels (1 = anomalous).
        maps: anomaly maps at mask resolution, an (N, H, W) floating array or a sequence of N (H_i, W_i) arrays.
        masks: ground-truth masks (bool or integer 0/1) of the same structure and shapes as ``maps``.
        fpr_limit: FPR integration limit of AUPRO.
        fpr_bounds: shared-FPR bounds of AUPIMO.

    Returns:
        ``image_auroc``, ``image_ap``, ``image_f1max`` and, with maps, ``pixel_auroc``, ``pixel_ap``,
        ``pixel_f1max``, ``aupro`` and ``aupimo`` (mean over anomalous images). When AUPIMO is undefined
        (e.g. no normal image, too few normal pixels for ``fpr_bounds``) ``aupimo`` is NaN and
        ``aupimo_error`` holds the reason.

    Raises:
        TypeError: invalid dtypes (see the individual metrics).
        ValueError: only one of ``maps``/``masks`` given, length mismatches, single-class labels or masks,
            and the other input errors of the individual metrics.

    Example:
        >>> evaluate([0.1, 0.9, 0.4], [0, 1, 1])
        {'image_auroc': 1.0, 'image_ap': 1.0, 'image_f1max': 1.0}
    """
    return evaluate_detailed(image_scores, labels, maps, masks, fpr_limit=fpr_limit, fpr_bounds=fpr_bounds)[0]


def evaluate_detailed(
    image_scores: ArrayLike,
    labels: ArrayLike,
    maps: ScoresLike | None = None,
    masks: ScoresLike | None = None,
    *,
    fpr_limit: float = 0.3,
    fpr_bounds: tuple[float, float] = (1e-5, 1e-4),
) -> tuple[dict[str, float | str], AupimoResult | None]:
    """:func:`evaluate` plus the per-image AUPIMO result it computed (None without maps or when undefined)."""
    image = classification_metrics(image_scores, labels)
    result: dict[str, float | str] = {
        "image_auroc": image.auroc,
        "image_ap": image.average_precision,
        "image_f1max": image.f1_max,
    }
    if maps is None and masks is None:
        return result, None
    if maps is None or masks is None:
        raise ValueError("Expected both maps and masks, or neither.")
    _check_params(fpr_limit, connectivity=8)
    pairs = _as_image_pairs(maps, masks)
    if len(pairs) != np.size(labels):
        raise ValueError(f"Expected one map per image label, but got {len(pairs)} maps and {np.size(labels)} labels.")
    pixel, details = _pixel_entry(pairs, fpr_limit, fpr_bounds)
    return {**result, **pixel}, details


def evaluate_pixels(
    maps: ScoresLike,
    masks: ScoresLike,
    *,
    fpr_limit: float = 0.3,
    fpr_bounds: tuple[float, float] = (1e-5, 1e-4),
) -> tuple[dict[str, float | str], AupimoResult | None]:
    """The pixel metrics of :func:`evaluate_detailed` alone: they need no image labels, so a set of defective images
    only (NEU-Seg has no normal image) is measured on the normal pixels around its defects. AUPIMO, whose FPR is
    taken on normal images, is then NaN with its reason."""
    _check_params(fpr_limit, connectivity=8)
    return _pixel_entry(_as_image_pairs(maps, masks), fpr_limit, fpr_bounds)


def _pixel_entry(
    pairs: list[tuple[NDArray[np.generic], NDArray[np.bool_]]], fpr_limit: float, fpr_bounds: tuple[float, float]
) -> tuple[dict[str, float | str], AupimoResult | None]:
    result = _pixel_metrics(pairs, fpr_limit)
    entry, details = _aupimo_entry(pairs, fpr_bounds)
    return {**result, **entry}, details


def _pixel_metrics(
    pairs: list[tuple[NDArray[np.generic], NDArray[np.bool_]]], fpr_limit: float
) -> dict[str, float | str]:
    """Pixel AUROC/AP/F1-max and AUPRO from one sort of the defect-free pixels."""
    neg, pos = _pool(pairs)
    weights = _region_weights([m for _, m in pairs], connectivity=8)
    order = np.argsort(pos, kind="stable")
    neg, pos, weights = _sort_in_place(neg), _sort_in_place(pos[order]), weights[order]
    pixel = _metrics_from_sorted(neg, pos)
    return {
        "pixel_auroc": pixel.auroc,
        "pixel_ap": pixel.average_precision,
        "pixel_f1max": pixel.f1_max,
        "aupro": _aupro_from_sorted(neg, pos, weights, fpr_limit),
    }


def _aupimo_size_advice(normal_maps: list[NDArray[np.generic]], fpr_low: float) -> str:
    """Why the normal test pixels cannot reach the lower FPR bound ``fpr_low``, and what would.

    The shared FPR averages per-image rates, so its smallest value above 0 is that of the top normal score: the
    pixels holding it over their image's pixels, divided by the number of normal images. One such pixel weighs less
    at a larger size; a flat peak (a map upscaled from a coarse grid repeats its maximum) grows with the size, so
    only more normal images lower it."""
    n = max(1, len(normal_maps))
    top = max((float(np.max(m)) for m in normal_maps), default=math.nan)
    counts = [int(np.count_nonzero(np.greater_equal(m, top))) for m in normal_maps]
    smallest = sum(c / m.size for c, m in zip(counts, normal_maps)) / n
    images = math.floor(n * smallest / fpr_low) + 1  # the fewest with sum(rates) / images < fpr_low
    text = (
        f"The normal test images have too few pixels for the lower FPR bound {fpr_low:g}: the shared FPR averages "
        f"per-image rates, and the top normal score (held by {sum(counts)} pixel(s) of {n} normal image(s)) already "
        f"gives {smallest:.3g}."
    )
    if sum(counts) == 1:
        side = math.ceil(math.sqrt(1 / (n * fpr_low)))
        return (
            f"{text} With {n} normal image(s), evaluate at a common size of about {side}x{side} or more "
            f"(`--eval-size` of `anomaly evaluate` or `anomaly benchmark`), or add normal test images."
        )
    return (
        f"{text} A flat peak grows with the evaluation size, so a larger --eval-size does not lower it; add normal "
        f"test images (about {images} in all)."
    )


def _aupimo_entry(
    pairs: list[tuple[NDArray[np.generic], NDArray[np.bool_]]], fpr_bounds: tuple[float, float]
) -> tuple[dict[str, float | str], AupimoResult | None]:
    """``{"aupimo": mean}`` and the result, or NaN plus ``aupimo_error`` when AUPIMO is undefined."""
    try:
        details = aupimo([s for s, _ in pairs], [m for _, m in pairs], fpr_bounds=fpr_bounds)
    except (ValueError, RuntimeError) as err:
        reason = str(err)
        if "'fpr_level'" in reason:  # the reference message (ALGORITHMS.md), and what it means for the user's data
            reason += " " + _aupimo_size_advice([s for s, m in pairs if not m.any()], fpr_bounds[0])
        return {"aupimo": math.nan, "aupimo_error": reason}, None
    return {"aupimo": details.mean}, details
