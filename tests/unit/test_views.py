"""Aspect-preserving resize and overlapping tiles: layouts, exact stitching, and a tiled 4000x3000 frame."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from anomaly.data.loader import decode_input
from anomaly.data.views import ViewSpec, copied_views, cut_views, overlapping_views, plan_layout
from anomaly.maps import stitch

IN = (64, 64)


def _field(h: int, w: int) -> np.ndarray:
    """A smooth, non-symmetric test map on a frame."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.sin(yy / 17.0) + np.cos(xx / 23.0) + 0.001 * yy * xx


@pytest.mark.parametrize(
    ("size", "spec", "frame", "n_views"),
    [
        ((460, 1130), ViewSpec("stretch"), (64, 64), 1),
        ((460, 1130), ViewSpec("keep_aspect"), (26, 64), 1),
        ((460, 1130), ViewSpec(tile=None), (64, 157), 3),  # the short side spans the input
        ((3000, 4000), ViewSpec(tile=500, overlap=0.25), (384, 512), 8 * 11),
        ((7, 5), ViewSpec("keep_aspect"), (64, 46), 1),  # tiny image: upsampled, mirrored border
        ((7, 5), ViewSpec(tile=100), (4, 3), 1),  # smaller than one tile: one mirrored view
    ],
)
def test_layouts(size: tuple[int, int], spec: ViewSpec, frame: tuple[int, int], n_views: int) -> None:
    layout = spec.layout(size, IN)
    assert layout.frame == frame and layout.n_views == n_views
    views = cut_views(np.zeros((*size, 3), np.uint8), layout, IN)
    assert views.shape == (n_views, *IN, 3)


def test_tiles_overlap_at_least_as_asked() -> None:
    layout = plan_layout((3000, 4000), IN, tile=500, overlap=0.25)
    xs = sorted({x for _, x in layout.origins})
    assert xs[0] == 0 and xs[-1] == layout.frame[1] - IN[1]  # the frame is covered edge to edge
    assert max(np.diff(xs)) <= IN[1] * 0.75


def test_overlapping_views_are_the_same_frames_tiles_that_share_pixels() -> None:
    tiled = plan_layout((200, 300), IN, tile=150, overlap=0.25)  # a 2 x 3 grid; the first and last column apart
    assert sorted(set(tiled.origins)) == list(tiled.origins) and tiled.n_views == 6
    found = overlapping_views([None, tiled, None], IN)
    assert [list(x) for x in found] == [
        [], [2, 4, 5], [1, 3, 4, 5, 6], [2, 5, 6], [1, 2, 5], [1, 2, 3, 4, 6], [2, 3, 5], []
    ]  # fmt: skip
    # view 0 and 7: untiled images; 1-6 the tiles, numbered across the images (each shares pixels with its
    # neighbours in its row and column and diagonally)


def test_copied_views_are_every_view_of_the_other_copies() -> None:
    tiled = plan_layout((200, 300), IN, tile=150, overlap=0.25)  # 6 views
    found = copied_views(["a", "b", None, "a", "b", None], [None, tiled, None, None, tiled, None])
    frame, its_copy = list(range(1, 7)), list(range(9, 15))
    assert [list(x) for x in found] == [[8], *[its_copy] * 6, [], [0], *[frame] * 6, []]
    # rows 0 and 8 one image and its copy, 1-6 and 9-14 a tiled frame and its copy; None (a reference's rows,
    # which keep no pixels) has no copy, whatever else is None


@pytest.mark.parametrize(
    ("size", "spec"),
    [
        ((460, 1130), ViewSpec(tile=None)),
        ((600, 500), ViewSpec(tile=150, overlap=0.5)),
        ((50, 200), ViewSpec("keep_aspect")),
    ],
)
def test_stitch_puts_views_back_exactly(size: tuple[int, int], spec: ViewSpec) -> None:
    """Views cut from a known frame map stitch back to that map (padding cropped, blends exact)."""
    layout = spec.layout(size, IN)
    field = _field(*layout.frame)
    views = cut_views(np.repeat(field[..., None], 3, axis=2), layout, IN)[..., 0]  # cut_views on a float "image"
    np.testing.assert_allclose(stitch(views.astype(np.float32), layout), field, atol=1e-5)


@pytest.mark.parametrize(
    ("size", "frame"),
    [
        ((40, 3000), (96, 736)),  # a line-scan strip at `resize: auto`'s 8:1 input: taller, 4x narrower
        ((40, 3000), (128, 128)),  # stretched to a square: taller, 23x narrower
        ((1000, 128), (128, 128)),  # one side shrinks, the other is kept
    ],
)
def test_a_thin_line_survives_the_resize_wherever_it_lies(size: tuple[int, int], frame: tuple[int, int]) -> None:
    """When one side grows and the other shrinks, the frame was resized bilinearly: the shrinking side was sampled, not
    averaged, so a 3 px scratch on a 40 x 3000 px strip vanished from the views at most positions (and a fit with the
    default `resize: auto` found or missed the same scratch as it moved by a pixel)."""
    contrast = []
    for offset in range(24):
        image = np.full((*size, 3), 200, np.uint8)
        if size[0] < size[1]:
            image[:, 1000 + offset : 1003 + offset] = 0  # a vertical scratch
        else:
            image[500 + offset : 503 + offset] = 0  # a horizontal one
        views = cut_views(image, plan_layout(size, frame), frame)
        contrast.append(200 - int(views[..., 0].min()))
    shrink = max(s / f for s, f in zip(size, frame))
    expected = 200 * 3 / shrink  # its area's share of the pixels it falls into
    assert min(contrast) >= 0.5 * expected and max(contrast) <= 2 * expected + 2


def test_a_side_shrinking_up_to_2x_while_the_other_grows_stays_bilinear() -> None:
    """Bilinear skips no pixel up to 2x, and area averaging there cost the magnetic tiles image AUROC (round 6)."""
    image = np.random.default_rng(0).integers(0, 256, (300, 100, 3), dtype=np.uint8)
    views = cut_views(image, plan_layout((300, 100), (256, 256)), (256, 256))
    np.testing.assert_array_equal(views[0], cv2.resize(image, (256, 256), interpolation=cv2.INTER_LINEAR))


def test_keep_aspect_content_is_not_squashed() -> None:
    """A 1:4 image keeps its aspect: a circle stays round inside the letterboxed view."""
    image = np.zeros((100, 400, 3), np.uint8)
    yy, xx = np.mgrid[0:100, 0:400]
    image[(yy - 50) ** 2 + (xx - 200) ** 2 < 30**2] = 255
    decoded = decode_input(image, IN, spec=ViewSpec("keep_aspect"))
    assert decoded.views is not None and decoded.layout is not None
    top = -decoded.layout.origins[0][0]  # the frame's rows inside the view; the rest is mirrored
    ys, xs = np.nonzero(decoded.views[0, top : top + decoded.layout.frame[0], :, 0] > 127)
    assert abs((ys.max() - ys.min()) - (xs.max() - xs.min())) <= 1


@pytest.fixture(scope="module")
def tiled_detector():  # type: ignore[no-untyped-def]
    from anomaly import Detector
    from anomaly.config import apply_overrides, load_config

    config = apply_overrides(
        load_config("patchcore"),
        [
            "backbone.image_size=[128,128]",
            "preprocess.tile={size: 256, overlap: 0.25}",
            "batch_size=32",
            "threshold.folds=3",
        ],
    )
    train = [_texture(np.random.default_rng(i), 512, 512) for i in range(4)]  # same scale as the big frame's tiles
    return Detector(config).fit(train)


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (xx + yy) / 40 + rng.uniform(0, 2 * np.pi))
    image = 80 + 90 * stripes[..., None] + rng.normal(0, 3, (h, w, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def test_tiled_4000x3000_finds_a_small_defect(tiled_detector) -> None:  # type: ignore[no-untyped-def]
    image = _texture(np.random.default_rng(9), 3000, 4000)
    image[1500:1524, 2600:2624] = (20, 160, 200)  # a 24 px defect (0.005 % of the frame)
    result = tiled_detector.predict(image)
    amap = result.anomaly_map
    assert amap.shape == (3000, 4000)
    assert amap[1500:1524, 2600:2624].max() >= np.quantile(amap, 0.99)
    assert result.image_score == pytest.approx(float(amap.max()), rel=1e-6)


def test_tiled_map_has_no_seams(tiled_detector) -> None:  # type: ignore[no-untyped-def]
    """On a defect-free frame the map changes no faster across tile borders than elsewhere."""
    image = _texture(np.random.default_rng(5), 1000, 1300)
    amap = tiled_detector.predict(image).anomaly_map
    layout = tiled_detector.view_spec.layout(image.shape[:2], tiled_detector.extractor.image_size)
    scale = image.shape[1] / layout.frame[1]
    grad = np.abs(np.diff(amap, axis=1))  # horizontal steps between columns c and c + 1
    borders = set()
    for _, x in layout.origins:  # tile edges, in original columns
        for edge in (x, x + tiled_detector.extractor.image_size[1]):
            if 0 < edge < layout.frame[1]:
                col = int(edge * scale)
                borders.update(range(max(0, col - 2), min(grad.shape[1], col + 2)))
    inner = np.setdiff1d(np.arange(grad.shape[1]), sorted(borders))
    at_borders = grad[:, sorted(borders)]
    # no larger than elsewhere: a ramp from each tile's own edge gave 1.055x by the mean (0.86x now)
    assert at_borders.mean() <= grad[:, inner].mean()
    assert np.percentile(at_borders, 99) <= np.percentile(grad[:, inner], 99)


def test_a_large_tiled_frame_is_scored_batch_size_views_at_a_time(tiled_detector, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """All tiles of a frame were extracted and scored at once: a 6000 x 4000 px frame in 256 px tiles (651 views)
    held their features together, 3.1 GB peak against 1.6 GB in batches of the configured size."""
    image = _texture(np.random.default_rng(5), 1000, 1300)
    whole = tiled_detector.predict(image)
    seen: list[int] = []
    score = tiled_detector.scorer.score

    def counted(layers):  # type: ignore[no-untyped-def]
        seen.append(len(layers[0]))
        return score(layers)

    monkeypatch.setattr(tiled_detector.scorer, "score", counted)
    monkeypatch.setattr(tiled_detector, "config", dataclasses.replace(tiled_detector.config, batch_size=4))
    batched = tiled_detector.predict(image)
    assert len(seen) > 1 and max(seen) <= 4
    assert sum(seen) == tiled_detector.view_spec.layout(image.shape[:2], tiled_detector.extractor.image_size).n_views
    assert batched.image_score == pytest.approx(whole.image_score, rel=1e-4)


def test_a_tiled_zero_shot_pool_scores_a_frame_by_its_defects_tile() -> None:
    """With tiles, RsCIN re-scored each tile against its nearest tiles: the same frame's clean ones, which diluted the
    defect's tile before the frame took its peak (a frame whose map peaked at the defect ranked 4th of 6)."""
    from anomaly import Detector
    from anomaly.config import apply_overrides, load_config

    config = apply_overrides(
        load_config("musc"), ["backbone.image_size=[64,64]", "preprocess.tile.size=128", "batch_size=64"]
    )
    frames = [_texture(np.random.default_rng(20 + i), 384, 384) for i in range(6)]
    frames[2][200:206, 150:156] = (120, 140, 150)  # a faint 6 px defect in one tile of one frame
    scores = [r.image_score for r in Detector(config).predict(frames)]
    assert int(np.argmax(scores)) == 2  # its tile-level RsCIN score was 1.40x the next frame's, its peak 1.71x
    unscaled = Detector(apply_overrides(config, ["scorer.params.rscin_k=null"])).predict(frames)
    assert scores == pytest.approx([r.image_score for r in unscaled], rel=1e-6)


def test_a_tiled_zero_shot_pool_never_compares_a_tile_with_its_overlapping_neighbours(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A defect inside a tile overlap is in both tiles, and each copy vouched for the other: its peak was 0.12 over a
    defect-free frame's instead of 0.16 (a 4000 x 3000 KolektorSDD frame, benchmarks/README.md section 6, round 30)."""
    from anomaly import Detector
    from anomaly.config import apply_overrides, load_config
    from anomaly.scorers.musc import MuScScorer

    config = apply_overrides(
        load_config("musc"), ["backbone.image_size=[64,64]", "preprocess.tile.size=128", "batch_size=64"]
    )
    seen = []
    score = MuScScorer.score
    monkeypatch.setattr(MuScScorer, "score", lambda self, *a, **k: seen.append(k["exclude"]) or score(self, *a, **k))
    frames = [_texture(np.random.default_rng(40 + i), 256, 320) for i in range(3)]
    Detector(config).predict(frames)
    tiles = plan_layout((256, 320), IN, tile=128, overlap=0.25)
    assert [list(x) for x in seen[0]] == [list(x) for x in overlapping_views([tiles] * 3, IN)]
    assert sum(map(len, seen[0])) > 0
    seen.clear()
    Detector(apply_overrides(config, ["preprocess.tile=null"])).predict(frames)
    assert seen == [None]


def test_tiled_references_never_compare_their_overlapping_tiles_either(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Few-shot references join the pool as one row per tile: their overlapping tiles were compared with each other
    (their rows carried no layout), so their scores, which set the pool's threshold, kept the help that the pool's
    tiles lost. Each row's tile is recorded, and saved with the model."""
    from anomaly import Detector
    from anomaly.config import apply_overrides, load_config
    from anomaly.scorers.musc import MuScScorer

    config = apply_overrides(
        load_config("musc"),
        [
            "backbone.image_size=[64,64]",
            "preprocess.tile.size=128",
            "batch_size=64",
            "scorer.params.augment_references=false",
        ],
    )
    seen = []
    score = MuScScorer.score
    monkeypatch.setattr(MuScScorer, "score", lambda self, *a, **k: seen.append(k["exclude"]) or score(self, *a, **k))
    references = [_texture(np.random.default_rng(60 + i), 256, 320) for i in range(2)]
    frames = [_texture(np.random.default_rng(40 + i), 256, 320) for i in range(2)]
    det = Detector(config).fit(references)
    tiles = plan_layout((256, 320), IN, tile=128, overlap=0.25)
    expected = [list(x) for x in overlapping_views([tiles] * 4, IN)]  # 2 references, then 2 frames
    det.predict(frames)
    assert [list(x) for x in seen[0]] == expected
    loaded = Detector.load(det.save(tmp_path / "model"))
    assert loaded.reference_tiles_ is not None and (loaded.reference_tiles_ == det.reference_tiles_).all()
    seen.clear()
    loaded.predict(frames)
    assert [list(x) for x in seen[0]] == expected


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("preprocess.resize=squash", "preprocess.resize"),
        ("preprocess.tile={size: 512, overlap: 0.9}", "preprocess.tile.overlap"),
        ("preprocess.tile={size: 8}", "preprocess.tile.size"),
        ("preprocess.tile={sise: 512}", "did you mean 'size'"),
    ],
)
def test_preprocess_config_is_validated(override: str, message: str) -> None:
    from anomaly.config import apply_overrides, load_config
    from anomaly.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        apply_overrides(load_config("patchcore"), [override])


def test_tiled_model_round_trips_and_exports(tiled_detector, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from anomaly import Detector

    image = _texture(np.random.default_rng(3), 700, 900)
    loaded = Detector.load(tiled_detector.save(tmp_path / "model"))
    assert loaded.config.preprocess.tile.size == 256
    expected = tiled_detector.predict(image)
    assert loaded.predict(image).image_score == pytest.approx(expected.image_score, rel=1e-5)
    pytest.importorskip("onnxruntime")
    from anomaly.export import export_model
    from anomaly.runtime import ExportedDetector

    exported = ExportedDetector(export_model(tmp_path / "model", tmp_path / "export")).predict(image)
    assert exported.image_score == pytest.approx(expected.image_score, rel=1e-4)
    assert exported.anomaly_map.shape == image.shape[:2]
    assert np.abs(exported.anomaly_map - expected.anomaly_map).max() <= 1e-3


def test_standardize_maps_gray_statistics_and_removes_lighting_drift() -> None:
    from anomaly.data.views import TARGET_MEAN, TARGET_STD, standardize_intensity

    image = _texture(np.random.default_rng(1), 300, 500)
    out = standardize_intensity(image[None], image)[0].astype(np.float64)
    assert out.mean(2).mean() == pytest.approx(TARGET_MEAN, abs=0.5)
    assert out.mean(2).std() == pytest.approx(TARGET_STD, abs=0.5)
    darker = np.clip(image * 0.6 + 10, 0, 255).astype(np.uint8)  # another lighting run: less gain, an offset
    assert np.abs(standardize_intensity(darker[None], darker)[0] - out).max() <= 3  # uint8 rounding only
    flat = np.full((50, 50, 3), 100, np.uint8)
    flat[::7, ::7] = 103  # near-flat: its noise is amplified at most 8x, not to full contrast
    assert np.ptp(standardize_intensity(flat[None], flat)) <= 8 * 3 + 1


def test_standardize_uses_whole_image_statistics_for_every_tile() -> None:
    from anomaly.data.views import standardize_intensity

    image = _texture(np.random.default_rng(2), 300, 900)
    image[:, 600:] //= 3  # a dark third: tiles there must not be stretched to full contrast on their own
    tiled = decode_input(image, IN, spec=ViewSpec(tile=None, standardize=True))
    plain = decode_input(image, IN, spec=ViewSpec(tile=None))
    assert tiled.views is not None and plain.views is not None and len(tiled.views) >= 3
    np.testing.assert_array_equal(tiled.views, standardize_intensity(plain.views, image))
    assert tiled.views[-1].mean() < tiled.views[0].mean() - 20


def test_standardized_detector_ignores_brightness_and_contrast_changes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from anomaly import Detector
    from anomaly.config import apply_overrides, load_config
    from anomaly.errors import ConfigError
    from anomaly.export import export_model

    small = ["backbone.image_size=[64,64]", "threshold.folds=3"]
    train = [_texture(np.random.default_rng(i), 96, 128) for i in range(6)]
    test = _texture(np.random.default_rng(99), 96, 128)
    lighting = ((0.5, 5), (0.6, 100), (1.8, -110))  # (gain, offset) of other acquisition runs
    runs = [np.clip(test * gain + offset, 0, 255).astype(np.uint8) for gain, offset in lighting]
    for flag in (False, True):
        det = Detector(apply_overrides(load_config("patchcore"), [*small, f"preprocess.standardize={flag}"])).fit(train)
        scores = np.array([r.image_score for r in det.predict([test, *runs])])
        if not flag:  # raw: the same part under other lighting is flagged, the part itself is not
            assert scores[0] < det.threshold_ < scores[1:].min()
    # standardised: the same part scores the same under any lighting, up to the uint8 rounding of a gain of 0.5
    assert np.ptp(scores) <= 0.03 * scores[0]
    loaded = Detector.load(det.save(tmp_path / "model"))
    assert loaded.config.preprocess.standardize is True
    assert loaded.predict(runs[0]).image_score == pytest.approx(scores[1], rel=1e-5)
    pytest.importorskip("onnxruntime")
    from anomaly.runtime import ExportedDetector

    export_model(tmp_path / "model", tmp_path / "export")  # the runtime standardises as the Detector does
    exported = [r.image_score for r in ExportedDetector(tmp_path / "export").predict([test, *runs])]
    assert exported == pytest.approx(scores.tolist(), rel=1e-4)
    with pytest.raises(ConfigError, match="preprocess.standardize"):
        apply_overrides(load_config("patchcore"), ["preprocess.standardize=sometimes"])


def test_lighting_drift_separates_constant_from_drifting_lighting() -> None:
    from anomaly.data.views import DRIFT_THRESHOLD, bright_level, lighting_drift

    base = [_texture(np.random.default_rng(i), 80, 120) for i in range(8)]
    runs = [np.clip(image * gain, 0, 255).astype(np.uint8) for image, gain in zip(base, [0.5, 1.4] * 4)]
    constant = lighting_drift([bright_level(image) for image in base])
    drifting = lighting_drift([bright_level(image) for image in runs])
    assert constant < 0.02 < DRIFT_THRESHOLD < drifting
    # two runs, gain 0.5 and 1.4: bright levels differ by a factor 2.8, so the std of their log is log(2.8) / 2
    assert drifting == pytest.approx(np.log(2.8) / 2, rel=0.05)


def test_lighting_drift_ignores_content_that_changes_the_gray_mean() -> None:
    from anomaly.data.views import DRIFT_THRESHOLD, bright_level, gray_stats, lighting_drift

    rng = np.random.default_rng(3)
    boards = []  # binarised crops (DeepPCB): 10 % to 70 % copper, at the same exposure
    for share in np.linspace(0.1, 0.7, 8):
        board = np.where(rng.random((96, 128)) < share, 255, 0).astype(np.uint8)
        boards.append(np.repeat(board[..., None], 3, axis=2))
    assert np.log([gray_stats(b)[0] for b in boards]).std() > 3 * DRIFT_THRESHOLD  # the mean swings with the copper
    assert lighting_drift([bright_level(b) for b in boards]) == pytest.approx(0.0, abs=1e-9)


def test_standardize_auto_is_decided_at_fit_and_saved(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from anomaly import Detector
    from anomaly.config import apply_overrides, load_config
    from anomaly.errors import ConfigError

    config = apply_overrides(load_config("patchcore"), ["backbone.image_size=[64,64]", "threshold.folds=3"])
    assert config.preprocess.standardize == "auto"
    base = [_texture(np.random.default_rng(i), 96, 128) for i in range(6)]
    drifting = [np.clip(image * gain, 0, 255).astype(np.uint8) for image, gain in zip(base, [0.5, 1.0, 1.4] * 2)]
    zero_shot = Detector(
        apply_overrides(load_config("musc"), ["backbone.image_size=[64,64]", "preprocess.standardize=auto"])
    )
    with pytest.raises(ConfigError, match="auto is decided from the training images"):
        zero_shot.extract(base)  # features need the decision first
    zero_shot.predict(drifting)  # a pool without references decides from its own (unlabelled) images
    assert zero_shot.config.preprocess.standardize is True
    zero_shot.predict(base)  # and every pool decides again
    assert zero_shot.config.preprocess.standardize is False
    assert Detector(config).fit(base).config.preprocess.standardize is False
    det = Detector(config).fit(drifting)
    assert det.config.preprocess.standardize is True
    assert det.fit(base).config.preprocess.standardize is False  # a refit decides again
    assert det.fit(drifting).config.preprocess.standardize is True
    assert Detector.load(det.save(tmp_path / "model")).config.preprocess.standardize is True


@pytest.mark.parametrize(
    ("sizes", "budget", "expected"),
    [
        ([(900, 900)] * 3, (256, 256), (256, 256)),  # squares keep the configured input
        ([(331, 291), (335, 296), (100, 252)], (256, 256), (256, 256)),  # median aspect 0.88: within 1.25
        ([(1259, 500), (1260, 500), (1258, 500)], (256, 256), (416, 160)),  # KolektorSDD's 1:2.5 parts
        ([(460, 1130)] * 2, (256, 256), (160, 416)),  # BSData's 2.5:1 frames
        ([(200, 4000)], (256, 256), (96, 736)),  # 20:1 is clipped to 8:1
        ([(460, 1130)], (256, 512), (256, 512)),  # an input already of the images' aspect is kept
        ([(1000, 1000)], (160, 416), (256, 256)),  # and a wide input meets square images
        ([(300, 400)] * 3 + [(400, 300)] * 2, (256, 256), (256, 256)),  # mixed orientations: no shape for all
        ([(100, 300)] * 4 + [(300, 100)], (256, 256), (160, 448)),  # 4 in 5 agree: theirs
    ],
)
def test_fitted_input_size_takes_the_aspect_at_the_same_pixel_count(sizes, budget, expected) -> None:  # type: ignore[no-untyped-def]
    from anomaly.data.views import fitted_input_size

    size = fitted_input_size(sizes, budget)
    assert size == expected
    assert size[0] % 32 == 0 and size[1] % 32 == 0
    assert abs(size[0] * size[1] / (budget[0] * budget[1]) - 1) < 0.1  # the backbone's cost stays as configured


def test_resize_auto_is_decided_at_fit_saved_and_redecided(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from anomaly import Detector
    from anomaly.config import apply_overrides, load_config
    from anomaly.errors import ConfigError

    config = apply_overrides(load_config("patchcore"), ["backbone.image_size=[64,64]", "threshold.folds=3"])
    assert config.preprocess.resize == "auto"
    tall = [_texture(np.random.default_rng(i), 192, 64) for i in range(4)]  # 1:3 parts
    square = [_texture(np.random.default_rng(i), 80, 80) for i in range(4)]
    det = Detector(config).fit(tall)
    assert det.config.backbone.image_size == (96, 32) and det.config.preprocess.resize == "stretch"
    assert det.extractor.image_size == (96, 32)
    result = det.predict(tall[0])
    assert result.anomaly_map.shape == (192, 64)
    loaded = Detector.load(det.save(tmp_path / "model"))
    assert loaded.config.backbone.image_size == (96, 32) and loaded.config.preprocess.resize == "stretch"
    assert loaded.predict(tall[0]).image_score == pytest.approx(result.image_score, rel=1e-5)
    assert det.fit(square).config.backbone.image_size == (64, 64)  # a refit decides again, from the budget
    assert det.extractor.image_size == (64, 64)
    with pytest.raises(ConfigError, match="preprocess.resize: expected stretch, keep_aspect or auto"):
        apply_overrides(load_config("patchcore"), ["preprocess.resize=squash"])


def test_resize_auto_in_zero_shot_pools_and_streams() -> None:
    from anomaly import Detector, StreamingDetector
    from anomaly.config import apply_overrides, load_config

    config = apply_overrides(load_config("musc"), ["backbone.image_size=[64,64]"])
    assert config.preprocess.resize == "auto"
    tall = [_texture(np.random.default_rng(i), 192, 64) for i in range(4)]
    square = [_texture(np.random.default_rng(i), 80, 80) for i in range(4)]
    pool = Detector(config)
    results = pool.predict(tall)  # no references: the pool decides from its own images
    assert pool.config.backbone.image_size == (96, 32) and results[0].anomaly_map.shape == (192, 64)
    pool.predict(square)
    assert pool.config.backbone.image_size == (64, 64)
    few_shot = Detector(config).fit(tall[:1])  # references decide at fit and fix the input for every pool
    few_shot.predict(square[:2])
    assert few_shot.config.backbone.image_size == (96, 32)
    line = StreamingDetector(Detector(config), pool_size=8)
    line.predict(tall[:2])  # the first batch decides for the whole stream
    assert line.predict(square[:2])[0].anomaly_map.shape == (80, 80)
    assert line.detector.config.backbone.image_size == (96, 32)


def test_a_tile_size_above_the_training_images_is_named_at_fit(caplog: pytest.LogCaptureFixture) -> None:
    """`--set preprocess.tile.size=2000` on 517 x 333 px parts fitted them at 66 x 43 px of the 256 px input (the rest
    mirrored) without a word: image AUROC 0.97 -> 0.72 on toothbrush parts. The fit now says so; tiles that keep the
    images at half the input or more stay silent."""
    from anomaly import Detector
    from anomaly.config import apply_overrides, load_config

    small = ["backbone.image_size=[64,64]", "threshold.folds=3", "scorer.params.coreset_ratio=0.1"]
    train = [_texture(np.random.default_rng(i), 96, 64) for i in range(4)]
    warned = {}
    for size in (512, 96):
        caplog.clear()
        Detector(apply_overrides(load_config("patchcore"), [*small, f"preprocess.tile.size={size}"])).fit(train)
        warned[size] = [r.getMessage() for r in caplog.records if "larger than the training images" in r.getMessage()]
    assert warned[96] == []
    assert len(warned[512]) == 1
    assert (
        "preprocess.tile.size 512 is larger than the training images (median 96x64 px, H x W): each is seen at about "
        "12x8 px of the 64x64 model input" in warned[512][0]
    )
