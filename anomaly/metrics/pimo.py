"""PIMO curves and AUPIMO (Bertoldo et al., BMVC 2024), exactly as ALGORITHMS.md §5.5 defines them.

Thresholds are ``K`` linspace values between the min and max score of the NORMAL images' pixels. A pixel is
predicted anomalous iff ``score >= threshold``. The shared FPR is the mean over normal images of their
per-image FPR (each normal image weighs the same, whatever its size); a PIMO curve is the TPR of one
anomalous image against it. AUPIMO integrates each curve over ``ln(shared FPR)`` between the FPR bounds and
divides by ``ln(upper / lower)``.

Implementation (§5.7): each image's relevant scores are sorted once and all thresholds are located with one
vectorised ``searchsorted``, so no pass over all pixels per threshold; :func:`aupimo` evaluates TPRs only on
the thresholds inside the integration range, so its memory is O(K + largest image), not O(N * K). Maps may
be an (N, H, W) array or a sequence of (H_i, W_i) arrays of different sizes.

Deviation from the reference implementations (anomalib 2.7.0, the aupimo repo): thresholds are computed in
float64 whatever the maps' dtype. Results are identical wherever the reference works; float32 maps with a
tiny range relative to their magnitude (e.g. scores in [1000, 1000.75]), where float32 thresholds collide and
the reference raises ``ValueError``, are evaluated instead. The curves are non-increasing by construction,
so the reference's monotonicity re-validation (``RuntimeError``) has no counterpart.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from numpy.typing import NDArray

from anomaly.metrics.classification import ScoresLike, _as_image_pairs

__all__ = ["AupimoResult", "PimoCurves", "aupimo", "pimo_curves"]

_Array = TypeVar("_Array", bound=np.ndarray)

_MIN_POINTS = 30  # n_pts <= this raises unless force=True
_FEW_POINTS = 300  # n_pts < this warns
_BOUND_RTOL = 1e-2  # achieved FPR bounds further than this (relative) from the requested ones warn


@dataclass(frozen=True, slots=True)
class PimoCurves:
    """PIMO curves of a set of images, for plotting ``per_image_tpr[i]`` against ``shared_fpr`` (log x-axis).

    Attributes:
        thresholds: (K,) float64, strictly increasing.
        shared_fpr: (K,) float64, mean per-image FPR of the normal images at each threshold, non-increasing.
        per_image_tpr: (N, K) float64 TPR of each image at each threshold; NaN rows for normal images.
        is_anomalous: (N,) bool, True where the mask has at least one positive pixel.
    """

    thresholds: NDArray[np.float64] = field(repr=False)
    shared_fpr: NDArray[np.float64] = field(repr=False)
    per_image_tpr: NDArray[np.float64] = field(repr=False)
    is_anomalous: NDArray[np.bool_] = field(repr=False)


@dataclass(frozen=True, slots=True)
class AupimoResult:
    """AUPIMO of every image and their summary.

    Attributes:
        per_image: (N,) float64 AUPIMO in [0, 1] per image, in input order; NaN for normal images.
        mean: mean over the anomalous images (anomalib ``AUPIMO(return_average=True)``).
        ci95: 95 % confidence interval of ``mean``, normal approximation
            ``mean +- 1.96 * std(ddof=1) / sqrt(n_anomalous)`` clipped to [0, 1]; (NaN, NaN) with one
            anomalous image.
        n_pts: number of thresholds (curve points) in the integration range.
        fpr_bounds: requested (lower, upper) shared-FPR bounds; the normaliser is ``ln(upper / lower)``.
        fpr_bounds_achieved: shared FPR actually reached at the (lower, upper) bound thresholds.
        threshold_bounds: (lowest, highest) score threshold of the integration range (they achieve the upper
            and the lower FPR bound respectively).
        num_thresholds: number of thresholds ``K`` of the PIMO curves.
    """

    per_image: NDArray[np.float64] = field(repr=False)
    mean: float
    ci95: tuple[float, float]
    n_pts: int
    fpr_bounds: tuple[float, float]
    fpr_bounds_achieved: tuple[float, float]
    threshold_bounds: tuple[float, float]
    num_thresholds: int

    def to_dict(self) -> dict[str, object]:
        """JSON-safe dictionary; NaN values (normal images, the interval of one anomalous image) become ``None``."""
        return {
            "per_image": [None if math.isnan(v) else float(v) for v in self.per_image],
            "mean": self.mean,
            "ci95": [None if math.isnan(v) else v for v in self.ci95],
            "n_pts": self.n_pts,
            "fpr_bounds": list(self.fpr_bounds),
            "fpr_bounds_achieved": list(self.fpr_bounds_achieved),
            "threshold_bounds": list(self.threshold_bounds),
            "num_thresholds": self.num_thresholds,
        }


@dataclass(frozen=True, slots=True)
class _Prepared:
    """Validated inputs: thresholds, shared FPR and the sorted defect scores of the anomalous images."""

    thresholds: NDArray[np.float64]  # (K,)
    shared_fpr: NDArray[np.float64]  # (K,)
    is_anomalous: NDArray[np.bool_]  # (N,)
    defect_scores: list[NDArray[np.generic]]  # one ascending array per anomalous image


def pimo_curves(anomaly_maps: ScoresLike, masks: ScoresLike, *, num_thresholds: int = 300_000) -> PimoCurves:
    """Compute the PIMO curves (full ``(N, K)`` TPR matrix: 8 * N * K bytes).

    Args:
        anomaly_maps: floating-point maps, higher = more anomalous: (N, H, W) or a sequence of (H_i, W_i).
        masks: bool or integer 0/1 ground truth of the same shapes; an image is anomalous iff its mask is
            not empty. At least one normal and one anomalous image are required.
        num_thresholds: number of thresholds ``K`` (int >= 2).

    Returns:
        The curves.

    Raises:
        TypeError: non-integer ``num_thresholds``, non-floating maps, masks neither bool nor integer.
        ValueError: ``num_thresholds < 2``, shape mismatch, non-binary masks, NaN scores, no normal or no
            anomalous image, non-finite or constant normal scores, colliding thresholds.
    """
    prep = _prepare(anomaly_maps, masks, num_thresholds)
    tpr = np.full((prep.is_anomalous.size, num_thresholds), np.nan)
    for i, scores in zip(np.flatnonzero(prep.is_anomalous), prep.defect_scores, strict=True):
        tpr[i] = _rate_at_or_above(scores, prep.thresholds)
    return PimoCurves(_frozen(prep.thresholds), _frozen(prep.shared_fpr), _frozen(tpr), _frozen(prep.is_anomalous))


def aupimo(
    anomaly_maps: ScoresLike,
    masks: ScoresLike,
    *,
    num_thresholds: int = 300_000,
    fpr_bounds: tuple[float, float] = (1e-5, 1e-4),
    force: bool = False,
) -> AupimoResult:
    """Area under each PIMO curve within ``fpr_bounds`` on a log shared-FPR axis, normalised to [0, 1].

    The default lower bound 1e-5 is reachable only with at least 100,000 normal pixels in total (the smallest
    shared FPR is about one pixel of one normal image); otherwise this raises ``ValueError``.

    Args:
        anomaly_maps: floating-point maps, higher = more anomalous: (N, H, W) or a sequence of (H_i, W_i).
        masks: bool or integer 0/1 ground truth of the same shapes.
        num_thresholds: number of thresholds ``K`` (int >= 2).
        fpr_bounds: tuple ``(lower, upper)`` of shared-FPR bounds, ``0 < lower < upper <= 1``.
        force: compute even when the integration range has 30 points or fewer (then only warn).

    Returns:
        Per-image values (NaN for normal images), their mean over anomalous images and 95 % CI, and the
        integration details.

    Raises:
        TypeError: ``fpr_bounds`` not a tuple or bounds not real numbers, plus those of :func:`pimo_curves`.
        ValueError: invalid ``fpr_bounds`` or a bound outside the reachable shared-FPR range, plus those of
            :func:`pimo_curves`.
        RuntimeError: both bounds map to the same threshold, or too few points (unless ``force``).

    Warns:
        UserWarning: achieved bounds more than 1 % off the requested ones, or fewer than 300 points.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> maps = rng.standard_normal((3, 224, 224))  # images 0 and 1 are normal
        >>> masks = np.zeros(maps.shape, dtype=bool)
        >>> masks[2, :20] = True  # image 2: 20 defect rows, 10 always found, 10 never
        >>> maps[2, :10], maps[2, 10:20] = 10.0, -10.0
        >>> result = aupimo(maps, masks)
        >>> round(result.mean, 6), result.per_image[:2]
        (0.5, array([nan, nan]))
    """
    lower, upper = _check_fpr_bounds(fpr_bounds)
    prep = _prepare(anomaly_maps, masks, num_thresholds)
    k_lower = _index_at_fpr(prep.shared_fpr, lower)  # highest threshold index of the range
    k_upper = _index_at_fpr(prep.shared_fpr, upper)  # lowest threshold index of the range
    achieved = (float(prep.shared_fpr[k_lower]), float(prep.shared_fpr[k_upper]))
    _warn_if_not_achieved(achieved, (lower, upper))
    if k_upper >= k_lower:
        raise RuntimeError(
            "The thresholds corresponding to the given 'fpr_bounds' are not valid because they matched the same "
            f"threshold or they are in the wrong order: threshold indices {k_upper} (upper FPR) and "
            f"{k_lower} (lower FPR). Widen the bounds or increase num_thresholds."
        )
    n_pts = k_lower - k_upper + 1
    _check_n_pts(n_pts, force)
    thresholds = prep.thresholds[k_upper : k_lower + 1]
    log_fpr_step = np.diff(np.log(prep.shared_fpr[k_upper : k_lower + 1]))  # <= 0: FPR decreases along k
    per_image = np.full(prep.is_anomalous.size, np.nan)
    for i, scores in zip(np.flatnonzero(prep.is_anomalous), prep.defect_scores, strict=True):
        tpr = _rate_at_or_above(scores, thresholds)
        area = -float(np.dot(log_fpr_step, tpr[:-1] + tpr[1:])) / 2  # trapezoid over ascending ln FPR
        per_image[i] = min(max(0.0, area / math.log(upper / lower)), 1.0)
    values = per_image[prep.is_anomalous]
    return AupimoResult(
        per_image=_frozen(per_image),
        mean=float(values.mean()),
        ci95=_ci95(values),
        n_pts=n_pts,
        fpr_bounds=(lower, upper),
        fpr_bounds_achieved=achieved,
        threshold_bounds=(float(thresholds[0]), float(thresholds[-1])),
        num_thresholds=num_thresholds,
    )


def _prepare(anomaly_maps: ScoresLike, masks: ScoresLike, num_thresholds: int) -> _Prepared:
    """Validate the inputs and compute the thresholds and the shared FPR."""
    if not isinstance(num_thresholds, int | np.integer) or isinstance(num_thresholds, bool):
        raise TypeError(f"Expected the number of thresholds to be an integer, but got {type(num_thresholds)}.")
    if num_thresholds < 2:
        raise ValueError(f"Expected the number of thresholds to be larger than 1, but got {num_thresholds}.")
    pairs = _as_image_pairs(anomaly_maps, masks)
    for s, _ in pairs:
        if s.dtype.kind != "f":
            raise TypeError(f"Expected floating-point anomaly maps, but got dtype {s.dtype}.")
    is_anomalous = np.array([m.any() for _, m in pairs])
    if not is_anomalous.any():
        raise ValueError("Expected at least one ANOMALOUS image, but found none.")
    if is_anomalous.all():
        raise ValueError("Expected at least one NORMAL image, but found none.")
    normal_maps = [s for (s, _), anomalous in zip(pairs, is_anomalous, strict=True) if not anomalous]
    thresholds = _thresholds(normal_maps, num_thresholds)
    defect_scores = [np.sort(s[m]) for (s, m), anomalous in zip(pairs, is_anomalous, strict=True) if anomalous]
    if any(np.isnan(x[-1]) for x in defect_scores):
        raise ValueError("Expected anomaly maps without NaN values in the defect pixels.")
    return _Prepared(thresholds, _shared_fpr(normal_maps, thresholds), is_anomalous, defect_scores)


def _thresholds(normal_maps: list[NDArray[np.generic]], num_thresholds: int) -> NDArray[np.float64]:
    """``num_thresholds`` float64 linspace thresholds between the min and max normal-image score."""
    lo = min(float(s.min()) for s in normal_maps)
    hi = max(float(s.max()) for s in normal_maps)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"Expected finite anomaly maps for the normal images, but got the range [{lo}, {hi}].")
    if hi <= lo:
        raise ValueError(
            "Invalid threshold bounds (min and max score of the normal images). Expected the upper bound to be "
            f"greater than the lower bound, but got {hi} <= {lo}."
        )
    thresholds = np.linspace(lo, hi, num_thresholds)
    if not np.all(np.diff(thresholds) > 0):
        raise ValueError("Expected thresholds to be strictly increasing, but it is not.")
    return thresholds


def _shared_fpr(normal_maps: list[NDArray[np.generic]], thresholds: NDArray[np.float64]) -> NDArray[np.float64]:
    """Mean over the normal images of their FPR at every threshold (every pixel of a normal image is negative)."""
    total = np.zeros(thresholds.size)
    for s in normal_maps:
        total += _rate_at_or_above(np.sort(s, axis=None), thresholds)
    return total / len(normal_maps)


def _rate_at_or_above(sorted_scores: NDArray[np.generic], thresholds: NDArray[np.float64]) -> NDArray[np.float64]:
    """Fraction of ``sorted_scores`` (ascending) that are ``>= t`` for every threshold ``t``."""
    n = sorted_scores.size
    return (n - np.searchsorted(sorted_scores, thresholds, side="left")) / n


def _check_fpr_bounds(fpr_bounds: tuple[float, float]) -> tuple[float, float]:
    """Validate ``0 < lower < upper <= 1`` given as a tuple of real numbers; return them as floats."""
    if not isinstance(fpr_bounds, tuple):
        raise TypeError(f"Expected the bounds to be a tuple, but got {type(fpr_bounds)}.")
    if len(fpr_bounds) != 2:
        raise ValueError(f"Expected the bounds to be a tuple of length 2, but got {len(fpr_bounds)}.")
    for bound in fpr_bounds:
        if not isinstance(bound, int | float | np.integer | np.floating) or isinstance(bound, bool):
            raise TypeError(f"Expected the bounds to be real numbers, but got {type(bound)}.")
        if not 0.0 <= bound <= 1.0:
            raise ValueError(f"Expected rate to be in [0, 1], but got {bound}.")
    lower, upper = float(fpr_bounds[0]), float(fpr_bounds[1])
    if lower == 0.0:
        raise ValueError("Rate cannot be 0.")
    if lower >= upper:
        raise ValueError(f"Expected the upper bound to be larger than the lower bound, but got {upper=} <= {lower=}.")
    return lower, upper


def _index_at_fpr(shared_fpr: NDArray[np.float64], level: float) -> int:
    """Threshold index whose shared FPR is closest to ``level`` (first on ties; last exact 1 for ``level == 1``)."""
    lo, hi = float(shared_fpr[-1]), float(shared_fpr[0])
    if not lo <= level <= hi:
        raise ValueError(
            f"Invalid 'fpr_level' because it's out of the range of 'shared_fpr' = [{lo}, {hi}], and got {level}."
        )
    if level == 1.0:
        return int(np.flatnonzero(shared_fpr == 1.0)[-1])
    return int(np.argmin(np.abs(shared_fpr - level)))


def _warn_if_not_achieved(achieved: tuple[float, float], requested: tuple[float, float]) -> None:
    """Warn for each achieved FPR bound further than 1 % (relative) from the requested one."""
    for name, got, wanted in zip(("lower", "upper"), achieved, requested, strict=True):
        if not math.isclose(got, wanted, rel_tol=_BOUND_RTOL):
            warnings.warn(
                f"AUPIMO: the {name} bound of the shared FPR integration range is not exactly achieved: expected "
                f"{wanted:.3g}, the normal pixels' thresholds reach {got:.3g} at the closest (more than "
                f"{_BOUND_RTOL:.0%} off), and the integral uses that bound",
                stacklevel=3,
            )


def _check_n_pts(n_pts: int, force: bool) -> None:
    """Raise (or, with ``force``, warn) for <= 30 integration points; warn for < 300."""
    msg = (
        "Cannot compute AUPIMO because the shared fpr integration range doesn't have enough points. "
        f"Found {n_pts} points in the integration range. Try increasing num_thresholds."
    )
    if n_pts <= _MIN_POINTS:
        if not force:
            raise RuntimeError(msg)
        warnings.warn(msg + " Computation was forced!", stacklevel=3)
    if n_pts < _FEW_POINTS:
        warnings.warn(
            f"The AUPIMO may be inaccurate because the shared fpr integration range has only {n_pts} points "
            "(< 300). Try increasing num_thresholds.",
            stacklevel=3,
        )


def _ci95(values: NDArray[np.float64]) -> tuple[float, float]:
    """Normal-approximation 95 % CI of the mean, clipped to [0, 1]; (NaN, NaN) for fewer than two values."""
    if values.size < 2:
        return (math.nan, math.nan)
    mean = float(values.mean())
    half = 1.96 * float(values.std(ddof=1)) / math.sqrt(values.size)
    return (max(mean - half, 0.0), min(mean + half, 1.0))


def _frozen(x: _Array) -> _Array:
    """Mark an array read-only so that frozen results stay immutable."""
    x.flags.writeable = False
    return x
