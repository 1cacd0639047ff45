from __future__ import annotations

import math
import os
import re
from typing import Any

import faiss
import numpy as np
import pytest
import torch

from anomaly import BackendError, ConfigError, NotFittedError
from anomaly.index import NNIndex, auto_index_string
from anomaly.scorers import get_scorer, list_scorers
from anomaly.scorers._aggregate import fuse_layers, patch_embeddings
from anomaly.scorers._coreset import greedy_coreset

TRAINED = [name for name in list_scorers() if name != "musc"]


def _layers(n: int, seed: int, anomaly: bool = False) -> list[torch.Tensor]:
    """Two-layer synthetic features: smooth normal structure, optionally a strong local outlier."""
    g = torch.Generator().manual_seed(seed)
    fine = torch.randn(n, 8, 8, 8, generator=g) * 0.1 + torch.linspace(0, 1, 8).view(1, 1, 1, 8)
    coarse = torch.randn(n, 6, 4, 4, generator=g) * 0.1
    if anomaly:
        fine[:, :, 2:4, 2:4] += 3.0
        coarse[:, :, 1, 1] += 3.0
    return [fine, coarse]


def test_patch_embeddings_on_a_chosen_grid() -> None:
    g = torch.Generator().manual_seed(0)
    fine, mid, coarse = (torch.randn(40, c, s, s, generator=g) for c, s in ((2, 8), (3, 4), (4, 2)))
    local = [torch.nn.functional.avg_pool2d(x, 3, 1, 1) for x in (fine, mid, coarse)]  # zero-padded 3x3 means
    on_mid = patch_embeddings([fine, mid, coarse], 3, grid_layer=1)  # 40 images: two chunks
    assert on_mid.shape == (40, 4, 4, 9)
    torch.testing.assert_close(
        on_mid[..., :2], local[0].unfold(2, 2, 2).unfold(3, 2, 2).mean((-1, -2)).permute(0, 2, 3, 1)
    )
    torch.testing.assert_close(on_mid[..., 2:5], local[1].permute(0, 2, 3, 1))
    torch.testing.assert_close(on_mid, fuse_layers([fine, mid, coarse], 3, grid_layer=1))
    on_fine = patch_embeddings([fine, mid, coarse], 3)  # the default: the finest grid, coarser layers upsampled
    assert on_fine.shape == (40, 8, 8, 9)
    torch.testing.assert_close(on_fine[..., :2], local[0].permute(0, 2, 3, 1))
    scorer = get_scorer("memory_bank", {"grid_layer": 1, "coreset_ratio": 0.5})
    train, odd = _layers(12, 0), _layers(3, 2, anomaly=True)
    assert scorer.fit(train).score(odd).patch_maps.shape == (3, 4, 4)
    with pytest.raises(ConfigError, match="grid_layer 2"):
        get_scorer("memory_bank", {"grid_layer": 2}).fit(train)


def test_binomial_patch_kernel_weighs_the_patch_itself_most() -> None:
    from anomaly.scorers._aggregate import neighbourhood_mean

    impulse = torch.zeros(2, 3, 7, 7)
    impulse[:, :, 3, 3] = 1.0  # a defect that fills one cell
    binomial = neighbourhood_mean(impulse, 3, "binomial")[0, 0, 2:5, 2:5]
    torch.testing.assert_close(binomial, torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16)
    assert float(neighbourhood_mean(impulse, 3, "mean")[0, 0, 3, 3]) == pytest.approx(1 / 9)  # PatchCore's: 2.25x less
    five = neighbourhood_mean(impulse, 5, "binomial")[0, 0, 3, 1:6]  # a row of Pascal's triangle again
    torch.testing.assert_close(five, torch.tensor([1.0, 4, 6, 4, 1]) * 6 / 256)
    flat = neighbourhood_mean(torch.ones(1, 1, 4, 4), 3, "binomial")[0, 0]
    assert float(flat[1, 1]) == pytest.approx(1.0) and float(flat[0, 0]) == pytest.approx(9 / 16)  # zero-padded border
    train, odd = _layers(12, 0), _layers(3, 2, anomaly=True)
    scorer = get_scorer("memory_bank", {"patch_kernel": "binomial", "coreset_ratio": 0.5})
    fine, coarse = (neighbourhood_mean(x, 3, k) for x, k in zip(odd, ("binomial", "mean")))  # the grid layer's only
    torch.testing.assert_close(scorer.embed(odd)[..., :8], fine.permute(0, 2, 3, 1))
    torch.testing.assert_close(scorer.embed(odd)[..., 8:], fuse_layers([fine, coarse], 1)[..., 8:])
    assert scorer.fit(train).score(odd).image_scores.min() > scorer.score(_layers(3, 1)).image_scores.max()
    with pytest.raises(ConfigError, match="patch_kernel"):
        get_scorer("memory_bank", {"patch_kernel": "gauss"})


@pytest.mark.parametrize("name", TRAINED)
def test_scorer_contract(name: str) -> None:
    train, normal, odd = _layers(12, 0), _layers(3, 1), _layers(3, 2, anomaly=True)
    scorer = get_scorer(name, {})
    with pytest.raises(NotFittedError):
        scorer.score(normal)
    assert scorer.fit(train) is scorer
    out = scorer.score(normal + [])
    assert out.image_scores.shape == (3,) and out.image_scores.dtype == np.float64
    assert scorer.has_maps == (name != "gaussian") and (out.patch_maps is None) == (name == "gaussian")
    if name != "gaussian":  # the patch scorers' maps, whatever their has_maps says
        assert out.patch_maps.shape == (3, 8, 8) and out.patch_maps.dtype == np.float32
    bad = scorer.score(odd)
    assert bad.image_scores.min() > out.image_scores.max()  # an injected anomaly scores higher

    twin = get_scorer(name, {}).fit(train)  # determinism under a fixed random_state
    np.testing.assert_array_equal(twin.score(normal).image_scores, out.image_scores)

    restored = get_scorer(name, scorer.get_params())
    restored.load_state_dict(scorer.state_dict())
    np.testing.assert_array_equal(restored.score(normal).image_scores, out.image_scores)


def test_memory_bank_distances_are_true_l2_and_sql2_squares() -> None:
    bank = [torch.zeros(1, 2, 1, 1), torch.zeros(1, 1, 1, 1)]
    query = [torch.tensor([3.0, 4.0]).view(1, 2, 1, 1), torch.zeros(1, 1, 1, 1)]
    l2 = get_scorer("memory_bank", {"coreset_ratio": 1.0, "patch_size": 1}).fit(bank)
    sq = get_scorer("memory_bank", {"coreset_ratio": 1.0, "patch_size": 1, "distance": "sql2"}).fit(bank)
    assert l2.score(query).image_scores[0] == pytest.approx(5.0)
    assert sq.score(query).image_scores[0] == pytest.approx(25.0)


def test_memory_bank_eq7_reweighting_stays_below_the_plain_max() -> None:
    train, odd = _layers(12, 0), _layers(3, 2, anomaly=True)
    plain = get_scorer("memory_bank", {}).fit(train).score(odd).image_scores
    weighted = get_scorer("memory_bank", {"reweight": True}).fit(train).score(odd).image_scores
    assert np.all(weighted <= plain) and np.all(weighted > 0)


def test_memory_bank_eq7_with_one_neighbour_is_the_plain_max() -> None:
    """Eq. 7's weight is 1 - exp(s*) / exp(s*) = 0 with one neighbour: every image scored 0 (ALGORITHMS.md 1.5)."""
    train, odd = _layers(12, 0), _layers(3, 2, anomaly=True)
    plain = get_scorer("memory_bank", {}).fit(train).score(odd).image_scores
    one = get_scorer("memory_bank", {"reweight": True, "num_neighbors": 1}).fit(train).score(odd).image_scores
    np.testing.assert_array_equal(one, plain)
    tiny = get_scorer("memory_bank", {"reweight": True, "max_bank": 1}).fit(train)  # a bank of one row
    np.testing.assert_array_equal(tiny.score(odd).image_scores, tiny.score(odd).patch_maps.max((1, 2)))
    assert np.all(tiny.score(odd).image_scores > 0)


def test_memory_bank_index_and_seed_faiss_cannot_take_are_config_errors() -> None:
    """An index string FAISS parses but cannot fill with plain rows, and a seed beyond FAISS's C int: tracebacks
    (exit 1) before, not the one-line error of an invalid setting."""
    train = _layers(6, 0)
    with pytest.raises(ConfigError, match=r"scorer.params.index: FAISS cannot build 'IDMap,Flat'.*add_with_ids"):
        get_scorer("memory_bank", {"index": "IDMap,Flat"}).fit(train)
    big = get_scorer("memory_bank", {"index": "IVF2,Flat", "coreset_ratio": 1.0, "random_state": 2**40}).fit(train)
    assert big.index_ is not None and big.index_.ntotal == 6 * 8 * 8
    with pytest.raises(ConfigError, match="random_state"):
        get_scorer("memory_bank", {"random_state": 2**64})


@pytest.mark.parametrize(
    ("index", "why"),
    [
        ("LSH", "binary codes"),
        ("ITQ,LSH", "ITQ"),
        ("IVF2,ITQ,SH", "binary codes"),
        ("L2norm,Flat", "L2norm"),
        ("PCAW8,Flat", "whitens"),
    ],
)
def test_an_index_whose_distances_are_not_l2_is_a_config_error(index: str, why: str) -> None:
    """LSH was accepted and scored with the square roots of Hamming distances between binary codes (threshold 4.3 on
    features whose nearest rows lie ~27 apart); L2norm and whitening PCA measure other vectors than the features."""
    train = _layers(6, 0)
    with pytest.raises(ConfigError, match=rf"^scorer.params.index: '{index}' does not search by L2 distance \(.*{why}"):
        get_scorer("memory_bank", {"index": index, "coreset_ratio": 1.0}).fit(train)
    kept = ("PCA8,Flat", "LSH,RFlat", "OPQ2,PQ2") if index == "LSH" else ()  # a projection, a refined search
    for kept_index in kept:  # L2 distances or close to them: built
        assert get_scorer("memory_bank", {"index": kept_index, "coreset_ratio": 1.0}).fit(train).index_ is not None


def test_memory_bank_cross_fit_scores_each_fold_against_the_other_folds_only() -> None:
    train = _layers(6, 0)
    folds = np.array([0, 1, 2, 0, 1, 2])
    scorer = get_scorer("memory_bank", {"coreset_ratio": 1.0})
    out = scorer.cross_fit(train, folds)
    assert scorer.bank_ is not None and len(scorer.bank_) == 6 * 8 * 8  # the union of the fold banks: every row
    assert np.all(scorer.score(train).image_scores == 0)  # in-sample: every patch is in the bank
    assert np.all(out.image_scores > 0)  # out-of-sample: the image's own fold was left out
    rest = torch.from_numpy(np.flatnonzero(folds != 0))
    twin = get_scorer("memory_bank", {"coreset_ratio": 1.0}).fit([x[rest] for x in train])
    expected = twin.score([x[torch.from_numpy(np.flatnonzero(folds == 0))] for x in train]).image_scores
    np.testing.assert_allclose(out.image_scores[folds == 0], expected, rtol=1e-6)


def test_memory_bank_cross_fit_embeds_one_fold_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """All the patch embeddings at once were the fit's peak (2.2x the layers with lite0; 3.6 GB against 2.5 GB
    for 1,672 bottles): each fold's are made when needed, with the same bank and scores as all at once."""
    import anomaly.scorers.memory_bank as memory_bank

    train, folds = _layers(12, 0), np.arange(12) % 4
    sizes: list[int] = []

    def counted(layers: list[torch.Tensor], *args: object) -> torch.Tensor:
        sizes.append(len(layers[0]))
        return patch_embeddings(layers, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(memory_bank, "patch_embeddings", counted)
    out = get_scorer("memory_bank", {"coreset_ratio": 0.25}).cross_fit(train, folds)
    assert sizes == [3] * 8  # each fold's for its coreset, then again for its held-out scores
    monkeypatch.undo()
    held = np.flatnonzero(folds == 0)  # a fold's rows embedded alone are those embedded with every image
    assert torch.equal(patch_embeddings([x[held] for x in train]), patch_embeddings(train)[held])
    assert np.isfinite(out.image_scores).all() and np.all(out.image_scores > 0)


def test_memory_bank_cross_fit_picks_the_folds_on_several_threads_with_the_same_outcome(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each greedy pick runs on one thread, so the folds' independent picks left the other cores idle; in threads
    they give the same bank and scores as one after another, and torch's thread setting is restored. A held-out
    bank is searched in the task that picked it: searched one after another on the calling thread, between pairs of
    picks, about a fifth of bottle's held-out stage left a core idle."""
    import threading

    import anomaly.scorers.memory_bank as memory_bank

    train, folds = _layers(24, 0), np.arange(24) % 6
    monkeypatch.setattr(memory_bank, "cpu_threads", lambda: 1)
    alone = get_scorer("memory_bank", {"coreset_ratio": 0.1})
    expected = alone.cross_fit(train, folds)
    monkeypatch.setattr(memory_bank, "cpu_threads", lambda: 2)
    seen: dict[str, set[int]] = {"held_out_bank": set(), "score_against": set()}
    for name, ids in seen.items():
        original = getattr(memory_bank.MemoryBankScorer, name)

        def recorded(self: object, *args: object, _f: Any = original, _ids: set[int] = ids) -> Any:
            _ids.add(threading.get_ident())
            return _f(self, *args)

        monkeypatch.setattr(memory_bank.MemoryBankScorer, name, recorded)
    threads = torch.get_num_threads()
    threaded = get_scorer("memory_bank", {"coreset_ratio": 0.1})
    out = threaded.cross_fit(train, folds)
    for ids in seen.values():
        assert threading.get_ident() not in ids and len(ids) >= 1
    assert torch.get_num_threads() == threads
    np.testing.assert_array_equal(out.image_scores, expected.image_scores)
    np.testing.assert_array_equal(out.patch_maps, expected.patch_maps)
    np.testing.assert_array_equal(threaded.bank_, alone.bank_)


def test_faiss_runs_on_one_thread_inside_each_of_the_cross_fits_parallel_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each task's FAISS search (a held-out bank's start distances) took every core: tasks x cores threads."""
    import faiss

    import anomaly.index as index
    import anomaly.scorers.memory_bank as memory_bank

    monkeypatch.setattr(memory_bank, "cpu_threads", lambda: 2)
    monkeypatch.setattr(index, "cpu_threads", lambda: 8)
    monkeypatch.setattr(index, "passive_openmp", lambda: True)
    seen: list[int] = []

    def search() -> None:
        with index._faiss_threads():
            seen.append(faiss.omp_get_max_threads())  # OpenMP's setting is the calling thread's own

    memory_bank._on_cpu_threads(search, [(), (), ()], torch.device("cpu"))
    assert seen == [1, 1, 1]
    search()  # a call outside the tasks takes every core again
    assert seen[-1] == 8


@pytest.mark.parametrize("workers", [1, 2])
def test_memory_bank_cross_fit_keeps_no_more_held_out_banks_than_it_picks_at_once(
    monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    """A held-out bank is (k-1)/k of the bank: all k of them at once outweighed the embeddings saved (WRN-50's
    1,536 columns, 10 folds of 100 images: peak 1.09 GB against 1.05 GB with all embeddings at once)."""
    import weakref

    import anomaly.scorers.memory_bank as memory_bank

    train, folds = _layers(12, 0), np.arange(12) % 4
    monkeypatch.setattr(memory_bank, "cpu_threads", lambda: workers)
    made: list[weakref.ref[np.ndarray]] = []
    alive: list[int] = []
    bank_of, score_against = memory_bank.MemoryBankScorer.held_out_bank, memory_bank.MemoryBankScorer.score_against

    def tracked(self: memory_bank.MemoryBankScorer, *args: object) -> np.ndarray:
        bank = bank_of(self, *args)  # type: ignore[arg-type]
        made.append(weakref.ref(bank))
        return bank

    def counted(self: memory_bank.MemoryBankScorer, *args: object, **kwargs: object) -> object:
        alive.append(sum(ref() is not None for ref in made))
        return score_against(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(memory_bank.MemoryBankScorer, "held_out_bank", tracked)
    monkeypatch.setattr(memory_bank.MemoryBankScorer, "score_against", counted)
    get_scorer("memory_bank", {"coreset_ratio": 0.25}).cross_fit(train, folds)
    assert len(alive) == 4 and max(alive) <= workers


def test_memory_bank_forgets_the_rows_of_named_training_images() -> None:
    normal, odd = _layers(10, 0), _layers(2, 3, anomaly=True)
    train = [torch.cat([a, b]) for a, b in zip(normal, odd)]  # images 10 and 11 carry a defect
    scorer = get_scorer("memory_bank", {"coreset_ratio": 0.1})
    scorer.fit(train)
    taken = np.isin(scorer.bank_image_, [10, 11])
    assert taken.any() and np.all(scorer.score(odd).image_scores < 0.5)  # their defect vouches for itself
    assert scorer.forget(np.array([10, 11])) == taken.sum()
    assert len(scorer.bank_) == len(taken) - taken.sum() and not np.isin(scorer.bank_image_, [10, 11]).any()
    assert np.all(scorer.score(odd).image_scores > 1.0)  # the index was rebuilt without them
    assert scorer.forget(np.array([10, 11])) == 0
    gaussian = get_scorer("gaussian", {}).fit(train)
    assert gaussian.forget(np.array([10])) == 0  # mean and covariance summarise every image


def test_after_a_cross_fit_the_forgotten_rows_are_replaced_by_other_images() -> None:
    """Dropping the rows alone thinned the bank (28 % of 24 bottles' bank): the normal regions those rows covered
    then scored above the threshold calibrated before (18 of 20 good bottles flagged). After a cross-fit the bank
    is picked again at its size from the other images' candidates."""
    normal, odd = _layers(22, 0), _layers(2, 3, anomaly=True)
    train = [torch.cat([a, b]) for a, b in zip(normal, odd)]  # images 22 and 23 carry a defect
    folds = np.arange(24) % 4
    scorer = get_scorer("memory_bank", {"coreset_ratio": 0.05})
    scorer.cross_fit(train, folds)
    size, fresh = len(scorer.bank_), _layers(6, 7)
    before = scorer.score(fresh).image_scores
    taken = int(np.isin(scorer.bank_image_, [22, 23]).sum())
    assert taken and scorer.forget(np.array([22, 23])) == taken
    assert len(scorer.bank_) == size and not np.isin(scorer.bank_image_, [22, 23]).any()
    assert np.all(scorer.score(odd).image_scores > 1.0)  # their defects no longer vouch for themselves
    assert np.all(scorer.score(fresh).image_scores <= before * 1.05)  # normal coverage kept
    assert scorer._candidates is None  # the fit has ended: nothing held; a later forget drops rows only
    dropped = scorer.forget(np.array([0]))
    assert dropped and len(scorer.bank_) == size - dropped


@pytest.mark.parametrize("name, params", [("padim", {"n_features": 8}), ("gaussian", {})])
def test_cross_fit_equals_refitting_without_each_fold(name: str, params: dict) -> None:
    """padim: from sufficient statistics; gaussian: the base class's refit of a clone per fold."""
    train = _layers(9, 0)
    folds = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    out = get_scorer(name, params).cross_fit(train, folds)
    rest = torch.from_numpy(np.flatnonzero(folds != 1))
    twin = get_scorer(name, params).fit([x[rest] for x in train]).score([x[3:6] for x in train])
    np.testing.assert_allclose(out.image_scores[3:6], twin.image_scores, rtol=1e-4)
    if out.patch_maps is not None:
        np.testing.assert_allclose(out.patch_maps[3:6], twin.patch_maps, rtol=1e-4)


def test_padim_builds_its_embeddings_a_chunk_of_positions_at_a_time_as_upsampling_all_would() -> None:
    """No (positions, N, d) tensor of every image is held (ALGORITHMS.md 2.4); the chunks must be exactly the
    nearest-upsampled, concatenated, subset layers, also where a grid is not a whole multiple of another."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    layers = [torch.randn(5, c, h, w, generator=gen) for c, h, w in [(6, 17, 23), (8, 9, 12), (10, 5, 6)]]
    scorer = get_scorer("padim", {"n_features": 11, "chunk": 50}).fit(layers)
    whole = torch.cat([F.interpolate(x, size=(17, 23), mode="nearest") for x in layers], dim=1)
    whole = whole[:, torch.from_numpy(scorer.channels_)].flatten(2).permute(2, 0, 1)  # (P, N, d)
    parts = scorer._positions(layers)
    chunks = [scorer._embed_chunk(layers, parts, sl) for sl in scorer._chunks(layers)]
    assert len(chunks) == 8 and torch.equal(torch.cat(chunks), whole)
    centred = whole.double() - whole.double().mean(1, keepdim=True)
    cov = centred.transpose(1, 2) @ centred / 4 + 0.01 * torch.eye(11, dtype=torch.float64)
    torch.testing.assert_close(scorer.chol_, torch.linalg.cholesky(cov).float())


def test_padim_says_when_it_has_fewer_channels_than_features_asked_for(caplog: pytest.LogCaptureFixture) -> None:
    scorer = get_scorer("padim", {"n_features": 1000}).fit(_layers(4, 0))
    assert len(scorer.channels_) == 14
    assert "n_features=1000: the layers give 14 channels, all of them are used" in caplog.text


def test_the_gaussian_scorer_keeps_each_layers_average_not_its_maps() -> None:
    layers = _layers(4, 0)
    kept = get_scorer("gaussian", {}).kept_features(layers)
    assert [tuple(x.shape) for x in kept] == [(4, x.shape[1], 1, 1) for x in layers]
    full = get_scorer("gaussian", {}).fit(_layers(9, 1))
    assert np.array_equal(full.score(kept).image_scores, full.score(layers).image_scores)


def test_the_gaussian_scorer_refuses_a_non_boolean_assume_centered() -> None:
    """`--set scorer.params.assume_centered=maybe` was a scikit-learn traceback (exit 1) after the backbone ran."""
    for value in ("maybe", 1, None):
        with pytest.raises(ConfigError, match=r"scorer.params.assume_centered must be true or false"):
            get_scorer("gaussian", {"assume_centered": value})
    assert get_scorer("gaussian", {"assume_centered": True}).fit(_layers(4, 0)).means_ is not None


@pytest.mark.parametrize("name", TRAINED)
def test_a_fit_on_copies_of_one_image_scores_any_change_higher(name: str) -> None:
    """The gaussian scorer's covariance of identical images is zero, and so was its precision: every image, a
    defect too, scored 0."""
    copies = [x[:1].repeat(6, 1, 1, 1) for x in _layers(1, 0)]
    changed = [x[:1] + 0.5 * torch.randn_like(x[:1]) for x in copies]
    scorer = get_scorer(name, {}).fit(copies)
    same, other = scorer.score([x[:1] for x in copies]).image_scores, scorer.score(changed).image_scores
    assert np.isfinite(other).all() and other[0] > same[0] + 1e-3, (same, other)


def test_a_scorer_registered_from_outside_the_package_runs_in_a_detector(tmp_path) -> None:
    from anomaly.config import apply_overrides, load_config
    from anomaly.detector import Detector
    from anomaly.scorers import ScoreOutput, Scorer, register_scorer

    @register_scorer
    class MeanDistance(Scorer):  # a new kNN-like variant: one class, nothing edited in the package
        name = "test_mean_distance"

        def __init__(self, *, scale: float = 1.0) -> None:
            self.scale = scale
            self.mean_ = None

        def fit(self, layers, *, progress=None):
            self.mean_ = layers[0].mean(0, keepdim=True)
            return self

        def score(self, layers, *, reference=None, embeddings=None, progress=None):
            maps = ((layers[0] - self.mean_) ** 2).sum(1).sqrt() * self.scale
            return ScoreOutput(maps.cpu().numpy(), maps.flatten(1).amax(1).double().cpu().numpy())

        def state_dict(self):
            return {"mean": self.mean_.numpy()}

        def load_state_dict(self, state):
            self.mean_ = torch.from_numpy(state["mean"])

    with pytest.raises(ValueError, match="already registered"):
        register_scorer(type("Other", (MeanDistance,), {"name": "test_mean_distance"}))
    same = {"name": "test_mean_distance", "__qualname__": MeanDistance.__qualname__, "__module__": __name__}
    assert register_scorer(type("MeanDistance", (MeanDistance,), same)) is not MeanDistance
    register_scorer(MeanDistance)
    config = apply_overrides(
        load_config("patchcore"),
        ["scorer.name=test_mean_distance", "scorer.params={}", "backbone.image_size=[64,64]", "threshold.folds=3"],
    )
    images = [np.full((64, 64, 3), 100 + i, np.uint8) for i in range(6)]
    det = Detector(config).fit(images)
    det.save(tmp_path / "m")
    loaded = Detector.load(tmp_path / "m")
    assert loaded.predict(images[0]).image_score == pytest.approx(det.predict(images[0]).image_score)
    from anomaly import ScorerError

    real_score = MeanDistance.score
    broken = {  # a plug-in that breaks the contract is named, not an IndexError deep in the Detector
        "image_scores must be an array of shape (2,), got shape (1,)": lambda out: ScoreOutput(
            out.patch_maps, out.image_scores[:1]
        ),
        "patch_maps must be None or an array of shape (1, h, w), got shape (1, 8)": lambda out: ScoreOutput(
            out.patch_maps[:, 0], out.image_scores
        ),
        "NaN or infinite": lambda out: ScoreOutput(out.patch_maps, out.image_scores * np.nan),
    }
    for message, damage in broken.items():
        MeanDistance.score = lambda self, layers, damage=damage, **kw: damage(real_score(self, layers, **kw))
        with pytest.raises(ScorerError, match=r"scorer test_mean_distance: .*" + re.escape(message)):
            loaded.predict(images[:1] if "(1, h, w)" in message else images[:2])
    MeanDistance.score = real_score


def test_invalid_params_raise_config_errors() -> None:
    with pytest.raises(ConfigError, match="coreset_ratio"):
        get_scorer("memory_bank", {"coreset_ratio": 0})
    with pytest.raises(ConfigError, match="distance"):
        get_scorer("memory_bank", {"distance": "cosine"})


def _exact_greedy(x: np.ndarray, n: int, starts: np.ndarray) -> list[int]:
    d = np.linalg.norm(x[:, None] - x[starts][None], axis=2).mean(1)
    picks = []
    for _ in range(n):
        j = int(np.argmax(d))
        picks.append(j)
        d = np.minimum(d, np.linalg.norm(x - x[j], axis=1))
    return picks


def test_coreset_matches_brute_force_farthest_point_selection() -> None:
    x = torch.randn(300, 5, generator=torch.Generator().manual_seed(0))
    picks = greedy_coreset(x, 20, projection_dim=0, n_starts=10, seed=3)
    starts = torch.randperm(300, generator=torch.Generator().manual_seed(3))[:10].numpy()
    assert picks.tolist() == _exact_greedy(x.numpy().astype(np.float64), 20, starts)
    assert len(set(picks.tolist())) == 20


@pytest.mark.parametrize("numpy_rows", [0, 50_000])  # the torch loop and the numpy loop
def test_coreset_continues_from_initial_rows_as_farthest_point_selection(numpy_rows: int, monkeypatch) -> None:
    monkeypatch.setattr("anomaly.scorers._coreset._NUMPY_ROWS", numpy_rows)
    x = torch.randn(300, 5, generator=torch.Generator().manual_seed(1))
    initial = np.array([7, 150, 42])
    picks = greedy_coreset(x, 12, projection_dim=0, initial=initial)
    xs = x.numpy().astype(np.float64)
    d = np.linalg.norm(xs[:, None] - xs[initial][None], axis=2).min(1)
    expected = initial.tolist()
    for _ in range(9):
        j = int(np.argmax(d))
        expected.append(j)
        d = np.minimum(d, np.linalg.norm(xs - xs[j], axis=1))
    assert picks.tolist() == expected
    with pytest.raises(ValueError, match="initial"):
        greedy_coreset(x, 3, initial=initial)


def test_coreset_covers_isolated_clusters_first() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.cat(
        [torch.randn(500, 16, generator=g) * 0.01, torch.randn(3, 16, generator=g) * 0.01 + 10 * torch.eye(16)[:3]]
    )
    picks = set(greedy_coreset(x, 4, projection_dim=8).tolist())
    assert {500, 501, 502} <= picks


def test_numpy_coreset_loop_holds_blas_to_one_thread() -> None:
    """OpenBLAS's own threads stall each short pick on a loaded machine; the limit is lifted afterwards."""
    from threadpoolctl import threadpool_info

    def blas_threads() -> list[int]:
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    seen: list[list[int]] = []
    x = torch.randn(400, 8, generator=torch.Generator().manual_seed(0))
    before = blas_threads()
    assert before, "numpy's BLAS is loaded"
    greedy_coreset(x, 100, projection_dim=0, progress=lambda done, total: seen.append(blas_threads()))
    assert seen and all(threads == [1] * len(before) for threads in seen)
    assert blas_threads() == before


def test_a_large_fold_picks_its_coreset_chunk_by_chunk(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Each chunk gives its share of the fold's picks, and an outlier in any chunk is among them."""
    import anomaly.scorers.memory_bank as memory_bank

    monkeypatch.setattr(memory_bank, "_CHUNK_ROWS", 64)
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(4, 8, 8, 6, generator=g) * 0.01  # 4 images x 64 patches: 256 rows -> 4 chunks of 64
    outliers = [(0, 3, 3), (2, 5, 1), (3, 0, 7)]  # rows 27, 169, 199 in chunks 0, 2 and 3
    for i, (img, y, x) in enumerate(outliers):
        emb[img, y, x, i] += 5.0
    scorer = get_scorer("memory_bank", {"coreset_ratio": 0.1, "projection_dim": 0})
    found = scorer.fold_candidates(emb, np.array([10, 11, 12, 13]), 10)
    assert len(found.vectors) == 4 * 3  # ceil(10 * 64 / 256) picks in each of the 4 chunks
    rows = emb.reshape(-1, 6)
    picked = {int(torch.cdist(v[None], rows).argmin()) for v in found.vectors}
    assert len(picked) == 12 and {27, 169, 199} <= picked
    assert sorted(set(found.images.tolist())) == [10, 11, 12, 13]  # rows keep the training image they came from
    monkeypatch.setattr(memory_bank, "_CHUNK_ROWS", 256)  # one chunk: the plain greedy pick
    assert len(scorer.fold_candidates(emb, np.array([10, 11, 12, 13]), 10).vectors) == 10


def test_patchcore_caps_its_bank_so_the_fit_grows_linearly() -> None:
    from anomaly.config import load_config

    params = load_config("patchcore").scorer.params
    scorer = get_scorer("memory_bank", params)
    assert scorer._bank_size(150 * 1024) == math.floor(0.04 * 150 * 1024)  # small sets: 4 % of the patches
    assert scorer._bank_size(2000 * 1024) == 8192  # large sets: the cap


def test_flat_index_returns_true_l2_and_hnsw_keeps_recall() -> None:
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((5000, 32)).astype(np.float32)
    queries = rng.standard_normal((500, 32)).astype(np.float32)
    exact = NNIndex("Flat").build(bank)
    dist, ids = exact.search(queries, 1)
    np.testing.assert_allclose(dist[:, 0], np.linalg.norm(bank[ids[:, 0]] - queries, axis=1), rtol=1e-4)
    _, approx_ids = NNIndex("HNSW32,Flat").build(bank).search(queries, 1)
    assert (approx_ids[:, 0] == ids[:, 0]).mean() >= 0.95
    restored = NNIndex("Flat").deserialize(exact.serialize())
    np.testing.assert_array_equal(restored.search(queries, 1)[1], ids)


def test_faiss_leaves_the_backbone_threads_as_they_were() -> None:
    """FAISS and torch share one OpenMP runtime when torch is loaded first, as the Detector loads them: FAISS's
    thread count must not outlast its own calls (it left torch on one thread of two after a first fit)."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, numpy as np\n"
        "from anomaly.index import NNIndex\n"
        "bank = np.random.default_rng(0).standard_normal((5000, 8)).astype(np.float32)\n"
        "NNIndex('auto').build(bank).search_images(bank[:256].reshape(2, 128, 8))\n"  # IVF: train, add, searches
        "print(torch.get_num_threads())\n"
    )
    # torch starts on at least 2 threads; FAISS with spinning threads takes half the cores, so fewer
    threads = str(max(2, os.cpu_count() or 2))
    env = {**os.environ, "OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": threads}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True)
    assert out.stdout.split()[-1] == threads


def test_auto_index_is_exact_for_small_banks_and_an_inverted_file_above() -> None:
    assert auto_index_string(4095) == "Flat"
    assert auto_index_string(10_700) == "IVF128,Flat"  # about 64 rows per list
    assert auto_index_string(200_001) == "HNSW32,Flat"
    index = NNIndex("auto").build(np.random.default_rng(0).standard_normal((5000, 8)).astype(np.float32))
    assert index.approximate and faiss.extract_index_ivf(index._cpu).nprobe == 64 // 16


def test_approximate_index_keeps_every_image_score_exact() -> None:
    """IVF misses some nearest rows, but each image's highest patches are searched exhaustively."""
    train, test = _layers(70, 0), _layers(20, 1)  # 4,480 bank rows: "auto" builds an IVF index
    flat = get_scorer("memory_bank", {"coreset_ratio": 1.0}).fit(train).score(test)
    scorer = get_scorer("memory_bank", {"coreset_ratio": 1.0, "index": "auto"}).fit(train)
    approx = scorer.score(test)
    assert scorer.index_ is not None and scorer.index_.approximate
    assert not np.array_equal(approx.patch_maps, flat.patch_maps)  # the data is hard enough for IVF to miss
    np.testing.assert_array_equal(approx.image_scores, flat.image_scores)
    assert np.all(approx.patch_maps >= flat.patch_maps - 1e-6)  # a missed row only overestimates


@pytest.mark.parametrize("string", ["auto", "IVF16,PQ2"])
def test_an_ivf_index_whose_probed_lists_hold_fewer_than_k_rows_still_finds_k(string: str) -> None:
    """FAISS fills the neighbours it did not find with id -1 and the largest float: k = 300 against the ~256 rows
    of 4 probed lists gave patch distances of 1.8e19, image scores of 7e18 (a cross-fit's held-out banks, half
    the rows in the same lists, at k = 120 already)."""
    rng = np.random.default_rng(0)
    bank, queries = rng.standard_normal((5000, 8)).astype(np.float32), rng.standard_normal((64, 8)).astype(np.float32)
    index = NNIndex(string).build(bank)
    assert index.approximate and (index._search.search(queries, 300)[1] < 0).any()  # FAISS's own answer
    dist, ids = index.search(queries, 300)
    assert (ids >= 0).all() and np.isfinite(dist).all() and dist.max() < 10
    if string == "auto":  # rows kept: the queries searched again are exact
        exact, _ = NNIndex("Flat").build(bank).search(queries, 300)
        lost = (index._search.search(queries, 300)[1] < 0).any(1)
        np.testing.assert_array_equal(dist[lost], exact[lost])
        assert np.all(dist >= exact - 1e-6)


def test_a_memory_bank_refuses_training_features_that_are_not_finite() -> None:
    """One NaN won every argmax of the greedy pick and poisoned every distance: the bank became 128 copies of one
    row (normal scores 15x higher), which saved without complaint and was refused at load."""
    from anomaly.errors import DataError

    train = _layers(20, 0)
    train[0][3, 0, 2, 2] = float("nan")
    train[1][7, 1, 0, 0] = float("inf")
    with pytest.raises(DataError, match=r"training row\(s\) \[3, 7\] have NaN or infinite features"):
        get_scorer("memory_bank", {"coreset_ratio": 0.1}).fit(train)
    with pytest.raises(DataError, match=r"training row\(s\) \[3, 7\]"):  # both in fold 3
        get_scorer("memory_bank", {"coreset_ratio": 0.1}).cross_fit(train, np.arange(20) % 4)


def test_a_non_finite_feature_gives_a_nan_score_not_faiss_empty_slot() -> None:
    """A NaN or infinite query finds no bank row; its distance was FAISS's empty slot, 1.8e19, a finite score that
    the checks for non-finite scores ("check backbone.mean/std and the input") let through."""
    scorer = get_scorer("memory_bank", {"coreset_ratio": 0.5}).fit(_layers(6, 0))
    test = _layers(3, 1)
    test[0][1, 0, 2, 2] = float("nan")
    test[0][2, 0, 2, 2] = float("inf")
    out = scorer.score(test)
    assert np.isfinite(out.image_scores[0]) and np.isnan(out.image_scores[1:]).all()
    assert out.patch_maps is not None and np.isfinite(out.patch_maps[0]).all() and np.isnan(out.patch_maps[1:]).any()
    assert np.nanmax(out.patch_maps) < 10


def test_an_index_with_compressed_rows_scores_images_without_a_second_pass() -> None:
    rng = np.random.default_rng(0)
    index = NNIndex("IVF16,PQ4x4").build(rng.standard_normal((2000, 8)).astype(np.float32))
    queries = rng.standard_normal((3, 50, 8)).astype(np.float32)
    dist, ids = index.search_images(queries, 2)
    assert dist.shape == ids.shape == (150, 2) and np.isfinite(dist).all()
    with pytest.raises(BackendError, match="keeps no rows"):
        index.search_exact(queries[0])


@pytest.mark.parametrize("string", ["SQ8", "IVF16,PQ7x4", "HNSW16,SQ8"])
def test_a_memory_bank_with_compressed_rows_loads_as_it_was_saved(tmp_path, string: str) -> None:  # type: ignore[no-untyped-def]
    """The load compared the index's rows, read back from their lossy codes, with the bank itself: every model
    with a PQ or SQ index was refused ("index rows differ from the saved bank")."""
    from anomaly._fs import load_tensors, save_tensors
    from anomaly.scorers.base import STATE_FILE

    train, test = _layers(12, 0), _layers(3, 1)
    scorer = get_scorer("memory_bank", {"coreset_ratio": 1.0, "index": string}).fit(train)
    names = scorer.save(tmp_path)
    loaded = get_scorer("memory_bank", {"coreset_ratio": 1.0, "index": string})
    loaded.load({name: tmp_path / name for name in names})
    before, after = scorer.score(test), loaded.score(test)
    np.testing.assert_array_equal(after.image_scores, before.image_scores)
    np.testing.assert_array_equal(after.patch_maps, before.patch_maps)
    state = load_tensors(tmp_path / STATE_FILE)
    state["bank"][5] += 1.0  # a bank the index does not hold is still refused
    save_tensors(state, tmp_path / STATE_FILE)
    with pytest.raises(ValueError, match="index rows differ"):
        get_scorer("memory_bank", {"coreset_ratio": 1.0, "index": string}).load(
            {name: tmp_path / name for name in names}
        )


def test_an_index_can_reuse_the_lists_of_another() -> None:
    rng = np.random.default_rng(0)
    bank, other = (rng.standard_normal((n, 8)).astype(np.float32) for n in (5000, 3000))
    full = NNIndex("auto").build(bank)
    reused = NNIndex("auto").build(other, lists_of=full)  # 3,000 rows alone would have been Flat
    centroids = [faiss.extract_index_ivf(i._cpu).quantizer.reconstruct_n(0, 64) for i in (full, reused)]
    np.testing.assert_array_equal(*centroids)
    assert reused.ntotal == 3000
    queries = rng.standard_normal((200, 8)).astype(np.float32)
    np.testing.assert_array_equal(reused.search_exact(queries)[1], NNIndex("Flat").build(other).search(queries)[1])


def test_approximate_index_image_peaks_are_exact() -> None:
    """The top 1/16 of an image's patches re-searched exhaustively left a lower patch whose approximate (over-
    estimated) distance exceeded them as the image's score: up to 7 % above the exact peak on random features."""
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((2000, 32)).astype(np.float32)
    queries = rng.standard_normal((6, 64, 32)).astype(np.float32)
    exact = NNIndex("Flat").build(bank).search_images(queries, 1)[0].reshape(6, 64).max(1)
    ivf = NNIndex("IVF32,Flat", nprobe=1).build(bank)
    np.testing.assert_allclose(ivf.search_images(queries, 1)[0].reshape(6, 64).max(1), exact, rtol=1e-6)


class _FakeGpuFaiss:
    """Stands in for a CUDA FAISS build with two GPUs: records each clone, searches on the CPU index."""

    def __init__(self, monkeypatch) -> None:  # type: ignore[no-untyped-def]
        self.clones: list[int] = []
        monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2, raising=False)
        monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
        monkeypatch.setattr(faiss, "index_cpu_to_gpu", self._clone, raising=False)

    def _clone(self, resources, device, index):  # type: ignore[no-untyped-def]
        self.clones.append(device)
        return faiss.clone_index(index)


def test_faiss_searches_on_the_gpu_the_queries_come_from(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    fake = _FakeGpuFaiss(monkeypatch)
    bank = np.random.default_rng(0).standard_normal((200, 8)).astype(np.float32)
    assert NNIndex("Flat").build(bank)._search_gpu is None  # features on the CPU: FAISS stays there too
    assert fake.clones == []
    index = NNIndex("Flat", gpu=1).build(bank)  # features on cuda:1 search on GPU 1, not GPU 0
    assert fake.clones == [1] and index._search_gpu == 1
    index.place(1)
    assert fake.clones == [1]  # already there: no second copy
    index.place(None)
    assert index._search_gpu is None and index._search is index._cpu
    np.testing.assert_array_equal(index.search(bank[:5])[1][:, 0], np.arange(5))
    assert NNIndex("Flat", use_gpu=False, gpu=1).build(bank)._search_gpu is None
    assert NNIndex("Flat", use_gpu=True).build(bank)._search_gpu == 0  # forced: GPU 0 when none is named
    hnsw = NNIndex("HNSW32,Flat", use_gpu=True, gpu=1).build(bank)  # no GPU HNSW in FAISS
    assert hnsw._search_gpu is None and fake.clones == [1, 0]


def test_index_types_without_a_gpu_version_search_on_the_cpu(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A CUDA FAISS build copies Flat, IVF..,Flat/SQ/PQ to a GPU but not PQ, SQ8, LSH, NSG or refine indexes: with
    ``use_gpu: auto`` such an index crashed the fit on a GPU machine (a traceback from index_cpu_to_gpu)."""
    fake = _FakeGpuFaiss(monkeypatch)

    def to_gpu(resources, device, index):  # type: ignore[no-untyped-def]
        if not isinstance(faiss.downcast_index(index), faiss.IndexFlat):
            raise RuntimeError("Error in ... at GpuCloner.cpp:180: This index type is not implemented on GPU.")
        return fake._clone(resources, device, index)

    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    bank = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
    index = NNIndex("SQ8", gpu=1).build(bank)
    assert index._search_gpu is None and index._search is index._cpu
    np.testing.assert_array_equal(index.search(bank[:5])[1][:, 0], np.arange(5))
    index.place(1)
    assert index._search_gpu is None  # not tried again on every search
    assert NNIndex("Flat", gpu=1).build(bank)._search_gpu == 1 and fake.clones == [1]
    with pytest.raises(BackendError, match="cannot search 'SQ8' on a GPU"):
        NNIndex("SQ8", use_gpu=True).build(bank)


def test_gpu_searches_from_several_threads_take_turns(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """FAISS's GPU indexes are not thread-safe even to search, and ``predict`` may be called from several threads
    (README): two searches ran on one GPU index at once. CPU searches stay concurrent."""
    import copy
    import pickle
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    class Guarded:
        def __init__(self, index, inside: list[int]) -> None:  # type: ignore[no-untyped-def]
            self.index, self.inside, self.lock = index, inside, threading.Lock()

        def search(self, queries, k):  # type: ignore[no-untyped-def]
            with self.lock:
                self.inside[0] += 1
                self.inside[1] = max(self.inside[1], self.inside[0])
            time.sleep(0.02)
            try:
                return self.index.search(queries, k)
            finally:
                with self.lock:
                    self.inside[0] -= 1

    inside = [0, 0]  # searches running now, most at once
    _FakeGpuFaiss(monkeypatch)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", lambda res, dev, index: Guarded(faiss.clone_index(index), inside))
    bank = np.random.default_rng(0).standard_normal((200, 8)).astype(np.float32)
    index = NNIndex("Flat", gpu=0).build(bank)
    with ThreadPoolExecutor(4) as pool:
        found = list(pool.map(lambda i: index.search(bank[i : i + 1])[1][0, 0], range(8)))
    assert found == list(range(8)) and inside[1] == 1
    for twin in (copy.deepcopy(index), pickle.loads(pickle.dumps(index))):  # a GPU index does not pickle
        assert twin._search is twin._cpu and twin.search(bank[3:4])[1][0, 0] == 3


def test_a_memory_bank_run_on_the_cpu_keeps_faiss_off_the_gpu(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    fake = _FakeGpuFaiss(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # torch has a GPU; the model was put on the CPU
    scorer = get_scorer("memory_bank", {"coreset_ratio": 0.5}).fit(_layers(6, 0))
    scorer.score(_layers(2, 1))
    assert fake.clones == [] and scorer.index_ is not None and scorer.index_._search_gpu is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only torch: FAISS's own GPU serves
    scorer.score(_layers(2, 1))
    assert fake.clones == [0] and scorer.index_._search_gpu == 0


def test_features_on_cuda_n_search_on_faiss_gpu_n(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from anomaly.scorers.memory_bank import _faiss_gpu_for

    assert _faiss_gpu_for(torch.device("cuda", 1)) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _faiss_gpu_for(torch.device("cpu")) is None  # the model was put on the CPU: FAISS stays there
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _faiss_gpu_for(torch.device("cpu")) == 0  # CPU-only torch: a CUDA FAISS build still serves


def test_use_gpu_true_without_a_faiss_gpu_is_refused(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0, raising=False)
    with pytest.raises(BackendError, match="FAISS sees no GPU"):
        NNIndex("Flat", use_gpu=True).build(np.zeros((10, 4), np.float32))


def test_under_trained_ivf_is_refused() -> None:
    with pytest.raises(BackendError, match="needs >= "):
        NNIndex("IVF256,Flat").build(np.zeros((100, 8), np.float32))


def test_scorers_from_another_package_load_through_the_entry_point_group(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from anomaly.scorers import Scorer, registry

    class PluginScorer(Scorer):
        name = "test_plugin_scorer"

        def fit(self, layers, *, progress=None):  # type: ignore[no-untyped-def]
            return self

        def score(self, layers, *, reference=None, embeddings=None, progress=None):  # type: ignore[no-untyped-def]
            raise NotImplementedError

        def state_dict(self):  # type: ignore[no-untyped-def]
            return {}

        def load_state_dict(self, state):  # type: ignore[no-untyped-def]
            pass

    class EntryPoint:
        name, value = "test_plugin_scorer", "plugin_pkg.scorers:PluginScorer"

        def load(self):  # type: ignore[no-untyped-def]
            return PluginScorer

    class Broken(EntryPoint):
        name, value = "broken", "broken_pkg:Missing"

        def load(self):  # type: ignore[no-untyped-def]
            raise ImportError("no module named broken_pkg")

    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.setattr(
        registry, "entry_points", lambda group: [EntryPoint(), Broken()] if group == registry.ENTRY_POINT_GROUP else []
    )
    assert "test_plugin_scorer" in registry.list_scorers()  # the broken plug-in is logged, not fatal
    assert isinstance(registry.get_scorer("test_plugin_scorer"), PluginScorer)


@pytest.mark.parametrize("name", list_scorers())
def test_scorers_follow_scikit_learns_parameter_conventions(name: str) -> None:
    from sklearn.base import clone

    scorer = get_scorer(name)
    twin = clone(scorer)
    assert type(twin) is type(scorer) and twin.get_params() == scorer.get_params()
    assert repr(scorer).startswith(f"{type(scorer).__name__}(") and "=" in repr(scorer)
    key, value = next(iter(scorer.get_params().items()))
    assert scorer.set_params(**{key: value}) is scorer
    with pytest.raises(ConfigError, match="unknown parameter"):
        scorer.set_params(no_such_parameter=1)


def test_faiss_searches_run_on_the_threads_this_process_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """A search used every host CPU (os.cpu_count()) whatever OMP_NUM_THREADS or a Ray actor's 1-CPU reservation
    said: each of a node's actors then started one thread per host core."""
    from anomaly import index

    seen: list[int] = []
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    with index._faiss_threads():
        seen.append(faiss.omp_get_max_threads())
    assert seen == [1]


def test_a_memory_bank_fitted_on_float64_features_saves_a_loadable_float32_bank(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The bank kept the features' dtype: float64 features saved a float64 bank, which the load refuses."""
    train, test = [x.double() for x in _layers(12, 0)], _layers(3, 1)
    scorer = get_scorer("memory_bank", {"coreset_ratio": 0.5}).fit(train)
    assert scorer.bank_ is not None and scorer.bank_.dtype == np.float32
    names = scorer.save(tmp_path)
    loaded = get_scorer("memory_bank", {"coreset_ratio": 0.5})
    loaded.load({name: tmp_path / name for name in names})
    np.testing.assert_array_equal(loaded.score(test).patch_maps, scorer.score(test).patch_maps)


def test_a_forget_whose_index_cannot_be_rebuilt_leaves_bank_and_index_as_they_were() -> None:
    """The rows were dropped before the index was rebuilt: an IVF of 64 lists, which needs 2,496 rows to train,
    raised on the 2,432 left and kept its 2,560 rows beside the smaller bank (scores read the wrong rows)."""
    normal, odd = _layers(38, 0), _layers(2, 3, anomaly=True)
    train = [torch.cat([a, b]) for a, b in zip(normal, odd)]  # 40 images x 64 patches: 2,560 rows
    scorer = get_scorer("memory_bank", {"coreset_ratio": 1.0, "index": "IVF64,Flat"}).fit(train)
    before = scorer.score(odd)
    with pytest.raises(BackendError, match="needs >= 2496 bank rows"):
        scorer.forget(np.array([38, 39]))
    assert scorer.bank_ is not None and scorer.bank_image_ is not None and scorer.index_ is not None
    assert len(scorer.bank_) == len(scorer.bank_image_) == scorer.index_.ntotal == 2560
    np.testing.assert_array_equal(scorer.score(odd).image_scores, before.image_scores)


def test_padim_refuses_features_of_another_grid_than_its_fit() -> None:
    """One Gaussian per position of the fit's grid: a smaller grid (a model directory whose input size was edited)
    was scored against the first positions' Gaussians without a word, a larger one failed with a bare RuntimeError."""
    from anomaly.errors import DataError

    scorer = get_scorer("padim", {"n_features": 8, "chunk": 16}).fit(_layers(6, 0))
    assert scorer.score(_layers(2, 1)).patch_maps.shape == (2, 8, 8)
    for size in (4, 16):
        other = [torch.nn.functional.interpolate(x, scale_factor=size / 8) for x in _layers(2, 1)]
        with pytest.raises(DataError, match=f"64 positions.*{size} x {size} = {size * size}"):
            scorer.score(other)
    wide = [x.reshape(2, x.shape[1], x.shape[2] // 2, x.shape[3] * 2) for x in _layers(2, 1)]  # 4 x 16: 64 too
    with pytest.raises(DataError, match="64 positions \\(8 x 8\\).*4 x 16 = 64"):
        scorer.score(wide)
    state = scorer.state_dict()
    assert state["grid"].tolist() == [8, 8]
    old = get_scorer("padim", {"n_features": 8, "chunk": 16})  # a model saved before the grid was kept
    old.load_state_dict({key: value for key, value in state.items() if key != "grid"})
    assert old.grid_ is None and old.score(_layers(2, 1)).patch_maps.shape == (2, 8, 8)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's resettable peak")
def test_padim_fit_holds_its_cholesky_factors_once() -> None:
    """The per-position factors (P x d x d float32) are the model's bulk: chunks joined by torch.cat held them twice
    at the fit's peak (a 1024 px input: 7.2 GB for a 2.6 GB model)."""
    from anomaly._runtime import peak_rss_mb, reset_peak_rss

    gen = torch.Generator().manual_seed(0)
    layers = [torch.randn(3, 40, 96, 96, generator=gen), torch.randn(3, 80, 48, 48, generator=gen)]
    model_mb = 96 * 96 * 100 * 100 * 4 / 2**20  # 352 MiB
    scorer = get_scorer("padim", {"n_features": 100, "chunk": 128})
    assert reset_peak_rss()
    before = peak_rss_mb()
    scorer.fit(layers)
    assert scorer.chol_.shape == (96 * 96, 100, 100) and scorer.chol_.dtype == torch.float32
    assert peak_rss_mb() - before < 1.5 * model_mb
