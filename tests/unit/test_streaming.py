from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from anomaly import ConfigError, DataError, Detector
from anomaly.config import apply_overrides, load_config
from anomaly.streaming import StreamingDetector


def _musc():
    return Detector(apply_overrides(load_config("musc"), ["backbone.image_size=[128,128]"]))


def test_stream_scores_defects_higher_with_a_bounded_pool(synthetic_root: Path) -> None:
    train = sorted((synthetic_root / "train" / "good").glob("*.png"))
    bad = sorted(p for p in (synthetic_root / "test").glob("*/*.png") if p.parent.name != "good")
    line = StreamingDetector(_musc().fit(train[:3]), pool_size=5)
    normal_scores, defect_scores = [], []
    for good_image, bad_image in zip(train[3:], bad):
        normal_scores += [r.image_score for r in line.predict([good_image])]
        defect_scores += [r.image_score for r in line.predict([bad_image])]
        assert len(line.pool) <= 5
    assert np.median(defect_scores) > np.median(normal_scores)
    assert all(np.isfinite(normal_scores + defect_scores))


def test_stream_needs_a_zero_shot_detector() -> None:
    with pytest.raises(ConfigError, match="zero-shot"):
        StreamingDetector(Detector("patchcore"))


def test_stream_threshold_treats_its_window_as_mostly_normal(synthetic_root: Path, monkeypatch) -> None:
    import anomaly.streaming

    seen: list[bool] = []
    real = anomaly.streaming.pool_threshold

    def spy(*args, **kwargs):
        seen.append(kwargs.get("expect_defects", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(anomaly.streaming, "pool_threshold", spy)
    train = sorted((synthetic_root / "train" / "good").glob("*.png"))
    StreamingDetector(_musc().fit(train[:2]), pool_size=4).predict(train[2:4])
    assert seen == [False, False]  # each frame decided in turn


def test_a_recurring_defect_stays_flagged_unless_every_image_joins_the_pool(synthetic_root: Path) -> None:
    """A line fault repeats the same defect: kept out of the pool it is flagged every time (admit="normal");
    with admit="all" its earlier copies vouch for it and it stops being flagged."""
    train = sorted((synthetic_root / "train" / "good").glob("*.png"))
    bad = sorted(p for p in (synthetic_root / "test").glob("*/*.png") if p.parent.name != "good")[0]
    flagged = {}
    for admit in ("normal", "all"):
        line = StreamingDetector(_musc().fit(train[:2]), pool_size=8, admit=admit)
        for image in train[2:10]:
            line.predict([image])
        before = len(line.pool)
        flagged[admit] = [line.predict([bad])[0].is_anomalous for _ in range(8)]
        if admit == "normal":
            assert len(line.pool) == before  # no copy of the defect joined
    assert flagged["normal"] == [True] * 8
    assert flagged["all"][0] and not any(flagged["all"][-3:])


def test_stream_admit_is_checked() -> None:
    with pytest.raises(ConfigError, match="admit must be one of normal, all"):
        StreamingDetector(_musc(), admit="flagged")


@pytest.mark.parametrize("window", [1, 2.5, True, "256"])
def test_stream_window_is_checked(window) -> None:
    with pytest.raises(ConfigError, match="window must be an integer >= 2"):
        StreamingDetector(_musc(), window=window)


@pytest.mark.parametrize("admit", ["normal", "all"])
def test_a_burst_of_flags_is_reported_once(synthetic_root: Path, monkeypatch, caplog, admit: str) -> None:
    """Half of the last frames flagged: one warning naming the count and what the admit policy does with them."""
    import anomaly.streaming

    monkeypatch.setattr(anomaly.streaming, "_BURST_FRAMES", 4)
    monkeypatch.setattr(anomaly.streaming, "_BURST_SHARE", 0.5)
    train = sorted((synthetic_root / "train" / "good").glob("*.png"))
    bad = sorted(p for p in (synthetic_root / "test").glob("*/*.png") if p.parent.name != "good")
    line = StreamingDetector(_musc().fit(train[:2]), pool_size=8, admit=admit)
    for image in train[2:8]:
        line.predict([image])
    assert not [r for r in caplog.records if r.levelname == "WARNING"]  # good frames: nothing to report
    for image in bad[:5]:  # distinct defects: with admit="all" an exact copy would be vouched for by the first
        assert line.predict([image])[0].is_anomalous
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert "2 of the last 4 frames flagged" in warnings[0] and f"admit='{admit}'" in warnings[0]


def test_without_references_the_first_batch_seeds_the_pool_whole(synthetic_root: Path) -> None:
    train = sorted((synthetic_root / "train" / "good").glob("*.png"))
    bad = sorted(p for p in (synthetic_root / "test").glob("*/*.png") if p.parent.name != "good")[0]
    line = StreamingDetector(_musc(), pool_size=8)
    first = line.predict([*train[:3], bad])
    assert len(line.pool) == 4  # nothing to compare with yet: every image of the first batch joins
    later = line.predict([bad])[0]
    assert later.is_anomalous == (len(line.pool) == 4)  # afterwards a flagged image stays out
    assert np.isfinite([r.image_score for r in first]).all()


def test_resent_frames_stay_out_of_the_threshold_window(synthetic_root: Path, caplog) -> None:
    """A stalled camera resends frames the pool holds: each scored about 0 against its copy, the window's threshold
    fell to 0.0009 and every new good frame was flagged. Repeats are scored, named once, and not counted."""
    good = sorted((synthetic_root / "train" / "good").iterdir())
    line = StreamingDetector(_musc(), pool_size=8)
    line.predict(good[:4])
    with caplog.at_level("WARNING", logger="anomaly"):
        repeats = [line.predict(good[i % 4]) for i in range(12)]
    assert not any(r.is_anomalous for r in repeats)
    assert np.median([r.image_score for r in repeats]) < 1e-2  # scored against their copy: about 0
    assert len(line._recent) == 4  # type: ignore[attr-defined]
    assert sum("repeat a frame the pool holds" in r.message for r in caplog.records) == 1
    fresh = line.predict(good[4:10])
    assert fresh[0].threshold > 0.1 and sum(r.is_anomalous for r in fresh) <= 1
    bad = sorted(p for p in (synthetic_root / "test").glob("*/*.png") if p.parent.name != "good")[0]
    assert line.predict(bad).is_anomalous  # the same line still flags a defect: the counts above are no empty check


def test_references_judge_the_first_frames(synthetic_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Until the stream has scores of its own, the references' scores against each other stand in for normal
    frames: a defect as the very first frame is flagged (before, one score was its own threshold). One reference
    has no other to be scored against: the line says so (it passed a first defect without a word)."""
    train = sorted((synthetic_root / "train" / "good").glob("*.png"))
    bad = sorted(p for p in (synthetic_root / "test").glob("*/*.png") if p.parent.name != "good")
    caplog.set_level("WARNING", logger="anomaly")
    line = StreamingDetector(_musc().fit(train[:4]), pool_size=8)
    assert "give 2 or more references" not in caplog.text
    assert line.predict([bad[0]])[0].is_anomalous
    assert not any(line.predict([image])[0].is_anomalous for image in train[4:7])
    single = StreamingDetector(_musc().fit(train[:1]))
    assert "give 2 or more references" in caplog.text
    assert not single.predict([train[1]])[0].is_anomalous


def test_confirmed_frames_join_the_pool_and_vouch_for_their_look(synthetic_root: Path) -> None:
    """A new normal look (here: inverted images) is flagged and, kept out of the pool (admit="normal"), keeps
    scoring like a defect; once someone confirms a few such frames they join the pool and vouch for the next."""
    from anomaly.data.io import read_image

    train = sorted((synthetic_root / "train" / "good").glob("*.png"))
    new_look = [255 - read_image(path) for path in train[4:12]]
    later = {}
    for confirm in (False, True):
        line = StreamingDetector(_musc().fit(train[:2]), pool_size=16)
        for image in train[2:8]:
            line.predict([image])
        assert all(line.predict([image])[0].is_anomalous for image in new_look[:4])
        assert len(line.pool) == 6  # the flagged frames stayed out
        if confirm:
            line.confirm_normal(new_look[:4])
            assert len(line.pool) == 10
        later[confirm] = [line.predict([image])[0].image_score for image in new_look[4:]]
    assert max(later[True]) < 0.8 * min(later[False])  # about 0.6 against 0.9
    with pytest.raises(DataError, match="confirm_normal: no images"):
        line.confirm_normal([])
    with pytest.raises(ConfigError, match="admit='all' every frame has joined"):
        StreamingDetector(line.detector, admit="all").confirm_normal(new_look[:1])


def test_a_line_without_references_warms_up_on_every_frame(synthetic_root: Path) -> None:
    """Without references the first frames are all a line has: flagged ones kept out of its start-up threshold
    (as they are with references, against a run of defects) left it at two seed scores' near-zero spread, and it
    flagged 12 of the next 14 good frames."""
    good = sorted((synthetic_root / "train" / "good").glob("*.png")) + sorted(
        (synthetic_root / "test" / "good").glob("*.png")
    )
    order = good[2:] + good[:2]
    line = StreamingDetector(_musc(), pool_size=16)
    line.predict(order[:2])
    assert sum(line.predict(image).is_anomalous for image in order[2:]) <= 3
    bad = sorted(p for p in (synthetic_root / "test").glob("*/*.png") if p.parent.name != "good")[0]
    assert line.predict(bad).is_anomalous  # and it flags a defect after them: the count above is no empty check


def test_a_run_of_defects_at_the_start_stays_flagged(synthetic_root: Path) -> None:
    """Until the window holds 20 scores, flagged frames stay out of the start-up threshold as they stay out of
    the pool: before, each defect lifted the median + 3 MAD until the next ones passed (and joined the pool)."""
    train = sorted((synthetic_root / "train" / "good").glob("*.png"))
    bad = sorted(p for p in (synthetic_root / "test").glob("*/*.png") if p.parent.name != "good")
    line = StreamingDetector(_musc().fit(train[:4]), pool_size=16)
    assert [line.predict(image).is_anomalous for image in bad] == [True] * len(bad)
    assert len(line.pool) == 0
    assert not any(line.predict(image).is_anomalous for image in train[4:8])


def test_a_window_under_20_scores_ends_the_start_up_after_20_frames(synthetic_root: Path, monkeypatch) -> None:
    """The start-up lasted while the window held under 20 scores: with a window of 4 it never ended, and every frame
    was judged by the references and all frames not flagged since the start (a list that grew without end)."""
    import anomaly.streaming

    calls: list[tuple[int, int]] = []
    real = anomaly.streaming.pool_threshold

    def spy(scores, *args, **kwargs):
        calls.append((len(scores), kwargs.get("n_reference", 0)))
        return real(scores, *args, **kwargs)

    monkeypatch.setattr(anomaly.streaming, "pool_threshold", spy)
    from anomaly.data.io import read_image

    train = sorted((synthetic_root / "train" / "good").glob("*.png"))
    frames = [read_image(path) for path in train[4:]]
    frames += [image[:, ::-1] for image in frames] + [read_image(p) for p in sorted(synthetic_root.glob("test/*/*"))]
    line = StreamingDetector(_musc().fit(train[:4]), pool_size=4, window=4)
    for image in frames:  # 26 frames
        line.predict(image)
    assert calls[-1] == (4, 0) and len(line._unflagged) < 20  # the window's 4 scores, no references


def test_one_image_gets_one_result_and_misuse_is_refused(synthetic_root: Path) -> None:
    train = sorted((synthetic_root / "train" / "good").glob("*.png"))
    line = StreamingDetector(_musc().fit(train[:2]), pool_size=8)
    result = line.predict(train[2])  # a path, not a list: one image (a string is not walked letter by letter)
    assert np.isfinite(result.image_score) and result.anomaly_map.shape == (128, 128)
    line.confirm_normal(str(train[3]))
    assert len(line.pool) == 2
    for empty in ([], (p for p in []), np.zeros((0, 128, 128, 3), np.uint8)):  # no images: no results, as predict
        assert line.predict(empty) == []
    for size in (-1, 2.5, True, None):
        with pytest.raises(ConfigError, match="pool_size must be an integer >= 0"):
            StreamingDetector(line.detector, pool_size=size)
    with pytest.raises(ConfigError, match="pool_size 0 keeps no frame"):
        StreamingDetector(_musc(), pool_size=0)
    with pytest.raises(ConfigError, match="nothing scored yet"):
        StreamingDetector(_musc()).confirm_normal(train[:2])


def test_a_detector_shared_by_two_lines_is_refused_once_its_settings_change() -> None:
    """Lines without references decide the detector's ``auto`` input from their first batch; a second line on the
    same Detector can change it under the first, whose pool then no longer matches: a clear error, not a crash."""
    rng = np.random.default_rng(0)
    wide = [rng.integers(0, 255, (64, 160, 3), dtype=np.uint8) for _ in range(3)]
    tall = [rng.integers(0, 255, (160, 64, 3), dtype=np.uint8) for _ in range(3)]
    detector = _musc()
    first, second = StreamingDetector(detector, pool_size=8), StreamingDetector(detector, pool_size=8)
    first.predict(wide[:2])
    second.predict(tall[:2])
    with pytest.raises(ConfigError, match="give each line its own Detector"):
        first.predict(wide[2])


def test_unreadable_frames_are_skipped_on_request_and_change_nothing(synthetic_root: Path, tmp_path: Path) -> None:
    """``on_error="skip"`` as in Detector.predict: an unreadable frame gets an error result (NaN score, not
    flagged) and stays out of the pool and the threshold's window; without it the batch fails naming the file."""
    train = sorted((synthetic_root / "train" / "good").glob("*.png"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    line = StreamingDetector(_musc().fit(train[:2]), pool_size=8)
    with pytest.raises(DataError, match="broken.png"):
        line.predict([train[2], broken])
    assert len(line.pool) == 0 and len(line._recent) == 0
    results = line.predict([train[2], broken, train[3]], on_error="skip")
    assert [r.error is None for r in results] == [True, False, True]
    assert "broken.png" in results[1].error and results[1].source == str(broken)
    assert np.isnan(results[1].image_score) and not results[1].is_anomalous
    assert results[1].threshold == results[2].threshold == line._last_decision.image  # the decision in force
    assert len(line.pool) == 2 and len(line._recent) == 2
    alone = line.predict(broken, on_error="skip")  # one unreadable frame alone: nothing scored, nothing changes
    assert alone.error and len(line.pool) == 2 and len(line._recent) == 2
    with pytest.raises(DataError, match="on_error must be"):
        line.predict(train[4], on_error="ignore")


def test_a_line_whose_first_frames_are_all_unreadable_starts_with_the_next(tmp_path: Path) -> None:
    """Without references the first batch decides the ``auto`` input; a batch of unreadable frames decides
    nothing, so the line starts (aspect and all) with the first batch it can read."""
    rng = np.random.default_rng(0)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    line = StreamingDetector(_musc(), pool_size=8)
    first = line.predict([broken, broken], on_error="skip")
    assert all(r.error for r in first) and np.isnan(first[0].threshold) and len(line.pool) == 0
    tall = rng.integers(0, 255, (192, 64, 3), dtype=np.uint8)
    with pytest.raises(DataError, match="needs 2 images"):  # a batch refused decides nothing either
        line.predict([tall, broken], on_error="skip")
    with pytest.raises(DataError, match="broken.png"):
        line.predict([tall, tall, broken])
    wide = [rng.integers(0, 255, (64, 192, 3), dtype=np.uint8) for _ in range(3)]
    results = line.predict(wide, on_error="skip")
    assert all(r.error is None and np.isfinite(r.image_score) for r in results)
    height, width = line.detector.extractor.image_size
    assert width > 2 * height  # the input took the readable frames' aspect


def test_calls_from_several_threads_take_turns(synthetic_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two cameras calling one line from two threads scored their batches against one pool at once: admitting,
    the threshold's window and the burst report raced. Each batch now meets the pool as the one before left it."""
    import threading
    import time

    train = sorted((synthetic_root / "train" / "good").glob("*.png"))
    line = StreamingDetector(_musc().fit(train[:2]), pool_size=16)
    inside, most = [0], [0]
    score = line._score

    def slow_score(features, maps):  # type: ignore[no-untyped-def]
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.3)
        try:
            return score(features, maps)
        finally:
            inside[0] -= 1

    monkeypatch.setattr(line, "_score", slow_score)
    threads = [threading.Thread(target=line.predict, args=([image],)) for image in train[2:6]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1 and len(line.pool) == 4


def test_a_recurring_defect_sent_as_one_batch_is_flagged_as_it_is_frame_by_frame(synthetic_root: Path) -> None:
    """The frames of one call scored each other: a recurring defect in a batch vouched for itself (24 bottles with one
    smudge in one call: 0 flagged, 10 / 10 one at a time). Each frame now meets the references and the pool alone,
    so a batch scores as its frames would one by one against the same pool."""
    from anomaly.data.io import read_image

    train = sorted((synthetic_root / "train" / "good").glob("*.png"))
    smudged = []
    for path in train[6:12]:
        image = read_image(path).copy()
        image[40:64, 50:74] //= 5  # the same dark mark at the same spot of every part
        smudged.append(image)
    good = [read_image(path) for path in train[2:12]]
    good += [image[:, ::-1] for image in good]  # 20 good frames: past the start-up threshold, the window's rule
    lines = []
    for _ in range(2):
        line = StreamingDetector(_musc().fit(train[:2]), pool_size=8)
        for image in good:
            line.predict(image)
        lines.append(line)
    batch = lines[0].predict(smudged)
    alone = [lines[1].predict(image) for image in smudged]
    assert [r.is_anomalous for r in alone] == [True] * len(smudged)  # none joined the pool
    assert [r.is_anomalous for r in batch] == [True] * len(smudged)
    assert [r.image_score for r in batch] == pytest.approx([r.image_score for r in alone], rel=1e-5)


def test_a_copied_line_has_its_own_lock_and_pool(synthetic_root: Path) -> None:
    """``copy.deepcopy`` (and pickle, as for Detector) failed on the line's lock; a copy now continues the line on
    its own: the same pool and window, a lock of its own, and what it scores next leaves the original as it was."""
    import copy
    import pickle

    train = sorted((synthetic_root / "train" / "good").glob("*.png"))
    line = StreamingDetector(_musc().fit(train[:2]), pool_size=8)
    line.predict(train[2:4])
    for twin in (copy.deepcopy(line), pickle.loads(pickle.dumps(line))):
        assert twin._lock is not line._lock and len(twin.pool) == len(line.pool) == 2
        assert twin.predict(train[4]).image_score == pytest.approx(copy.deepcopy(line).predict(train[4]).image_score)
        assert len(twin.pool) == 3 and len(line.pool) == 2 and len(line._recent) == 2


def test_a_line_takes_maps_false_as_detector_predict_does(synthetic_root: Path) -> None:
    """``line.predict(frames, maps=False)``, as a Detector or its export is called, was a TypeError."""
    train = sorted((synthetic_root / "train" / "good").glob("*.png"))
    line = StreamingDetector(_musc().fit(train[:2]), pool_size=8)
    twin = StreamingDetector(_musc().fit(train[:2]), pool_size=8)
    without, with_maps = line.predict(train[2:4], maps=False), twin.predict(train[2:4])
    assert all(r.anomaly_map is None for r in without) and all(r.anomaly_map is not None for r in with_maps)
    assert [(r.image_score, r.is_anomalous) for r in without] == [(r.image_score, r.is_anomalous) for r in with_maps]


def test_a_call_of_defects_at_the_start_is_judged_as_its_frames_one_at_a_time(synthetic_root: Path) -> None:
    """The start-up threshold took a call's own scores: 4 references, then 6 defects in one call flagged none (they
    set a median + 3 MAD above themselves), against 6 / 6 sent one at a time. A call's frames are now decided in turn,
    so its verdicts are those of the same frames sent alone."""
    train = sorted((synthetic_root / "train" / "good").glob("*.png"))
    bad = sorted(p for p in (synthetic_root / "test").glob("*/*.png") if p.parent.name != "good")[:6]
    together = StreamingDetector(_musc().fit(train[:4]), pool_size=8).predict(bad)
    alone_line = StreamingDetector(_musc().fit(train[:4]), pool_size=8)
    alone = [alone_line.predict(path) for path in bad]
    assert [r.is_anomalous for r in together] == [r.is_anomalous for r in alone]
    assert [r.threshold for r in together] == pytest.approx([r.threshold for r in alone], rel=1e-9)
    assert sum(r.is_anomalous for r in together) >= 5


def test_after_the_start_up_a_call_is_decided_together(synthetic_root: Path, monkeypatch) -> None:
    """Frames are decided one at a time only until 20 are scored (a call could otherwise set its own start-up
    threshold); then a mixture per frame would cost each frame another fit, while 20+ earlier scores outweigh a call."""
    import cv2

    import anomaly.streaming

    calls: list[int] = []
    real = anomaly.streaming.pool_threshold

    def spy(scores, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(len(scores))
        return real(scores, *args, **kwargs)

    monkeypatch.setattr(anomaly.streaming, "pool_threshold", spy)
    train = sorted((synthetic_root / "train" / "good").glob("*.png"))
    image = cv2.cvtColor(cv2.imread(str(train[2])), cv2.COLOR_BGR2RGB)
    rng = np.random.default_rng(0)
    frames = [np.clip(image + rng.integers(-3, 4, image.shape), 0, 255).astype(np.uint8) for _ in range(24)]
    line = StreamingDetector(_musc().fit(train[:2]), pool_size=4)
    decisions = []
    for call in (frames[:2], frames[2:22], frames[22:]):
        before = len(calls)
        line.predict(call)
        decisions.append(len(calls) - before)
    assert decisions == [2, 18 + 1, 1]  # 18 frames reach the 20th score one by one, the last 2 of that call together


def test_a_copy_taken_while_another_thread_scores_waits_for_its_call(
    synthetic_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pickling a line (a checkpoint of the stream) from another thread read its state half-way through a call: the
    frame was in the pool but not among the pool's fingerprints nor in the window, so the restored line did not know
    that frame when it came again. A copy now waits for the call and takes the state it leaves."""
    import pickle
    import threading

    from anomaly.scorers.musc import RollingPool

    train = sorted((synthetic_root / "train" / "good").glob("*.png"))
    line = StreamingDetector(_musc().fit(train[:2]), pool_size=8)
    line.predict(train[2:4])
    inside, release = threading.Event(), threading.Event()
    add = RollingPool.add

    def held_add(pool, layers):  # type: ignore[no-untyped-def]
        add(pool, layers)
        inside.set()
        release.wait(10)

    monkeypatch.setattr(RollingPool, "add", held_add)
    scoring = threading.Thread(target=line.predict, args=([train[4]],))
    scoring.start()
    assert inside.wait(60)
    saved: list[bytes] = []
    saving = threading.Thread(target=lambda: saved.append(pickle.dumps(line)))
    saving.start()
    saving.join(1.0)
    release.set()
    scoring.join()
    saving.join()
    monkeypatch.setattr(RollingPool, "add", add)
    twin = pickle.loads(saved[0])
    assert len(twin.pool) == len(twin._pool_prints) == len(twin._pool_sizes) == 3
    assert len(twin._recent) == len(twin._flags) == twin._n_scored == 3
    again = twin.predict(train[4])  # the frame the copy holds, sent again: a repeat, left out of the window
    assert np.isfinite(again.image_score) and len(twin._recent) == 3
