"""Golden and cross-check tests of ``anomaly.metrics`` (ALGORITHMS.md §5 definitions, §6 golden values).

Fixtures S and L are built from the closed-form expressions of §6.1/§6.2 (no RNG). Tolerances follow §6.6:
rationals and float64 results ``1e-12``, AUPIMO ``1e-9``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from anomaly.metrics import (
    AupimoResult,
    aupimo,
    aupro,
    auroc,
    average_precision,
    classification_metrics,
    evaluate,
    f1_max,
    pimo_curves,
)

EXACT = 1e-12
AUPIMO_TOL = 1e-9


# --------------------------------------------------------------------------------------------- fixtures


def _raster(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row, column and raster index ``p = W*r + c`` of a square image."""
    r, c = np.mgrid[0:size, 0:size]
    return r, c, (size * r + c).astype(np.float64)


def _build_s() -> tuple[np.ndarray, np.ndarray]:
    """Fixture S (§6.1): 3 normal + 3 anomalous images, 16x16, float64 maps, int64 masks."""
    r, c, p = _raster(16)
    maps = np.zeros((6, 16, 16))
    masks = np.zeros((6, 16, 16), dtype=np.int64)
    for i in range(3):
        maps[i] = (p + 256 * i + 0.5) / 1024
    masks[3, 4:8, 4:8] = 1
    maps[3] = np.where(masks[3] == 1, 0.875, (p + 0.5) / 1024)
    maps[4] = (p + 0.5) / 2048
    masks[4, 2:4, 2:6] = 1  # component A
    j = 4 * (r - 2) + (c - 2)
    maps[4] = np.where(masks[4] == 1, (740.25 + 3 * j) / 1024, maps[4])
    for k in (10, 11, 12):  # component B, diagonal
        masks[4, k, k] = 1
        maps[4, k, k] = 512.5 / 1024
    masks[5, 12:16, 0:4] = 1
    maps[5][masks[5] == 1] = 0.5
    maps[5, 0, 15] = 767.5 / 1024
    return maps, masks


def _build_l() -> tuple[np.ndarray, np.ndarray]:
    """Fixture L (§6.2): 2 normal + 3 anomalous images, 224x224."""
    _, c, p = _raster(224)
    maps = np.zeros((5, 224, 224))
    masks = np.zeros((5, 224, 224), dtype=np.int64)
    for i in range(2):
        maps[i] = (p + 50176 * i + 0.5) / 2**18
    for n in range(1, 11):
        maps[1, 0, n - 1] = (17 - n) / 16
    maps[2:] = (p + 0.5) / 2**19
    masks[2, 50:60, 50:60] = 1
    maps[2][masks[2] == 1] = 1.25
    masks[3, 100:110, 20:30] = 1
    maps[3] = np.where(masks[3] == 1, (6.5 + (c - 20)) / 16, maps[3])
    masks[4, 150:152, 150:160] = 1
    maps[4][masks[4] == 1] = 2.0
    masks[4, 200:210, 200] = 1
    maps[4, 200:210, 200] = 0.25
    return maps, masks


@pytest.fixture(scope="module")
def fixture_s() -> tuple[np.ndarray, np.ndarray]:
    return _build_s()


@pytest.fixture(scope="module")
def fixture_l() -> tuple[np.ndarray, np.ndarray]:
    return _build_l()


@pytest.fixture(scope="module", params=["S", "L"])
def fixture_any(request: pytest.FixtureRequest) -> tuple[str, np.ndarray, np.ndarray]:
    return request.param, *(_build_s() if request.param == "S" else _build_l())


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    """Trapezoidal rule (``np.trapezoid`` is NumPy >= 2 only)."""
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))


def _image_level(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return maps.max(axis=(1, 2)), masks.any(axis=(1, 2)).astype(np.int64)


def test_fixtures_match_reference_counts(fixture_s, fixture_l):
    (s, sm), (l_, lm) = fixture_s, fixture_l
    assert (sm.size, sm.sum(), (sm == 0).sum(), (sm[:3] == 0).sum()) == (1536, 43, 1493, 768)
    assert (lm.size, lm.sum(), (lm == 0).sum()) == (250880, 230, 250650)
    assert _image_level(s, sm)[0].tolist() == [
        0.24951171875,
        0.49951171875,
        0.74951171875,
        0.875,
        0.743408203125,
        0.74951171875,
    ]
    assert _image_level(l_, lm)[0].tolist() == [0.19140434265136719, 1.0, 1.25, 0.96875, 2.0]


# --------------------------------------------------------------------------------------------- golden §6.3

GOLDEN = {
    "S": {
        "image": (Fraction(5, 6), Fraction(29, 36), Fraction(6, 7)),
        "pixel": (Fraction(118339, 128398), Fraction(1840524474460591, 3453166564778700), Fraction(32, 59)),
        "aupro8": Fraction(3149, 4479),
        "aupro4": Fraction(8212, 13437),
    },
    "L": {
        "image": (Fraction(5, 6), Fraction(11, 12), Fraction(6, 7)),
        "pixel": (Fraction(1910023, 1921650), 0.944410720498261, Fraction(22, 23)),
        "aupro8": Fraction(177299, 200520),
        "aupro4": Fraction(177299, 200520),
    },
}


def test_image_metrics_golden(fixture_any):
    name, maps, masks = fixture_any
    scores, labels = _image_level(maps, masks)
    result = classification_metrics(scores, labels)
    expected = GOLDEN[name]["image"]
    assert_allclose([result.auroc, result.average_precision, result.f1_max], [float(v) for v in expected], atol=EXACT)
    assert auroc(scores, labels) == result.auroc
    assert average_precision(scores, labels) == result.average_precision
    assert f1_max(scores, labels) == result.f1_max


@pytest.mark.parametrize("as_list", [False, True])
def test_pixel_metrics_golden(fixture_any, as_list):
    name, maps, masks = fixture_any
    args = (list(maps), list(masks)) if as_list else (maps, masks)
    result = classification_metrics(*args)
    expected = [float(v) for v in GOLDEN[name]["pixel"]]
    assert_allclose([result.auroc, result.average_precision, result.f1_max], expected, atol=EXACT)


def test_pixel_metrics_float32_equal_float64(fixture_any):
    _, maps, masks = fixture_any
    assert classification_metrics(maps.astype(np.float32), masks) == classification_metrics(maps, masks)


@pytest.mark.parametrize("connectivity", [8, 4])
def test_aupro_golden(fixture_any, connectivity):
    name, maps, masks = fixture_any
    expected = GOLDEN[name][f"aupro{connectivity}"]
    assert aupro(maps, masks, connectivity=connectivity) == pytest.approx(float(expected), abs=EXACT)
    assert aupro(list(maps.astype(np.float32)), list(masks.astype(bool)), connectivity=connectivity) == pytest.approx(
        float(expected), abs=EXACT
    )


def test_aupro_is_not_a_reference_variant(fixture_s):
    """The exact value differs from the coarse variants of §6.4 by far more than the tolerance."""
    value = aupro(*fixture_s)
    for variant in (0.711605548113418, 0.703616878767582, 0.702634529147982):
        assert abs(value - variant) > 4e-4


# --------------------------------------------------------------------------------------------- golden §6.5

AUPIMO_GOLDEN = [
    # fixture, bounds, per anomalous image, mean, n_pts, achieved (lower, upper)
    ("S", (1e-2, 1e-1), [0.983400738180538, 0.491318014330532, 0.0], 0.491572917503690, 26989, (8 / 768, 77 / 768)),
    (
        "L",
        (1e-5, 1e-4),
        [1.0, 0.344023696712321, 0.666666666666667],
        0.670230121126329,
        166408,
        (1 / 100352, 10 / 100352),
    ),
    ("L", (1e-3, 1e-1), [1.0, 1.0, 0.667172458941168], 0.889057486313723, 11371, (100 / 100352, 10035 / 100352)),
]


def _aupimo_quiet(*args, **kwargs) -> AupimoResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return aupimo(*args, **kwargs)


@pytest.mark.parametrize(("name", "bounds", "values", "mean", "n_pts", "achieved"), AUPIMO_GOLDEN)
def test_aupimo_golden(name, bounds, values, mean, n_pts, achieved):
    maps, masks = _build_s() if name == "S" else _build_l()
    n_normal = 3 if name == "S" else 2
    if name == "S":  # achieved lower bound 8/768 is 4 % off 1e-2
        with pytest.warns(UserWarning, match="lower bound .* not exactly achieved"):
            result = aupimo(maps, masks, fpr_bounds=bounds)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            result = aupimo(maps, masks, fpr_bounds=bounds)
    assert np.isnan(result.per_image[:n_normal]).all()
    assert_allclose(result.per_image[n_normal:], values, atol=AUPIMO_TOL)
    assert result.mean == pytest.approx(mean, abs=AUPIMO_TOL)
    assert result.n_pts == n_pts
    assert_allclose(result.fpr_bounds_achieved, achieved, rtol=1e-12)
    assert result.fpr_bounds == bounds
    assert result.num_thresholds == 300_000
    lo, hi = result.threshold_bounds
    assert lo < hi


def test_aupimo_closed_forms(fixture_s, fixture_l):
    s = _aupimo_quiet(*fixture_s, fpr_bounds=(1e-2, 1e-1)).per_image
    assert s[3] == pytest.approx(math.log10(77 / 8), abs=AUPIMO_TOL)
    assert s[4] == pytest.approx(sum(math.log10(77 / m) for m in (28, 25, 22, 19, 16, 13, 10, 8)) / 11, abs=AUPIMO_TOL)
    assert s[5] == 0.0
    l_ = aupimo(*fixture_l).per_image
    assert_allclose(l_[2:], [1.0, 1 - math.log10(math.factorial(10)) / 10, 2 / 3], atol=AUPIMO_TOL)
    wide = aupimo(*fixture_l, fpr_bounds=(1e-3, 1e-1)).per_image
    assert wide[4] == pytest.approx((2 / 3) * math.log(10035 / 100) / math.log(100), abs=AUPIMO_TOL)


def test_aupimo_float32_bit_identical(fixture_any):
    name, maps, masks = fixture_any
    bounds = (1e-2, 1e-1) if name == "S" else (1e-5, 1e-4)
    r64 = _aupimo_quiet(maps, masks, fpr_bounds=bounds)
    r32 = _aupimo_quiet(maps.astype(np.float32), masks, fpr_bounds=bounds)
    assert np.array_equal(r64.per_image, r32.per_image, equal_nan=True)
    assert r64.n_pts == r32.n_pts


def test_aupimo_float32_large_offset_is_computed(fixture_s):
    """Documented deviation: the reference raises (colliding float32 thresholds); float64 thresholds do not."""
    maps, masks = fixture_s
    result = _aupimo_quiet((maps + 1000).astype(np.float32), masks, fpr_bounds=(1e-2, 1e-1))
    assert_allclose(result.per_image[3:], AUPIMO_GOLDEN[0][2], atol=AUPIMO_TOL)
    assert result.n_pts == 26989


def test_aupimo_threshold_count_variants(fixture_l):
    maps, masks = fixture_l
    with pytest.raises(RuntimeError, match="Found 28 points"):
        aupimo(maps, masks, num_thresholds=50)
    with pytest.warns(UserWarning) as record:
        forced = aupimo(maps, masks, num_thresholds=50, force=True)
    messages = " ".join(str(w.message) for w in record)
    assert "Computation was forced" in messages and "may be inaccurate" in messages
    assert forced.n_pts == 28
    assert_allclose(forced.per_image[2:], [1.0, 0.344024, 0.666667], atol=1e-6)
    with pytest.warns(UserWarning, match="may be inaccurate"):
        few = aupimo(maps, masks, num_thresholds=200)
    assert few.n_pts == 111
    assert aupimo(maps, masks, num_thresholds=2000).n_pts == 1110
    for result in (few, aupimo(maps, masks, num_thresholds=2000)):
        assert_allclose(result.per_image[2:], [1.0, 0.344023696712321, 0.666666666666667], atol=1e-6)


def _constant_normals(maps: np.ndarray) -> np.ndarray:
    out = maps.copy()
    out[:3] = 0.5
    return out


def _integer_maps(maps: np.ndarray) -> np.ndarray:
    return (maps * 1024).astype(np.int64)


AUPIMO_ERRORS = [
    # (description, maps transform, masks transform, kwargs, exception, message)
    (
        "default bounds unreachable",
        None,
        None,
        {},
        ValueError,
        r"out of the range of 'shared_fpr' = \[0.0013020833333333333, 1.0\], and got 1e-05",
    ),
    ("only normal images", lambda a: a[:3], lambda m: m[:3], {}, ValueError, "at least one ANOMALOUS image"),
    ("only anomalous images", lambda a: a[3:], lambda m: m[3:], {}, ValueError, "at least one NORMAL image"),
    (
        "constant normal maps",
        _constant_normals,
        None,
        {"fpr_bounds": (1e-2, 1e-1)},
        ValueError,
        "Invalid threshold bounds.*0.5 <= 0.5",
    ),
    ("same threshold", None, None, {"fpr_bounds": (1e-2, 1.05e-2)}, RuntimeError, "matched the same threshold"),
    ("integer maps", _integer_maps, None, {}, TypeError, "floating-point"),
    ("non-binary masks", None, lambda m: 2 * m, {}, ValueError, "binary"),
    ("float masks", None, lambda m: m.astype(np.float64), {}, TypeError, "bool or integer"),
    ("shape mismatch", None, lambda m: m[:, :8], {}, ValueError, "same shape"),
    ("zero lower bound", None, None, {"fpr_bounds": (0.0, 0.1)}, ValueError, "Rate cannot be 0"),
    ("reversed bounds", None, None, {"fpr_bounds": (0.1, 0.01)}, ValueError, "upper bound to be larger"),
    ("bound above 1", None, None, {"fpr_bounds": (0.1, 1.5)}, ValueError, "in \\[0, 1\\]"),
    ("bounds as list", None, None, {"fpr_bounds": [1e-2, 1e-1]}, TypeError, "tuple"),
    ("bounds of length 3", None, None, {"fpr_bounds": (1e-3, 1e-2, 1e-1)}, ValueError, "length 2"),
    ("string bound", None, None, {"fpr_bounds": ("0.01", 0.1)}, TypeError, "real numbers"),
    ("one threshold", None, None, {"num_thresholds": 1}, ValueError, "larger than 1, but got 1"),
    ("float num_thresholds", None, None, {"num_thresholds": 300.0}, TypeError, "integer"),
]


@pytest.mark.filterwarnings("ignore:The lower bound:UserWarning")
@pytest.mark.parametrize(
    ("maps_fn", "masks_fn", "kwargs", "exc", "match"), [e[1:] for e in AUPIMO_ERRORS], ids=[e[0] for e in AUPIMO_ERRORS]
)
def test_aupimo_errors(fixture_s, maps_fn, masks_fn, kwargs, exc, match):
    maps, masks = fixture_s
    maps = maps_fn(maps) if maps_fn else maps
    masks = masks_fn(masks) if masks_fn else masks
    with pytest.raises(exc, match=match):
        aupimo(maps, masks, **kwargs)


def test_pimo_curves_errors_share_validation(fixture_s):
    maps, masks = fixture_s
    with pytest.raises(ValueError, match="NORMAL"):
        pimo_curves(maps[3:], masks[3:])
    with pytest.raises(TypeError):
        pimo_curves(_integer_maps(maps), masks)
    with pytest.raises(ValueError, match="larger than 1"):
        pimo_curves(maps, masks, num_thresholds=1)
    nan_maps = maps.copy()
    nan_maps[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        pimo_curves(nan_maps, masks)


def test_aupimo_threshold_collision_in_float64_raises(fixture_s):
    maps, masks = fixture_s
    tiny = 1e6 + np.where(maps > 0.5, np.spacing(1e6), 0.0)  # two adjacent float64 values
    with pytest.raises(ValueError, match="strictly increasing"):
        aupimo(tiny, masks, fpr_bounds=(1e-2, 1e-1))


# --------------------------------------------------------------------------------------------- PIMO structure


def test_pimo_curves_consistent_with_aupimo(fixture_l):
    maps, masks = fixture_l
    curves = pimo_curves(maps, masks)
    result = aupimo(maps, masks)
    assert curves.thresholds.shape == curves.shared_fpr.shape == (300_000,)
    assert curves.per_image_tpr.shape == (5, 300_000)
    assert curves.is_anomalous.tolist() == [False, False, True, True, True]
    assert np.isnan(curves.per_image_tpr[:2]).all() and not np.isnan(curves.per_image_tpr[2:]).any()
    assert np.all(np.diff(curves.thresholds) > 0) and np.all(np.diff(curves.shared_fpr) <= 0)
    assert np.all(np.diff(curves.per_image_tpr[2:], axis=1) <= 0)
    k_upper = int(np.searchsorted(curves.thresholds, result.threshold_bounds[0]))
    window = slice(k_upper, k_upper + result.n_pts)
    assert curves.thresholds[window][-1] == result.threshold_bounds[1]
    x = np.log(curves.shared_fpr[window])[::-1]
    manual = [_trapezoid(tpr[window][::-1], x) / math.log(10) for tpr in curves.per_image_tpr[2:]]
    assert_allclose(np.clip(manual, 0, 1), result.per_image[2:], atol=1e-12)
    assert not curves.per_image_tpr.flags.writeable


def test_aupimo_result_dataclass(fixture_l):
    result = aupimo(*fixture_l)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.mean = 0.0  # type: ignore[misc]
    with pytest.raises(ValueError):
        result.per_image[0] = 0.0
    values = result.per_image[2:]
    half = 1.96 * values.std(ddof=1) / math.sqrt(3)
    assert result.ci95 == pytest.approx((max(values.mean() - half, 0.0), min(values.mean() + half, 1.0)))
    as_dict = json.loads(json.dumps(result.to_dict()))
    assert as_dict["per_image"][:2] == [None, None]
    assert as_dict["n_pts"] == 166408
    assert "per_image" not in repr(result)


def test_aupimo_single_anomalous_image_has_no_ci(fixture_l):
    maps, masks = fixture_l
    result = aupimo(maps[:3], masks[:3])
    assert result.mean == pytest.approx(1.0, abs=AUPIMO_TOL)
    assert all(math.isnan(v) for v in result.ci95)
    assert json.loads(json.dumps(result.to_dict(), allow_nan=False))["ci95"] == [None, None]  # aupimo.json: no NaN


# --------------------------------------------------------------------------------------------- input errors


@pytest.mark.parametrize(
    ("scores", "labels", "exc", "match"),
    [
        ([0.1, 0.2], [1, 1], ValueError, "both classes"),
        ([0.1, 0.2], [0, 0], ValueError, "both classes"),
        ([0.1, np.nan, 0.3], [0, 1, 1], ValueError, "NaN"),
        ([0.1, 0.2, 0.3], [0, 1], ValueError, "same shape"),
        ([0.1, 0.2], [0, 2], ValueError, "binary"),
        ([0.1, 0.2], [0.0, 1.0], TypeError, "bool or integer"),
        (["a", "b"], [0, 1], TypeError, "real-valued"),
        ([], np.array([], dtype=bool), ValueError, "at least one score"),
    ],
)
def test_classification_errors(scores, labels, exc, match):
    with pytest.raises(exc, match=match):
        classification_metrics(scores, labels)


def test_aupro_errors(fixture_s):
    maps, masks = fixture_s
    with pytest.raises(ValueError, match="no positive"):
        aupro(maps[:3], masks[:3])
    with pytest.raises(ValueError, match="no negative"):
        aupro(maps[3:4, 4:8, 4:8], masks[3:4, 4:8, 4:8])
    with pytest.raises(ValueError, match="connectivity"):
        aupro(maps, masks, connectivity=6)
    for limit in (0.0, 1.5):
        with pytest.raises(ValueError, match="fpr_limit"):
            aupro(maps, masks, fpr_limit=limit)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        aupro(maps[0], masks[0])
    with pytest.raises(ValueError, match="as many label arrays"):
        aupro(list(maps), list(masks[:5]))


# --------------------------------------------------------------------------------------------- random cross-checks


def _random_scores(rng: np.random.Generator, n: int, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """Scores on a coarse grid (many ties, also across classes) and random labels."""
    labels = rng.random(n) < rng.uniform(0.05, 0.6)
    labels[:2] = [False, True]
    scores = (rng.integers(0, rng.integers(3, 60), n) + 2.0 * labels * rng.random(n)).round(1)
    return scores.astype(dtype), labels


def _sklearn_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return float(f1.max())


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int64])
def test_classification_matches_sklearn(seed, dtype):
    rng = np.random.default_rng(seed)
    scores, labels = _random_scores(rng, int(rng.integers(10, 3000)), dtype)
    result = classification_metrics(scores, labels)
    assert result.auroc == pytest.approx(roc_auc_score(labels, scores), abs=EXACT)
    assert result.average_precision == pytest.approx(average_precision_score(labels, scores), abs=EXACT)
    assert result.f1_max == pytest.approx(_sklearn_f1_max(labels, scores), abs=EXACT)
    predicted = scores >= result.f1_threshold
    tp = np.sum(predicted & labels)
    assert 2 * tp / (predicted.sum() + labels.sum()) == pytest.approx(result.f1_max, abs=EXACT)


def test_ragged_sequence_pools_pixels():
    rng = np.random.default_rng(0)
    shapes = [(7, 9), (12, 5), (1, 30), (16, 16)]
    maps = [rng.integers(0, 20, s).astype(np.float32) / 4 for s in shapes]
    masks = [rng.random(s) < 0.2 for s in shapes]
    flat_scores = np.concatenate([m.ravel() for m in maps])
    flat_labels = np.concatenate([m.ravel() for m in masks])
    assert classification_metrics(maps, masks) == classification_metrics(flat_scores, flat_labels)


def _naive_aupro(maps, masks, fpr_limit: float, connectivity: int) -> float:
    """§5.4 literally: one sort of all pixels, two weighted cumsums, last of each tie run, cut, trapezoid."""
    structure = np.ones((3, 3)) if connectivity == 8 else ndimage.generate_binary_structure(2, 1)
    scores, fpr_w, pro_w, n_regions = [], [], [], 0
    for a, m in zip(maps, masks, strict=True):
        lab, n = ndimage.label(m, structure=structure)
        sizes = np.bincount(lab.ravel())
        scores.append(a.ravel().astype(np.float64))
        fpr_w.append((lab == 0).ravel().astype(np.float64))
        pro_w.append(np.where(lab > 0, 1.0 / sizes[lab], 0.0).ravel())
        n_regions += n
    s, fw, pw = (np.concatenate(x) for x in (scores, fpr_w, pro_w))
    order = np.argsort(-s, kind="stable")
    s = s[order]
    fpr = np.cumsum(fw[order]) / fw.sum()
    pro = np.cumsum(pw[order]) / n_regions
    last = np.r_[s[1:] != s[:-1], True]
    fpr, pro = np.r_[0.0, fpr[last]], np.r_[0.0, pro[last]]
    i = int(np.searchsorted(fpr, fpr_limit, side="right"))
    x, y = list(fpr[:i]), list(pro[:i])
    if x[-1] < fpr_limit and i < fpr.size:
        t = (fpr_limit - fpr[i - 1]) / (fpr[i] - fpr[i - 1])
        x.append(fpr_limit)
        y.append(pro[i - 1] + t * (pro[i] - pro[i - 1]))
    return _trapezoid(np.asarray(y), np.asarray(x)) / fpr_limit


def _random_maps(rng: np.random.Generator, shapes, n_normal: int, levels: int):
    """Integer-grid maps (ties within and across classes) with rectangles, lines and diagonal defects."""
    maps, masks = [], []
    for i, shape in enumerate(shapes):
        m = np.zeros(shape, dtype=bool)
        if i >= n_normal:
            for _ in range(rng.integers(1, 4)):
                r, c = rng.integers(0, shape[0] - 3), rng.integers(0, shape[1] - 3)
                m[r : r + rng.integers(1, 4), c : c + rng.integers(1, 4)] = True
            if rng.random() < 0.5:  # a diagonal chain: one region under 8-connectivity, three under 4
                d = np.arange(3) + rng.integers(0, min(shape) - 3)
                m[d, d] = True
        a = rng.integers(0, levels, shape) / 8 + m * rng.integers(0, 3, shape) / 4
        maps.append(a.astype(np.float32 if i % 2 else np.float64))
        masks.append(m)
    return maps, masks


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("connectivity", [8, 4])
def test_aupro_matches_naive_staircase(seed, connectivity):
    rng = np.random.default_rng(seed)
    shapes = [tuple(rng.integers(6, 30, 2)) for _ in range(int(rng.integers(3, 7)))]
    maps, masks = _random_maps(rng, shapes, n_normal=1, levels=int(rng.integers(4, 40)))
    for limit in (0.05, 0.3, 1.0):
        assert aupro(maps, masks, fpr_limit=limit, connectivity=connectivity) == pytest.approx(
            _naive_aupro(maps, masks, limit, connectivity), abs=1e-10
        )


def _naive_aupimo(maps, masks, num_thresholds: int, bounds: tuple[float, float]) -> np.ndarray:
    """§5.5 literally: every pixel compared with every threshold."""
    normal = [a for a, m in zip(maps, masks, strict=True) if not m.any()]
    lo, hi = min(a.min() for a in normal), max(a.max() for a in normal)
    tau = np.linspace(float(lo), float(hi), num_thresholds)
    sfpr = np.mean([(a.reshape(-1, 1) >= tau).mean(axis=0) for a in normal], axis=0)
    k_lower, k_upper = (int(np.argmin(np.abs(sfpr - b))) for b in bounds)
    x = np.log(sfpr[k_upper : k_lower + 1])[::-1]
    out = np.full(len(maps), np.nan)
    for i, (a, m) in enumerate(zip(maps, masks, strict=True)):
        if m.any():
            tpr = (a[m].reshape(-1, 1) >= tau[k_upper : k_lower + 1]).mean(axis=0)[::-1]
            out[i] = np.clip(_trapezoid(tpr, x) / math.log(bounds[1] / bounds[0]), 0, 1)
    return out


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("seed", range(4))
def test_aupimo_matches_naive_on_ragged_sizes(seed):
    rng = np.random.default_rng(seed)
    shapes = [tuple(rng.integers(20, 45, 2)) for _ in range(6)]
    maps, masks = _random_maps(rng, shapes, n_normal=3, levels=400)
    maps = [a + rng.standard_normal(a.shape) * 0.5 if i % 3 else a for i, a in enumerate(maps)]
    bounds = (1e-2, 2e-1)
    result = aupimo(maps, masks, num_thresholds=3000, fpr_bounds=bounds)
    assert_allclose(result.per_image, _naive_aupimo(maps, masks, 3000, bounds), atol=1e-12)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_aupimo_list_equals_stacked(fixture_s):
    maps, masks = fixture_s
    stacked = aupimo(maps, masks, fpr_bounds=(1e-2, 1e-1))
    listed = aupimo(list(maps), list(masks.astype(bool)), fpr_bounds=(1e-2, 1e-1))
    assert np.array_equal(stacked.per_image, listed.per_image, equal_nan=True)


# --------------------------------------------------------------------------------------------- evaluate


def test_evaluate_golden_fixture_l(fixture_l):
    maps, masks = fixture_l
    scores, labels = _image_level(maps, masks)
    result = evaluate(scores, labels, list(maps.astype(np.float32)), list(masks.astype(bool)))
    expected = {
        "image_auroc": 5 / 6,
        "image_ap": 11 / 12,
        "image_f1max": 6 / 7,
        "pixel_auroc": 1910023 / 1921650,
        "pixel_ap": 0.944410720498261,
        "pixel_f1max": 22 / 23,
        "aupro": 177299 / 200520,
        "aupimo": 0.670230121126329,
    }
    assert set(result) == set(expected)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=AUPIMO_TOL if key == "aupimo" else EXACT), key


def test_evaluate_reports_why_aupimo_is_missing(fixture_s):
    maps, masks = fixture_s
    scores, labels = _image_level(maps, masks)
    result = evaluate(scores, labels, maps, masks)
    assert math.isnan(result["aupimo"])
    assert "out of the range" in result["aupimo_error"]
    assert result["aupro"] == pytest.approx(3149 / 4479, abs=EXACT)
    with pytest.raises(ValueError, match="Invalid 'fpr_level'"):
        aupimo(maps, masks)


def test_evaluate_ragged_sizes_match_individual_metrics():
    rng = np.random.default_rng(3)
    shapes = [(40, 50), (30, 30), (50, 20), (45, 45), (35, 60)]
    maps, masks = _random_maps(rng, shapes, n_normal=2, levels=1000)
    maps = [a.astype(np.float32) for a in maps]
    scores = np.array([a.max() for a in maps])
    labels = np.array([m.any() for m in masks])
    result = evaluate(scores, labels, maps, masks, fpr_bounds=(1e-2, 1e-1))
    pixel = classification_metrics(maps, masks)
    assert result["pixel_auroc"] == pixel.auroc
    assert result["pixel_ap"] == pixel.average_precision
    assert result["pixel_f1max"] == pixel.f1_max
    assert result["aupro"] == aupro(maps, masks)
    assert result["aupimo"] == _aupimo_quiet(maps, masks, fpr_bounds=(1e-2, 1e-1)).mean
    assert result["image_auroc"] == auroc(scores, labels)


def test_evaluate_input_errors(fixture_s):
    maps, masks = fixture_s
    scores, labels = _image_level(maps, masks)
    assert set(evaluate(scores, labels)) == {"image_auroc", "image_ap", "image_f1max"}
    with pytest.raises(ValueError, match="both maps and masks"):
        evaluate(scores, labels, maps)
    with pytest.raises(ValueError, match="one map per image"):
        evaluate(scores, labels, maps[:5], masks[:5])


# --------------------------------------------------------------------------------------------- anomalib oracle


@pytest.mark.parametrize("bounds", [(1e-5, 1e-4), (1e-3, 1e-1)])
def test_aupimo_matches_anomalib(fixture_l, bounds):
    """Optional oracle: anomalib's functional AUPIMO (the API the §6.5 golden values come from)."""
    pytest.importorskip("anomalib")
    torch = pytest.importorskip("torch")
    from anomalib.metrics.pimo.functional import aupimo_scores

    rng = np.random.default_rng(0)
    random_maps = rng.standard_normal((6, 224, 224))
    random_masks = np.zeros(random_maps.shape, dtype=np.int64)
    random_masks[3:, 100:130, 90:110] = 1
    random_maps[3:] += 2.5 * random_masks[3:] * rng.random(random_maps[3:].shape)
    for maps, masks in (fixture_l, (random_maps, random_masks)):
        # positional arguments: anomaly_maps, masks, number of thresholds, fpr_bounds, force
        reference = aupimo_scores(torch.from_numpy(maps), torch.from_numpy(masks), 300_000, bounds, False)
        ours = _aupimo_quiet(maps, masks, fpr_bounds=bounds)
        assert_allclose(ours.per_image, reference[4].numpy(), atol=AUPIMO_TOL, equal_nan=True)
        assert ours.n_pts == int(reference[5])


def _earlier_evaluation(folder: Path) -> None:
    """An evaluation folder as `anomaly evaluate --out` leaves it, with maps, and a user's note beside it."""
    from anomaly._fs import OUTPUT_MARKER

    folder.mkdir()
    owned = ["aupimo.json", "ground_truth.json", "metrics.json", "pimo.json"]
    for name in owned:
        (folder / name).write_text('{"earlier": true}')
    (folder / OUTPUT_MARKER).write_text(json.dumps({"owned": owned}))
    (folder / "notes.txt").write_text("mine")


def _evaluate_again(out: Path) -> None:
    """A new evaluation without maps into ``out``: its two files replace the earlier ones, a user's note stays."""
    from anomaly.evaluation import Evaluation, write_evaluation

    write_evaluation(Evaluation({"image_auroc": 0.9}, None, None, None, ["a.png"], [1], [None]), out)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "ground_truth.json",
        "metrics.json",
        "notes.txt",
    ]
    assert json.loads((out / "metrics.json").read_text()) == {"image_auroc": 0.9}


def test_an_evaluation_without_aupimo_removes_an_earlier_ones_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Re-evaluating into the same --out without maps left the first run's aupimo.json and pimo.json, which the
    report then showed as this evaluation's per-image AUPIMO. A user's own file stays."""
    out = tmp_path / "eval"
    _earlier_evaluation(out)
    _evaluate_again(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]  # no temp folder left beside it


def test_an_evaluation_folder_from_before_the_marker_is_replaced_and_keeps_the_users_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Evaluation folders written before outputs listed their own files have no marker: a new evaluation into one
    was refused ("no readable .anomaly-output.json"), though re-evaluating into the same --out is the usual workflow.
    A folder whose metrics.json is not an evaluation's stays refused."""
    from anomaly.errors import DataError
    from anomaly.evaluation import check_evaluation_dir

    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"image_auroc": 0.5}))
    (out / "aupimo.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    check_evaluation_dir(out)
    _evaluate_again(out)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "metrics.json").write_text(json.dumps({"loss": 0.1}))
    with pytest.raises(DataError, match="theirs"):
        check_evaluation_dir(theirs)
    assert [p.name for p in theirs.iterdir()] == ["metrics.json"]


def test_an_evaluation_killed_half_way_leaves_the_earlier_one_whole(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Each file was replaced on its own: a run killed after its metrics.json left the earlier evaluation's
    ground_truth.json beside it (a report read one run's metrics with another's labels), or no aupimo.json."""
    from anomaly import evaluation as module

    out = tmp_path / "eval"
    _earlier_evaluation(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    class Aupimo:
        def to_dict(self) -> dict[str, list[float]]:
            return {"per_image": [0.5]}

    def killed(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "pimo_plot_data", killed)  # the last file of the four
    evaluation = module.Evaluation({"image_auroc": 0.9}, Aupimo(), [], [], ["a.png"], [1], [None])  # type: ignore[arg-type]
    with pytest.raises(KeyboardInterrupt):
        module.write_evaluation(evaluation, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]


def test_an_evaluation_on_a_full_disk_is_one_error_and_leaves_the_earlier_one(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The files are written into the temp folder with plain writes: a full disk raised a bare OSError (a traceback
    from `anomaly benchmark`, which calls write_evaluation directly), where each atomic write had said it in one
    line."""
    from anomaly.errors import DataError
    from anomaly.evaluation import Evaluation, write_evaluation

    out = tmp_path / "eval"
    _earlier_evaluation(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    write_text = Path.write_text

    def full(self: Path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.name == "ground_truth.json":
            raise OSError(28, "No space left on device")
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(DataError, match=r"eval: could not write the evaluation \(No space left on device\)"):
        write_evaluation(Evaluation({"image_auroc": 0.9}, None, None, None, ["a.png"], [1], [None]), out)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]


def test_a_defect_only_set_whose_masks_are_empty_is_one_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """No defect pixel and no normal image: nothing to evaluate, said in one line naming the mask folder."""
    from PIL import Image

    from anomaly.data.datasets import Sample
    from anomaly.errors import DataError
    from anomaly.evaluation import evaluate_samples

    (tmp_path / "ground_truth" / "crack").mkdir(parents=True)
    samples = []
    for i in range(2):
        Image.new("L", (8, 8)).save(tmp_path / "ground_truth" / "crack" / f"{i}_mask.png")
        samples.append(Sample(tmp_path / "test" / "crack" / f"{i}.png", tmp_path / "ground_truth" / "crack" /
                              f"{i}_mask.png", 1, "crack", "test"))  # fmt: skip
    maps = [np.ones((8, 8), np.float32)] * 2
    with pytest.raises(DataError, match=r"ground_truth: no mask has a defect pixel .* no normal image"):
        evaluate_samples([1.0, 2.0], samples, maps)


@pytest.mark.parametrize(("map_size", "eval_size"), [((40, 40), None), ((80, 80), (8, 8))])
def test_a_defect_that_nearest_sampling_drops_keeps_its_image_defective(  # type: ignore[no-untyped-def]
    tmp_path, caplog, map_size, eval_size
) -> None:
    """A mask scaled down (to its image, or to --eval-size) lost a defect of a few pixels whole: its image, defect
    included, then counted as a normal one in AUPIMO's shared FPR, without a word."""
    from PIL import Image

    from anomaly.data.datasets import Sample
    from anomaly.evaluation import evaluate_samples

    (tmp_path / "ground_truth" / "pit").mkdir(parents=True)
    drawn = np.zeros((2, 80, 80), np.uint8)
    drawn[0, 20:60, 20:60] = 255
    drawn[1, 40, 40] = 255  # one pixel that neither size samples
    samples = [Sample(tmp_path / "test" / "good" / "0.png", None, 0, "good", "test")]
    for i, mask in enumerate(drawn):
        Image.fromarray(mask).save(tmp_path / "ground_truth" / "pit" / f"{i}_mask.png")
        samples.append(Sample(tmp_path / "test" / "pit" / f"{i}.png", tmp_path / "ground_truth" / "pit" /
                              f"{i}_mask.png", 1, "pit", "test"))  # fmt: skip
    maps = list(np.random.default_rng(0).random((3, *map_size), dtype=np.float32))
    evaluation = evaluate_samples([0.1, 0.9, 0.8], samples, maps, eval_size)
    assert evaluation.masks is not None and evaluation.masks[2].any()
    assert "1 ground-truth mask(s) lose every defect pixel" in caplog.text and "1_mask.png" in caplog.text


def test_a_map_whose_image_cannot_be_read_keeps_its_size(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Maps are scaled to their test image's size, read from the image: an unreadable image in --root (scored from
    another copy) ended the evaluation, though its map needed nothing."""
    from anomaly.data.datasets import Sample
    from anomaly.evaluation import _at_image_size

    (tmp_path / "broken.png").write_bytes(b"not an image")
    amap = np.ones((6, 9), np.float32)
    (sized,) = _at_image_size([amap], [Sample(tmp_path / "broken.png", None, 0, "good", "test")])
    assert sized is amap


def test_aupimo_on_too_few_normal_pixels_says_which_size_would_do() -> None:
    """The advice was "evaluate at a common size (--eval-size)" even to a user who had given one too small: it now
    names the size at which one normal pixel weighs less than the lower FPR bound."""
    from anomaly.metrics.evaluate import evaluate

    rng = np.random.default_rng(0)
    maps = [rng.random((8, 8)).astype(np.float32) for _ in range(4)]
    masks = [np.zeros((8, 8), bool) for _ in range(4)]
    masks[2][2:4, 2:4] = masks[3][5:7, 1:3] = True
    result = evaluate([0.1, 0.2, 0.9, 0.8], [0, 0, 1, 1], maps, masks)
    assert math.isnan(float(result["aupimo"]))
    assert "With 2 normal image(s), evaluate at a common size of about 224x224 or more" in str(result["aupimo_error"])
    assert 1 / (2 * 224 * 224) <= 1e-5 < 1 / (2 * 223 * 223)


def test_aupimo_on_a_flat_normal_peak_asks_for_normal_images_not_a_size() -> None:
    """Maps upscaled from a coarse grid repeat their maximum over a block that grows with the evaluation size: the
    advice to evaluate at a larger size could never work there (it named a size smaller than the one in use)."""
    from anomaly.metrics.evaluate import evaluate

    rng = np.random.default_rng(0)
    maps = [np.kron(rng.random((6, 6)), np.ones((40, 40))).astype(np.float32) for _ in range(4)]  # 240 x 240
    masks = [np.zeros((240, 240), bool) for _ in range(4)]
    masks[2][10:50, 10:50] = masks[3][100:140, 40:80] = True
    result = evaluate([0.1, 0.2, 0.9, 0.8], [0, 0, 1, 1], maps, masks)
    assert math.isnan(float(result["aupimo"]))
    error = str(result["aupimo_error"])
    # the top normal score fills one 40 x 40 block of one of 2 images: 1600 / 57600 / 2 = 0.0139 (the bound is 1e-5)
    assert "held by 1600 pixel(s) of 2 normal image(s)) already gives 0.0139" in error
    assert "a larger --eval-size does not lower it; add normal test images (about 2778 in all)" in error
    assert "evaluate at a common size" not in error


def test_pimo_json_names_the_images_of_its_curves(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """pimo.json's paths were those of the images labelled defective, its curves those of the images whose mask has
    a defect pixel: a defective image with an empty mask shifted every later curve onto the next image's name."""
    from anomaly.evaluation import Evaluation, write_evaluation

    maps = list(np.random.default_rng(0).standard_normal((3, 256, 256)))
    masks = [np.zeros((256, 256), bool) for _ in range(3)]
    masks[2][100:120, 100:120] = True  # image 1 is labelled defective but its mask is empty
    paths = ["good.png", "empty.png", "crack.png"]
    evaluation = Evaluation({}, _aupimo_quiet(maps, masks), maps, masks, paths, [0, 1, 1], [None, "e.png", "c.png"])
    write_evaluation(evaluation, tmp_path / "eval")
    curves = json.loads((tmp_path / "eval" / "pimo.json").read_text())
    assert curves["paths"] == ["crack.png"] and len(curves["per_image_tpr"]) == 1
