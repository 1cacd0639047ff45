"""Decision thresholds chosen from scores of normal images only, each with its stated guarantee.

* :func:`calibrate` (trained scorers): out-of-sample scores of normal images that never shaped the
  model (K-fold cross-fitting, see ``Scorer.cross_fit``). The threshold is the split-conformal
  quantile, whose false-positive rate on new normal images is at most ``target_fpr`` (finite-sample
  correction included). A target finer than ``1/(n+1)`` cannot be resolved by ``n`` scores: the
  upper tail is then extrapolated with a generalised Pareto fit (peaks over threshold).
  Training images whose score lies far above all the others (:func:`outlying_scores`: probable
  defects in a folder of "good" images) are left out of that quantile, so that two mislabelled
  images cannot lift the threshold over most defects.
* :func:`pool_threshold` (zero-shot pools, no labels): the normal images are the lowest cluster of
  a Gaussian mixture fitted to Box-Cox transformed scores (transform and number of components chosen
  by BIC, so right-skewed normal scores such as log-normal or exponential ones are modelled as well
  as symmetric ones; components not separated from the lowest one join it); the threshold is that
  cluster's ``1 - target_fpr`` quantile. When the BIC-best model sees no defect cluster, a model within
  ``_BIC_TIE`` of it that separates one is used instead (low-scoring defects can hide the valley); failing that,
  Otsu's split of the scores, when it separates them beyond chance and their density has a valley between the
  groups. A batch's threshold never lies above all its scores: with no group apart, its highest score is flagged.

The pixel threshold lives on the map's own scale. When a scorer's image score is the peak of its
post-processed map, both thresholds coincide and a flagged image always has a non-empty mask;
otherwise (re-scored image scores) the pixel threshold is calibrated on the map peaks and capped
per image at the peak of a flagged image's map (see :meth:`Threshold.pixel_for`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from anomaly.errors import DataError

__all__ = [
    "MIN_REFERENCE_RULE",
    "MIN_WINDOW",
    "REFERENCE_RATIO",
    "RELIABLE_POOL_SIZE",
    "Threshold",
    "calibrate",
    "outlying_scores",
    "pool_threshold",
    "robust_z",
    "suspect_references",
]

# Below this many images a pool threshold strays far from its target: synthetic pools of 83 reach 3.2x it, and real
# pools of 20-40 flag most normal images (20 magnetic tiles: 85 %) or no defect (20 + 20: 7 of 9 categories);
# benchmarks/README.md sections 6 (round 10) and 10.
RELIABLE_POOL_SIZE = 80

# Outlying training scores: looked for among at least this many images, and only when at most this share of them
# qualifies (more is a second group of normal images, not a few mislabelled ones).
_OUTLIER_MIN_IMAGES = 20
_OUTLIER_MAX_SHARE = 0.1
REFERENCE_RATIO = 1.5  # a few-shot reference scoring this many times the others' median is suspect
_TAIL_SHARE = 0.2  # peaks over threshold: the top 20 % of the scores model the tail
_MIN_POOL = 8  # below this many scores a mixture cannot be fitted
# A batch under that size with at least this many few-shot references takes median + 3 MAD of the references' scores
# alone: over the whole pool the image judged moves it. 4 good bottles + 1 contaminated one put it at 0.96, over that
# bottle's 0.91, and + 1 good bottle at 0.74; the references alone put it at 0.78 and 0.71.
_MIN_NORMAL_SAMPLE = 3
# From this many references on, a pool of any size takes that rule too (CONTRACT: with references, the verdict comes
# from their score distribution). Over 15 categories, 20 + 20 pools with 4 references, the mixture of the whole pool
# flagged 45 % of the defects (none in 6 pools whose defects outscored every reference) and 5.9 % of the good images;
# the references' rule 61 % and 6.9 %. With 3 references their MAD is too rough: 22 % of the good images flagged.
# benchmarks/README.md section 13.
MIN_REFERENCE_RULE = 4
# A mostly normal window (a stream's recent scores) gets the median + 3 MAD rule below this many scores: mixtures
# fitted to 8-12 normal scores split them, and the threshold fell to their median (bottle streams: 14 of the
# first 80 good frames flagged; benchmarks/README.md section 12).
MIN_WINDOW = 20
_MIN_COMPONENT = 0.1  # a score group (Otsu's lower one, a defect cluster) holds at least 10 % of a pool
_MIN_NORMAL = 0.2  # the normal cluster at least 20 %: a mixture's left-tail component alone is not normal
_MIN_WINDOW_NORMAL = 0.5  # a tight mode standing alone in a line's window of recent scores (mostly normal) holds half
_COPY_MARGIN = 1e-4  # copies of one image score alike to float32 rounding (batching: 1e-6 relative), not closer
_BOXCOX_LAMBDAS = tuple(np.linspace(-1.0, 2.0, 13))  # 0: log-normal, 1/4-1/2: gamma-like, 1: Gaussian
_COMPONENTS = (1, 2, 3)  # normal images, and defects in one or two clusters when there are any
_VALLEY = 0.5  # two clusters: the density between them dips below half the lower peak
# Otsu's two groups (no mixture component draws them) count when the scores' kernel density dips between them below
# 0.9 of the lower of the peaks on either side. Of pure normal pools (five families, 40-400 scores, seeded), up to 19 %
# pass the separability test (exponential ones of 400) and at most 2 % show such a dip. benchmarks/README.md section 10.
_DIP = 0.9
# A normal cluster under _MIN_NORMAL of a pool (the few good images of a mostly defective one) counts when the scores'
# own kernel density dips below a quarter of its peak between it and as many next scores: 4 good and 36 broken bottles
# 0.13, the glass mats' test folder (9 good, 80 defects) 0.004; spurious low clusters of real pools 0.33-0.65 (measured
# to the rest of the pool; benchmarks/README.md section 10).
_APART = 0.25
_SHIFT_SDS = 4.0  # a component this many of the lowest's standard deviations above it, and broader, is a group of
_BROAD_RATIO = 1.0  # its own in a batch (see _shifted_and_broad), unless it is _BROAD_RATIO_MAX times broader or
_BROAD_RATIO_MAX = 10.0  # more: a lowest component that tight is copies of one image (tied scores), not a mode
_BIC_TIE = 2.0  # BIC differences below this are not evidence for either model (Kass & Raftery 1995)
_BIMODAL_LEVEL = 0.99  # two score groups count when they separate better than 99 % of one-Gaussian pools
_SMALL_POOL_LEVEL = 0.95  # ... and in a pool under _MIN_POOL whose median + 3 MAD flags nothing, better than 95 %
_NULL_DRAWS = 400  # simulated one-Gaussian pools behind those levels


@dataclass(frozen=True)
class Threshold:
    """An image threshold and a pixel threshold with how they were chosen.

    Attributes:
        image: an image is flagged when its score is >= this.
        pixel: a map pixel of a flagged image is in the mask when it is >= this (capped per image).
        rule: ``conformal``, ``tail-gpd``, ``above-all``, ``pool-mixture``, ``pool-small``, ``pool-small-split``,
            ``pool-references``, ``pool-small-references``, ``pool-small-copies``, ``pool-top`` or ``pool-degenerate``.
        target_fpr: the false-positive rate asked for.
        n_normal: normal scores the threshold was chosen from.
        estimated_fpr: the false-positive rate the rule expects on new normal images.
        fpr_interval: 95 % Clopper-Pearson interval of the false-positive rate seen on those scores.
        n_excluded: training images left out of the normal scores as outlying (:func:`outlying_scores`).
    """

    image: float
    pixel: float
    rule: str
    target_fpr: float
    n_normal: int
    estimated_fpr: float
    fpr_interval: tuple[float, float] | None = None
    n_excluded: int = 0

    def is_anomalous(self, score: float) -> bool:
        """The verdict for an image score."""
        return bool(score >= self.image)

    def pixel_for(self, score: float, peak: float) -> float:
        """The pixel threshold for one image: a flagged image's map always reaches it."""
        return min(self.pixel, peak) if self.is_anomalous(score) else self.pixel

    def summary(self) -> str:
        """One line for logs and the fit summary."""
        text = f"threshold {self.image:.6g} ({self.rule}, target FPR {self.target_fpr:g}, {self.n_normal} normal scores"
        if self.fpr_interval is not None:
            lo, hi = self.fpr_interval
            text += f"; estimated FPR {self.estimated_fpr:.3g}, seen {lo:.3g}-{hi:.3g} at 95 %"
        if self.rule in ("tail-gpd", "above-all"):
            # under 10 scores (or all equal) nothing is extrapolated: the threshold lies above them all, 1 in n + 1
            # (models saved before "above-all" existed called that "tail-gpd" too)
            how = "above every score" if self.estimated_fpr > self.target_fpr else "tail extrapolated"
            text += f"; finer than the 1/{self.n_normal + 1} the scores resolve: {how}"
        if self.n_excluded:
            text += f"; {self.n_excluded} outlying training image(s) left out"
        return text + ")"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form stored in meta.json."""
        data = asdict(self)
        data["fpr_interval"] = None if self.fpr_interval is None else list(self.fpr_interval)
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str = "threshold") -> Threshold:
        """Rebuild from :meth:`to_dict`, refusing anything malformed or non-finite."""
        if not isinstance(data, dict):
            raise DataError(f"{where}: expected a mapping, got {type(data).__name__}")
        try:
            interval = data.get("fpr_interval")
            out = cls(
                image=float(data["image"]),
                pixel=float(data["pixel"]),
                rule=str(data["rule"]),
                target_fpr=float(data["target_fpr"]),
                n_normal=int(data["n_normal"]),
                estimated_fpr=float(data["estimated_fpr"]),
                fpr_interval=None if interval is None else (float(interval[0]), float(interval[1])),
                n_excluded=int(data.get("n_excluded", 0)),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise DataError(f"{where}: malformed threshold ({exc!r})") from None
        if not all(math.isfinite(v) for v in (out.image, out.pixel, out.target_fpr, out.estimated_fpr)):
            raise DataError(f"{where}: non-finite threshold values")
        return out


def calibrate(scores: ArrayLike, target_fpr: float, peaks: ArrayLike | None = None) -> Threshold:
    """Threshold from out-of-sample scores of normal images (and their map peaks, when they differ)."""
    values = _finite(scores, "normal scores")
    image, rule, estimated = _conformal(values, target_fpr)
    pixel = image if peaks is None else _conformal(_finite(peaks, "normal map peaks"), target_fpr)[0]
    flagged = int(np.sum(values >= image))
    return Threshold(image, pixel, rule, target_fpr, len(values), estimated, _clopper_pearson(flagged, len(values)))


def outlying_scores(scores: ArrayLike, z: float) -> NDArray[np.bool_]:
    """Which scores lie more than ``z`` robust standard deviations above the median, on a log scale.

    The spread is 1.4826 x the median absolute deviation of the log scores. Out-of-fold scores of a
    few defective images among normal ones sit there (bottle with two of its test defects added:
    13-16 against at most 8.3 for the normal images of 13 real categories), while the conformal
    quantile would follow them. Nothing is outlying among fewer than 20 scores, when any score is not
    positive, or when more than 10 % of them would be.
    """
    values = np.asarray(scores, dtype=np.float64).ravel()
    none = np.zeros(values.shape, dtype=bool)
    robust = robust_z(values)
    if len(values) < _OUTLIER_MIN_IMAGES or robust is None:
        return none
    out = robust > z
    return out if out.sum() <= _OUTLIER_MAX_SHARE * len(values) else none


def robust_z(scores: ArrayLike) -> NDArray[np.float64] | None:
    """Each score's distance above the median in robust standard deviations (1.4826 x the MAD), on a log scale;
    None when a score is not positive and finite or the spread is zero."""
    values = np.asarray(scores, dtype=np.float64).ravel()
    if not len(values) or not np.all(np.isfinite(values)) or values.min() <= 0:
        return None
    logs = np.log(values)
    median = float(np.median(logs))
    spread = 1.4826 * float(np.median(np.abs(logs - median)))
    return None if spread <= 0 else (logs - median) / spread


def suspect_references(scores: ArrayLike, owners: Sequence[str]) -> NDArray[np.bool_]:
    """Which reference rows (views, tiles) in a zero-shot pool belong to a reference that scores like a defect.

    ``owners`` names the reference of each row; a reference's score is the highest of its rows. With at least
    3 references, one scoring more than 1.5x the median of the others' is suspect: four good references of
    10 real categories stay within 1.45x of each other (magnetic tiles; most within 1.2x), one defective bottle
    among three good ones scores 1.7-2.4x, a chipped glass pane 3x (benchmarks/README.md section 13). The floor a
    reference sets under the pool threshold would otherwise sit at a defect's level. Nothing is suspect when any
    score is not positive or when half of the references or more would be.
    """
    values = np.asarray(scores, dtype=np.float64).ravel()
    names, owner = np.unique(np.asarray(owners, dtype=str), return_inverse=True)
    none = np.zeros(values.shape, dtype=bool)
    if len(names) < 3 or not np.all(np.isfinite(values)) or values.min() <= 0:
        return none
    per_reference = np.full(len(names), -np.inf)
    np.maximum.at(per_reference, owner, values)
    others = [np.median(np.delete(per_reference, i)) for i in range(len(names))]
    suspect = per_reference > REFERENCE_RATIO * np.asarray(others)
    return suspect[owner] if 2 * suspect.sum() < len(names) else none


def pool_threshold(
    scores: ArrayLike,
    target_fpr: float,
    *,
    peaks: ArrayLike | None = None,
    n_reference: int = 0,
    expect_defects: bool = True,
) -> Threshold:
    """Threshold for one unlabeled pool; the first ``n_reference`` scores are known-good references.

    With references the threshold never falls below the highest reference score, and a batch (``expect_defects``)
    with 4 or more references, or of under 8 images with 3 or more, takes median + 3 MAD of theirs alone.
    ``expect_defects``: the pool may hold many defects (a batch sent for inspection), so when the BIC-best mixture
    sees no defect cluster, an equally likely one that does is used; false for pools known to be mostly normal (a
    production line's recent images), where that would mostly split normal scores.
    """
    values = _finite(scores, "pool scores")
    image, rule = _pool_rule(values, target_fpr, n_reference, expect_defects)
    pixel = image
    if peaks is not None:
        pixel = _pool_rule(_finite(peaks, "pool map peaks"), target_fpr, n_reference, expect_defects)[0]
    return Threshold(image, pixel, rule, target_fpr, len(values), target_fpr)


def _above(value: float) -> float:
    """The smallest margin above ``value`` that survives flush-to-zero (torch sets it; denormals vanish)."""
    return value + max(abs(value) * 1e-12, float(np.finfo(np.float64).tiny))


def _finite(values: ArrayLike, what: str) -> NDArray[np.float64]:
    array = np.asarray(values, dtype=np.float64).ravel()
    if array.size == 0 or not np.all(np.isfinite(array)):
        raise DataError(f"cannot choose a threshold: {what} are empty or not finite")
    return array


def _conformal(values: NDArray[np.float64], alpha: float) -> tuple[float, str, float]:
    """Split-conformal quantile: P(new normal score >= t) <= alpha for exchangeable scores.

    The guarantee is for scores above the quantile, so ``t`` lies just above it: at the quantile, normal scores tied
    with it were flagged too (100 equal scores, a target of 1 %: every new normal image with that score flagged).
    """
    n = len(values)
    rank = math.ceil((n + 1) * (1 - alpha))
    ordered = np.sort(values)
    if rank <= n:
        return _above(float(ordered[rank - 1])), "conformal", (n + 1 - rank) / (n + 1)
    if n < 10 or np.ptp(ordered) == 0:  # nothing to extrapolate from: flag above all seen, 1 in n + 1 new ones
        return _above(float(ordered[-1])), "above-all", 1 / (n + 1)
    return _gpd_tail(ordered, alpha), "tail-gpd", alpha


def _gpd_tail(ordered: NDArray[np.float64], alpha: float) -> float:
    """The 1 - alpha quantile extrapolated from a generalised Pareto fit to the top of 10+ scores."""
    from scipy.stats import genpareto

    n = len(ordered)
    n_tail = max(5, round(_TAIL_SHARE * n))
    u = ordered[n - n_tail - 1]
    excess = ordered[n - n_tail :] - u
    shape, _, scale = genpareto.fit(excess, floc=0)
    if shape < 0:
        # A bounded tail, from 5-8 points: below -1 its likelihood has no maximum (any shape whose upper end sits at
        # the top score), so the fit's scale was arbitrary and a shape clipped to -0.5 kept it: a relative 1e-6 in the
        # scores moved thresholds by up to 25 % (a --ray fit gave another threshold). The exponential tail is the fit
        # at the shape's bound 0: stable, and nine real categories at 20 / 40 images held 1.9 / 1.4 % of normal images
        # flagged (1.6 / 1.2 % before) for 42 / 50 % of defects (36 / 47 %): benchmarks/README.md section 7.
        shape, scale = 0.0, float(excess.mean())
    elif shape > 0.5:  # keep a heavy tail fitted to few points from exploding
        shape, scale = 0.5, float(genpareto.fit(excess, f0=0.5, floc=0)[2])
    # The tail's exceedance probability itself, not 1 - it: below about 1e-17 the level rounded to 1, whose quantile
    # is infinite (a target FPR of 1e-20 gave an infinite threshold that the model then refused to load).
    quantile = float(u + genpareto.isf(alpha * n / n_tail, shape, loc=0, scale=scale))
    if not math.isfinite(quantile):
        raise DataError(f"cannot choose a threshold: target FPR {alpha:g} is too small for these scores")
    return max(quantile, _above(float(ordered[-1])))


def _clopper_pearson(k: int, n: int) -> tuple[float, float]:
    """Exact 95 % binomial interval (the beta quantiles; scipy.special imports in a tenth of scipy.stats' time)."""
    from scipy.special import betaincinv

    low = 0.0 if k == 0 else float(betaincinv(k, n - k + 1, 0.025))
    high = 1.0 if k == n else float(betaincinv(k + 1, n - k, 0.975))
    return low, high


def _pool_rule(values: NDArray[np.float64], alpha: float, n_reference: int, expect_defects: bool) -> tuple[float, str]:
    top = _above(float(values.max()))
    spread = float(np.ptp(values))
    if spread <= 1e-9 * max(1.0, float(np.abs(values).max())):
        return top, "pool-degenerate"  # identical scores: nothing stands out, nothing is flagged
    if expect_defects and n_reference >= _MIN_NORMAL_SAMPLE and len(values) - n_reference < _MIN_POOL:
        # a batch too small for a mixture of its own: the references are normal, the batch may not be
        threshold, rule = _small_pool(values[:n_reference], expect_defects=False)[0], "pool-small-references"
    elif expect_defects and n_reference >= MIN_REFERENCE_RULE:
        # a batch sent for inspection may be mostly defective, or its scores one continuum: its mixture's normal cluster
        # then takes in defects, where the references are normal images by definition
        threshold, rule = _small_pool(values[:n_reference], expect_defects=False)[0], "pool-references"
    elif len(values) < (_MIN_POOL if expect_defects else MIN_WINDOW):
        threshold, rule = _small_pool(values, expect_defects)
    else:
        threshold, rule = _mixture_quantile(values, alpha, expect_defects), "pool-mixture"
    if n_reference:
        threshold = max(threshold, float(values[:n_reference].max()))
    if expect_defects and threshold > values.max() and rule in ("pool-mixture", "pool-small", "pool-small-split"):
        # No score group stands apart (a pool all normal, all defective, or mixed beyond telling): the normal
        # quantile lies above every score. A batch sent for inspection then shows its highest score flagged, never
        # a threshold that flags none of its images whatever they are (NEU-Seg's 90 defective steel images; 1 or 2
        # references, too few for a rule of their own: 2 good and 38 broken bottles, none flagged). Where that
        # score is a reference's, the references' floor stands and no image of the batch is flagged. The references'
        # own rule (4 or more) stands as it is: their scores say what normal is.
        threshold, rule = float(values.max()), "pool-top"
    return float(threshold), rule


def _small_pool(values: NDArray[np.float64], expect_defects: bool) -> tuple[float, str]:
    """Median + 3 MAD of a pool too small for a mixture. In a batch sent for inspection (``expect_defects``) many of
    a few images can be defects: the median and the MAD then follow them and the rule passes them (3 good + 3
    defective images: nothing flagged at an image AUROC of 1). When the rule would pass part of the upper of two
    score groups that split more cleanly than one Gaussian sample of the pool's size does (Otsu on the log scores,
    as :func:`_mixture_quantile` on its transformed ones), the threshold is the middle of the gap between the
    groups; at a lower bar (:data:`_SMALL_POOL_LEVEL`) when the rule would flag nothing at all (benchmarks/README.md
    section 10)."""
    median = float(np.median(values))
    mad = 1.4826 * float(np.median(np.abs(values - median)))
    above = values[values > median + _COPY_MARGIN * (abs(median) or 1.0)]  # not float noise of one image's copies
    if mad > 0:
        threshold = median + 3 * mad
    else:  # most scores equal (copies of one image): any other score stands out
        threshold = float(above.min()) if above.size else _above(float(values.max()))
    if expect_defects and len(values) >= 4:
        ordered = np.sort(values)
        # scores are distances: on a log scale two groups differ by a ratio, and log-normal normal scores are Gaussian
        separability, n_low = _otsu(np.log(ordered) if ordered[0] > 0 else ordered)
        level = _SMALL_POOL_LEVEL if threshold > ordered[-1] else _BIMODAL_LEVEL
        if threshold > ordered[n_low] and separability > _null_separability(len(values), level):
            return 0.5 * float(ordered[n_low - 1] + ordered[n_low]), "pool-small-split"
    return threshold, "pool-small" if mad > 0 else "pool-small-copies" if above.size else "pool-degenerate"


def _mixture_quantile(values: NDArray[np.float64], alpha: float, expect_defects: bool) -> float:
    """1 - alpha quantile of the normal cluster of a Gaussian mixture on Box-Cox transformed scores.

    Transform and number of components are chosen by BIC; the normal cluster is the lowest component,
    merged with the next ones while no density valley separates them. With ``expect_defects``, a pool in
    which that leaves no defect cluster tries an equally likely model, then a significant Otsu split.
    """
    from scipy.special import boxcox, inv_boxcox

    shift = 0.0
    if values.min() <= 0:  # Box-Cox needs positive values: shift by a small fraction of the spread
        low = float(values.min())
        shift = -low + 0.01 * ((float(np.median(values)) - low) or float(np.ptp(values)))
    scale = float(np.median(values + shift))
    x = (values + shift) / scale
    log_x = np.log(x).sum()
    fits: list[tuple[float, float, NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]] = []
    for lam in _BOXCOX_LAMBDAS:
        # sorted: k-means++ seeds the mixture from positions, so the same scores in another order (a pool given in
        # another order) reached other local optima, thresholds 0.63 or 0.93 for one bottle pool
        y = np.sort(boxcox(x, lam))
        jacobian = (lam - 1) * log_x  # makes likelihoods comparable across lambda
        for k in _COMPONENTS:
            if k == 1:  # closed form
                mean, var = float(y.mean()), float(y.var()) + 1e-12
                log_lik = -0.5 * len(y) * (math.log(2 * math.pi * var) + 1)
                params = (np.array([mean]), np.array([math.sqrt(var)]), np.array([1.0]))
            else:
                mean_log_lik, *fitted = _gaussian_mixture(y, k, reg_covar=1e-6 * float(y.var()) + 1e-12)
                log_lik = mean_log_lik * len(y)
                params = (fitted[0], fitted[1], fitted[2])
            fits.append((-2 * (log_lik + jacobian) + (3 * k - 1) * math.log(len(y)), lam, *params))
    fits.sort(key=lambda fit: fit[0])
    _, lam, means, sds, weights = fits[0]

    def apart(weight: float) -> bool:  # the lowest ``weight`` of the scores stands apart from as many next ones
        n_low = min(len(x) - 2, max(2, round(weight * len(x))))
        return _density_dips(x, n_low, _APART, n_next=n_low)

    normal = _normal_cluster(means, sds, weights, apart, expect_defects)
    if expect_defects and len(normal) == len(means):
        # The best model sees no defect cluster. A model the data cannot tell from it (BIC within
        # _BIC_TIE) that does see one is taken instead: low-scoring defects can widen a normal component
        # until no valley is left (20 normal + 63 defective bottles at 517x333 px: nothing flagged).
        for bic, other_lam, other_means, other_sds, other_weights in fits[1:]:
            if bic - fits[0][0] > _BIC_TIE:
                break
            cluster = _normal_cluster(other_means, other_sds, other_weights, apart, expect_defects)
            if other_weights[cluster].sum() <= 1 - _MIN_COMPONENT:  # a defect cluster of some size
                lam, means, sds, weights, normal = other_lam, other_means, other_sds, other_weights, cluster
                break

    def normal_quantile() -> float:  # the normal cluster's 1 - alpha quantile on the scores' scale (inf: beyond)
        quantile = float(inv_boxcox(_mixture_ppf(1 - alpha, means[normal], sds[normal], weights[normal]), lam))
        return quantile * scale - shift if math.isfinite(quantile) else math.inf

    if expect_defects and len(normal) < len(means) and normal_quantile() > values.max():
        # A defect cluster that nothing is flagged in: a strongly concave transform can stretch the
        # normal scores into one wide component whose quantile lies beyond every defect (20 normal +
        # 20 defective bottles). The model contradicts itself; the test below decides instead.
        normal = list(range(len(means)))
    if expect_defects and len(normal) == len(means):
        # No defect cluster. A tight normal mode next to many spread defects can be fitted as one
        # skewed mode (20 normal + 63 defective bottles cropped to 700x900 px: nothing flagged). If the
        # scores split into two groups more cleanly than one Gaussian sample of the pool's size does
        # (Otsu's separability beyond its 99th percentile) and the scores' own density dips between them, the lower
        # group (20 % or more) is the normal cluster. Without the dip, one skewed mode that the transform leaves
        # short-tailed on one side split as often as 6 % of pure exponential pools of 200 (their 20-55 % flagged).
        # A lower group of 10-20 % (the few good images of a mostly defective pool) needs the deeper dip of apart().
        y = boxcox(x, lam)
        separability, n_low = _otsu(y, _MIN_NORMAL)
        found = separability > _null_separability(len(y), _BIMODAL_LEVEL, _MIN_NORMAL) and _density_dips(x, n_low)
        if not found:
            separability, n_low = _otsu(y, _MIN_COMPONENT)
            found = separability > _null_separability(len(y), _BIMODAL_LEVEL) and apart(n_low / len(y))
        if found:
            lows = np.sort(y)[:n_low]
            means, sds, weights, normal = np.array([lows.mean()]), np.array([lows.std() + 1e-12]), np.array([1.0]), [0]
    threshold = normal_quantile()
    return threshold if math.isfinite(threshold) else _above(float(values.max()))  # beyond the transform's range


def _gaussian_mixture(
    y: NDArray[np.float64], k: int, reg_covar: float
) -> tuple[float, NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """(mean log-likelihood, means, standard deviations, weights) of scikit-learn's ``GaussianMixture(k,
    random_state=0, init_params="k-means++", reg_covar=reg_covar)`` fitted to the 1-D values ``y``: its seeds
    (:func:`sklearn.cluster.kmeans_plusplus`), its EM updates and its stopping rule (mean log-likelihood change
    under 1e-3, at most 100 iterations), written for one dimension. By hand because the estimator's input checks and
    1 x 1 Cholesky factors took 4 ms a fit, and a pool threshold fits 26 mixtures: 0.1 s of each 0.6 s frame of a
    production line (``musc``, a pool of 64 bottles, 2 cores), 0.03 s with these; the thresholds are the same."""
    from sklearn.cluster import kmeans_plusplus

    _, seeds = kmeans_plusplus(y[:, None], k, random_state=0)
    resp = np.zeros((len(y), k))
    resp[seeds, np.arange(k)] = 1.0

    def m_step(resp: NDArray[np.float64]) -> tuple[NDArray[np.float64], ...]:
        counts = resp.sum(0) + 10 * np.finfo(np.float64).eps
        means = resp.T @ y / counts
        variances = (resp * np.square(y[:, None] - means)).sum(0) / counts + reg_covar
        return counts, means, variances

    def e_step() -> tuple[NDArray[np.float64], NDArray[np.float64]]:  # per value: log p(y), log responsibilities
        precision = 1 / np.sqrt(variances)
        weighted = (
            -0.5 * (math.log(2 * math.pi) + np.square(y[:, None] * precision - means * precision))
            + np.log(precision)
            + np.log(weights)
        )
        top = weighted.max(1)
        log_norm = top + np.log(np.exp(weighted - top[:, None]).sum(1))  # scipy's logsumexp: 0.2 ms of checks a call
        return log_norm, weighted - log_norm[:, None]

    counts, means, variances = m_step(resp)
    weights = counts / len(y)
    bound = -math.inf
    for _ in range(100):
        previous = bound
        log_norm, log_resp = e_step()
        bound = float(log_norm.mean())
        counts, means, variances = m_step(np.exp(log_resp))
        weights = counts / counts.sum()
        if abs(bound - previous) < 1e-3:
            break
    return float(e_step()[0].mean()), means, np.sqrt(variances), weights


def _normal_cluster(
    means: NDArray[np.float64],
    sds: NDArray[np.float64],
    weights: NDArray[np.float64],
    apart: Callable[[float], bool],
    expect_defects: bool = False,
) -> list[int]:
    """The lowest component, grown by the next ones while no density valley separates them, or while it holds
    under ``_MIN_NORMAL`` of the pool, unless it holds ``_MIN_COMPONENT`` and ``apart`` (its share) finds a valley
    in the scores themselves: a left-tail component that a transform stretched apart has none there, the few good
    images of a mostly defective pool do (4 good and 36 broken bottles: 1 of 36 flagged at an AUROC of 1).

    A lowest component of ``_MIN_NORMAL`` or more (``_MIN_WINDOW_NORMAL`` in a line's window, without
    ``expect_defects``) also stands alone when the next one is :func:`_shifted_and_broad` from it, valley or not:
    defects spread over a wide range overlap a tight normal mode without a dip between them (MVTec AD transistor's
    60 good and 40 defective images, zero-shot: 1 of 40 flagged; a line's window of 18 good bottles, 5 gray ones
    and 2 defects: the merged modes' quantile lay above every score)."""
    order = np.argsort(means)
    normal = [int(order[0])]
    for j in order[1:]:
        share = float(weights[normal].sum())
        if share >= _MIN_COMPONENT and _valley_between(normal, int(j), means, sds, weights):
            if share >= _MIN_NORMAL or apart(share):
                break
        # a tight mode may stand alone; in a line's window (mostly normal) only when it holds half the scores or more:
        # the floor of 1 + exponential scores fits a tight component of 20-25 % (71 % of a window flagged)
        alone = len(normal) == 1 and share >= (_MIN_NORMAL if expect_defects else _MIN_WINDOW_NORMAL)
        if alone and _shifted_and_broad(normal[0], int(j), means, sds):
            break
        normal.append(int(j))
    return normal


def _shifted_and_broad(low: int, j: int, means: NDArray[np.float64], sds: NDArray[np.float64]) -> bool:
    """Whether component ``j`` lies ``_SHIFT_SDS`` of component ``low``'s standard deviations above it and is broader:
    a group of its own, not the tail of one skewed mode (the Box-Cox transform before the mixture leaves a skewed mode
    about symmetric; its tail, where two Gaussians still fit it, stays within a few of the core's deviations); but not
    ``_BROAD_RATIO_MAX`` times broader or more, where the lowest is tied scores (copies of one image). On 1,440
    seeded one-mode pools of eight families, 20-200 scores, two thresholds moved (a t(3) pool: 1 -> 4 of 130
    flagged): benchmarks/README.md section 6, round 29."""
    ratio = sds[j] / max(float(sds[low]), 1e-300)
    return bool(means[j] - means[low] > _SHIFT_SDS * sds[low] and _BROAD_RATIO < ratio < _BROAD_RATIO_MAX)


def _valley_between(
    cluster: list[int], j: int, means: NDArray[np.float64], sds: NDArray[np.float64], weights: NDArray[np.float64]
) -> bool:
    """Whether the mixture density dips between the cluster's highest peak and component ``j``'s mean.

    A skewed normal mode fitted by two Gaussians has no dip between them; normal images and defects do.
    """
    from scipy.stats import norm

    members = [*cluster, j]

    def density(t: NDArray[np.float64]) -> NDArray[np.float64]:
        return np.sum(weights[members, None] * norm.pdf(t[None, :], means[members, None], sds[members, None]), axis=0)

    start = means[cluster][np.argmax(weights[cluster] / sds[cluster])]
    grid = np.linspace(start, means[j], 65)
    values = density(grid)
    return bool(values.min() < _VALLEY * min(values[0], values[-1]))


def _density_dips(y: NDArray[np.float64], n_low: int, depth: float = _DIP, n_next: int | None = None) -> bool:
    """Whether a kernel density estimate of ``y`` (half Scott's bandwidth) has a valley between the median of its
    lowest ``n_low`` values and the median of the others (of the next ``n_next`` only, when given): a minimum below
    ``depth`` of the highest density on either side of it (a tail falling away has none). The nonparametric form of
    :func:`_valley_between`, for a split that no mixture component draws."""
    from scipy.stats import gaussian_kde

    z = np.sort(y)
    upper = z[n_low:] if n_next is None else z[n_low : n_low + n_next]
    grid = np.linspace(np.median(z[:n_low]), np.median(upper), 65)
    values = gaussian_kde(z, lambda kde: kde.scotts_factor() / 2)(grid)  # spread-out defects widen Scott's
    low = int(np.argmin(values))  # a valley has a peak on either side of it (a tail falling away has none)
    return bool(values[low] < depth * min(values[: low + 1].max(), values[low:].max()))


def _mixture_ppf(q: float, means: NDArray[np.float64], sds: NDArray[np.float64], weights: NDArray[np.float64]) -> float:
    """Quantile of a 1-D Gaussian mixture (bisection on its CDF)."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    w = weights / weights.sum()
    lo, hi = float(np.min(means - 10 * sds)), float(np.max(means + 10 * sds))
    return float(brentq(lambda t: float(np.sum(w * norm.cdf(t, means, sds))) - q, lo, hi))


def _otsu(y: NDArray[np.float64], min_low: float = _MIN_COMPONENT) -> tuple[float, int]:
    """Otsu's split of 1-D values into a lower group (at least ``min_low`` of them) and an upper one.

    Returns the between-group share of the variance (separability, 0..1) and the size of the lower group.
    """
    z = np.sort(y)
    n = len(z)
    sizes = np.arange(max(2, math.ceil(min_low * n)), n - 1)
    low_sums = np.cumsum(z)[sizes - 1]
    gap = low_sums / sizes - (z.sum() - low_sums) / (n - sizes)
    between = sizes * (n - sizes) / n * gap**2
    best = int(np.argmax(between))
    return float(between[best] / max(float(z.var()) * n, 1e-300)), int(sizes[best])


@functools.lru_cache(maxsize=64)
def _null_separability(n: int, level: float, min_low: float = _MIN_COMPONENT) -> float:
    """The ``level`` quantile of Otsu's separability (lower group at least ``min_low``) over seeded samples of ``n``
    Gaussian values."""
    rng = np.random.default_rng(0)
    return float(np.quantile([_otsu(rng.standard_normal(n), min_low)[0] for _ in range(_NULL_DRAWS)], level))
