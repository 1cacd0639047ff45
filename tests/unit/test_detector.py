from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from anomaly import DataError, DetectionResult, Detector, NotFittedError
from anomaly.config import apply_overrides, load_config
from anomaly.data.io import read_image
from anomaly.errors import ConfigError
from anomaly.model_dir import signed
from anomaly.streaming import StreamingDetector


def _config(name: str = "patchcore", *extra: str):
    small = ["backbone.image_size=[128,128]", "batch_size=4"]  # 12 training images: a larger coreset share
    bank = ["scorer.params.coreset_ratio=0.1"] if name == "patchcore" else []
    return apply_overrides(load_config(name), [*small, *bank, *extra])


def _split_train(det: Detector) -> list[Path]:
    return det._train  # type: ignore[attr-defined]


def _split(root: Path) -> tuple[list[Path], list[Path], list[Path]]:
    train = sorted((root / "train" / "good").glob("*.png"))
    good = sorted((root / "test" / "good").glob("*.png"))
    bad = sorted(p for p in (root / "test").glob("*/*.png") if p.parent.name != "good")
    return train, good, bad


@pytest.fixture(scope="module")
def fitted(synthetic_root: Path) -> Detector:
    train, _, _ = _split(synthetic_root)
    det = Detector(_config()).fit(train)
    det._train = train  # type: ignore[attr-defined]
    return det


def test_fit_decodes_each_training_file_once(synthetic_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sample that decides ``standardize: auto`` decodes its images; the extraction took them from there
    instead of decoding them again (bottle: 32 of 209 decodes, about 5 % of the extraction), and fits the same."""
    import anomaly.data.loader as loader
    import anomaly.detector as detector_module

    train, _, _ = _split(synthetic_root)
    counts: dict[str, int] = {}
    read = loader.read_pixels

    def counted(source):  # type: ignore[no-untyped-def]
        counts[str(source)] = counts.get(str(source), 0) + 1
        return read(source)

    monkeypatch.setattr(loader, "read_pixels", counted)
    kept = Detector(_config()).fit(train)
    assert counts == {str(p): 1 for p in train}  # all 12 are in the sample: each read once all the same
    monkeypatch.setattr(detector_module, "_SAMPLE_KEEP_BYTES", 0)  # nothing kept: the sample decodes them again
    counts.clear()
    again = Detector(_config()).fit(train)
    assert counts == {str(p): 2 for p in train}
    assert again.config == kept.config and again.threshold_ == kept.threshold_
    np.testing.assert_array_equal(again.normal_scores_, kept.normal_scores_)
    np.testing.assert_array_equal(again.scorer.bank_, kept.scorer.bank_)  # type: ignore[attr-defined]


def test_fit_reports_how_many_image_pixels_one_patch_covers(
    fitted: Detector, synthetic_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert fitted.patch_footprint_ == (8, 8)  # 128 px images at a 128 px input, stride-8 patches
    train, _, _ = _split(synthetic_root)
    images = [np.kron(read_image(p), np.ones((2, 2, 1), dtype=np.uint8)) for p in train[:6]]  # 256 px
    whole = Detector(_config("patchcore", "threshold.folds=3")).fit(images)
    assert whole.patch_footprint_ == (16, 16)  # 256 px seen at 128: a patch spans 2x its input pixels
    with caplog.at_level(logging.INFO, logger="anomaly"):
        tiled = Detector(_config("patchcore", "threshold.folds=3", "preprocess.tile={size: 64}")).fit(images)
    assert tiled.patch_footprint_ == (4, 4)  # 64 px tiles seen at 128 px: finer than the image's pixels
    assert "fit: 6 images give 150 tiles (25-25 per image)" in caplog.text  # 5 x 5 overlapping 64 px tiles


def test_predict_returns_typed_results_at_original_size(fitted: Detector, synthetic_root: Path) -> None:
    _, good, bad = _split(synthetic_root)
    result = fitted.predict(bad[0])
    assert isinstance(result, DetectionResult)
    assert result.anomaly_map is not None and result.anomaly_map.shape == (128, 128)
    assert result.anomaly_map.dtype == np.float32
    assert result.is_anomalous == (result.image_score >= result.threshold)
    assert result.mask is not None and result.mask.dtype == bool
    batch = fitted.predict(good + bad)
    assert [r.source for r in batch] == [str(p) for p in good + bad]
    normal = [r.image_score for r in batch[: len(good)]]
    anomalous = [r.image_score for r in batch[len(good) :]]
    assert min(anomalous) > max(normal)  # the painted defects are found
    assert not any(r.is_anomalous for r in batch[: len(good)])  # threshold from normal images only
    assert all(r.is_anomalous for r in batch[len(good) :])  # and it does flag: the line above is no empty check


def test_predict_stream_takes_one_image_given_alone_as_one_input(fitted: Detector, synthetic_root: Path) -> None:
    """A 3-D array, a CHW tensor or a path given alone is one image, as in predict and fit: it was iterated, and an
    RGB frame gave one result per row (each row scored as a (W, 3) gray image), a CHW tensor one per channel."""
    import torch

    _, good, _ = _split(synthetic_root)
    rgb = read_image(good[0])
    expected = fitted.predict(rgb)
    for one in (rgb, torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))), good[0], str(good[0])):
        streamed = [result for result, _ in fitted.predict_stream(one)]
        assert len(streamed) == 1
        assert streamed[0].image_score == pytest.approx(expected.image_score, rel=1e-6)
        assert streamed[0].anomaly_map is not None and streamed[0].anomaly_map.shape == rgb.shape[:2]
    stack = np.stack([rgb, rgb])  # a 4-D stack and a generator are still many
    assert len(list(fitted.predict_stream(stack))) == 2
    assert len(list(fitted.predict_stream(x for x in [good[0], good[1]]))) == 2


def test_predict_stream_takes_a_1d_array_of_paths_as_many(fitted: Detector, synthetic_root: Path) -> None:
    """``np.array(paths)`` or a pandas column of paths (1-D, never an image) was iterated before one image given alone
    became one input; since then it was one input, refused as an image array of shape (N,)."""
    _, good, _ = _split(synthetic_root)
    paths = np.array([str(p) for p in good[:2]])
    expected = [r.image_score for r in fitted.predict([str(p) for p in good[:2]])]
    assert [r.image_score for r, _ in fitted.predict_stream(paths)] == pytest.approx(expected, rel=1e-6)


def test_predict_takes_the_collections_predict_stream_takes(fitted: Detector, synthetic_root: Path) -> None:
    """``predict(np.array(paths))`` (or ``df["path"]``, a set, ``dict.keys()``) was one input, refused as an image of
    shape (N,), where ``predict_stream`` and ``fit`` took its items; and ``predict_stream`` walked a memoryview of an
    encoded image byte by byte, where ``predict`` took it as one image."""
    _, good, _ = _split(synthetic_root)
    names = [str(p) for p in good[:2]]
    expected = [r.image_score for r in fitted.predict(names)]
    for paths in (np.array(names), {n: 0 for n in names}.keys(), range(0)):
        results = fitted.predict(paths)
        assert isinstance(results, list) and [r.image_score for r in results] == expected[: len(paths)]  # all, in order
    assert {r.image_score for r in fitted.predict(set(names))} == set(expected)
    encoded = memoryview(good[0].read_bytes())
    streamed = [r.image_score for r, _ in fitted.predict_stream(encoded)]
    assert streamed == [fitted.predict(encoded).image_score] == expected[:1]


def test_predict_takes_a_1d_uint8_array_as_one_encoded_image(fitted: Detector, synthetic_root: Path) -> None:
    """``np.fromfile(path, np.uint8)`` (or ``cv2.imencode``'s buffer) was taken as N inputs, each refused as "an
    unsupported image input of type uint8": it is one encoded image, scored as its file is."""
    _, good, _ = _split(synthetic_root)
    expected = fitted.predict(str(good[0])).image_score
    encoded = np.fromfile(good[0], np.uint8)
    assert fitted.predict(encoded).image_score == pytest.approx(expected, rel=1e-6)
    assert [r.image_score for r in fitted.predict([encoded, encoded[::1]])] == pytest.approx([expected] * 2, rel=1e-6)
    assert [r.image_score for r, _ in fitted.predict_stream(encoded)] == pytest.approx([expected], rel=1e-6)
    strided = np.repeat(encoded, 2)[::2]  # the same bytes, not contiguous
    assert fitted.predict(strided).image_score == pytest.approx(expected, rel=1e-6)


def _as_12_bit(paths: list[Path], folder: Path) -> list[Path]:
    """The same pixels as a 12-bit camera writes them into 16-bit PNGs (value x 16, at most 4080)."""
    folder.mkdir()
    copies = [folder / f"{i:03d}.png" for i in range(len(paths))]
    for path, copy in zip(paths, copies):
        cv2.imwrite(str(copy), read_image(path)[..., ::-1].astype(np.uint16) * 16)
    return copies


def test_bit_depth_auto_reads_12_bit_images_like_their_8_bit_originals(
    fitted: Detector, synthetic_root: Path, tmp_path: Path
) -> None:
    train, good, bad = _split(synthetic_root)
    det = Detector(_config()).fit(_as_12_bit(train, tmp_path / "train"))
    assert det.config.preprocess.bit_depth == 12 and fitted.config.preprocess.bit_depth == 16
    assert det.threshold_ == pytest.approx(fitted.threshold_, rel=1e-6)  # the same pixels, so the same model
    test12 = _as_12_bit(good + bad, tmp_path / "test")
    expected = [r.image_score for r in fitted.predict(good + bad)]
    assert [r.image_score for r in det.predict(test12)] == pytest.approx(expected, rel=1e-6)
    det.save(tmp_path / "model")
    loaded = Detector.load(tmp_path / "model")
    assert loaded.config.preprocess.bit_depth == 12
    assert [r.image_score for r in loaded.predict(test12)] == pytest.approx(expected, rel=1e-6)


def _assert_masks_agree_with_verdicts(results: list[DetectionResult]) -> None:
    flagged = [r for r in results if r.is_anomalous]
    assert flagged, "nothing flagged: the check would be empty"
    for r in results:
        assert r.mask is not None and bool(r.mask.any()) == r.is_anomalous
        if r.is_anomalous:
            assert r.anomaly_map is not None and r.anomaly_map.max() >= r.pixel_threshold


def test_flagged_images_always_have_a_mask_and_others_never(fitted: Detector, synthetic_root: Path) -> None:
    _, good, bad = _split(synthetic_root)
    results = fitted.predict(good + bad)
    _assert_masks_agree_with_verdicts(results)
    assert all(r.image_score == pytest.approx(float(r.anomaly_map.max()), rel=1e-6) for r in results)


def test_threshold_comes_from_cross_fitted_normal_images(fitted: Detector) -> None:
    decision = fitted.decision_
    assert decision is not None and decision.n_normal == 12  # every training image scored out-of-sample
    assert decision.rule == "tail-gpd"  # 1 % is finer than the 1/13 that 12 scores resolve
    assert decision.pixel == decision.image  # the image score is the map peak: one scale
    coarse = Detector(_config("patchcore", "threshold.target_fpr=0.1")).fit(_split_train(fitted))
    assert coarse.decision_ is not None and coarse.decision_.rule == "conformal"
    assert coarse.decision_.estimated_fpr == pytest.approx(1 / 13)  # rank ceil(13 * 0.9) = 12 of 12


def test_set_target_fpr_chooses_again_from_the_fits_normal_scores(fitted: Detector) -> None:
    import copy

    from anomaly.thresholds import calibrate

    det = copy.deepcopy(fitted)
    assert det.normal_scores_ is not None and len(det.normal_scores_) == det.decision_.n_normal
    det.set_target_fpr(0.25)
    assert det.decision_ == replace(calibrate(fitted.normal_scores_, 0.25), n_excluded=fitted.decision_.n_excluded)
    assert det.decision_.image < fitted.decision_.image and det.config.threshold.target_fpr == 0.25
    with pytest.raises(ConfigError, match="threshold.target_fpr"):
        det.set_target_fpr(0.0)
    with pytest.raises(ConfigError, match="zero-shot"):
        Detector(_config("musc")).set_target_fpr(0.05)
    with pytest.raises(NotFittedError):
        Detector(_config()).set_target_fpr(0.05)


def test_a_numpy_target_fpr_leaves_the_model_savable(fitted: Detector, tmp_path: Path) -> None:
    """``set_target_fpr(np.float32(0.05))`` (a value read from an array) kept the float32 in the decision, and
    ``save`` failed: "Object of type float32 is not JSON serializable"."""
    import copy

    det = copy.deepcopy(fitted).set_target_fpr(np.float32(0.05))
    assert Detector.load(det.save(tmp_path / "model")).decision_ == det.decision_


def test_arrays_of_any_size_and_grayscale_are_accepted(fitted: Detector, synthetic_root: Path) -> None:
    from anomaly.data.io import read_image

    image = read_image(_split(synthetic_root)[1][0])
    gray = image.mean(2).astype(np.uint8)[:100, :77]
    result = fitted.predict(gray)
    assert result.anomaly_map.shape == (100, 77) and result.source is None


def test_save_load_roundtrip_gives_identical_scores(fitted: Detector, synthetic_root: Path, tmp_path: Path) -> None:
    _, good, bad = _split(synthetic_root)
    fitted.save(tmp_path / "model")
    files = {p.name for p in (tmp_path / "model").iterdir()}
    assert files == {"config.json", "meta.json", "scorer.safetensors", "index.faiss", ".anomaly-output.json"}
    assert not list(tmp_path.glob(".model*"))  # no temp dir left behind
    loaded = Detector.load(tmp_path / "model")
    before = [r.image_score for r in fitted.predict(good + bad)]
    after = [r.image_score for r in loaded.predict(good + bad)]
    assert before == after
    assert loaded.decision_ == fitted.decision_


def test_random_weights_load_as_they_were_fitted(synthetic_root: Path, tmp_path: Path) -> None:
    """A model on randomly initialised weights (nothing saved for them) scores the same after a load."""
    train, good, bad = _split(synthetic_root)
    det = Detector(_config("patchcore", "backbone.pretrained=false", "threshold.folds=3")).fit(train[:6])
    loaded = Detector.load(det.save(tmp_path / "model"))
    assert [r.image_score for r in loaded.predict(good + bad)] == [r.image_score for r in det.predict(good + bad)]


def test_incompatible_or_tampered_model_dirs_fail_clearly(fitted: Detector, tmp_path: Path) -> None:
    path = fitted.save(tmp_path / "model")
    meta = json.loads((path / "meta.json").read_text())
    meta["format_version"] = 1  # an earlier format
    (path / "meta.json").write_text(json.dumps(signed(meta)))
    with pytest.raises(DataError, match="incompatible"):
        Detector.load(path)
    path = fitted.save(tmp_path / "model2")
    (path / "scorer.safetensors").write_bytes(b"garbage")
    with pytest.raises(DataError, match="modified since the model was saved"):
        Detector.load(path)
    with pytest.raises(DataError, match="model directory not found"):
        Detector.load(tmp_path / "missing")
    meta["format_version"] = 3  # a model of a later release
    (path / "meta.json").write_text(json.dumps(signed(meta)))
    with pytest.raises(DataError, match="saved by a newer anomaly"):
        Detector.load(path)
    path = fitted.save(tmp_path / "model3")
    meta = json.loads((path / "meta.json").read_text())
    meta.pop("meta_sha256")  # removing the digest must not switch the check off
    meta["threshold"]["image"] = 1.0
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="modified since the model was saved"):
        Detector.load(path)
    with pytest.raises(DataError, match="a file, not a model directory"):
        Detector.load(path / "config.json")
    path = fitted.save(tmp_path / "model4")  # a damaged state file whose checksum was updated to match
    from anomaly._fs import file_sha256

    (path / "scorer.safetensors").write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    meta = json.loads((path / "meta.json").read_text())
    meta["files"]["scorer.safetensors"] = file_sha256(path / "scorer.safetensors")
    (path / "meta.json").write_text(json.dumps(signed(meta)))
    with pytest.raises(DataError, match="model state is incomplete or corrupt \\(scorer.safetensors: .*header"):
        Detector.load(path)


def test_unfitted_detector_refuses_to_predict(synthetic_root: Path) -> None:
    with pytest.raises(NotFittedError):
        Detector(_config()).predict(_split(synthetic_root)[1][0])


@pytest.mark.parametrize("name", ["padim", "gaussian"])
def test_other_trained_configs_separate_defects(name: str, synthetic_root: Path) -> None:
    train, good, bad = _split(synthetic_root)
    det = Detector(_config(name)).fit(train)
    results = det.predict(good + bad)
    normal = [r.image_score for r in results[: len(good)]]
    anomalous = [r.image_score for r in results[len(good) :]]
    assert np.mean(anomalous) > np.max(normal)
    assert (results[0].anomaly_map is None) == (name == "gaussian")
    if name == "padim":
        _assert_masks_agree_with_verdicts(results)


def test_zero_shot_pool_scores_defects_higher_and_finite_for_two_images(synthetic_root: Path) -> None:
    train, good, bad = _split(synthetic_root)
    good = good + train  # a realistic pool: mostly normal images
    det = Detector(_config("musc", "scorer.params.rscin_k=[]"))  # mutual scoring alone
    results = det.predict(good + bad)
    assert len(results) == len(good + bad)
    auroc_pairs = [(a.image_score > n.image_score) for a in results[len(good) :] for n in results[: len(good)]]
    assert np.mean(auroc_pairs) >= 0.9
    pair = det.predict(good[:2])
    assert all(np.isfinite(r.image_score) for r in pair)


def test_reference_free_pools_from_two_threads_score_as_one_after_the_other(monkeypatch) -> None:
    """Each reference-free pool decides the input size on the detector; a second thread's pool (another aspect)
    must not change it while the first is being scored."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(0)
    square = [rng.integers(0, 255, (96, 96, 3), dtype=np.uint8) for _ in range(4)]
    wide = [rng.integers(0, 255, (64, 192, 3), dtype=np.uint8) for _ in range(4)]
    det = Detector(_config("musc", "backbone.image_size=[64,64]"))
    alone = [[r.image_score for r in det.predict(pool)] for pool in (square, wide)]
    decide, square_decided = Detector._resolve_auto, threading.Event()

    def slow_decide(self, images, *args, **kwargs):  # type: ignore[no-untyped-def]
        decided = decide(self, images, *args, **kwargs)
        if len(images) and images[0].shape == (96, 96, 3):  # the square pool: let the wide one decide meanwhile
            square_decided.set()
            time.sleep(0.5)
        return decided

    monkeypatch.setattr(Detector, "_resolve_auto", slow_decide)
    with ThreadPoolExecutor(2) as threads:
        first = threads.submit(det.predict, square)
        square_decided.wait(30)
        second = threads.submit(det.predict, wide)
        together = [[r.image_score for r in f.result()] for f in (first, second)]
    assert together == alone
    import copy
    import pickle

    for twin in (copy.deepcopy(det), pickle.loads(pickle.dumps(det))):  # each its own line, its own lock
        assert twin._pool_lock is not det._pool_lock and [r.image_score for r in twin.predict(square)] == alone[0]


def test_few_shot_references_set_the_threshold(synthetic_root: Path) -> None:
    train, good, bad = _split(synthetic_root)
    det = Detector(_config("musc", "scorer.params.augment_references=false")).fit(train[:4])
    results = det.predict(good + bad)
    assert det.reference_ is not None and det.reference_.layers[0].shape[0] == 4
    assert len(results) == len(good + bad)
    assert sum(r.is_anomalous for r in results[len(good) :]) >= len(bad) // 2
    _assert_masks_agree_with_verdicts(results)  # RsCIN re-scores images: the pixel threshold is capped per image


def test_a_split_pool_keeps_the_references_in_every_group(
    synthetic_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The references joined the pool as images, so a pool split by ``max_pool`` drew them into some groups only."""
    from anomaly.scorers.musc import MuScScorer

    train, good, bad = _split(synthetic_root)
    det = Detector(_config("musc", "scorer.params.augment_references=false", "scorer.params.max_pool=4")).fit(train[:2])
    groups: list[torch.Tensor] = []
    whole = MuScScorer.score

    def spy(self: MuScScorer, layers: list[torch.Tensor], **kwargs: object) -> object:
        if self.max_pool is None:  # one group, scored as a pool of its own
            groups.append(layers[0])
        return whole(self, layers, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(MuScScorer, "score", spy)
    det.predict([*good[:3], *bad[:3]])
    references = det.reference_.layers[0] if det.reference_ is not None else None
    assert references is not None and len(groups) == 3  # 6 inputs, 2 per group beside the 2 references
    for group in groups:
        torch.testing.assert_close(group[:2], references.to(group.device))


def test_a_reference_among_the_inputs_is_scored_not_compared_with_itself(
    synthetic_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    train, good, bad = _split(synthetic_root)
    pool = [*good[:4], *bad[:3], train[0]]  # the saved model's first reference is scored again
    with caplog.at_level("WARNING", logger="anomaly"):
        scored = Detector(_config("musc")).fit(train[:4]).predict(pool)
    expected = Detector(_config("musc")).fit(train[1:4]).predict(pool)  # as `score --reference` drops it
    assert [r.image_score for r in scored] == pytest.approx([r.image_score for r in expected], rel=1e-5)
    assert [r.is_anomalous for r in scored] == [r.is_anomalous for r in expected]
    assert f"1 reference(s) are also inputs: scored, not used as references, first: {train[0]}" in caplog.text


def test_a_tiled_reference_sharing_a_plain_tile_with_an_input_is_kept(caplog: pytest.LogCaptureFixture) -> None:
    """References were compared with the inputs tile by tile: a tile of plain background (a black belt, the same in
    every frame) equals every other frame's, so each reference was taken for an input and dropped."""

    def frame(seed: int) -> np.ndarray:
        image = np.random.default_rng(seed).integers(80, 170, (64, 128, 1)).repeat(3, axis=2).astype(np.uint8)
        image[:, 64:] = 0  # its right tile: black
        return image

    references = [frame(i) for i in range(3)]
    tiled = ["backbone.image_size=[64,64]", "preprocess.tile.size=64", "scorer.params.augment_references=false"]
    det = Detector(_config("musc", *tiled)).fit(references)
    with caplog.at_level("WARNING", logger="anomaly"):
        det.predict([frame(10 + i) for i in range(4)])
    assert "are also inputs" not in caplog.text
    with caplog.at_level("WARNING", logger="anomaly"):
        det.predict([frame(10 + i) for i in range(4)] + [references[1]])  # a copy, every tile alike, still is one
    assert "1 reference(s) are also inputs: scored, not used as references, first: reference 1" in caplog.text


def test_a_defective_few_shot_reference_does_not_set_the_floor(
    synthetic_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import anomaly.detector as detector_module

    train, good, bad = _split(synthetic_root)
    det = Detector(_config("musc", "scorer.params.augment_references=false")).fit(train[:3] + bad[:1])
    pool = good + bad[1:]
    with caplog.at_level("INFO", logger="anomaly"):
        guarded = det.predict(pool)
    assert sum(str(bad[0]) in r.message and "floor" in r.message for r in caplog.records) == 1
    counted = f"zero-shot pool of {len(pool) + 1} image(s) and 3 reference(s)"  # the suspect one joins the pool
    assert sum(r.message.startswith(counted) for r in caplog.records) == 1
    det.save(tmp_path / "model")
    loaded = Detector.load(tmp_path / "model")
    assert [d.source for d in loaded.reference_.images] == [str(p) for p in train[:3] + bad[:1]]
    assert loaded.predict(pool)[0].threshold == pytest.approx(guarded[0].threshold)
    monkeypatch.setattr(detector_module, "suspect_references", lambda scores, owners: np.zeros(len(scores), bool))
    floored = det.predict(pool)  # as before: the defective reference's score is the threshold's floor
    assert guarded[0].threshold < floored[0].threshold
    assert sum(r.is_anomalous for r in guarded) >= sum(r.is_anomalous for r in floored)


def test_few_shot_support_augmentation_adds_six_views(synthetic_root: Path) -> None:
    train, good, bad = _split(synthetic_root)
    det = Detector(_config("musc", "scorer.params.augment_references=true")).fit(train[:2])
    assert det.reference_ is not None and det.reference_.layers[0].shape[0] == 12
    scores = [r.image_score for r in det.predict(good + bad)]
    assert np.mean(scores[len(good) :]) > np.mean(scores[: len(good)])


def test_a_few_shot_reference_counts_once_in_the_pool_threshold(
    synthetic_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Six support views per reference were six rows of the pool rule: 12 references outweighed a pool of 7 and
    the threshold rose over defects the scores separated. A reference is one score: the image as given, not its
    highest view (a turned or flipped copy that looks like no pool image set the floor over defects)."""
    import anomaly.detector as detector_module

    seen: list[tuple[np.ndarray, int]] = []
    real = detector_module.pool_threshold

    def spy(scores, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append((np.asarray(scores), kwargs["n_reference"]))
        return real(scores, *args, **kwargs)

    members: list[np.ndarray] = []
    real_view_max = detector_module.view_max

    def view_max_spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        members.append(real_view_max(*args, **kwargs))  # the score of every member: each support view here
        return members[-1]

    monkeypatch.setattr(detector_module, "pool_threshold", spy)
    monkeypatch.setattr(detector_module, "view_max", view_max_spy)
    train, good, bad = _split(synthetic_root)
    det = Detector(_config("musc", "scorer.params.augment_references=true")).fit(train[:3])
    results = det.predict(good + bad)
    ((scores, n_reference),) = seen
    assert n_reference == 3 and len(scores) == 3 + len(good + bad)  # not 18 reference rows
    assert results[0].threshold >= scores[:3].max()  # the references' floor still holds
    per_view = members[-1][:18].reshape(3, 6)  # 3 references x 6 support views, as given first
    assert sorted(scores[:3]) == sorted(per_view[:, 0]) and (per_view[:, 0] < per_view.max(axis=1)).any()


def test_each_reference_row_knows_its_support_view_through_a_save(tmp_path: Path) -> None:
    """A reference counts as given: with tiles, by its highest tile of the image as given (not tile 0, not a
    flipped copy); the rows of each support view are recorded and saved with the model."""
    rng = np.random.default_rng(0)
    references = [rng.integers(0, 255, (128, 192, 3), dtype=np.uint8) for _ in range(2)]
    det = Detector(_config("musc", "preprocess.tile={size: 64, overlap: 0}", "preprocess.resize=keep_aspect"))
    det.fit(references)
    views = det.reference_views_
    assert views is not None and len(views) == len(det.reference_)
    per_reference = len(views) // 2
    assert (views[:per_reference] == np.repeat([0, 1, 2, 3], per_reference // 4)).all()  # 4 views: not square
    loaded = Detector.load(det.save(tmp_path / "model"))
    assert loaded.reference_views_ is not None and (loaded.reference_views_ == views).all()
    pool = [rng.integers(0, 255, (128, 192, 3), dtype=np.uint8) for _ in range(2)]
    assert [r.threshold for r in loaded.predict(pool)] == [r.threshold for r in det.predict(pool)]


def test_support_views_turn_only_square_images() -> None:
    """Resized to the model input like the pool's images, a non-square reference turned by 90 degrees is a
    squashed part: such images get the shape-keeping views alone (identity first, as the pool rule reads it)."""
    from anomaly.data.loader import support_views

    rng = np.random.default_rng(0)
    wide = rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)
    views = support_views(wide)
    assert len(views) == 4 and all(v.shape == wide.shape for v in views) and (views[0] == wide).all()
    square = rng.integers(0, 255, (60, 64, 3), dtype=np.uint8)  # within 10 %: turned too
    assert len(support_views(square)) == 6


def test_query_augmentation_averages_the_pool_with_its_mirror_image(synthetic_root: Path) -> None:
    from anomaly.data.io import read_image

    _, good, bad = _split(synthetic_root)
    images = [read_image(p) for p in good[:3] + bad[:3]]
    plain = Detector(_config("musc", "scorer.params.rscin_k=null"))
    straight, mirrored = plain.predict(images), plain.predict([np.ascontiguousarray(im[:, ::-1]) for im in images])
    both = Detector(_config("musc", "scorer.params.rscin_k=null", "scorer.params.augment_queries=true")).predict(images)
    for a, s, m in zip(both, straight, mirrored):
        expected = (s.anomaly_map + m.anomaly_map[:, ::-1]) / 2  # map post-processing commutes with the mirror
        assert np.mean(np.isclose(a.anomaly_map, expected, rtol=1e-4, atol=1e-6)) > 0.999
        assert not np.allclose(a.anomaly_map, s.anomaly_map, rtol=1e-3)  # the mirrored pool did count
    with pytest.raises(ConfigError, match="augment_queries"):
        Detector(_config("musc", "scorer.params.augment_queries=2"))
    with pytest.raises(ConfigError, match="augment_queries"):
        StreamingDetector(Detector(_config("musc", "scorer.params.augment_queries=true")))


def test_too_few_images_for_a_held_out_threshold_fail_before_any_work(synthetic_root: Path) -> None:
    train, _, _ = _split(synthetic_root)
    with pytest.raises(DataError, match="gaussian scorer needs at least 4 normal images"):
        Detector(_config("gaussian")).fit(train[:3])  # a fold model from 2 images has a singular covariance
    two_folds = Detector(_config("gaussian", "threshold.folds=2"))  # fold models of 5 images see 2 of them
    assert two_folds.min_training_images() == 6 and Detector(_config("patchcore")).min_training_images() == 3
    with pytest.raises(DataError, match="needs at least 6 normal images with threshold.folds=2"):
        two_folds.fit(train[:5])
    with pytest.raises(DataError, match="memory_bank scorer needs at least 3"):
        Detector(_config()).fit(train[:1])
    one = np.zeros((64, 64, 3), np.uint8)  # fitted as 64 gray images of 64 x 3 px, one per row of the image
    for alone in (one, Image.fromarray(one)):
        with pytest.raises(DataError, match="memory_bank scorer needs at least 3 .*, got 1"):
            Detector(_config()).fit(alone)
    with pytest.raises(DataError, match="unsupported image input of type NoneType"):
        Detector(_config()).fit(None)  # type: ignore[arg-type]


def test_a_pil_image_is_scored_upright_as_its_file_is(tmp_path: Path) -> None:
    """A photo opened with PIL carries its EXIF orientation unapplied: the file was scored upright (64 x 48) and the
    same photo given as ``Image.open(path)`` on its side (48 x 64: another map, another score)."""
    rng = np.random.default_rng(0)
    det = Detector(_config()).fit([rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(4)])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    pixels = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    pixels[:8, :8] = 255
    Image.fromarray(pixels).save(tmp_path / "photo.png", exif=exif)
    from_file = det.predict(tmp_path / "photo.png")
    with Image.open(tmp_path / "photo.png") as opened:
        by_hand = opened.transpose(Image.Transpose.ROTATE_270)  # upright, and still tagged: not turned again
        assert by_hand.getexif().get(0x0112) == 6
        given = [det.predict(opened), det.predict(ImageOps.exif_transpose(opened)), det.predict(by_hand)]
    for result in given:
        assert result.anomaly_map is not None and from_file.anomaly_map is not None
        assert result.anomaly_map.shape == from_file.anomaly_map.shape == (64, 48)
        np.testing.assert_array_equal(result.anomaly_map, from_file.anomaly_map)
        assert result.image_score == from_file.image_score


def test_16_bit_images_of_another_depth_than_the_model_are_named(caplog: pytest.LogCaptureFixture) -> None:
    """A model fitted on 8-bit images reads 16-bit data as 16 bits: 12-bit frames score near-black, and every one
    was flagged without a word. One warning per call names them; 8-bit images and frames of the model's depth not."""
    rng = np.random.default_rng(0)
    det = Detector(_config()).fit([rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(4)])
    assert det.config.preprocess.bit_depth == 16  # auto, with no 16-bit training image
    caplog.set_level("WARNING", logger="anomaly")
    det.predict([rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), rng.integers(0, 65535, (64, 64), dtype=np.uint16)])
    assert "bit_depth" not in caplog.text
    twelve = rng.integers(0, 4096, (64, 64), dtype=np.uint16)
    det.predict([twelve, twelve])
    (line,) = [r.message for r in caplog.records if "bit_depth" in r.message]
    assert line.startswith("2 of 2 image(s) are 16-bit data of another depth than the model's bit_depth 16")
    assert "an image (12 bits: near-black)" in line


def test_thumbnails_among_the_training_images_are_named_at_fit(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (96, 128, 3), dtype=np.uint8) for _ in range(5)]
    thumb = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)  # 40 px against a median of 128 px
    caplog.set_level("WARNING", logger="anomaly")
    Detector(_config()).fit(frames)
    assert "under a third of the others' size" not in caplog.text
    Detector(_config()).fit([*frames, thumb, rng.integers(0, 255, (50, 60, 3), dtype=np.uint8)])
    (line,) = [r.message for r in caplog.records if "under a third" in r.message]
    assert line.startswith("fit: 1 of 7 training image(s)") and line.endswith("first: an image of 40x30 px")


def test_an_image_far_from_the_training_aspect_is_named_in_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every image is stretched to the model input: a part fed sideways (a 2.5:1 surface shown 1:2.5) is scored
    squashed (a good KolektorSDD part was flagged). Such images are named in one warning per call; images within
    the training images' range are not, and a saved model keeps the range."""
    rng = np.random.default_rng(0)
    wide = [rng.integers(0, 255, (64, 96 + 8 * i, 3), dtype=np.uint8) for i in range(6)]  # aspect 1.5-2.1
    det = Detector(_config()).fit(wide)
    assert det.training_aspects_ == pytest.approx((1.5, 136 / 64))
    tall = rng.integers(0, 255, (160, 64, 3), dtype=np.uint8)
    near = rng.integers(0, 255, (64, 160, 3), dtype=np.uint8)  # 2.5: within 1.25x of the widest
    caplog.set_level("WARNING", logger="anomaly")
    caplog.clear()
    det.predict([near, wide[0]])
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    det.predict([tall, near, tall])
    (record,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "2 of 3 image(s)" in record.message and "(1.50-2.12)" in record.message
    assert "an image of 64x160 px" in record.message
    loaded = Detector.load(det.save(tmp_path / "model"))
    assert loaded.training_aspects_ == pytest.approx(det.training_aspects_)
    check = loaded.input_check()
    check.add_decoded(loaded.extract([tall]).images)
    assert check.aspects == ["an image of 64x160 px"]
    keep = Detector(_config("patchcore", "preprocess.resize=keep_aspect")).fit(wide)
    assert keep.input_profile().aspects is None  # not stretched: padded to the input


def test_a_camera_switched_to_gray_or_to_colour_is_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A model of colour images flagged every gray image of the same parts, without a word (and the reverse is as
    unlike its training images): both are named, by the saved model too; a mixed training set checks nothing."""
    rng = np.random.default_rng(0)
    colour = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(6)]
    gray = [np.repeat(c[:, :, :1], 3, axis=2) for c in colour]
    caplog.set_level("WARNING", logger="anomaly")
    det = Detector(_config("patchcore", "threshold.folds=3")).fit(colour)
    assert det.training_colour_ == "colour"
    Detector.load(det.save(tmp_path / "model")).predict([gray[0], colour[0], gray[1][:, :, 0]])
    (line,) = [r.message for r in caplog.records if "training image was" in r.message]
    assert line.startswith("2 of 3 image(s) are gray where every training image was in colour: another camera")
    caplog.clear()
    on_gray = Detector(_config("patchcore", "threshold.folds=3")).fit([g[:, :, 0] for g in gray])
    on_gray.predict([colour[0], gray[0]])
    (line,) = [r.message for r in caplog.records if "training image was" in r.message]
    assert line.startswith("1 of 2 image(s) are in colour where every training image was gray")
    caplog.clear()
    mixed = Detector(_config("patchcore", "threshold.folds=3")).fit(colour[:3] + gray[3:])
    assert mixed.training_colour_ is None
    mixed.predict([colour[0], gray[0]])
    assert not [r for r in caplog.records if "training image was" in r.message]
    few_shot = Detector(_config("musc")).fit([g[:, :, 0] for g in gray[:3]])  # gray references, colour queries
    few_shot.predict(colour[:2])
    (line,) = [r.message for r in caplog.records if "every reference was" in r.message]
    assert line.startswith("2 of 2 image(s) are in colour where every reference was gray")


@pytest.mark.parametrize(
    ("odd_shape", "word", "opening", "ending"),
    [
        ((60, 150, 3), "aspect", "1 of 5 image(s) have an aspect (width / height) outside the pool's median (1.00)",
         "First: an image of 150x60 px"),
        ((24, 24, 3), "under a third", "1 of 5 image(s) are under a third of the pool's median image's size (96 px",
         "First: an image of 24x24 px"),
    ],
)  # fmt: skip
def test_a_zero_shot_pool_without_references_names_images_unlike_its_own(
    odd_shape: tuple[int, int, int], word: str, opening: str, ending: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Without references the pool is all there is: images stretched far from its median aspect, and thumbnails
    under a third of its median longer side (from 3 images; a thumbnail went unnamed before), are named."""
    rng = np.random.default_rng(0)
    pool = [rng.integers(0, 255, (96, 96, 3), dtype=np.uint8) for _ in range(4)]
    odd = rng.integers(0, 255, odd_shape, dtype=np.uint8)
    caplog.set_level("WARNING", logger="anomaly")
    Detector(_config("musc")).predict([*pool, odd])
    (line,) = [r.message for r in caplog.records if word in r.message]
    assert line.startswith(opening) and line.endswith(ending)
    if word == "under a third":  # two images give no usual size
        caplog.clear()
        Detector(_config("musc")).predict([pool[0], odd])
        assert not [r for r in caplog.records if word in r.message]


def test_a_pool_with_references_names_only_images_far_from_both(caplog: pytest.LogCaptureFixture) -> None:
    """Three square references cannot show what a product cut at many sizes looks like: the aspects the middle half
    of a pool of 8 or more spans count as normal beside theirs, so only an image far from both is named."""
    rng = np.random.default_rng(0)
    references = [rng.integers(0, 255, (96, 96, 3), dtype=np.uint8) for _ in range(3)]
    pool = [rng.integers(0, 255, (96, 96 + 12 * i, 3), dtype=np.uint8) for i in range(8)]  # aspects 1.0-1.9
    strip = rng.integers(0, 255, (40, 240, 3), dtype=np.uint8)  # 6:1
    det = Detector(_config("musc", "scorer.params.augment_references=false")).fit(references)
    caplog.set_level("WARNING", logger="anomaly")
    det.predict([*pool, strip])
    (line,) = [r.message for r in caplog.records if "aspect" in r.message]
    assert line.startswith(
        "1 of 9 image(s) have an aspect (width / height) outside the references' and the middle half of the pool's "
        "(1.00-1.75)"
    )
    assert line.endswith("First: an image of 240x40 px")
    caplog.clear()
    det.predict([strip, references[0]])  # too few to show a spread: judged by the references alone
    (line,) = [r.message for r in caplog.records if "aspect" in r.message]
    assert line.startswith("1 of 2 image(s) have an aspect (width / height) outside the references' (1.00)")


def test_an_image_far_smaller_than_every_training_image_is_named_in_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A 1x1 or thumbnail input is upscaled to the model input and scored as blur: it gets its score, and a
    warning naming it; images down to a third of the smallest training image's size do not. Saved models keep
    the size."""
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (90 + 6 * i, 120, 3), dtype=np.uint8) for i in range(6)]  # longer side 120
    det = Detector(_config()).fit(frames)
    assert det.training_smallest_ == 120
    caplog.set_level("WARNING", logger="anomaly")
    caplog.clear()
    det.predict([rng.integers(0, 255, (30, 40, 3), dtype=np.uint8), frames[0]])  # 40 px: a third, not under it
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    dot = np.zeros((1, 1, 3), np.uint8)
    dot[..., 0] = 200  # a coloured dot, as the training frames are (a gray one is named for that too)
    result = Detector.load(det.save(tmp_path / "model")).predict([dot, frames[0], dot])[0]
    assert np.isfinite(result.image_score) and result.anomaly_map.shape == (1, 1)
    (line,) = [r.message for r in caplog.records if r.levelname == "WARNING"]
    assert line.startswith("2 of 3 image(s) are under a third of the smallest training image's size (120 px")
    assert line.endswith("First: an image of 1x1 px, an image of 1x1 px")
    tiled = Detector(_config("patchcore", "preprocess.tile={size: 64}"))
    tiled.training_smallest_ = 120
    assert tiled.input_profile().smallest is None  # tiles of 64 px: a small image is not upscaled more
    few_shot = Detector(_config("musc"))
    few_shot.training_smallest_ = 120
    profile = few_shot.input_profile()  # a zero-shot pool's references are no training images
    assert (profile.smallest_of, profile.aspects_of) == ("the smallest reference's", "the references'")


def test_results_compare_hash_and_serialise_as_plain_values() -> None:
    """Comparing two results compared their map arrays (ValueError), and an unreadable input's NaN score was
    written as NaN, which strict JSON refuses."""
    import json

    from anomaly.results import DetectionResult

    a = DetectionResult(1.5, True, 1.0, np.ones((4, 4), np.float32), "a.png", 1.2)
    b = DetectionResult(1.5, True, 1.0, np.ones((4, 4), np.float32), "a.png", 1.2)
    assert a == b and len({a, b}) == 1
    skipped = DetectionResult.unreadable("x.png", "cannot read image: x.png", 1.0, 1.2)
    assert json.loads(json.dumps(skipped.to_dict(), allow_nan=False))["image_score"] is None


def test_a_config_edited_after_construction_is_not_saved_as_the_model(fitted: Detector, tmp_path: Path) -> None:
    """The scorer is built from the config once: a params dict edited afterwards changed nothing the model
    computes, but was saved, and the reloaded model scored differently (a pass became a flag)."""
    det = Detector.load(fitted.save(tmp_path / "model"))
    built_k = det.scorer.get_params()["k"]
    det.config.scorer.params["k"] = built_k + 2
    loaded = Detector.load(det.save(tmp_path / "again"))
    assert loaded.scorer.get_params()["k"] == built_k


def _resign_with_layers(path: Path, layers: list[str], saved_widths: bool = True) -> None:
    """Edit config.json's backbone.layers and sign meta.json again, as a hand edit that recomputes the digests;
    without ``saved_widths`` meta.json loses the layers' widths, as models saved before they were recorded."""
    from anomaly._fs import file_sha256

    config = json.loads((path / "config.json").read_text())
    config["backbone"]["layers"] = layers
    config["backbone"]["layer_scales"] = None  # one per layer: the old layers' scales would be refused first
    (path / "config.json").write_text(json.dumps(config))
    meta = json.loads((path / "meta.json").read_text())
    meta["files"]["config.json"] = file_sha256(path / "config.json")
    if not saved_widths:
        del meta["channels"]
    (path / "meta.json").write_text(json.dumps(signed(meta)))


@pytest.mark.parametrize(
    ("name", "saved"),
    [
        ("patchcore", "the saved bank has 152"),
        ("padim", "the saved channel subset needs at least 176"),
        ("gaussian", "the saved per-layer Gaussians have 16 + 24 + 40 + 112 + 320"),
        ("musc", "the saved references have 40 + 112 + 320"),
    ],
)
def test_layers_edited_against_the_saved_state_are_named_at_load(name: str, saved: str, tmp_path: Path) -> None:
    """config.json's backbone.layers edited and meta.json re-signed: the memory bank failed at the first image with
    FAISS's bare AssertionError (the other scorers with an IndexError, ValueError or RuntimeError of their own).
    Models saved with their layers' widths are checked against those; older ones by their scorer's state."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(6)]
    tiny = ["backbone.image_size=[64,64]", "backbone.pretrained=false", "threshold.folds=3", "batch_size=6"]
    path = Detector(apply_overrides(load_config(name), tiny)).fit(images).save(tmp_path / "model")
    widths = json.loads((path / "meta.json").read_text())["channels"]
    _resign_with_layers(path, ["blocks.2", "blocks.3"])  # lite0: 40 + 80 channels
    with pytest.raises(DataError) as info:
        Detector.load(path)
    fitted = f"{sum(widths)} ({' + '.join(map(str, widths))})"
    assert str(info.value) == (
        f"{path}: config.json backbone.layers give 120 (40 + 80) channels but the model was fitted on {fitted}; "
        "refit the model"
    )
    _resign_with_layers(path, ["blocks.2", "blocks.3"], saved_widths=False)
    with pytest.raises(DataError) as info:
        Detector.load(path)
    assert (
        str(info.value)
        == f"{path}: config.json backbone.layers give 120 (40 + 80) channels but {saved}; refit the model"
    )
    if name == "patchcore":  # the same total width (16 + 24 + 112): only the saved widths tell it apart
        path = Detector(apply_overrides(load_config(name), tiny)).fit(images).save(tmp_path / "model")
        _resign_with_layers(path, ["blocks.0", "blocks.1", "blocks.4"])
        with pytest.raises(DataError, match=r"give 152 \(16 \+ 24 \+ 112\) channels but the model was fitted on 152"):
            Detector.load(path)


def test_too_few_training_images_name_an_unreadable_one_first(tmp_path: Path) -> None:
    """`fit bad.png` said "needs at least 3 normal images, got 1": the file's problem went unnamed."""
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(DataError, match=r"cannot read image: .*bad.png \(not an image file"):
        Detector(_config()).fit([bad])
    good = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(DataError, match="needs at least"):
        Detector(_config()).fit([good])


def test_tiny_training_images_are_named_at_fit(caplog: pytest.LogCaptureFixture) -> None:
    """8 px training images passed without a word ("a patch covers 0x0 image px"): upscaled 16x, they are blur."""
    rng = np.random.default_rng(0)
    caplog.set_level("WARNING", logger="anomaly")
    det = Detector(_config("patchcore", "threshold.folds=3")).fit(
        [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for _ in range(6)]
    )
    assert det.patch_footprint_ == (1, 1)
    assert "the training images (median 8 px on the longer side) are upscaled 16x to the 128x128" in caplog.text


@pytest.mark.parametrize("name", ["patchcore", "musc"])
def test_a_fit_that_fails_on_an_unreadable_image_leaves_the_fitted_model_as_it_was(name: str) -> None:
    """``resolve_auto`` decides the input size before the images are read: a refit on wide images that failed on an
    unreadable one left a square model at their 80x208 input, which scored other values (patchcore) or raised
    torch's "Sizes of tensors must match" (musc's saved references)."""
    rng = np.random.default_rng(0)
    square = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(6)]
    wide = [rng.integers(0, 255, (40, 104, 3), dtype=np.uint8) for _ in range(6)]
    det = Detector(_config(name, "threshold.folds=3")).fit(square[:4])
    config, extractor = det.config, det.extractor
    before = det.predict(square[4:])
    with pytest.raises(DataError, match="cannot read image"):
        det.fit([*wide, b"not an image"])
    assert det.config == config and det.extractor is extractor
    after = det.predict(square[4:])
    assert [r.image_score for r in after] == [r.image_score for r in before]


def test_a_zero_shot_pool_names_copies_of_its_images(caplog: pytest.LogCaptureFixture) -> None:
    """Copies in a pool are named, and a pool of nothing but copies says that it compares them all the same."""
    rng = np.random.default_rng(0)
    pool = [rng.integers(0, 255, (96, 96, 3), dtype=np.uint8) for _ in range(4)]
    caplog.set_level("WARNING", logger="anomaly")
    Detector(_config("musc")).predict(pool)
    assert not [r for r in caplog.records if "copies" in r.message]
    Detector(_config("musc")).predict([*pool, pool[1].copy(), pool[1].copy()])
    (line,) = [r.message for r in caplog.records if "copies" in r.message]
    assert line.startswith("2 of 6 pool images repeat another one's pixels: copies are not compared with each other")
    caplog.clear()
    results = Detector(_config("musc")).predict([pool[0], pool[0].copy(), pool[0].copy()])
    assert len(results) == 3 and all(np.isfinite(r.image_score) for r in results)
    (line,) = [r.message for r in caplog.records if "copies" in r.message]
    assert line == "all 3 pool images are copies of one image: compared with each other, as nothing else"


def test_copies_of_a_defective_image_do_not_vouch_for_each_other() -> None:
    """Two copies of one defective image (a file copied under another name) among good ones: each was the other's
    nearest image in mutual scoring, so their defect scored 0.6x what one copy alone gets, 1.5x the good images. They
    are now compared with the other images only, and score at least as that one copy does."""
    rng = np.random.default_rng(0)
    good = [np.clip(120 + rng.normal(0, 12, (96, 96, 3)), 0, 255).astype(np.uint8) for _ in range(8)]
    defective = good[0].copy()
    defective[30:54, 30:54] = 250
    det = Detector(_config("musc", "scorer.params.rescore=null"))
    alone = det.predict([*good[1:], defective])[-1].image_score
    twice = det.predict([*good[1:], defective, defective.copy()])
    assert min(r.image_score for r in twice[-2:]) >= 0.9 * alone
    assert min(r.image_score for r in twice[-2:]) > 2 * max(r.image_score for r in twice[:-2])


def test_a_tiled_pool_of_nothing_but_copies_compares_the_copies() -> None:
    """Two copies of one tiled frame and nothing else: the log says they are compared with each other, as nothing
    else is there, but each tile was compared with its own frame's far tiles alone (rows were counted, not images)
    and scored 0.75, where the same pool untiled, or tiled before copies were kept apart, scores about 0."""
    rng = np.random.default_rng(0)
    frame = np.clip(120 + rng.normal(0, 12, (96, 300, 3)), 0, 255).astype(np.uint8)
    det = Detector(_config("musc", "preprocess.tile={size: 96}", "preprocess.resize=stretch"))
    results = det.predict([frame, frame.copy()])
    assert max(r.image_score for r in results) < 0.01
