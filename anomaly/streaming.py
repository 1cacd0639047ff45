"""Zero-shot scoring on a production line: each new image is scored against a rolling pool."""

from __future__ import annotations

import copy
import logging
import threading
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from anomaly.data.inputs import OnError, check_on_error, one_or_many
from anomaly.data.loader import DecodedImage, ImageInput, fingerprint
from anomaly.detector import Detector, FeatureSet, in_input_order
from anomaly.errors import ConfigError, DataError
from anomaly.results import DetectionResult
from anomaly.scorers.base import ScoreOutput
from anomaly.scorers.musc import RollingPool
from anomaly.thresholds import MIN_WINDOW, Threshold, pool_threshold, suspect_references

__all__ = ["StreamingDetector"]

log = logging.getLogger(__name__)

_ADMIT = ("normal", "all")
# Scores of this many recent frames set the threshold. With 80, one bsdata stream (seed 0, 150 good frames) ran away:
# its mixture split the upper tail of normal wear off as a "defect" cluster, flagged frames stayed out of the pool,
# and 25 / 150 good frames were flagged (5 / 150 with admit="all"); with 256, 9 / 230, none after frame 80, while a
# recurring smudge on bottle stays flagged 50 / 50 (benchmarks/README.md section 12).
STREAM_WINDOW = 256
# A burst of flags (this share of the last this many frames) is reported once: a recurring defect or a new normal look.
_BURST_FRAMES = 40
_BURST_SHARE = 0.2  # 4 of 40 happen at start-up (bsdata seed 0); a recurring defect soon passes 8


class StreamingDetector:
    """Score a stream of unlabeled images with MuSc against the most recent ``pool_size`` images admitted.

    Few-shot references (``Detector.fit`` on a zero-shot detector) stay in the pool for good; without them,
    the first batch decides the config's ``auto`` preprocessing for the whole stream (one Detector per line).
    The threshold follows the zero-shot pool rule (:func:`anomaly.thresholds.pool_threshold`) over the
    scores of the most recent ``window`` images (at least ``pool_size``), flagged ones included: a longer
    window is steadier, a shorter one follows a change of the score level sooner. Until the stream has
    scored 20 images of its own, the threshold comes from the frames not flagged so far and the references'
    scores (each against the other references), which stand in for the normal images it has not seen yet:
    a defect among the first frames is flagged, and so is a run of them.

    ``admit``: which scored images join the pool. ``"normal"`` (default) keeps flagged images out, so a
    defect that recurs on the line (a roller mark on every part) keeps being flagged instead of being
    vouched for by its own earlier copies; a lasting change of the normal look then stays flagged until
    someone looks and passes some of those frames to :meth:`confirm_normal`. Without references the first
    batch joins whole: it seeds the pool. ``"all"`` lets every image in, so the pool follows any drift,
    defects included.

    Calls from several threads (two cameras on one line) take turns: each batch is scored against the pool as
    the batch before it left it.

    Example:
        >>> line = StreamingDetector(Detector("musc").fit(good_images), pool_size=32)  # doctest: +SKIP
        >>> [r.is_anomalous for r in line.predict(new_frames)]  # doctest: +SKIP
    """

    def __init__(
        self, detector: Detector, pool_size: int = 64, admit: str = "normal", window: int = STREAM_WINDOW
    ) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ConfigError(f"StreamingDetector: window must be an integer >= 2, got {window!r}")
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 0:
            raise ConfigError(f"StreamingDetector: pool_size must be an integer >= 0, got {pool_size!r}")
        if pool_size == 0 and detector.reference_ is None:
            raise ConfigError("StreamingDetector: pool_size 0 keeps no frame, so it needs few-shot references (fit)")
        if admit not in _ADMIT:
            raise ConfigError(f"StreamingDetector: admit must be one of {', '.join(_ADMIT)}, got {admit!r}")
        if not detector.zero_shot or not detector.scorer.uses_references:
            raise ConfigError("StreamingDetector needs a zero-shot detector that scores against references (musc)")
        if detector.config.preprocess.tile is not None:
            raise ConfigError("StreamingDetector scores whole images: set preprocess.tile to null")
        if detector.scorer.augment_queries:
            raise ConfigError("StreamingDetector scores each image once: set scorer.params.augment_queries to false")
        self.detector = detector
        self.admit = admit
        self._lock = threading.Lock()  # calls from several threads take turns: each batch meets the pool as left
        device = detector.extractor.device
        reference = None if detector.reference_ is None else [r.to(device) for r in detector.reference_.layers]
        self.pool = RollingPool(detector.scorer, pool_size, reference=reference)  # type: ignore[arg-type]
        # the threshold's window of recent scores (below 20 scores: median + 3 MAD, see anomaly.thresholds)
        self._recent: deque[float] = deque(maxlen=max(pool_size, window))
        self._unflagged: list[float] = []  # start-up: scores of the frames not flagged (see predict)
        self._n_scored = 0  # frames scored into the window: start-up ends at 20, whatever the window holds
        self._flags: deque[bool] = deque(maxlen=_BURST_FRAMES)
        self._pool_prints: deque[str] = deque(maxlen=pool_size)  # fingerprints of the pool's frames, oldest first
        self._pool_sizes: deque[tuple[int, int]] = deque(maxlen=pool_size)  # their sizes (H, W), for the aspect check
        self._repeats_reported = False
        self._burst_reported = False
        # the decision in force: what a result of an unreadable frame reports (NaN before the first decision)
        nan = float("nan")
        self._last_decision = Threshold(nan, nan, "none", detector.config.threshold.target_fpr, 0, nan)
        self._reference_scores = self._score_references()
        if reference is not None and not len(self._reference_scores):
            log.warning(
                "StreamingDetector: no reference score to judge the first frames by (one reference has no other to be "
                "scored against): they are judged by their own scores, and a defect among them may pass; give 2 or "
                "more references"
            )
        # the input settings this line scores with (decided by the fit, or by its first batch)
        self._config = None if reference is None else detector.config

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles (``copy.deepcopy``, multiprocessing) get their own lock, and the pool as it stands: as
        the last call left it, not half of a call another thread is making (its frames in the pool, not yet in the
        pool's fingerprints or the threshold's window), which they wait for."""
        with self._lock:  # a snapshot of what calls change in place: pickled after the lock is let go
            state = self.__dict__.copy()
            for key in ("_recent", "_unflagged", "_flags", "_pool_prints", "_pool_sizes"):
                state[key] = copy.copy(state[key])
            state["pool"] = copy.copy(self.pool)  # its tensors are replaced by add(), never written in place
            state["detector"] = copy.copy(self.detector)  # a first call decides its input settings
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def predict(
        self, images: ImageInput | Sequence[ImageInput], *, maps: bool = True, on_error: OnError = "raise"
    ) -> Any:
        """Score each new image against the references and the pool (not against the other images of the call: a
        recurring defect would vouch for itself); until 20 images are scored, decide them in turn, each by the
        threshold it would meet alone (a call of defects would set its own), then together by the window of recent
        scores; then add those ``admit`` lets in. The first call of a line without references has nothing else: its
        images score each other, are decided together and seed the pool.

        One image returns one DetectionResult, a list of them a list (as :meth:`Detector.predict`); ``maps=False``
        leaves ``anomaly_map`` None (the verdicts are the same).
        ``on_error="skip"``: an unreadable image gets a result with ``error`` set (NaN score, not flagged) and
        leaves the pool, the threshold's window and the burst report as they were; the others are scored.
        """
        check_on_error(on_error)
        items, single = one_or_many(images)
        if not items:  # an empty batch (list, generator, stack of 0 images) has no results
            return []
        with self._lock:
            results = self._predict(items, maps, on_error)
        return results[0] if single else results

    def _predict(self, items: list[ImageInput], maps: bool, on_error: OnError) -> list[DetectionResult]:
        before = (self._config, self.detector.config)
        self._start(items, "predict")
        try:
            if on_error == "skip":
                features, decoded = self.detector.extract_readable(items)
            else:
                features = self.detector.extract(items)
                decoded = features.images
            scored = [] if features is None else self._score(features, maps)
        except DataError:
            self._config, self.detector.config = before  # a line without references starts with a batch it scores
            raise
        if features is None:  # nothing readable: nothing scored, nothing decided
            self._config, self.detector.config = before
        return [r for r, _ in in_input_order(decoded, scored, self._last_decision)]

    def _score(self, features: FeatureSet, maps: bool) -> list[DetectionResult]:
        """Score readable frames, decide with the window's threshold, admit, and report a burst of flags."""
        if len(self.pool) + len(features.images) + (0 if self.pool.reference is None else 1) < 2:
            raise DataError("the first call needs 2 images, or few-shot references")
        if len(self.pool) or self.pool.reference is not None:
            # Each frame against the references and the admitted frames alone: scored together, the frames of one call
            # vouched for each other, and a recurring defect sent as one batch passed (24 bottles with one smudge in a
            # call: 0 flagged, against 10 / 10 one at a time), whatever ``admit`` kept out of the pool.
            n = len(features.images)
            out = ScoreOutput.concat([self.pool.score([x[i : i + 1] for x in features.layers]) for i in range(n)])
        else:  # the first batch of a line without references: its frames are all there is to compare with
            out = self.pool.score(features.layers)
        peaks = self.detector.map_peaks(out, features.images)
        out = ScoreOutput(out.patch_maps, peaks)  # no RsCIN on a stream: the image score is the map peak
        prints = [fingerprint(d.views) for d in features.images]
        repeated = self._repeated(prints)
        if len(self.pool) or self.pool.reference is not None:
            # During start-up each frame is decided in turn, as if it came alone: decided together, a call's frames
            # set their own threshold (4 references, then 6 defects in one call: none flagged, against 6 / 6 one at a
            # time). Then the window's 20+ earlier scores outweigh a call, and the rest of it is decided together.
            results, i = [], 0
            while i < len(peaks) and self._n_scored < MIN_WINDOW:
                one = slice(i, i + 1)
                results += self._decide(out.take(one), features.images[one], repeated[one], maps)
                i += 1
            if i < len(peaks):
                rest = slice(i, None)
                results += self._decide(out.take(rest), features.images[rest], repeated[rest], maps)
        else:  # the first batch of a line without references: its frames are all there is to judge by
            results = self._decide(out, features.images, repeated, maps)
        check = self.detector.input_check(list(self._pool_sizes))  # the frames admitted so far, not those judged
        check.add_decoded(features.images)
        check.warn(len(results))
        seeding = len(self.pool) == 0 and self.pool.reference is None  # nothing to compare with yet: all join
        keep = [i for i, r in enumerate(results) if self.admit == "all" or seeding or not r.is_anomalous]
        self.pool.add([x[keep] for x in features.layers])
        self._pool_prints.extend(prints[i] for i in keep)
        self._pool_sizes.extend(features.images[i].size for i in keep)
        self._flags.extend(r.is_anomalous for r in results)
        self._report_burst()
        return results

    def _decide(
        self, out: ScoreOutput, images: Sequence[DecodedImage], repeated: NDArray[np.bool_], maps: bool
    ) -> list[DetectionResult]:
        """Results of scored frames by the threshold of the window (during start-up: the references' scores, the
        frames not flagged so far and these), which their fresh scores join."""
        peaks = out.image_scores
        fresh = peaks[~repeated]
        self._recent.extend(fresh.tolist())
        self._n_scored += len(fresh)
        start_up = self._n_scored < MIN_WINDOW  # counted: a window under 20 scores never held 20, start-up never ended
        if start_up:
            # Until 20 frames are scored: the references' scores, the frames not flagged so far, these frames.
            # Flagged frames stay out, as they stay out of the pool: a run of defects at the start would otherwise
            # lift the median + 3 MAD over itself (4 references, then 10 broken bottles: 3 flagged, then none).
            anchor = np.r_[self._reference_scores, self._unflagged]
            scores, n_reference = np.r_[anchor, fresh], len(self._reference_scores)
        else:
            scores, n_reference = np.asarray(self._recent), 0
        if not len(scores):  # repeats alone and nothing before them: the frames decide for themselves
            scores, n_reference = peaks, 0
        target = self.detector.config.threshold.target_fpr
        decision = pool_threshold(scores, target, n_reference=n_reference, expect_defects=False)  # mostly good
        self._last_decision = decision
        results = self.detector.finish(out, images, decision, maps=maps)
        if start_up:
            # Without references the first frames are all there is to judge by: a flagged one kept out of two seed
            # scores left the threshold at their near-zero spread (8 of 30 good bottles flagged).
            anchored = self.pool.reference is not None
            self._unflagged += [
                r.image_score for r, rep in zip(results, repeated) if not (rep or (anchored and r.is_anomalous))
            ]
        return results

    def confirm_normal(self, images: ImageInput | Sequence[ImageInput]) -> None:
        """Someone looked at flagged frames and found them good: they join the pool as admitted frames would.

        A look the pool has not seen (a second product variant, new lighting) is flagged, stays out of the pool
        with ``admit="normal"``, and so keeps being flagged: one KolektorSDD stream flagged 44 of 120 good frames,
        15 (none after the 60th) when the flagged frames were confirmed at the burst report (benchmarks/README.md
        section 12). The burst report starts afresh. The pool is not saved: to keep such a look across a restart,
        fit the detector with a few of those frames among its references.
        """
        items, _ = one_or_many(images)
        with self._lock:  # the checks too: a first predict that fails in another thread resets the line's settings
            if self.admit == "all":
                raise ConfigError("confirm_normal: with admit='all' every frame has joined the pool already")
            if self.pool.size == 0:
                raise ConfigError("confirm_normal: pool_size 0 keeps no frame")
            if self._config is None:
                raise ConfigError(
                    "confirm_normal: nothing scored yet; to start a line from known-good frames, fit the detector on "
                    "them"
                )
            self._start(items, "confirm_normal")
            confirmed = self.detector.extract(items)
            self.pool.add(confirmed.layers)
            self._pool_prints.extend(fingerprint(d.views) for d in confirmed.images)
            self._pool_sizes.extend(d.size for d in confirmed.images)
            self._flags.clear()
            self._burst_reported = False

    def _start(self, items: list[ImageInput], what: str) -> None:
        """Check a call's images against the detector's input settings; the first batch of a line without
        references decides its ``auto`` settings."""
        if not items:
            raise DataError(f"{what}: no images")
        if self._config is None:
            self.detector.resolve_auto(items)
            self._config = self.detector.config
        elif self.detector.config != self._config:
            raise ConfigError(
                f"{what}: the detector's settings changed since this line started (shared with another "
                "StreamingDetector, or refitted?): give each line its own Detector"
            )

    def _score_references(self) -> NDArray[np.float64]:
        """Each reference's score against the other references, as a new frame meets them: the image as given (the
        highest of its tiles) against every view of the others. A suspect reference
        (:func:`~anomaly.thresholds.suspect_references`) is left out. Empty with fewer than 2 references."""
        reference, images = self.pool.reference, self.detector.reference_
        if reference is None or images is None:
            return np.empty(0)
        owners = np.array([str(d.source) for d in images.images])
        names = list(dict.fromkeys(owners))
        if len(names) < 2:
            return np.empty(0)
        views = self.detector.reference_views_
        given = np.ones(len(owners), bool) if views is None else views == 0
        peaks = []
        for name in names:
            others = torch.from_numpy(np.flatnonzero(owners != name)).to(reference[0].device)
            tiles = []
            for row in np.flatnonzero((owners == name) & given):  # one at a time, as a frame meets the pool
                out = self.detector.scorer.score(
                    [x[row : row + 1] for x in reference], reference=[x[others] for x in reference]
                )
                tiles.append(float(self.detector.map_peaks(out, [images.images[row]])[0]))
            peaks.append(max(tiles))
        scores = np.asarray(peaks)
        return scores[~suspect_references(scores, names)]

    def _repeated(self, prints: list[str]) -> NDArray[np.bool_]:
        """Which frames of a batch are copies of a pool frame or of another frame of the batch. They score about 0
        against their copy: kept in the threshold's window, a stalled camera's resent frames pulled a reference-free
        line's threshold to 0.0009 and every new good frame was flagged. They are scored, named once, and left out
        of the window (they join the pool as ``admit`` says: with ``"all"`` copies of a recurring defect vouch for
        it)."""
        counts = Counter(prints)
        repeated = np.array([p in self._pool_prints or counts[p] > 1 for p in prints], dtype=bool)
        if repeated.any() and not self._repeats_reported:
            self._repeats_reported = True
            log.warning(
                "%d of %d frames repeat a frame the pool holds or one of the same call (a stalled camera?): they are"
                " scored, and left out of the threshold's window",
                int(repeated.sum()),
                len(prints),
            )
        return repeated

    def _report_burst(self) -> None:
        """Warn once when many recent frames were flagged; again only after the share has fallen back."""
        if len(self._flags) < _BURST_FRAMES:
            return
        share = sum(self._flags) / len(self._flags)
        if share < _BURST_SHARE / 2:
            self._burst_reported = False
        elif share >= _BURST_SHARE and not self._burst_reported:
            self._burst_reported = True
            what = (
                "they stay out of the pool (admit='normal'): if they are good, pass some to "
                "StreamingDetector.confirm_normal()"
                if self.admit == "normal"
                else "they join the pool (admit='all'), so a recurring defect soon passes"
            )
            log.warning(
                "stream: %d of the last %d frames flagged (target FPR %g): a recurring defect, or the normal look "
                "changed; %s",
                sum(self._flags),
                len(self._flags),
                self.detector.config.threshold.target_fpr,
                what,
            )
