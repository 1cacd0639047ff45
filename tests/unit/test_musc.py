"""MuSc core: LNAMD, mutual scoring (blocked kernel vs brute force), RsCIN golden values (§6.7)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from anomaly import Detector
from anomaly.config import apply_overrides, load_config
from anomaly.errors import ConfigError
from anomaly.scorers import musc
from anomaly.scorers.musc import MuScScorer, RollingPool, lnamd, msm_flops, mutual_scores, rscin


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors, thousands of ops: OpenMP barriers dominate on oversubscribed CI cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def chord(deg: float) -> float:
    return 2 * math.sin(math.radians(deg) / 2)


def toy(n: int) -> torch.Tensor:
    """§6.7 toy set: z_ip = (cos θ, sin θ), θ = (10p + i)°, last image's patch 3 at 90°."""
    theta = torch.tensor([[10.0 * p + i for p in range(4)] for i in range(n)], dtype=torch.float64)
    theta[-1, 3] = 90.0
    rad = torch.deg2rad(theta)
    return torch.stack([rad.cos(), rad.sin()], dim=-1)


def toy_tokens(n: int) -> torch.Tensor:
    rad = torch.deg2rad(torch.arange(n, dtype=torch.float64) ** 2)
    return torch.stack([rad.cos(), rad.sin()], dim=-1)


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def brute_force(z, reference=None, interval=(0.0, 0.3), window=None, grid=None, exclude=None):
    """Direct distances (cdist) per image pair, sorted in full: the definition of §3.3 (``exclude[i]``: the images
    that i skips; the interval's ranks then count the others less the longest such list)."""
    n, length, _ = z.shape
    others_all = list(z) + ([] if reference is None else list(reference))
    mask = None
    if window is not None:
        y, x = torch.arange(length) // grid[1], torch.arange(length) % grid[1]
        mask = ((y[:, None] - y[None, :]).abs() > window) | ((x[:, None] - x[None, :]).abs() > window)
    out = torch.empty(n, length, dtype=z.dtype)
    skipped = [set()] * n if exclude is None else [set(int(j) for j in e) for e in exclude]
    compared = len(others_all) - 1 - max(len(e) for e in skipped)
    for i in range(n):
        mins = []
        for j in range(len(others_all)):
            if j != i and j not in skipped[i]:
                d = torch.cdist(z[i], others_all[j])
                if mask is not None:
                    d = d.masked_fill(mask, math.inf)
                mins.append(d.min(dim=1).values)
        mins = torch.stack(mins, dim=1).sort(dim=1).values
        lo, hi = musc._interval_bounds(interval, compared)
        out[i] = mins[:, lo:hi].mean(dim=1)
    return out


# ---------------------------------------------------------------- golden values (§6.7)

N11 = {
    0: [0.034903929, 0.011635381, 0.011635381, 0.011635381],
    1: [0.023270318, 0.017453071, 0.017453071, 0.017453071],
    9: [0.017453071, 0.017453071, 0.017453071, 0.034903929],
    10: [0.011635381, 0.011635381, 0.011635381, 0.876720011],
    **{i: [0.023270318] * 4 for i in range(2, 9)},
}
RSCIN = {
    (1,): [0.013631279] + [0.0] * 8 + [0.013631279, 1.0],
    (1, 2, 3): [0.008331707, 0.003786832, 0.001512817, 0, 0, 0, 0, 0, 0.001486953, 0.117044230, 0.629447760],
    (1, 8, 9): [0.005750512, 0.001199221, 0.001177144, 0.001141742, 0.001094055, 0.001033747,
                0.000451269, 0.001050949, 0.079714553, 0.113697019, 0.497422568],
}  # fmt: skip


def test_msm_golden_n6():
    s = mutual_scores(toy(6))
    expected = torch.full((6, 4), 0.017453071, dtype=torch.float64)
    expected[5, 3] = 0.938943148
    assert chord(56) == pytest.approx(0.938943148, abs=1e-7)
    torch.testing.assert_close(s, expected, atol=1e-6, rtol=0)


def test_msm_golden_n11():
    s = mutual_scores(toy(11))
    expected = torch.tensor([N11[i] for i in range(11)], dtype=torch.float64)
    torch.testing.assert_close(s, expected, atol=1e-6, rtol=0)
    image = s.max(dim=1).values.numpy()
    np.testing.assert_allclose(image, [0.034903929] + [0.023270318] * 8 + [0.034903929, 0.876720011], atol=1e-6)


@pytest.mark.parametrize("k_list", list(RSCIN))
def test_rscin_golden_reference_semantics(k_list):
    image = mutual_scores(toy(11)).max(dim=1).values
    out = rscin(image, toy_tokens(11), k_list, clamp_negative=False)
    assert out.dtype == np.float64 and out.shape == (11,)
    np.testing.assert_allclose(out, RSCIN[k_list], atol=1e-6)


def test_rscin_clamped_similarities():
    """Default clamps cos < 0: only image 10 with k ∈ {8, 9} keeps tokens 91° and 96° away."""
    image = mutual_scores(toy(11)).max(dim=1).values
    for k_list, golden in RSCIN.items():
        out = rscin(image, toy_tokens(11), k_list)
        if k_list == (1, 8, 9):
            np.testing.assert_allclose(out[:10], golden[:10], atol=1e-6)
            assert out[10] == pytest.approx(0.494663412, abs=1e-6)  # float64 re-computation
        else:
            np.testing.assert_allclose(out, golden, atol=1e-6)


def test_rscin_edge_cases():
    tokens = toy_tokens(6)
    out = rscin(np.arange(6.0), tokens, (1, 8, 9))  # the reference raises for N < max(k)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(rscin(np.ones(6), tokens), np.zeros(6))
    np.testing.assert_allclose(rscin(np.arange(6.0), tokens, (1,)), np.arange(6.0) / 5)
    with pytest.raises(ValueError):
        rscin(np.arange(6.0), tokens, ())
    with pytest.raises(ValueError):
        rscin(np.arange(6.0), tokens[:5])


@pytest.mark.parametrize("n", [2, 3, 4])
def test_small_sets_are_finite(n):
    """The reference returns NaN for N ≤ 4 (k = 0); we average the single nearest image."""
    s = mutual_scores(toy(n))
    assert torch.isfinite(s).all()
    if n > 2:
        torch.testing.assert_close(s[:-1], torch.full((n - 1, 4), chord(1), dtype=torch.float64))


def test_one_image_without_references_raises():
    with pytest.raises(ValueError, match="at least 2 images"):
        mutual_scores(toy(1))


def test_interval_bounds():
    assert musc._interval_bounds((0.0, 0.3), 10) == (0, 3)
    assert musc._interval_bounds((0.0, 0.3), 3) == (0, 1)  # at least one term
    assert musc._interval_bounds((0.3, 0.0), 10) == (0, 3)  # swapped
    assert musc._interval_bounds((2, 5), 10) == (2, 5)  # absolute counts
    assert musc._interval_bounds((0.0, 50), 10) == (0, 10)  # clamped to n_others
    with pytest.raises(ValueError):
        mutual_scores(toy(6), interval=(-0.1, 0.3))


# ---------------------------------------------------------------- blocked kernel


def plan_for(z, budget_mb, reference=None, window=None, grid=None):
    n, length, c = z.shape
    m = 0 if reference is None else reference.shape[0]
    n_others = n - 1 + m
    top = musc._interval_bounds((0.0, 0.3), n_others)[1]
    width = None if grid is None else grid[1]
    budget = int(budget_mb * 2**20)
    return musc._plan(
        n=n, length=length, length_other=length, c=c, n_others=n_others, top=top, elem=8, buf_elem=8,
        budget=budget, window=window, width=width, cpu=True,
    )  # fmt: skip


@pytest.mark.parametrize("budget_mb", [512, 1e-2, 2e-3, 3e-4, 1e-6])
@pytest.mark.parametrize("interval", [(0.0, 0.3), (0.1, 0.7), (0.0, 3)])
def test_blocked_equals_brute_force(budget_mb, interval):
    z = unit(9, 12, 5)
    expected = brute_force(z, interval=interval)
    got = mutual_scores(z, interval=interval, memory_budget_mb=budget_mb)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("budget_mb", [512, 2e-3, 1e-6])
def test_vectors_of_any_length_get_euclidean_distances(budget_mb):
    g = torch.Generator().manual_seed(11)
    z = unit(7, 12, 5, seed=8) * torch.rand(7, 12, 1, generator=g, dtype=torch.float64).mul(4).add(0.1)
    ref = unit(3, 12, 5, seed=9) * 2.5
    got = mutual_scores(z, reference=ref, memory_budget_mb=budget_mb)
    torch.testing.assert_close(got, brute_force(z, reference=ref), atol=1e-12, rtol=0)
    aligned = mutual_scores(z, aligned_window=1, grid=(3, 4), memory_budget_mb=budget_mb)
    torch.testing.assert_close(aligned, brute_force(z, window=1, grid=(3, 4)), atol=1e-12, rtol=0)


@pytest.mark.parametrize("budget_mb", [512, 2e-3, 1e-6])
def test_excluded_images_are_never_compared(budget_mb):
    """Overlapping tiles of one frame share pixels: each must not vouch for the other's content."""
    z = unit(9, 12, 5)
    z[4] = z[3]  # 3 and 4 are copies: each is the other's perfect match
    exclude = [np.array([], np.int64)] * 9
    exclude[3], exclude[4], exclude[0] = np.array([4]), np.array([3]), np.array([7, 8])
    ref = unit(2, 12, 5, seed=3)
    for reference in (None, ref):
        got = mutual_scores(z, reference=reference, exclude=exclude, memory_budget_mb=budget_mb)
        torch.testing.assert_close(got, brute_force(z, reference, exclude=exclude), atol=1e-12, rtol=0)
    plain = mutual_scores(z, interval=(0.0, 1), memory_budget_mb=budget_mb)
    skipped = mutual_scores(z, interval=(0.0, 1), exclude=exclude, memory_budget_mb=budget_mb)
    assert plain[3].abs().max() < 1e-6 < skipped[3].min()  # its copy no longer vouches for it
    with pytest.raises(ValueError, match="exclude"):
        mutual_scores(z, exclude=exclude[:3])
    with pytest.raises(ValueError, match=r"exclude\[1\]"):
        mutual_scores(z, exclude=[np.array([], np.int64), np.array([1])] + exclude[2:])
    with pytest.raises(ValueError, match="nothing to be compared"):
        mutual_scores(z[:2], exclude=[np.array([1]), np.array([0])])


def test_scorer_passes_exclude_to_every_pass_and_group():
    """A copy in the pool (an overlapping tile) hides a defect from mutual scoring, the re-scoring pass and each
    group of a split pool, unless it is excluded."""
    n = 24
    layer = normal_layers(n, 8, 4, 4, seed=21)
    layer[5, :, 2, 2] += torch.randn(8, generator=torch.Generator().manual_seed(22)) * 2
    layer[6] = layer[5]  # 6 is 5's overlapping copy
    exclude = [np.array([], np.int64)] * n
    exclude[5], exclude[6] = np.array([6]), np.array([5])
    for params in ({}, {"rescore": 0.5}, {"max_pool": 12, "rescore": 0.5}):
        scorer = MuScScorer(r_list=(1,), rscin_k=None, interval=(0.0, 1), **params)
        hidden, shown = (scorer.score([layer], exclude=e) for e in (None, exclude))
        assert hidden.patch_maps[5, 2, 2] < 0.6 * shown.patch_maps[5, 2, 2], params
        assert int(np.argmax(shown.image_scores)) in (5, 6), params
        others = np.setdiff1d(np.arange(n), [5, 6])
        assert shown.image_scores[5] > 1.5 * np.median(shown.image_scores[others]), params
    tokens = lnamd(layer, 1)  # the re-scoring pass: an excluded image leaves the bank of the one that excludes it
    chosen = np.array([0, 1, 6])
    got = MuScScorer(interval=(0.0, 1))._against_chosen(tokens, (4, 4), chosen, exclude)
    expected = mutual_scores(tokens[5:6], reference=tokens[[0, 1]], interval=(0.0, 1))[0]
    torch.testing.assert_close(got[5], expected.float())


def _frames(n_frames: int, tiles: int) -> list[np.ndarray]:
    """``exclude`` of ``n_frames`` frames cut into ``tiles`` views that all overlap each other (views in order)."""
    return [
        np.setdiff1d(np.arange(f * tiles, (f + 1) * tiles), [f * tiles + t])
        for f in range(n_frames)
        for t in range(tiles)
    ]


def test_second_pass_excludes_in_every_comparison_with_the_rank_count_of_the_first():
    """``rescore``'s pass: the chosen images score each other without their excluded ones, and every other image
    averages as many ranks as the one with the most chosen images excluded (mutual_scores' rule, brute_force)."""
    tokens = lnamd(normal_layers(12, 6, 3, 3, seed=5), 1).double()
    exclude = [np.array([], np.int64)] * 12
    for a, b in ((0, 1), (2, 7), (3, 8), (4, 9), (5, 10)):  # 0 and 1 chosen together; 7, 8 and 9 lose one each
        exclude[a], exclude[b] = np.r_[exclude[a], b], np.r_[exclude[b], a]
    exclude[11] = np.array([0, 1, 2, 3])  # 11 keeps 2 of the 6 chosen: every other image averages its 2 nearest
    exclude[0], exclude[1], exclude[2], exclude[3] = (np.r_[e, 11] for e in exclude[:4])
    chosen = np.arange(6)
    got = MuScScorer(interval=(0, 3))._against_chosen(tokens, (3, 3), chosen, exclude)  # the 3 nearest, at most
    inside = [np.searchsorted(chosen, np.intersect1d(exclude[i], chosen)) for i in chosen]
    torch.testing.assert_close(got[:6], brute_force(tokens[:6], interval=(0, 3), exclude=inside).float())
    for i in range(6, 12):
        kept = np.setdiff1d(chosen, exclude[i])
        mins = torch.stack([torch.cdist(tokens[i], tokens[j]).min(dim=1).values for j in kept], dim=1)
        torch.testing.assert_close(got[i], mins.sort(dim=1).values[:, :2].mean(dim=1).float())


def test_a_frame_of_overlapping_tiles_among_the_lowest_scores_still_rescores():
    """Tiles that all overlap each other (tile overlap 0.5+, or 3 to a side) were all chosen to re-score the pool:
    the chosen ones had nothing to compare with (ValueError) and the others compared with their own frame's tiles.
    The bank grows along the scores until every image has one it may be compared with."""
    layer = normal_layers(32, 8, 4, 4, seed=3)
    layer[16:] += 0.3 * torch.randn(16, 8, 4, 4, generator=torch.Generator().manual_seed(4))  # frame 2: noisier
    exclude = _frames(2, 16)
    scorer = MuScScorer(r_list=(1,), rscin_k=None, rescore=0.2)
    first = scorer._image_scores(scorer._fused([layer], None, None, lambda: None, exclude)[0], None)
    order = np.argsort(first, kind="stable")
    assert (order[:10] < 16).all()  # the 10 chosen: all of frame 1
    chosen = musc._bank(order, 10, exclude)
    first_of_frame_2 = int(np.argmax(order >= 16))  # the bank grows along the scores to frame 2's lowest tile
    np.testing.assert_array_equal(chosen, np.sort(order[: first_of_frame_2 + 1]))
    np.testing.assert_array_equal(musc._bank(order, 10, None), np.sort(order[:10]))
    second = scorer._image_scores(scorer._fused([layer], None, chosen, lambda: None, exclude)[0], None)
    out = scorer.score([layer], exclude=exclude)  # both passes without a tile's overlapping ones
    expected = first.min() + np.ptp(first) * (musc._unit_range(first) + musc._unit_range(second)) / 2
    np.testing.assert_allclose(out.image_scores, expected, rtol=1e-12)
    lonely = [np.array([2]), np.array([2]), np.array([0, 1]), np.array([], np.int64)]  # 2 excludes both chosen
    with pytest.raises(ValueError, match="none of the chosen"):  # not compared with the whole bank instead
        scorer._against_chosen(lnamd(layer[:4], 1), (4, 4), np.array([0, 1]), lonely)


def test_a_split_pool_never_leaves_a_group_of_one_frames_overlapping_tiles():
    """Groups of a split pool are drawn at random: one holding only tiles of one frame (that all overlap) left them
    nothing to be compared with. Such a group joins the next."""
    layer = normal_layers(6, 8, 4, 4, seed=7)
    exclude = _frames(1, 5) + [np.array([], np.int64)]  # 5 overlapping tiles and one image: any 3 of the tiles fail
    kwargs = {"r_list": (1,), "rscin_k": None}
    whole = MuScScorer(**kwargs).score([layer], exclude=exclude)
    grouped = MuScScorer(max_pool=3, **kwargs).score([layer], exclude=exclude)  # both groups joined: one, whole
    np.testing.assert_array_equal(grouped.patch_maps, whole.patch_maps)
    np.testing.assert_array_equal(grouped.image_scores, whole.image_scores)
    two = _frames(2, 3)  # tiles 0-2 and 3-5: a group of one frame's tiles joins the next (the last the one before)
    for groups, joined in (
        ([[0, 3], [1, 4], [2, 5]], [[0, 3], [1, 4], [2, 5]]),
        ([[0, 1], [3, 4], [2, 5]], [[0, 1, 3, 4], [2, 5]]),
        ([[0, 3], [4, 5], [1, 2]], [[0, 3], [4, 5, 1, 2]]),
    ):
        assert [g.tolist() for g in musc._partnered([np.array(g) for g in groups], 0, two)] == joined
    shared = [np.array([], np.int64)] + [e + 1 for e in _frames(1, 4)]  # image 0, in every group, and 4 tiles
    assert len(musc._partnered([np.array([1, 2]), np.array([3, 4])], 1, shared)) == 2


def test_budgets_exercise_every_blocking_path():
    z = unit(9, 12, 5)
    assert plan_for(z, 512).chunk == 9 and plan_for(z, 512).rows == 12
    mid = plan_for(z, 1e-2)  # several query chunks of whole images, several blocks per row
    assert 1 < mid.chunk < 9 and mid.rows == 12 and 1 < mid.block < 8
    assert plan_for(z, 2e-3).chunk == 1 and plan_for(z, 2e-3).rows == 12
    small = plan_for(z, 3e-4)
    assert small.chunk == 1 and small.rows < 12
    tiny = plan_for(z, 1e-6)  # below the floor: one patch against one image
    assert (tiny.rows, tiny.block, tiny.tile_rows) == (1, 1, 1)
    big = musc._plan(n=200, length=1369, length_other=1369, c=1024, n_others=199, top=59, elem=2, buf_elem=4,
                     budget=64 * 2**20, window=None, width=None, cpu=False)  # fmt: skip
    assert big.peak_bytes <= 64 * 2**20 and big.chunk < 200


def test_references_are_used_but_not_scored():
    z, ref = unit(5, 12, 5, seed=1), unit(4, 12, 5, seed=2)
    for budget_mb in (512, 2e-3, 1e-6):
        got = mutual_scores(z, reference=ref, memory_budget_mb=budget_mb)
        assert got.shape == (5, 12)
        torch.testing.assert_close(got, brute_force(z, reference=ref), atol=1e-12, rtol=0)
    # one image against references only; a reference containing its patch 0 makes that patch normal
    ref2 = ref.clone()
    ref2[:, 7] = z[0, 0]
    s = mutual_scores(z[:1], reference=ref2)
    assert s.shape == (1, 12) and s[0, 0] < 1e-6 < s[0, 1:].min()


def test_references_with_other_patch_count():
    z, ref = unit(4, 12, 5, seed=1), unit(3, 20, 5, seed=2)
    torch.testing.assert_close(mutual_scores(z, reference=ref), brute_force(z, reference=ref), atol=1e-12, rtol=0)


@pytest.mark.parametrize("budget_mb", [512, 1e-6])
def test_aligned_whole_grid_equals_full(budget_mb):
    z, ref = unit(6, 12, 5, seed=3), unit(2, 12, 5, seed=4)
    full = mutual_scores(z, reference=ref)
    aligned = mutual_scores(z, reference=ref, aligned_window=3, grid=(3, 4), memory_budget_mb=budget_mb)
    torch.testing.assert_close(aligned, full, atol=1e-12, rtol=0)


@pytest.mark.parametrize("window", [0, 1])
@pytest.mark.parametrize("budget_mb", [512, 1e-6])
def test_aligned_window_equals_brute_force(window, budget_mb):
    z = unit(6, 20, 5, seed=5)
    got = mutual_scores(z, aligned_window=window, grid=(4, 5), memory_budget_mb=budget_mb)
    torch.testing.assert_close(got, brute_force(z, window=window, grid=(4, 5)), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="grid"):
        mutual_scores(z, aligned_window=window, grid=(4, 4))


def test_float32_and_half_precision_paths(monkeypatch):
    z = unit(7, 16, 8, seed=6)
    expected = brute_force(z)
    torch.testing.assert_close(mutual_scores(z.float()).double(), expected, atol=1e-3, rtol=0)
    monkeypatch.setattr(musc, "_compute_dtype", lambda _: torch.float16)  # the CUDA path's arithmetic
    half = mutual_scores(z.float(), memory_budget_mb=1e-3)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half.double(), expected, atol=2e-2, rtol=0)


def test_msm_flops():
    assert msm_flops(3, 4, 2) == 3 * 2 * 4 * 4 * 2
    assert msm_flops(3, 4, 2, n_reference=2, length_reference=5) == 3 * 2 * 4 * 4 * 2 + 3 * 2 * 2 * 4 * 5 * 2


# ---------------------------------------------------------------- LNAMD


def test_lnamd_layer_norm_over_whole_map_and_local_mean():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64) * 3 + 1
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    var = x.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
    t = (x - mean) / torch.sqrt(var + 1e-5)
    z1 = lnamd(x, 1)
    assert z1.shape == (2, 20, 3)
    torch.testing.assert_close(z1, F.normalize(t.flatten(2).transpose(1, 2), dim=-1))
    z3 = lnamd(x, 3)
    padded = F.pad(t, (1, 1, 1, 1))
    for y, xx in [(0, 0), (2, 3), (3, 4)]:  # corner (zero padding counts), interior, corner
        v = padded[0, :, y : y + 3, xx : xx + 3].sum(dim=(1, 2)) / 9
        torch.testing.assert_close(z3[0, y * 5 + xx], v / v.norm())
    torch.testing.assert_close(z3.norm(dim=-1), torch.ones(2, 20, dtype=torch.float64))
    for bad in (0, 2, -1):
        with pytest.raises(ValueError):
            lnamd(x, bad)


def test_lnamd_norm_exponent_keeps_directions_and_compresses_lengths():
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    raw = lnamd(x, 3, norm_exponent=1.0)
    unit_vectors = lnamd(x, 3)
    torch.testing.assert_close(F.normalize(raw, dim=-1), unit_vectors)
    half = lnamd(x, 3, norm_exponent=0.5)
    torch.testing.assert_close(F.normalize(half, dim=-1), unit_vectors)
    torch.testing.assert_close(half.norm(dim=-1), raw.norm(dim=-1).sqrt())
    assert raw.norm(dim=-1).std() > 0.1  # the lengths did vary


# ---------------------------------------------------------------- scorer and streaming


def normal_layers(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    pattern = torch.randn(1, c, h, w, generator=g)
    return pattern + 0.05 * torch.randn(n, c, h, w, generator=g)


def test_injected_anomaly_scores_highest():
    layer = normal_layers(8, 16, 6, 6)
    layer[3, :, 2, 4] = torch.randn(16, generator=torch.Generator().manual_seed(9)) * 3
    coarse = F.avg_pool2d(layer, 2)
    out = MuScScorer(rscin_k=None).score([layer, coarse])
    assert out.patch_maps.shape == (8, 6, 6) and out.patch_maps.dtype == np.float32
    assert out.image_scores.shape == (8,) and out.image_scores.dtype == np.float64
    assert np.unravel_index(out.patch_maps.argmax(), out.patch_maps.shape) == (3, 2, 4)
    assert out.image_scores.argmax() == 3


def test_norm_exponent_sees_a_patch_that_differs_in_contrast_alone():
    layer = normal_layers(8, 16, 6, 6, seed=3)
    layer[3, :, 2, 4] *= 4  # same direction, four times the length: a brighter copy of the normal patch
    cosine = MuScScorer(r_list=(1,), rscin_k=None).score([layer])
    lengths = MuScScorer(r_list=(1,), rscin_k=None, norm_exponent=0.5).score([layer])
    peak = np.unravel_index(lengths.patch_maps.argmax(), lengths.patch_maps.shape)
    assert peak == (3, 2, 4) and lengths.image_scores.argmax() == 3
    assert cosine.patch_maps[3, 2, 4] < 3 * np.median(cosine.patch_maps)  # unit vectors cannot tell it


def test_scorer_fusion_matches_manual_pipeline():
    fine, coarse = normal_layers(5, 4, 4, 4, seed=1), normal_layers(5, 6, 2, 2, seed=2)
    calls = []
    scorer = MuScScorer(r_list=(1, 3), interval=(0.0, 0.5))
    out = scorer.score([fine, coarse], progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    maps = []
    for r in (1, 3):
        for layer in (fine, coarse):
            s = mutual_scores(lnamd(layer, r), interval=(0.0, 0.5)).view(5, 1, *layer.shape[2:])
            maps.append(F.interpolate(s, size=(4, 4), mode="bilinear", align_corners=False)[:, 0])
    expected = torch.stack(maps).mean(dim=0).numpy()
    np.testing.assert_allclose(out.patch_maps, expected, atol=1e-6)
    np.testing.assert_allclose(out.image_scores, expected.reshape(5, -1).max(axis=1), atol=1e-6)
    emb = torch.randn(5, 3, generator=torch.Generator().manual_seed(3))
    with_rscin = scorer.score([fine, coarse], embeddings=emb)
    peaks = out.image_scores  # RsCIN's 0..1 output, mapped back onto the peaks' range
    expected_scores = peaks.min() + np.ptp(peaks) * rscin(peaks, emb, (1, 2, 3))
    np.testing.assert_allclose(with_rscin.image_scores, expected_scores, atol=1e-12)
    assert with_rscin.image_scores.min() >= peaks.min() - 1e-12 and with_rscin.image_scores.max() <= peaks.max() + 1e-12
    np.testing.assert_array_equal(with_rscin.patch_maps, out.patch_maps)


def test_map_layers_split_the_map_from_the_image_score():
    fine, mid = normal_layers(6, 4, 4, 4, seed=1), normal_layers(6, 5, 4, 4, seed=2)
    coarse = normal_layers(6, 6, 2, 2, seed=3)
    coarse[2] = 3 * torch.randn(6, 2, 2, generator=torch.Generator().manual_seed(4))  # odd to the coarse layer only
    kwargs = {"r_list": (1, 3), "rscin_k": None}
    two = MuScScorer(**kwargs).score([fine, mid])
    three = MuScScorer(**kwargs).score([fine, mid, coarse])
    split = MuScScorer(map_layers=[0, 1], **kwargs).score([fine, mid, coarse])
    np.testing.assert_allclose(split.patch_maps, two.patch_maps, atol=1e-6)  # the map of the named layers alone
    np.testing.assert_allclose(split.image_scores, three.image_scores, atol=1e-6)  # the score of all three
    assert split.image_scores.argmax() == 2 and not MuScScorer(map_layers=[0], **kwargs).image_score_from_map
    with pytest.raises(ConfigError, match="map_layers"):
        MuScScorer(map_layers=[0, 3]).score([fine, mid, coarse])
    with pytest.raises(ConfigError, match=r"map_layers \[0, 3\] name layers beyond the backbone's 3"):
        Detector(apply_overrides(load_config("musc"), ["scorer.params.map_layers=[0,3]"]))  # before any image is read
    for bad in ([], [0, 0], [-1], [True]):
        with pytest.raises(ConfigError, match="map_layers"):
            MuScScorer(map_layers=bad)


def test_a_large_pool_is_scored_in_seeded_groups_of_at_most_max_pool():
    fine, coarse = normal_layers(7, 4, 4, 4, seed=5), normal_layers(7, 6, 2, 2, seed=6)
    ref = [normal_layers(2, 4, 4, 4, seed=7), normal_layers(2, 6, 2, 2, seed=8)]
    emb = torch.randn(7, 3, generator=torch.Generator().manual_seed(9))
    kwargs = {"r_list": (1, 3)}
    calls = []
    grouped = MuScScorer(max_pool=3, **kwargs).score(
        [fine, coarse], reference=ref, embeddings=emb, progress=lambda *c: calls.append(c)
    )
    draw = musc._content_order([fine, coarse])[np.random.default_rng(0).permutation(7)]
    groups = np.array_split(draw, 3)  # the documented seeded split: 3 + 2 + 2
    assert sorted(len(g) for g in groups) == [2, 2, 3]
    for group in groups:
        idx = torch.from_numpy(np.sort(group))
        alone = MuScScorer(**kwargs).score([fine[idx], coarse[idx]], reference=ref, embeddings=emb[idx])
        np.testing.assert_allclose(grouped.patch_maps[idx.numpy()], alone.patch_maps, atol=1e-6)  # input order kept
        np.testing.assert_allclose(grouped.image_scores[idx.numpy()], alone.image_scores, atol=1e-9)
    whole = MuScScorer(**kwargs).score([fine, coarse], reference=ref, embeddings=emb)
    assert not np.allclose(grouped.patch_maps, whole.patch_maps)  # a group is its own pool
    assert calls[-1] == (12, 12) and [c[0] for c in calls] == list(range(1, 13))  # 3 groups x 2 r x 2 layers
    same = MuScScorer(max_pool=7, **kwargs).score([fine, coarse], reference=ref, embeddings=emb)
    np.testing.assert_array_equal(same.patch_maps, whole.patch_maps)  # pools up to max_pool are scored whole
    for bad in (2, 1, 0, 2.5, True):  # 2: 3 images split 2 + 1, and one image alone has nothing to score it by
        with pytest.raises(ConfigError, match="max_pool"):
            MuScScorer(max_pool=bad)


def test_shared_images_join_every_group_of_a_split_pool():
    """Few-shot references join a Detector's pool as images: a pool split into groups drew them into some groups and
    left others without any normal anchor. ``shared`` leading images now join every group."""
    fine, coarse = normal_layers(11, 4, 4, 4, seed=5), normal_layers(11, 6, 2, 2, seed=6)
    emb = torch.randn(11, 3, generator=torch.Generator().manual_seed(9))
    kwargs = {"r_list": (1, 3)}
    grouped = MuScScorer(max_pool=5, **kwargs).score([fine, coarse], embeddings=emb, shared=2)
    rest = musc._content_order([fine[2:], coarse[2:]]) + 2
    groups = np.array_split(rest[np.random.default_rng(0).permutation(9)], 3)  # 9 images, 3 per group + the 2
    maps, scores = np.zeros_like(grouped.patch_maps[:2]), np.zeros(2)
    for group in groups:
        idx = torch.from_numpy(np.r_[0, 1, np.sort(group)])
        alone = MuScScorer(**kwargs).score([fine[idx], coarse[idx]], embeddings=emb[idx])
        np.testing.assert_allclose(grouped.patch_maps[idx.numpy()[2:]], alone.patch_maps[2:], atol=1e-6)
        np.testing.assert_allclose(grouped.image_scores[idx.numpy()[2:]], alone.image_scores[2:], atol=1e-9)
        maps, scores = maps + alone.patch_maps[:2] / 3, scores + alone.image_scores[:2] / 3
    np.testing.assert_allclose(grouped.patch_maps[:2], maps, atol=1e-6)  # the shared ones: their mean over groups
    np.testing.assert_allclose(grouped.image_scores[:2], scores, atol=1e-9)
    many = MuScScorer(max_pool=5, **kwargs).score([fine, coarse], embeddings=emb, shared=3)  # over max_pool // 2
    np.testing.assert_allclose(
        many.image_scores, MuScScorer(max_pool=5, **kwargs).score([fine, coarse], embeddings=emb).image_scores
    )
    with pytest.raises(ValueError, match="shared"):
        MuScScorer(**kwargs).score([fine, coarse], shared=12)


def test_groups_do_not_depend_on_the_order_of_the_pool():
    fine, coarse = normal_layers(9, 4, 4, 4, seed=5), normal_layers(9, 6, 2, 2, seed=6)
    fine[[1, 4]] += 2 * torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(7))  # two odd images
    emb = torch.randn(9, 3, generator=torch.Generator().manual_seed(9))
    scorer = MuScScorer(max_pool=4, r_list=(1, 3))
    out = scorer.score([fine, coarse], embeddings=emb)
    for seed in range(3):  # the same images in another order: the same groups, the same scores
        order = torch.from_numpy(np.random.default_rng(seed).permutation(9))
        moved = scorer.score([fine[order], coarse[order]], embeddings=emb[order])
        np.testing.assert_allclose(moved.image_scores, out.image_scores[order.numpy()], atol=1e-5)
        np.testing.assert_allclose(moved.patch_maps, out.patch_maps[order.numpy()], atol=1e-6)


def test_rescore_against_the_lowest_scoring_images():
    n = 40
    layer = normal_layers(n, 8, 4, 4, seed=11)
    g = torch.Generator().manual_seed(12)
    recurring = torch.randn(8, generator=g)
    for i in range(20, n):  # half the pool is defective, and 16 of them share one defect: it vouches for itself
        layer[i, :, 1, 2] += recurring + 0.05 * torch.randn(8, generator=g) if i < 36 else torch.randn(8, generator=g)
    plain = MuScScorer(r_list=(1,), rscin_k=None).score([layer])
    calls = []
    again = MuScScorer(r_list=(1,), rscin_k=None, rescore=0.25).score([layer], progress=lambda *c: calls.append(c))
    assert calls == [(1, 2), (2, 2)]  # one step per pass
    np.testing.assert_array_equal(again.patch_maps, plain.patch_maps)  # the maps are the first pass's
    chosen = np.sort(np.argsort(plain.image_scores, kind="stable")[:10])  # 25 % of 40
    tokens = lnamd(layer, 1)
    second = torch.empty(n, 16)
    second[chosen] = mutual_scores(tokens[chosen])
    for i in sorted(set(range(n)) - set(chosen.tolist())):
        second[i] = mutual_scores(tokens[i : i + 1], reference=tokens[chosen])[0]
    second_scores = second.amax(1).double().numpy()
    unit = [(x - x.min()) / np.ptp(x) for x in (plain.image_scores, second_scores)]
    expected = plain.image_scores.min() + np.ptp(plain.image_scores) * (unit[0] + unit[1]) / 2
    np.testing.assert_allclose(again.image_scores, expected, rtol=1e-6)
    labels = np.arange(n) >= 20
    assert roc_auc_score(labels, again.image_scores) > roc_auc_score(labels, plain.image_scores)
    ten = [layer[:10]]  # at least 10 images re-score the pool: a pool of 10 gets one pass
    np.testing.assert_array_equal(
        MuScScorer(r_list=(1,), rscin_k=None, rescore=0.25).score(ten).image_scores,
        MuScScorer(r_list=(1,), rscin_k=None).score(ten).image_scores,
    )
    ref = normal_layers(2, 8, 4, 4, seed=11)  # references anchor the normal state themselves: no second pass
    np.testing.assert_array_equal(
        MuScScorer(r_list=(1,), rscin_k=None, rescore=0.25).score([layer], reference=[ref]).image_scores,
        MuScScorer(r_list=(1,), rscin_k=None).score([layer], reference=[ref]).image_scores,
    )
    pool = RollingPool(MuScScorer(r_list=(1,), rescore=0.25), size=4)  # a rolling pool never re-scores
    assert pool.scorer.rescore is None


def test_scorer_contract_and_validation():
    scorer = MuScScorer()
    assert MuScScorer.name == "musc" and MuScScorer.requires_fit is False
    assert scorer.fit([torch.zeros(2, 1, 1, 1)]) is scorer
    assert scorer.state_dict() == {}
    scorer.load_state_dict({})
    assert scorer.get_params() == {
        "r_list": (1, 3, 5),
        "interval": (0.0, 0.3),
        "rscin_k": (1, 2, 3),
        "memory_budget_mb": 512,
        "aligned_window": None,
        "augment_references": False,
        "augment_queries": False,
        "map_layers": None,
        "rescore": None,
        "max_pool": None,
        "norm_exponent": 0.0,
    }
    for bad in ({"r_list": (2,)}, {"interval": (0.1,)}, {"rscin_k": (0,)}, {"memory_budget_mb": 0},
                {"aligned_window": -1}, {"rescore": 1.0}, {"rescore": 0}, {"rescore": True},
                {"norm_exponent": -0.5}, {"norm_exponent": 1.5}, {"norm_exponent": True}):  # fmt: skip
        with pytest.raises(ConfigError):
            MuScScorer(**bad)
    with pytest.raises(ValueError, match="reference layer"):
        scorer.score([torch.zeros(3, 2, 4, 4)], reference=[torch.zeros(2, 2, 3, 3)])


def test_scorer_with_references_and_aligned_window():
    layer, ref = normal_layers(3, 8, 4, 4, seed=4), normal_layers(4, 8, 4, 4, seed=5)
    full = MuScScorer(r_list=(1,)).score([layer], reference=[ref])
    aligned = MuScScorer(r_list=(1,), aligned_window=3).score([layer], reference=[ref])
    np.testing.assert_allclose(aligned.patch_maps, full.patch_maps, atol=1e-5)  # float32 sums vs GEMM
    expected = mutual_scores(lnamd(layer, 1), reference=lnamd(ref, 1)).view(3, 4, 4).numpy()
    np.testing.assert_allclose(full.patch_maps, expected, atol=1e-6)


def test_rolling_pool_scores_against_recent_images():
    images = normal_layers(6, 8, 3, 3, seed=6)
    fixed = normal_layers(1, 8, 3, 3, seed=7)
    scorer = MuScScorer(r_list=(1,), rscin_k=None)
    pool = RollingPool(scorer, 2, reference=[fixed])
    first = pool.score([images[:2]])
    np.testing.assert_allclose(first.patch_maps, scorer.score([images[:2]], reference=[fixed]).patch_maps)
    assert len(pool) == 0  # scoring leaves the pool as it was: the caller adds what should join
    pool.add([images[:2]])
    assert len(pool) == 2
    for t in range(2, 6):
        got = pool.score([images[t : t + 1]])
        recent = torch.cat([images[t - 2 : t], fixed])
        np.testing.assert_allclose(got.patch_maps, scorer.score([images[t : t + 1]], reference=[recent]).patch_maps)
        pool.add([images[t : t + 1]])
        assert len(pool) == 2
    pool.add([images[:0]])  # an empty batch changes nothing
    np.testing.assert_array_equal(pool._pool[0].numpy(), images[4:6].numpy())
    with pytest.raises(ValueError, match="at least 2 images"):
        RollingPool(scorer, 3).score([images[:1]])
    with pytest.raises(ValueError):
        RollingPool(scorer, -1)


def test_a_bad_musc_parameter_is_named_by_its_config_key() -> None:
    from anomaly import Detector
    from anomaly.config import apply_overrides, load_config

    with pytest.raises(ConfigError, match=r"^scorer\.params\.max_pool must be None or an integer >= 3, got 1$"):
        Detector(apply_overrides(load_config("musc"), ["scorer.params.max_pool=1"]))
