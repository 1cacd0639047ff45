"""Thresholds hold their stated false-positive rate on normal images that took no part in the choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import binomtest, norm

from anomaly.errors import DataError
from anomaly.scorers import get_scorer
from anomaly.thresholds import Threshold, calibrate, pool_threshold


def _normal_images(n: int, seed: int) -> list[torch.Tensor]:
    """Feature maps of 'normal' images: every patch drawn from one Gaussian (8 x 8 grid, 16 channels)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 16, 8, 8, generator=gen)]


def _within_binomial_interval(flagged: int, n: int, target: float) -> bool:
    """``flagged`` lies in the central 95 % range of Binomial(n, target)."""
    from scipy.stats import binom

    lo, hi = binom.ppf(0.025, n, target), binom.ppf(0.975, n, target)
    return lo <= flagged <= hi


@pytest.mark.parametrize("target", [0.01, 0.05])
def test_cross_fitted_memory_bank_threshold_holds_its_rate_on_1500_new_normal_images(target: float) -> None:
    train = _normal_images(1000, seed=1)
    folds = np.arange(1000) % 10  # the default threshold.folds
    scorer = get_scorer("memory_bank", {"coreset_ratio": 0.05})
    decision = calibrate(scorer.cross_fit(train, folds).image_scores, target)
    assert decision.rule == "conformal" and decision.n_normal == 1000
    new = scorer.score(_normal_images(1500, seed=2)).image_scores
    flagged = int(np.sum(new >= decision.image))
    assert _within_binomial_interval(flagged, 1500, target), (flagged, target)


def test_in_sample_scores_would_have_missed_the_target() -> None:
    """The reason for cross-fitting: scores of the fitted images themselves are far too optimistic."""
    train = _normal_images(300, seed=1)
    scorer = get_scorer("memory_bank", {"coreset_ratio": 0.05}).fit(train)
    naive = calibrate(scorer.score(train).image_scores, 0.05)
    new = scorer.score(_normal_images(600, seed=2)).image_scores
    assert np.mean(new >= naive.image) > 0.15


def test_conformal_rank_and_interval_are_exact() -> None:
    scores = np.arange(1.0, 20.0)  # n = 19: the target 0.1 resolves as rank ceil(20 * 0.9) = 18
    decision = calibrate(scores, 0.1)
    assert decision.image == pytest.approx(18.0, rel=1e-9) and decision.rule == "conformal"
    assert not decision.is_anomalous(18.0) and decision.is_anomalous(19.0)  # flagged above the quantile
    assert decision.estimated_fpr == pytest.approx(2 / 20)
    ci = binomtest(1, 19).proportion_ci(0.95)
    assert decision.fpr_interval == pytest.approx((ci.low, ci.high))


@pytest.mark.parametrize("n", [98, 99, 1000])
def test_normal_scores_tied_at_the_conformal_quantile_are_not_flagged(n: int) -> None:
    """Copies of one golden image score 0 out of fold: at the quantile, every new copy was flagged from 99 on."""
    decision = calibrate(np.zeros(n), 0.01)
    assert not decision.is_anomalous(0.0) and decision.fpr_interval is not None and decision.fpr_interval[0] == 0
    rng = np.random.default_rng(0)  # scores 0 or 1, one in ten normal images scoring 1: the 5 % target flags no 0
    decisions = [calibrate((rng.random(200) < 0.1).astype(float), 0.05) for _ in range(50)]
    assert not any(d.is_anomalous(0.0) for d in decisions)
    assert decision.is_anomalous(1e-6) and all(d.is_anomalous(1.5) for d in decisions)  # above them all: flagged


def test_targets_finer_than_the_data_resolves_are_extrapolated_above_every_score() -> None:
    scores = np.random.default_rng(0).normal(size=40)
    decision = calibrate(scores, 0.001)
    assert decision.rule == "tail-gpd" and decision.image > scores.max()
    assert "tail extrapolated" in decision.summary()


@pytest.mark.parametrize("target", [1e-17, 1e-20, 1e-300])  # (a subnormal reads 0 where a library set flush-to-zero)
def test_a_target_finer_than_a_float_resolves_still_gives_a_finite_threshold(target: float) -> None:
    """1 - target rounded to 1 below about 1e-17: the tail's quantile at 1 is infinite, and `anomaly threshold
    --target-fpr 1e-20` wrote that into the model, which every later command then refused to load."""
    scores = np.random.default_rng(0).normal(20, 2, 12)
    decision = calibrate(scores, target)
    assert decision.rule == "tail-gpd" and np.isfinite(decision.image) and decision.image > scores.max()
    assert decision.image >= calibrate(scores, 1e-12).image  # finer targets never lower it
    assert Threshold.from_dict(decision.to_dict()) == decision  # a model keeps it


def test_a_tail_quantile_that_is_not_finite_is_one_error_not_a_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the tail's probability underflows (a subnormal target where a library set flush-to-zero reads 0), the
    quantile is infinite: refused in one line rather than written into the model."""
    from scipy.stats import genpareto

    monkeypatch.setattr(genpareto, "isf", lambda *args, **kwargs: np.inf)
    scores = np.random.default_rng(0).normal(20, 2, 12)
    with pytest.raises(DataError, match=r"cannot choose a threshold: target FPR 1e-20 is too small"):
        calibrate(scores, 1e-20)


@pytest.mark.parametrize("n", [3, 9])
def test_too_few_scores_to_extrapolate_state_the_rate_of_flagging_above_all_of_them(n: int) -> None:
    """Under 10 scores the threshold lies above every one: a new normal image scores higher 1 time in n + 1."""
    rng = np.random.default_rng(0)
    decisions = [calibrate(rng.normal(size=n), 0.01) for _ in range(2000)]
    realised = np.mean([1 - norm.cdf(d.image) for d in decisions])
    assert all(d.rule == "above-all" and d.estimated_fpr == pytest.approx(1 / (n + 1)) for d in decisions)  # no fit
    assert "above every score" in decisions[0].summary() and "extrapolated" not in decisions[0].summary()
    assert realised == pytest.approx(1 / (n + 1), rel=0.1)


def test_separate_map_peaks_give_their_own_pixel_threshold_and_flagged_masks_are_never_empty() -> None:
    decision = calibrate(np.linspace(0, 1, 99), 0.05, peaks=np.linspace(10, 20, 99))
    assert decision.pixel > 10
    assert decision.pixel_for(score=0.99, peak=12.0) == 12.0  # flagged: its own peak is in the mask
    assert decision.pixel_for(score=0.10, peak=12.0) == decision.pixel


def _pool(family: str, n_normal: int, n_anomalous: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    draw = {
        "gaussian": lambda n: rng.normal(10, 1, n),
        "exponential": lambda n: rng.exponential(1, n) + 0.01,
        "lognormal": lambda n: rng.lognormal(0, 0.5, n),
    }[family]
    reference = draw(200_000)
    q50, q999 = np.quantile(reference, [0.5, 0.999])
    anomalous = q999 + rng.exponential(q999 - q50, n_anomalous)  # separable defects
    return np.concatenate([draw(n_normal), anomalous]), reference


@pytest.mark.parametrize("family", ["gaussian", "exponential", "lognormal"])
def test_zero_shot_pool_rule_holds_its_false_positive_share_on_skewed_and_symmetric_pools(family: str) -> None:
    rng = np.random.default_rng(3)
    target, shares, caught = 0.05, [], []
    for anomalous in (10, 50, 100):  # 5 %, 25 % and 50 % of a pool of 200
        for _ in range(2):
            pool, normal = _pool(family, 200 - anomalous, anomalous, rng)
            decision = pool_threshold(pool, target)
            shares.append(np.mean(normal >= decision.image))  # realised share on the normal distribution
            caught.append(np.mean(pool[200 - anomalous :] >= decision.image))
    assert np.mean(shares) <= 2 * target, shares
    assert np.mean(caught) >= 0.6, caught  # and it still flags what the scores separate


def test_zero_spread_pools_flag_nothing() -> None:
    for pool in (np.full(2, 0.3), np.full(200, 0.3)):
        decision = pool_threshold(pool, 0.01)
        assert not any(decision.is_anomalous(s) for s in pool)
        assert decision.is_anomalous(0.31)  # a score above the pool's is flagged: not a threshold that flags nothing


@pytest.mark.parametrize("copies", [4, 5])
def test_a_small_pool_of_copies_flags_the_image_that_differs(copies: int) -> None:
    """Copies of one image (MAD 0) beside another part: median + 3 MAD would pass everything ("nothing stands out")."""
    pool = np.array([0.45] * copies + [460.0])
    decision = pool_threshold(pool, 0.01)
    assert [decision.is_anomalous(s) for s in pool] == [False] * copies + [True]
    assert decision.rule == "pool-small-copies"
    rounding = pool_threshold(np.array([0.5] * copies + [0.5000004]), 0.01)  # float noise, not another image
    assert rounding.rule == "pool-degenerate" and not rounding.is_anomalous(0.5000004)


@pytest.mark.parametrize("n", [3, 12, 90])
def test_a_batch_threshold_never_lies_above_every_score(n: int) -> None:
    """One group of scores (all normal, or all defective as a pool of NEU-Seg's steel defects): the normal quantile
    lies above them all, so the batch's highest score is flagged (CONTRACT: a pool threshold above every score is a
    defect). References, a stream's window and identical scores keep their rules."""
    rng = np.random.default_rng(n)
    pools = [rng.lognormal(0.0, 0.1, n) for _ in range(10)]
    decisions = [pool_threshold(pool, 0.001) for pool in pools]
    assert all(decision.is_anomalous(pool.max()) for pool, decision in zip(pools, decisions))
    top = [[d.is_anomalous(s) for s in pool].count(True) for pool, d in zip(pools, decisions) if d.rule == "pool-top"]
    assert top and set(top) == {1}
    pool = pools[0]
    assert pool_threshold(pool, 0.001, expect_defects=False).image > pool.max()
    assert pool_threshold(np.r_[pool.max() * 1.2, pool], 0.001, n_reference=1).image > pool.max()
    assert pool_threshold(np.full(n, 0.3), 0.001).rule == "pool-degenerate"


def test_references_raise_the_pool_threshold_to_their_highest_score() -> None:
    pool = np.r_[5.0, np.random.default_rng(0).normal(1, 0.1, 50)]
    assert pool_threshold(pool, 0.01, n_reference=1).image >= 5.0


def test_a_small_pool_with_references_is_judged_by_the_references_alone() -> None:
    """Few-shot with one or a few images to judge: median + 3 MAD of the whole pool moved with the image judged (4
    good bottles and a contaminated one: 0.96 over its 0.91). With 3 or more references, their scores alone set
    it, whatever the pool holds; with fewer, the whole pool still does."""
    references = [0.552, 0.584, 0.657, 0.653]  # bottle, `musc`, 4 references (benchmarks/README.md section 13)
    median = np.median(references)
    expected = median + 3 * 1.4826 * np.median(np.abs(np.subtract(references, median)))
    for judged in ([0.909], [0.579], [0.9, 1.2, 0.6], [0.6] * 6 + [1.5]):  # batches of 1 to 7 images
        decision = pool_threshold([*references, *judged], 0.01, n_reference=4)
        assert decision.image == pytest.approx(expected) and decision.rule == "pool-small-references"
    assert decision.is_anomalous(0.909) and not decision.is_anomalous(0.622)
    assert pool_threshold([*references[:2], 0.909], 0.01, n_reference=2).rule == "pool-small"
    rng = np.random.default_rng(0)
    batch = np.r_[rng.normal(0.6, 0.03, 20), rng.normal(1.2, 0.1, 10)]
    three = pool_threshold([*references[:3], *batch], 0.01, n_reference=3)
    assert three.rule == "pool-mixture"  # pools of 8 or more with 3 references keep the mixture


def test_one_or_two_references_never_leave_the_threshold_above_every_score() -> None:
    """2 good and 38 broken bottles (AUROC 1.000) with one reference: the pool's mixture quantile lay above every
    score and nothing was flagged (without the reference its highest score was). Where the highest score is a
    reference's, the batch stays unflagged."""
    batch = np.r_[0.69, 0.77, np.linspace(0.84, 1.28, 38)]
    for references in ([0.579], [0.579, 0.62]):
        decision = pool_threshold([*references, *batch], 0.01, n_reference=len(references))
        assert decision.image <= batch.max() and decision.is_anomalous(batch.max()), decision
    above = pool_threshold([1.5, *batch], 0.01, n_reference=1)  # a reference over every image: its floor stands
    assert above.image == 1.5 and not (batch >= above.image).any()


def test_four_references_judge_a_pool_of_any_size_where_its_mixture_takes_in_the_defects() -> None:
    """A batch mostly defective (glass: 9 good panes among 89) or one continuum of scores (transistor): the whole
    pool's mixture put its normal cluster over nearly every defect; four good references know the normal level."""
    references = [0.552, 0.584, 0.657, 0.653]
    rng = np.random.default_rng(0)
    pool = np.r_[rng.normal(0.6, 0.03, 9), rng.normal(1.2, 0.15, 80)]  # 9 good, 80 defective
    median = np.median(references)
    expected = median + 3 * 1.4826 * np.median(np.abs(np.subtract(references, median)))
    decision = pool_threshold([*references, *pool], 0.01, n_reference=4)
    assert decision.rule == "pool-references" and decision.image == pytest.approx(expected)
    assert (pool[9:] >= decision.image).mean() >= 0.95 and not (pool[:9] >= decision.image).any()
    assert pool_threshold([*references, *pool], 0.01, n_reference=4, expect_defects=False).rule == "pool-mixture"


def test_non_finite_scores_and_malformed_stored_thresholds_are_refused() -> None:
    with pytest.raises(DataError, match="not finite"):
        calibrate([1.0, float("nan")], 0.01)
    good = calibrate(np.arange(100.0), 0.05).to_dict()
    assert Threshold.from_dict(good) == calibrate(np.arange(100.0), 0.05)
    for bad in ([1, 2], {**good, "image": float("nan")}, {**good, "image": "x"}, {"image": 1.0}):
        with pytest.raises(DataError):
            Threshold.from_dict(bad)


def test_a_mostly_defective_pool_with_spread_out_defects_is_still_split_correctly() -> None:
    """Like MVTec's test sets: 76 % defective, defects spread far above a tight normal cluster."""
    rng = np.random.default_rng(5)
    normal = rng.lognormal(np.log(0.07), 0.4, 20)
    defects = rng.uniform(0.22, 0.95, 63)
    decision = pool_threshold(np.r_[normal, defects], 0.01)
    assert np.mean(defects >= decision.image) >= 0.9
    assert np.sum(normal >= decision.image) <= 3


def test_a_pool_whose_low_defects_widen_the_normal_fit_still_flags_its_defects() -> None:
    """MuSc scores of bottle/test resized to 517x333 px (rounded): the BIC-best mixture took every score
    into one wide normal cluster and flagged none of the 63 defects; an equally likely model separates them."""
    normal = [0.058, 0.167, 0.075, 0.014, 0.097, 0.112, 0.362, 0.045, 0.074, 0.061,
              0.106, 0.062, 0.072, 0.144, 0.043, 0.119, 0.107, 0.078, 0.046, 0.097]  # fmt: skip
    defects = [0.701, 0.702, 0.693, 0.834, 0.732, 0.645, 0.757, 0.7, 0.703, 0.632, 0.753, 0.588, 0.622,
               0.685, 0.643, 0.611, 0.669, 0.692, 0.75, 0.684, 0.296, 0.659, 0.624, 0.602, 0.636, 0.47,
               0.619, 0.49, 0.595, 0.598, 0.632, 0.557, 0.603, 0.43, 0.512, 0.57, 0.48, 0.687, 0.648, 0.622,
               0.613, 0.533, 0.66, 0.364, 0.448, 0.222, 0.292, 0.563, 0.677, 0.888, 0.714, 0.632, 0.722,
               0.652, 0.419, 0.78, 0.61, 0.623, 0.316, 0.879, 0.688, 0.29, 0.369]  # fmt: skip
    decision = pool_threshold(np.r_[normal, defects], 0.01)
    # 56 / 63 and no normal image, in any order of the pool; its order used to pick the mixture's local optimum:
    # 56 / 63 in 16 of 40 random orders, 63 / 63 with 1 or 2 normal images flagged in the others
    assert np.mean(np.array(defects) >= decision.image) >= 0.88
    assert np.sum(np.array(normal) >= decision.image) <= 1


def test_a_tight_normal_mode_beside_many_spread_defects_is_found_by_its_separability() -> None:
    """MuSc scores of bottle/test cropped to rows 100-800 (rounded): every mixture within the BIC tie took all
    scores as one skewed mode, so nothing was flagged; Otsu's split is beyond what one Gaussian pool gives."""
    normal = [0.154, 0.18, 0.068, 0.082, 0.062, 0.05, 0.3, 0.076, 0.079, 0.085,
              0.187, 0.07, 0.061, 0.14, 0.018, 0.095, 0.14, 0.024, 0.045, 0.144]  # fmt: skip
    defects = [0.84, 0.818, 0.819, 0.917, 0.743, 0.692, 0.854, 0.83, 0.886, 0.662, 0.825, 0.672, 0.65, 0.773,
               0.662, 0.688, 0.78, 0.808, 0.819, 0.781, 0.275, 0.664, 0.606, 0.666, 0.697, 0.462, 0.662, 0.416,
               0.68, 0.407, 0.697, 0.595, 0.698, 0.586, 0.396, 0.71, 0.536, 0.718, 0.716, 0.689, 0.65, 0.582,
               0.789, 0.428, 0.467, 0.254, 0.296, 0.806, 0.688, 0.882, 0.786, 0.695, 0.802, 0.528, 0.445, 0.849,
               0.311, 0.659, 0.4, 0.886, 0.72, 0.309, 0.387]  # fmt: skip
    decision = pool_threshold(np.r_[normal, defects], 0.01)
    assert np.mean(np.array(defects) >= decision.image) >= 0.9
    assert np.sum(np.array(normal) >= decision.image) <= 1


def test_a_defect_cluster_that_flags_nothing_hands_over_to_the_separability_test() -> None:
    """MuSc scores of 20 good + 20 defective bottle/test images (rounded): the BIC-best mixture saw the defects as a
    cluster, but its log-like transform stretched the normal scores into a component whose quantile lay beyond them."""
    normal = [0.042, 0.166, 0.063, 0.035, 0.086, 0.1, 0.338, 0.046, 0.074, 0.048,
              0.088, 0.058, 0.071, 0.075, 0.044, 0.129, 0.123, 0.089, 0.04, 0.105]  # fmt: skip
    defects = [0.824, 0.709, 0.813, 0.804, 0.774, 0.732, 0.817, 0.702, 0.805, 0.823,
               0.339, 0.658, 0.457, 0.683, 0.571, 0.645, 0.552, 0.576, 0.672, 0.315]  # fmt: skip
    decision = pool_threshold(np.r_[normal, defects], 0.01)
    assert np.mean(np.array(defects) >= decision.image) >= 0.9
    assert np.sum(np.array(normal) >= decision.image) <= 1


def test_the_few_good_images_of_a_mostly_defective_pool_are_its_normal_cluster() -> None:
    """MuSc scores of 4 good and 36 defective bottle/test images (rounded), AUROC 1: a normal cluster had to hold
    20 % of a pool, so it took in defects and 1 of 36 was flagged; its own valley in the scores now lets it stand."""
    normal = [0.683, 0.699, 0.636, 0.616]
    defects = [1.209, 1.143, 1.185, 1.299, 1.107, 1.13, 1.189, 1.169, 1.175, 1.043, 1.161, 1.099, 1.057, 1.192,
               0.993, 1.101, 1.11, 1.06, 1.213, 1.17, 1.214, 1.06, 0.944, 0.741, 0.913, 1.362, 1.224, 1.435, 1.256,
               1.243, 1.282, 1.232, 1.113, 1.322, 1.055, 1.242]  # fmt: skip
    decision = pool_threshold(np.r_[normal, defects], 0.01)
    assert np.mean(np.array(defects) >= decision.image) >= 0.9
    assert np.sum(np.array(normal) >= decision.image) == 0


def test_spread_defects_overlapping_a_tight_normal_mode_without_a_valley_are_flagged() -> None:
    """MuSc zero-shot scores of MVTec AD transistor's whole test folder (60 good, 40 defective; rounded), AUROC 0.95:
    the mixture's second component (defects from 0.85 to 1.56) overlapped the tight normal one without a valley, the
    two were merged as one skewed mode and 1 of 40 defects was flagged."""
    normal = [0.825, 1.041, 0.837, 0.944, 0.994, 0.86, 0.991, 0.869, 0.828, 0.795, 0.921, 0.811, 0.791, 0.805, 0.882,
              0.911, 0.774, 0.85, 0.843, 0.853, 0.901, 0.852, 0.801, 0.816, 0.821, 0.813, 0.88, 0.884, 0.85, 0.891,
              0.788, 0.797, 0.844, 0.866, 0.828, 0.768, 0.811, 0.847, 0.874, 0.794, 0.878, 0.811, 0.869, 0.754, 0.889,
              0.8, 0.836, 0.805, 0.764, 0.817, 0.977, 0.801, 0.797, 0.927, 0.84, 0.865, 0.854, 0.84, 0.836,
              0.863]  # fmt: skip
    defects = [0.947, 0.954, 0.912, 0.889, 0.92, 1.032, 1.153, 1.068, 1.105, 1.045, 1.071, 0.975, 0.853, 1.037, 1.005,
               0.912, 1.003, 0.875, 0.946, 0.952, 1.122, 1.371, 0.878, 1.027, 1.105, 1.033, 1.002, 1.016, 1.299, 1.344,
               1.118, 1.226, 1.021, 1.002, 1.244, 1.33, 1.187, 1.415, 1.561, 1.301]  # fmt: skip
    decision = pool_threshold(np.r_[normal, defects], 0.01)
    assert np.mean(np.array(defects) >= decision.image) >= 0.7
    assert np.mean(np.array(normal) >= decision.image) <= 0.1
    rolling = pool_threshold(np.r_[normal, defects], 0.01, expect_defects=False)  # a line's window: its mode holds 60 %
    assert rolling.image == decision.image


def test_a_window_flags_the_defects_that_stand_far_above_its_tight_normal_mode() -> None:
    """A stream's window (a rolling `musc` pool of bottles): 18 good frames, 5 gray ones between, 2 defects. The
    mixture's tight lowest component and the broad one above it had no valley between them and were merged; their
    quantile (1.25) lay above every score, so the second defect passed (CONTRACT: a threshold above every score of
    its pool is a defect). As in a batch, the tight mode now stands alone."""
    window = [0.339, 0.371, 0.38, 0.381, 0.382, 0.385, 0.393, 0.394, 0.395, 0.4, 0.404, 0.405, 0.409, 0.413, 0.415,
              0.431, 0.433, 0.439, 0.526, 0.555, 0.597, 0.597, 0.681, 1.015, 1.104]  # fmt: skip
    decision = pool_threshold(window, 0.01, expect_defects=False)
    assert decision.is_anomalous(1.015) and not decision.is_anomalous(0.439)


def test_copies_inside_a_normal_pool_are_not_a_tight_mode_of_their_own() -> None:
    """20 normal scores, 6 of them copies of one image at the lower quartile: the copies fitted a component of almost
    no spread, the next one lay 'shifted and broader' beside it, and 10 of 20 images were flagged."""
    rest = np.random.default_rng(0).normal(1.0, 0.05, 14)
    pool = np.r_[np.full(6, np.quantile(rest, 0.25)), rest]
    assert np.sum(pool >= pool_threshold(pool, 0.01).image) <= 2


def test_the_shifted_component_split_leaves_one_mode_pools_alone(monkeypatch) -> None:
    """Normal scores alone (six families, 20-200 scores, seeded): a second, broader component fitted to a skewed or
    heavy-tailed mode must not be taken for a defect group."""
    rng = np.random.default_rng(21)
    families = (
        lambda n: rng.normal(10, 1, n),
        lambda n: rng.exponential(1, n) + 0.01,
        lambda n: rng.lognormal(0, 0.5, n),
        lambda n: rng.lognormal(0, 1.0, n),
        lambda n: rng.gamma(2, 1, n),
        lambda n: 10 + rng.standard_t(3, n),
    )
    pools = [draw(n) for n in (20, 40, 83, 200) for _ in range(2) for draw in families]
    with_split = [pool_threshold(pool, 0.01).image for pool in pools]
    monkeypatch.setattr("anomaly.thresholds._SHIFT_SDS", np.inf)
    without = [pool_threshold(pool, 0.01).image for pool in pools]
    assert sum(a != b for a, b in zip(with_split, without)) <= 1


def test_the_separability_fallback_leaves_one_mode_pools_alone(monkeypatch) -> None:
    """On pools of normal scores alone (three families, seeded) it must almost never fire: it would flag a group."""
    rng = np.random.default_rng(7)
    families = (
        lambda n: rng.normal(10, 1, n),
        lambda n: rng.exponential(1, n) + 0.01,
        lambda n: rng.lognormal(0, 0.5, n),
    )
    pools = [draw(n) for n in (40, 83, 200) for _ in range(8) for draw in families]  # 200: exponential pools fired
    with_fallback = [pool_threshold(pool, 0.01).image for pool in pools]
    monkeypatch.setattr("anomaly.thresholds._null_separability", lambda n, level, min_low=0.1: np.inf)
    without = [pool_threshold(pool, 0.01).image for pool in pools]
    assert sum(a != b for a, b in zip(with_fallback, without)) <= 1


def test_a_mostly_normal_pool_can_refuse_the_equal_evidence_split() -> None:
    """A stream's recent images are mostly good: a near-tie model that splits 64 log-normal normal scores
    (seeded) must not set the threshold there. A batch pool refuses it too since its normal cluster must hold 20 %
    of the pool or more (before, its lowest 14 % of scores were the normal cluster: 86 % of the pool flagged)."""
    from scipy import stats

    pool = np.random.default_rng(131).lognormal(0, 0.5, 64)
    for expect_defects in (False, True):
        kept = pool_threshold(pool, 0.01, expect_defects=expect_defects).image
        assert stats.lognorm.sf(kept, 0.5) <= 0.02  # realised share on the true normal distribution


def test_outlying_training_scores_are_the_far_ones_only() -> None:
    from anomaly.thresholds import outlying_scores

    rng = np.random.default_rng(0)
    normal = rng.lognormal(3.0, 0.15, 200)
    assert not outlying_scores(normal, 10.0).any()  # a clean set loses nothing
    planted = np.concatenate([normal, [normal.max() * 5, normal.max() * 8]])  # about 13 and 16 robust SDs out
    assert np.flatnonzero(outlying_scores(planted, 10.0)).tolist() == [200, 201]
    assert not outlying_scores(planted[-19:], 10.0).any()  # too few scores to call any of them outlying
    many = np.concatenate([normal, np.full(30, normal.max() * 4)])  # 13 %: a second group, not a few mistakes
    assert not outlying_scores(many, 10.0).any()
    assert not outlying_scores(np.concatenate([planted, [0.0]]), 10.0).any()  # no log scale for a zero score


def test_outlying_training_images_are_left_out_of_the_threshold_and_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from anomaly import Detector
    from anomaly.config import apply_overrides, load_config
    from anomaly.data.synthetic import make_synthetic_category

    root = make_synthetic_category(tmp_path, "widget", n_train=24, n_test_good=0, n_test_defect=2, size=128, seed=0)
    good = sorted((root / "train" / "good").glob("*.png"))
    bad = sorted(p for p in (root / "test").glob("*/*.png") if p.parent.name != "good")
    decisions = {}
    for z in ("5", "null"):  # the synthetic defects lie about 9.5 robust SDs out; bottle's real ones 13-16
        config = apply_overrides(
            load_config("patchcore"), ["backbone.image_size=[128,128]", f"threshold.outlier_z={z}"]
        )
        caplog.clear()
        with caplog.at_level("WARNING", logger="anomaly"):
            det = Detector(config).fit(good + bad)
        decisions[z] = det.decision_
        setters = [r.message for r in caplog.records if "set the threshold at" in r.message]
        from_bad = np.isin(det.scorer.bank_image_, [24, 25])  # the bank rows the two defects gave
        if z == "5":
            assert sorted(det.excluded_training_) == sorted(map(str, bad))
            assert not from_bad.any()  # forgotten by the memory bank too
            det.save(tmp_path / "model")
            loaded = Detector.load(tmp_path / "model")
            assert loaded.excluded_training_ == det.excluded_training_
            assert len(loaded.scorer.bank_) == len(det.scorer.bank_)
            assert not setters
        else:
            assert from_bad.any()  # the k-center pick takes a defect's patches first
            (line,) = setters  # kept (the rule is off), they are still named: they set the threshold
            assert line.startswith("fit: 2 training image(s) score far above the others") and str(bad[0]) in line
    assert decisions["5"].n_excluded == 2 and decisions["5"].n_normal == 24
    assert "2 outlying training image(s) left out" in decisions["5"].summary()
    assert decisions["null"].n_excluded == 0 and decisions["null"].n_normal == 26
    assert decisions["5"].image < decisions["null"].image  # the defects no longer set the threshold


def test_a_short_window_of_normal_scores_does_not_split_them() -> None:
    """A stream's first scores (expect_defects=False, fewer than 20): median + 3 MAD, not a mixture. Mixtures
    fitted to 12 log-normal scores flagged 27 % of fresh normal scores on average; the rule about 3 %."""
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(100):
        window = rng.lognormal(0.0, 0.1, 12)
        decision = pool_threshold(window, 0.01, expect_defects=False)
        assert decision.rule == "pool-small"
        rates.append(np.mean(rng.lognormal(0.0, 0.1, 2000) >= decision.image))
    assert np.mean(rates) < 0.05
    assert pool_threshold(rng.lognormal(0.0, 0.1, 12), 0.01).rule != "pool-small"  # batch pools keep 8


def test_a_tiny_batch_of_half_defects_is_split_not_passed_whole() -> None:
    """Below 8 scores median + 3 MAD follows a defective majority and flagged nothing (an audit's 3 good + 3
    defective parts); two groups that separate beyond chance are split at their gap instead."""
    good, bad = [0.59, 0.62, 0.65], [0.93, 0.95, 0.97]
    decision = pool_threshold(good + bad, 0.01)
    assert decision.rule == "pool-small-split" and decision.image == pytest.approx(0.79)
    assert pool_threshold([0.6, 0.62, 0.65, 0.61, 0.63, 0.95], 0.01).rule == "pool-small"  # one defect: the MAD rule
    flat = pool_threshold([0.6, 0.62, 0.65, 0.61, 0.63, 0.64], 0.01)
    assert flat.rule == "pool-top" and flat.image == 0.65  # one group of scores: the highest alone is flagged
    with_refs = pool_threshold([0.66, 0.6, *good, *bad], 0.01, n_reference=2)  # references stay below it
    assert 0.66 <= with_refs.image < 0.93
    streamed = pool_threshold(good + bad, 0.01, expect_defects=False)  # a line's window: no split
    assert streamed.rule == "pool-small"
    equal = pool_threshold([0.5, 0.5, 0.5, 0.5, 0.9, 0.95], 0.01)  # MAD 0: the two defects still stand out
    assert [equal.is_anomalous(s) for s in (0.5, 0.9, 0.95)] == [False, True, True]


def test_a_few_shot_reference_scoring_like_a_defect_is_suspect() -> None:
    from anomaly.thresholds import suspect_references

    owners = ["a", "a", "b", "b", "c", "c", "d", "d"]  # two views per reference; a reference's score is its highest
    scores = np.array([1.0, 1.1, 1.2, 1.0, 0.9, 1.05, 1.0, 2.0])  # d: 2.0 against the others' median 1.1
    assert suspect_references(scores, owners).tolist() == [False] * 6 + [True, True]
    assert not suspect_references(np.where(scores == 2.0, 1.6, scores), owners).any()  # 1.45x: within the bar
    assert not suspect_references(scores[4:], owners[4:]).any()  # two references: which one is off is unknown
    two_high = np.where(np.isin(owners, ["c", "d"]), 2.0, scores)
    assert not suspect_references(two_high, owners).any()  # half of them: no majority to trust
    assert not suspect_references(scores - 1.0, owners).any()  # ratios need positive scores


def test_an_extrapolated_tail_does_not_move_with_the_last_bits_of_the_scores() -> None:
    """24 normal scores whose top five look bounded: the fit's shape had no maximum below -1 and its clipped scale
    was arbitrary, so a relative 1e-6 in the scores (another batch size, --ray) moved the threshold by up to 25 %."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.normal(20, 2, 24)
        thresholds = [calibrate(scores * (1 + 1e-6 * rng.standard_normal(24)), 0.01).image for _ in range(5)]
        assert calibrate(scores, 0.01).rule == "tail-gpd"
        assert np.ptp(thresholds) <= 1e-4 * np.median(thresholds)
        assert min(thresholds) > scores.max()


def test_a_pool_threshold_does_not_depend_on_the_order_of_the_pool() -> None:
    """The mixture was seeded (k-means++) from the scores' positions: the map peaks of one bottle pool (14 good, 10
    defective) given in another order got a threshold of 0.92 instead of 0.63, and 3 verdicts changed."""
    scores = np.array(
        [0.568, 0.623, 0.53, 0.529, 0.568, 0.548, 0.711, 0.527, 0.59, 0.56, 0.602, 0.53, 0.557, 0.562]
        + [1.165, 1.079, 1.172, 1.133, 1.167, 0.739, 1.118, 1.054, 1.167, 0.865]
    )
    rng = np.random.default_rng(0)
    thresholds = {pool_threshold(scores[rng.permutation(len(scores))], 0.01).image for _ in range(12)}
    assert thresholds == {pool_threshold(scores, 0.01).image}
    window = np.r_[rng.lognormal(0, 0.1, 60), rng.lognormal(0.5, 0.2, 15)]  # a stream's window: mostly normal
    thresholds = {
        pool_threshold(window[rng.permutation(len(window))], 0.01, expect_defects=False).image for _ in range(12)
    }
    assert len(thresholds) == 1


@pytest.mark.parametrize("k", [2, 3])
def test_the_one_dimensional_mixture_is_scikit_learns(k: int) -> None:
    """The pool rule's mixtures are fitted by hand for speed: they must be scikit-learn's GaussianMixture (its
    k-means++ seeds, EM and stopping rule), parameters and likelihood, on skewed, two-mode and tied samples."""
    from sklearn.mixture import GaussianMixture

    from anomaly.thresholds import _gaussian_mixture

    rng = np.random.default_rng(3)
    samples = [
        rng.lognormal(0, 0.5, 40),
        np.r_[rng.normal(0, 1, 60), rng.normal(6, 2, 23)],
        np.r_[rng.normal(0, 1, 150), np.full(50, 3.0)],
    ]
    for y in samples:
        y = np.sort(y)
        reg = 1e-6 * float(y.var()) + 1e-12
        gmm = GaussianMixture(k, random_state=0, init_params="k-means++", reg_covar=reg).fit(y[:, None])
        log_lik, means, sds, weights = _gaussian_mixture(y, k, reg)
        assert log_lik == pytest.approx(gmm.score(y[:, None]), rel=1e-9)
        np.testing.assert_allclose(means, gmm.means_.ravel(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(sds, np.sqrt(gmm.covariances_.ravel()), rtol=1e-9)
        np.testing.assert_allclose(weights, gmm.weights_, rtol=1e-9)
