"""Detector: composes the stages image -> features -> scorer -> map/score -> threshold -> result.

Each stage lives in its own module (``data.loader``, ``features``, ``scorers``, ``maps``,
``thresholds``, ``results``, ``model_dir``); this class wires them together and is the public API.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeGuard, overload

import numpy as np
import torch
from numpy.typing import NDArray

from anomaly import __version__
from anomaly._fs import load_tensors, restore_interrupted, save_tensors
from anomaly.config import DetectorConfig, from_dict, load_config
from anomaly.data.input_checks import (
    POOL_ASPECTS_MIN,
    InputCheck,
    InputProfile,
    aspect_range,
    colour_of,
    median_side,
    middle_aspects,
    small_images,
    smallest_side,
)
from anomaly.data.inputs import OnError, check_on_error, many, one_or_many, training_paths
from anomaly.data.io import significant_bits
from anomaly.data.loader import (
    DecodedImage,
    ImageInput,
    fingerprint,
    image_size,
    is_encoded_array,
    iter_batches,
    raw_pixels,
    support_views,
)
from anomaly.data.views import (
    DRIFT_THRESHOLD,
    Layout,
    ViewSpec,
    bright_level,
    copied_views,
    fitted_input_size,
    lighting_drift,
    overlapping_views,
)
from anomaly.decisions import make_results, map_peaks, view_max
from anomaly.errors import AnomalyError, ConfigError, DataError, NotFittedError, WeightsUnavailableError
from anomaly.features import FeatureExtractor, whole_patches
from anomaly.model_dir import read_meta, verified_files, write_model_dir
from anomaly.results import DetectionResult, StageProgress
from anomaly.scorers import ScoreOutput, Scorer, get_scorer
from anomaly.scorers.musc import MuScScorer
from anomaly.thresholds import (
    MIN_REFERENCE_RULE,
    REFERENCE_RATIO,
    RELIABLE_POOL_SIZE,
    Threshold,
    calibrate,
    outlying_scores,
    pool_threshold,
    robust_z,
    suspect_references,
)

__all__ = ["DetectionResult", "Detector", "FeatureSet", "ImageInput"]

log = logging.getLogger(__name__)

_REFERENCES_FILE = "references.safetensors"
_SAMPLE = 32  # images that decide the ``auto`` settings of ``preprocess`` (decoding them: ~5 % of a fit)
# the sample's decoded pixels kept for the extraction that follows (not decoded twice), up to this many bytes in all:
# 32 bottle images (900 x 900 RGB) take 78 MB, held while the fit's memory is still below its cross-fit's peak
_SAMPLE_KEEP_BYTES = 128 * 2**20
_UPSCALE_WARNING = 4  # training images upscaled more than this to the model input are named in a fit warning
# A few kept training images this many robust SDs above the others (outlier_z leaves out above 10) that lift the
# threshold to this many times what the rest give are named: defects that the outlier rule did not take.
_SETTER_Z = 5.0
_SETTER_RATIO = 1.5
_SETTER_MIN_REST = 10


@dataclass
class FeatureSet:
    """Backbone features of a set of images, with what later stages need to know about each image."""

    layers: list[torch.Tensor]  # per layer (V, C_l, h_l, w_l) over all views, finest first, on the extractor's device,
    # as the scorer keeps them (Scorer.kept_features: the gaussian scorer keeps 1 x 1 averages)
    embedding: torch.Tensor  # (V, D) global descriptors
    images: list[DecodedImage]  # per image: original size, source, view layout, decoded image when kept

    def __len__(self) -> int:
        return len(self.images)


class Detector:
    """Anomaly detector with a scikit-learn-like API.

    Example:
        >>> det = Detector("patchcore").fit(["good/"])  # doctest: +SKIP
        >>> det.predict("test/000.png").is_anomalous  # doctest: +SKIP
    """

    def __init__(self, config: DetectorConfig | str | os.PathLike[str] = "patchcore") -> None:
        self.config = config if isinstance(config, DetectorConfig) else load_config(config)
        # what the config asked for: its "auto" settings are decided again by every fit and reference-free pool
        self._standardize_setting = self.config.preprocess.standardize
        self._bit_depth_setting = self.config.preprocess.bit_depth
        self._input_setting = (self.config.preprocess.resize, self.config.backbone.image_size)
        self.scorer: Scorer = get_scorer(self.config.scorer.name, self.config.scorer.params)
        self.scorer.check_layer_count(len(self.config.backbone.layers))
        self._extractor: FeatureExtractor | None = None
        self._pool_lock = threading.Lock()  # see _predict_pool
        self.decision_: Threshold | None = None
        self.reference_: FeatureSet | None = None
        self.reference_views_: NDArray[np.int64] | None = None  # per reference row: its support view (0: as given)
        # tiled references: per row (image, y, x), the image (support view) it is a tile of and the tile's origin
        self.reference_tiles_: NDArray[np.int64] | None = None
        self._warned_references: set[str] = set()
        self.patch_footprint_: tuple[int, int] | None = None  # set by fit: see _patch_footprint
        self.excluded_training_: list[str] = []  # set by fit: training images left out of the threshold
        # set by fit: the out-of-sample scores (and map peaks, where they differ) the threshold was chosen from
        self.normal_scores_: NDArray[np.float64] | None = None
        self.normal_peaks_: NDArray[np.float64] | None = None
        self.training_aspects_: tuple[float, float] | None = None  # set by fit: see input_profile
        self.training_smallest_: int | None = None  # set by fit: the smallest training image's longer side
        self.training_colour_: str | None = None  # set by fit: "gray" / "colour" when every training image was

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles (``copy.deepcopy``, multiprocessing) get their own pool lock."""
        state = self.__dict__.copy()
        del state["_pool_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pool_lock = threading.Lock()

    @property
    def extractor(self) -> FeatureExtractor:
        """The frozen backbone, created on first use."""
        if self._extractor is None:
            bb = self.config.backbone
            self._extractor = FeatureExtractor(
                bb.name,
                bb.layers,
                weights=bb.weights,
                pretrained=bb.pretrained,
                image_size=bb.image_size,
                mean=bb.mean,
                std=bb.std,
                device=self.config.device,
                final_norm=bb.final_norm,
                layer_scales=bb.layer_scales,
            )
        return self._extractor

    @property
    def view_spec(self) -> ViewSpec:
        """How images become model-input views (``preprocess`` in the config)."""
        pre = self.config.preprocess
        if pre.resize == "auto":
            raise ConfigError(
                "preprocess.resize: auto is decided from the training images (fit) or a zero-shot pool; "
                "set stretch or keep_aspect to extract features before either"
            )
        for key, value, choice in (
            ("standardize", pre.standardize, "true or false"),
            ("bit_depth", pre.bit_depth, "a number of bits"),
        ):
            if value == "auto":
                raise ConfigError(
                    f"preprocess.{key}: auto is decided from the training images (fit) or a zero-shot pool; "
                    f"set {choice} to extract features before either"
                )
        tile = (False, 0.25) if pre.tile is None else (pre.tile.size, pre.tile.overlap)
        return ViewSpec(pre.resize, *tile, standardize=bool(pre.standardize), bit_depth=int(pre.bit_depth))

    def resolve_auto(self, images: Sequence[ImageInput], *, build_backbone: bool = False) -> None:
        """Decide the ``auto`` settings of ``preprocess`` (in place) from up to 32 evenly spaced images.

        The images are those the model learns normality from: the training images, or a zero-shot pool without
        references (unlabelled, so deciding from it is fair). ``resize: auto``: the model input takes their
        median aspect at the configured pixel count (:func:`anomaly.data.views.fitted_input_size`) and every
        image is stretched to it. ``standardize: auto``: on when their lighting drifts
        (:func:`anomaly.data.views.lighting_drift` above ``DRIFT_THRESHOLD``). ``bit_depth: auto``: the bits the
        largest value of their 16-bit images needs (:func:`anomaly.data.io.significant_bits`; 16 without any).
        The config holds the decisions (a saved model keeps them); every fit, and every reference-free pool,
        decides again. Unreadable images are left out of the sample (the stage that reads them reports them).
        ``build_backbone``: build the backbone while the sample decodes (again if the input size changes).
        """
        self._resolve_auto(images, build_backbone)

    def _resolve_auto(self, images: Sequence[ImageInput], build_backbone: bool = False) -> dict[int, NDArray[Any]]:
        """:meth:`resolve_auto`; returns the pixels of the sample's decoded files by position (``_SAMPLE_KEEP_BYTES``
        of them at most), for the extraction that follows to take instead of decoding them again
        (:func:`anomaly.data.loader.iter_batches`)."""
        resize, budget = self._input_setting
        if "auto" not in (resize, self._standardize_setting, self._bit_depth_setting) or not images:
            if build_backbone:
                _ = self.extractor
            return {}
        if resize == "auto":  # decided again from the configured input
            self.config = replace(self.config, backbone=replace(self.config.backbone, image_size=budget))
        lighting, depth = self._standardize_setting == "auto", self._bit_depth_setting == "auto"
        positions = _sample_positions(len(images))
        keep = _Keep(_SAMPLE_KEEP_BYTES)
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # decoders release the GIL
            measuring = pool.map(lambda i: _measure(images[i], lighting, depth, keep), positions)
            if build_backbone:
                _ = self.extractor
            measured = list(measuring)
        sample = [m for m in measured if m is not None]
        decoded = {int(i): m.pixels for i, m in zip(positions, measured) if m is not None and m.pixels is not None}
        if resize == "auto":
            self._decide_input_size([m.size for m in sample])
        bits = self.config.preprocess.bit_depth
        if depth:
            found = [m.bits for m in sample if m.bits is not None]
            bits = max(found, default=16)
            if found:  # 8-bit images are read as they are whatever the setting: no line for them
                log.info("preprocess.bit_depth: auto -> %d (the largest value of the 16-bit images)", bits)
            self.config = replace(self.config, preprocess=replace(self.config.preprocess, bit_depth=bits))
        if lighting:  # no readable image in the sample: off (the extraction then names the unreadable files)
            levels = [m.level_at(int(bits)) for m in sample if m.level is not None]
            drift = lighting_drift(levels) if levels else 0.0
            on = drift > DRIFT_THRESHOLD
            log.info("preprocess.standardize: auto -> %s (lighting drift %.3f, limit %.2f)", on, drift, DRIFT_THRESHOLD)
            self.config = replace(self.config, preprocess=replace(self.config.preprocess, standardize=on))
        return decoded

    def _decide_input_size(self, sizes: list[tuple[int, int]]) -> None:
        size = self.config.backbone.image_size or self.extractor.image_size  # None: the model's pretrained input
        if self.config.preprocess.tile is None:  # tiles keep the configured input shape
            size = fitted_input_size(sizes, size)
        # the extractor's size is a ViT's whole patches: compare it with the size it would round this one to
        if self._extractor is not None and whole_patches(self._extractor.model, size) != self._extractor.image_size:
            self._extractor = None  # rebuilt at the new input size
        if self.config.preprocess.tile is None:
            log.info("preprocess.resize: auto -> stretch to %s (H, W)", list(size))
        else:  # the views are tiles of this input size; resize applies to untiled models only
            log.info("preprocess.resize: auto -> unused: preprocess.tile cuts %s (H, W) views", list(size))
        self.config = replace(
            self.config,
            backbone=replace(self.config.backbone, image_size=size),
            preprocess=replace(self.config.preprocess, resize="stretch"),
        )

    @property
    def zero_shot(self) -> bool:
        """True for scorers that need no training (MuSc): each predict() call is one pool."""
        return not self.scorer.requires_fit

    @property
    def threshold_(self) -> float | None:
        """The image threshold of a fitted trained detector (zero-shot pools choose theirs per call)."""
        return None if self.decision_ is None else self.decision_.image

    @property
    def pixel_threshold_(self) -> float | None:
        """The pixel (map) threshold of a fitted trained detector (None without maps)."""
        return None if self.decision_ is None or not self.scorer.has_maps else self.decision_.pixel

    # ------------------------------------------------------------------ stages
    def extract(
        self,
        images: Sequence[ImageInput],
        *,
        keep_images: bool = False,
        progress: StageProgress | None = None,
    ) -> FeatureSet:
        """Decode, resize and run the backbone over ``images`` (features stay on the backbone's device)."""
        features, _ = self._extract_all(images, keep_images, False, progress)
        assert features is not None  # without skipping, an unreadable input has raised
        return features

    def extract_readable(self, images: Sequence[ImageInput]) -> tuple[FeatureSet | None, list[DecodedImage]]:
        """:meth:`extract` for the inputs that decode (None when none does), and every input's decode in input
        order, ``error`` set where it failed: ``on_error="skip"`` for callers that score the features themselves."""
        return self._extract_all(images, False, True, None)

    def _extract_all(
        self,
        images: Sequence[ImageInput],
        keep_images: bool,
        skip: bool,
        progress: StageProgress | None,
        pixels: dict[int, NDArray[Any]] | None = None,
    ) -> tuple[FeatureSet | None, list[DecodedImage]]:
        decoded: list[DecodedImage] = []
        batches = []
        for batch in self._progress_batches(images, keep_images, skip, "features", progress, pixels):
            decoded += batch.items
            if batch.ok:
                batches.append(self._extract_batch(batch.images, batch.ok))
        if not batches:
            return None, decoded
        features = FeatureSet(
            [torch.cat(per_layer) for per_layer in zip(*(b.layers for b in batches))],
            torch.cat([b.embedding for b in batches]),
            [d for b in batches for d in b.images],
        )
        return features, decoded

    def finish(
        self, out: ScoreOutput, images: Sequence[DecodedImage], decision: Threshold, *, maps: bool = True
    ) -> list[DetectionResult]:
        """Post-process scorer outputs into results: image score, verdict, pixel threshold and map."""
        return make_results(
            out.patch_maps,
            out.image_scores,
            [d.size for d in images],
            [d.source for d in images],
            decision,
            input_size=self.extractor.image_size,
            sigma=self.config.postprocess.blur_sigma,
            score_from_map=self.scorer.image_score_from_map,
            maps=maps,
            layouts=[d.layout for d in images],
        )

    # --------------------------------------------------------------------- fit
    def fit(self, images: Sequence[ImageInput] | ImageInput, progress: StageProgress | None = None) -> Detector:
        """Learn from normal images (files, folders, a category root, arrays); zero-shot: store references.

        Trained scorers are cross-fitted: the images are split into ``threshold.folds`` folds and
        every image is scored by a model that never saw its fold, so the threshold comes from honest
        out-of-sample scores of normal images (see :mod:`anomaly.thresholds`).
        """
        items = _expand_training(images)
        if not self.zero_shot and len(items) < self.min_training_images():
            for item in items:  # an unreadable file is named as such, not counted as too few images
                image_size(item)
            raise DataError(
                f"fit: the {self.scorer.name} scorer needs at least {self.min_training_images()} normal images "
                f"with threshold.folds={self.config.threshold.folds} (they are cross-fitted to choose the threshold, "
                f"and each fold model needs {self.scorer.min_fold_images}), got {len(items)}"
            )
        start = time.perf_counter()
        # The ``auto`` settings are decided before the images are read: a fit that fails on them (an unreadable
        # training image) restores the settings the fitted model scores with, so it keeps scoring as before.
        before = (self.config, self._extractor)
        try:
            pixels = self._resolve_auto(items, build_backbone=True)
            if self.zero_shot:
                return self._store_references(items, progress)
            features, _ = self._extract_all(items, False, False, progress, pixels)
            assert features is not None  # without skipping, an unreadable input has raised
        except BaseException:
            self.config, self._extractor = before
            raise
        extracted = time.perf_counter()
        # folds by image, so that overlapping tiles of one image never score each other
        views = [_n_views(d) for d in features.images]
        if max(views) > 1:
            log.info("fit: %d images give %d tiles (%d-%d per image)", len(views), sum(views), min(views), max(views))
        folds = np.repeat(self.folds(len(features)), views)
        steps = None if progress is None else (lambda done, total: progress("fit", done, total))
        out_of_sample = self.scorer.cross_fit(features.layers, folds, progress=steps).checked(
            len(folds), self.scorer.name
        )
        fitted = time.perf_counter()
        self.calibrate(out_of_sample, features.images)
        done = time.perf_counter()
        log.info(
            "fit took %.1f s on %s: decode + backbone %.1f s, %s + cross-fit %.1f s, maps + threshold %.1f s",
            done - start,
            self.extractor.device,
            extracted - start,
            self.scorer.name,
            fitted - extracted,
            done - fitted,
        )
        return self

    def calibrate(self, out_of_sample: ScoreOutput, images: Sequence[DecodedImage] | None = None) -> Detector:
        """Set the decision from cross-fitted scores of the normal training images; returns self.

        Outlying training images (``threshold.outlier_z``) are left out of the threshold, and the fitted scorer
        forgets what it kept of them (:meth:`Scorer.forget`: the memory bank's rows). ``images`` gives the view
        layouts of the rows of ``out_of_sample`` (None: one view per image) and the original sizes from which
        ``patch_footprint_``, ``training_aspects_``, ``training_smallest_`` and ``training_colour_`` are measured.
        """
        peaks = self.map_peaks(out_of_sample, images)
        self.training_aspects_ = None if images is None else aspect_range([d.size for d in images])
        self.training_smallest_ = None if images is None else smallest_side([d.size for d in images])
        self.training_colour_ = None if images is None else colour_of([d.chroma for d in images])
        if images is not None and (small := small_images([d.size for d in images], [d.source for d in images])):
            log.warning(
                "fit: %d of %d training image(s) are under a third of the others' size and are upscaled to the "
                "model input (thumbnails, or crops of another scale?), first: %s",
                len(small),
                len(images),
                ", ".join(small[:3]),
            )
        if images is not None and not self._fixed_scale() and (median := median_side([d.size for d in images])):
            upscale = max(self.extractor.image_size) / median
            if upscale > _UPSCALE_WARNING:
                log.warning(
                    "fit: the training images (median %d px on the longer side) are upscaled %.0fx to the %dx%d "
                    "model input: their detail is blur; a smaller backbone.image_size suits them",
                    median, upscale, *self.extractor.image_size,
                )  # fmt: skip
        tile = self.config.preprocess.tile
        if images is not None and tile is not None and tile.size is not None:
            shrunk = _shrunk_in_tiles(images, self.extractor.image_size)
            if shrunk is not None:
                (h, w), (fh, fw) = shrunk
                log.warning(
                    "fit: preprocess.tile.size %d is larger than the training images (median %dx%d px, H x W): each "
                    "is seen at about %dx%d px of the %dx%d model input, the rest mirrored padding; tiles of at most "
                    "their shorter side (%d), `preprocess.tile={size: null}` or no tiles (null) see them larger",
                    tile.size, h, w, fh, fw, *self.extractor.image_size, min(h, w),
                )  # fmt: skip
        has_maps = out_of_sample.patch_maps is not None
        if out_of_sample.patch_maps is not None and images is not None:
            grid = out_of_sample.patch_maps.shape[1:]
            self.patch_footprint_ = _patch_footprint(images, self.extractor.image_size, grid)
        from_map = self.scorer.image_score_from_map and has_maps
        layouts = None if images is None else [d.layout for d in images]
        scores = peaks if from_map else view_max(out_of_sample.image_scores, layouts)
        separate_pixels = has_maps and not from_map
        z = self.config.threshold.outlier_z
        left_out = np.zeros(len(scores), dtype=bool) if z is None else outlying_scores(scores, z)
        kept = ~left_out
        self.normal_scores_ = scores[kept]
        self.normal_peaks_ = peaks[kept] if separate_pixels else None
        decision = calibrate(self.normal_scores_, self.config.threshold.target_fpr, self.normal_peaks_)
        self.decision_ = replace(decision, n_excluded=int(left_out.sum()))
        self.excluded_training_ = [_name(images, int(i)) for i in np.flatnonzero(left_out)]
        views = np.ones(len(scores), dtype=np.int64) if images is None else [_n_views(d) for d in images]
        dropped = self.scorer.forget(np.flatnonzero(np.repeat(left_out, views)))  # always: it ends the fit
        if self.excluded_training_:
            names = ", ".join(self.excluded_training_[:5]) + (" ..." if len(self.excluded_training_) > 5 else "")
            log.warning(
                "fit: %d training image(s) score far above the others (defects or mislabelled images?) and are left "
                "out of the threshold%s; check them: %s",
                len(self.excluded_training_),
                f" and of the model ({dropped} {self.scorer.name} rows replaced by other images')" if dropped else "",
                names,
            )
        self._say_threshold_setters(scores, kept, images, peaks if separate_pixels else None)
        log.info("%s", self.decision_.summary())
        return self

    def set_target_fpr(self, target_fpr: float) -> Detector:
        """Choose the threshold again for another share of normal images flagged, from the out-of-sample scores of
        the fit (the same rule as the fit, the same training images left out): no refit. Returns self.

        Raises:
            ConfigError: ``target_fpr`` outside (0, 0.5], or a zero-shot detector (its threshold is chosen per pool).
            NotFittedError: not fitted. DataError: a model saved before models kept their normal scores (fit it again).
        """
        threshold = replace(self.config.threshold, target_fpr=target_fpr)  # validates it
        if self.zero_shot:
            raise ConfigError(
                "set_target_fpr: a zero-shot detector chooses its threshold per pool; set threshold.target_fpr"
            )
        if self.decision_ is None:
            raise NotFittedError("Detector is not fitted: call fit() or Detector.load() first")
        if self.normal_scores_ is None:
            raise DataError("this model was saved without the normal scores its threshold came from: fit it again")
        # the validated float: a numpy float32 in the decision made the model unsavable (JSON)
        decision = calibrate(self.normal_scores_, threshold.target_fpr, self.normal_peaks_)
        self.decision_ = replace(decision, n_excluded=self.decision_.n_excluded)
        self.config = replace(self.config, threshold=threshold)
        return self

    def _say_threshold_setters(
        self,
        scores: NDArray[np.float64],
        kept: NDArray[np.bool_],
        images: Sequence[DecodedImage] | None,
        peaks: NDArray[np.float64] | None,
    ) -> None:
        """Warn when a few kept training images far above the others (under ``outlier_z``, or among too few
        images for that rule) set the threshold: two defective bottles among 30 good ones lifted it from 23.9 to
        47.0 without a word, and 3 of 51 defects were flagged."""
        robust = robust_z(scores[kept])
        if self.decision_ is None or robust is None:
            return
        high = robust > _SETTER_Z
        if not high.any() or high.sum() > max(2, 0.1 * len(high)):
            return
        rest = np.flatnonzero(kept)[~high]
        if len(rest) < _SETTER_MIN_REST:  # too few left to say what the others give
            return
        without = calibrate(scores[rest], self.config.threshold.target_fpr, None if peaks is None else peaks[rest])
        if self.decision_.image < _SETTER_RATIO * without.image:
            return
        names = [_name(images, i) for i in np.flatnonzero(kept)[high]]
        log.warning(
            "fit: %d training image(s) score far above the others (%.0f-%.0f robust SDs; left in) and set the "
            "threshold at %.4g, %.1fx what the rest give (%.4g): defects in the good folder? Check them: %s",
            len(names), robust[high].min(), robust[high].max(), self.decision_.image,
            self.decision_.image / without.image, without.image, ", ".join(names),
        )  # fmt: skip

    def min_training_images(self) -> int:
        """The fewest training images whose cross-fit gives every fold model the scorer's ``min_fold_images`` (the
        fold models of ``n`` images in ``k`` folds are fitted on ``n - ceil(n / k)``); at least 3."""
        n = 3
        while n - math.ceil(n / min(self.config.threshold.folds, n)) < self.scorer.min_fold_images:
            n += 1
        return n

    def folds(self, n: int) -> NDArray[np.int64]:
        """The seeded fold of each of ``n`` training images (``threshold.folds`` folds)."""
        k = min(self.config.threshold.folds, n)
        order = np.random.default_rng(self.config.seed).permutation(n)
        folds = np.empty(n, dtype=np.int64)
        folds[order] = np.arange(n) % k
        return folds

    # ----------------------------------------------------------------- predict
    # A binary file object is also an Iterator[bytes], so it matches both overloads: it is one image, as the first
    # (checked first) says and predict does.
    @overload
    def predict(  # type: ignore[overload-overlap]
        self, images: ImageInput, *, maps: bool = ..., on_error: OnError = ...
    ) -> DetectionResult: ...

    @overload
    def predict(
        self,
        images: list[ImageInput] | tuple[ImageInput, ...] | Iterator[ImageInput],
        *,
        maps: bool = ...,
        on_error: OnError = ...,
    ) -> list[DetectionResult]: ...

    def predict(
        self,
        images: ImageInput | Sequence[ImageInput] | Iterator[ImageInput],
        *,
        maps: bool = True,
        on_error: OnError = "raise",
    ) -> Any:
        """Score one image (returns a DetectionResult) or a list of them (returns a list; a generator or a 4-D
        stack of images too).

        Type checkers cannot tell a 4-D stack from one image: they type any array or tensor's result as a
        DetectionResult. Pass ``list(stack)``, or ``cast`` the result to ``list[DetectionResult]``.

        ``on_error="skip"`` gives an unreadable input a result with ``error`` set (NaN score)
        instead of raising, so one bad file does not lose the others.
        """
        check_on_error(on_error)  # an empty batch too, as StreamingDetector.predict
        items, single = one_or_many(images)
        if not items:  # an empty batch has no results
            return []
        results = [result for result, _ in self.predict_stream(items, maps=maps, on_error=on_error)]
        return results[0] if single else results

    def predict_stream(
        self,
        images: Sequence[ImageInput],
        *,
        maps: bool = True,
        keep_images: bool = False,
        progress: StageProgress | None = None,
        on_error: OnError = "raise",
    ) -> Iterator[tuple[DetectionResult, NDArray[np.uint8] | None]]:
        """Yield (result, decoded RGB image or None) per input, in input order, exactly once each.

        Trained scorers stream with bounded memory; a zero-shot scorer scores all inputs as one pool. One image given
        alone (a path, a 3-D array, a CHW tensor) is one input, as in :meth:`predict`, not iterated.
        """
        items = many(images)
        if not items:
            raise DataError("predict: no images")
        check_on_error(on_error)
        if self.zero_shot:
            yield from self._predict_pool(items, maps, keep_images, progress, on_error == "skip")
            return
        if self.decision_ is None:
            raise NotFittedError("Detector is not fitted: call fit() or Detector.load() first")
        check = self.input_check()
        for batch in self._progress_batches(items, keep_images, on_error == "skip", "score", progress):
            ok = batch.ok
            scored: list[DetectionResult] = []
            if ok:
                scored = self.finish(self._score_views(batch.images), ok, self.decision_, maps=maps)
                check.add_decoded(ok)
            yield from in_input_order(batch.items, scored, self.decision_, has_maps=self.scorer.has_maps)
        check.warn(len(items))

    def _predict_pool(
        self, items: list[ImageInput], maps: bool, keep_images: bool, progress: StageProgress | None, skip: bool
    ) -> Iterator[tuple[DetectionResult, NDArray[np.uint8] | None]]:
        # A pool without references decides the ``auto`` settings on this detector (references keep the fit's):
        # such pools take turns, so a call from another thread never scores with the input size of this one.
        with self._pool_lock if self.reference_ is None else contextlib.nullcontext():
            decoded, results, decision = self._score_pool_items(items, maps, keep_images, progress, skip)
        yield from in_input_order(decoded, results, decision, has_maps=self.scorer.has_maps)

    def _score_pool_items(
        self, items: list[ImageInput], maps: bool, keep_images: bool, progress: StageProgress | None, skip: bool
    ) -> tuple[list[DecodedImage], list[DetectionResult], Threshold]:
        """The pool's decoded inputs, the results of the readable ones and the pool's decision."""
        pixels = self._resolve_auto(items) if self.reference_ is None else None
        mirror = self.scorer.augment_queries
        decoded, batches, mirrored = [], [], []
        for batch in self._progress_batches(items, keep_images, skip, "features", progress, pixels):
            decoded += batch.items
            if batch.ok:
                batches.append(self._extract_batch(batch.images, batch.ok))
                if mirror:
                    mirrored.append(self._extract_batch(np.ascontiguousarray(batch.images[:, :, ::-1]), batch.ok))
        ok = [d for d in decoded if d.error is None]
        check = self.input_check([d.size for d in ok])
        check.add_decoded(ok)
        check.warn(len(items))
        reference, reference_views, reference_tiles = self._references_for(batches)
        n_ref = 0 if reference is None else len(reference)
        _warn_copies(ok, n_ref)
        if len(ok) + n_ref < 2:
            bad = [d for d in decoded if d.error is not None]
            skipped = f"; {len(bad)} unreadable skipped, first: {bad[0].error}" if bad else ""
            raise DataError(f"zero-shot scoring needs at least 2 images in the pool (inputs + references){skipped}")
        references = [reference] if reference is not None else []
        scoring = None if progress is None else (lambda done, total: progress("mutual scoring", done, total))
        out = self._score_pool(references + batches, scoring, n_ref, reference_tiles)
        if mirror:  # the mirrored pool (references mirrored on their feature grid), maps mirrored back
            flipped = [FeatureSet([x.flip(-1) for x in r.layers], r.embedding, r.images) for r in references]
            again = self._score_pool(flipped + mirrored, scoring, n_ref, reference_tiles)
            averaged = None
            if out.patch_maps is not None and again.patch_maps is not None:
                averaged = np.ascontiguousarray((out.patch_maps + again.patch_maps[..., ::-1]) / 2)
            # numpy's stubs type float32 / 2 as float64
            out = ScoreOutput(averaged, (out.image_scores + again.image_scores) / 2)  # type: ignore[arg-type]
        members = (reference.images if reference is not None else []) + ok
        peaks = self.map_peaks(out, members)
        from_map = self.scorer.image_score_from_map and out.patch_maps is not None
        scores = peaks if from_map else view_max(out.image_scores, [d.layout for d in members])
        # A reference counts once, as given (its first support view): six near-copies of each outweighed the pool
        # in the mixture and lifted the threshold over defects the scores separated; its highest view (a rotated,
        # flipped or, for a non-square part, squashed copy that looks like no pool image) set the floor over them
        # (benchmarks/README.md section 13).
        names, owner = np.unique([str(d.source) for d in members[:n_ref]], return_inverse=True)
        given = np.ones(n_ref, bool) if reference_views is None else reference_views == 0
        scores, peaks = (
            np.r_[_max_by(x[:n_ref][given], owner[given], len(names)), x[n_ref:]] for x in (scores, peaks)
        )  # a reference's score: the highest of its tiles as given
        floor = self._floor_references(scores[: len(names)], list(names))
        order = np.r_[np.flatnonzero(floor), np.flatnonzero(~floor), np.arange(len(names), len(scores))]
        decision = pool_threshold(
            scores[order],
            self.config.threshold.target_fpr,
            peaks=peaks[order] if out.patch_maps is not None and not from_map else None,
            n_reference=int(floor.sum()),
        )
        _say_pool_decision(decision, len(scores) - int(floor.sum()), int(floor.sum()))  # suspect ones: pool images
        pool = out.take(slice(n_ref, None))
        rows = np.cumsum([0] + [_n_views(d) for d in ok])
        results = []
        for start in range(0, len(ok), self.config.batch_size):  # maps are made a batch at a time
            chunk = slice(start, start + self.config.batch_size)
            views = slice(int(rows[start]), int(rows[min(start + self.config.batch_size, len(ok))]))
            results += self.finish(pool.take(views), ok[chunk], decision, maps=maps)
        return decoded, results, decision

    # --------------------------------------------------------------- internals
    def _references_for(
        self, pool: list[FeatureSet]
    ) -> tuple[FeatureSet | None, NDArray[np.int64] | None, NDArray[np.int64] | None]:
        """The references (their view indices and tiles) a pool is scored with: all but those also among its images.

        A reference scored as an input would meet its own copy: the two scored alike, so the copy of the highest
        reference reached the threshold's floor (never below a reference's score) and a good image was flagged.
        As ``anomaly score --reference`` does, such a reference is scored as an input and compares with no copy.
        """
        ref, views, ref_tiles = self.reference_, self.reference_views_, self.reference_tiles_
        if ref is None or not pool:
            return ref, views, ref_tiles
        owners = np.array([str(d.source) for d in ref.images])
        as_given = np.ones(len(ref), bool) if views is None else views == 0
        names = list(dict.fromkeys(owners))
        # each reference as given, all its tiles in one vector: a tile alone (a plain background) may equal another
        # image's tile, a whole image only its own copy
        flat = ref.layers[0].flatten(1).float()
        given = [flat[torch.from_numpy(np.flatnonzero(as_given & (owners == name))).to(flat.device)] for name in names]
        match = np.zeros(len(names), bool)
        for part in pool:
            found = part.layers[0].flatten(1).to(flat.device, torch.float32)
            starts = np.cumsum([0] + [_n_views(d) for d in part.images])
            for tiles in {len(g) for g in given}:
                mine = [i for i, g in enumerate(given) if len(g) == tiles]
                theirs = [found[s:e].flatten() for s, e in zip(starts[:-1], starts[1:]) if e - s == tiles]
                if not theirs:
                    continue
                refs = torch.stack([given[i].flatten() for i in mine])
                # the same image extracted in another batch: equal but for float noise (other images differ far more)
                dist = torch.cdist(refs, torch.stack(theirs), compute_mode="donot_use_mm_for_euclid_dist")
                match[mine] |= (dist <= 1e-3 * refs.norm(dim=1, keepdim=True)).any(dim=1).cpu().numpy()
        copied = np.isin(owners, np.array(names)[match])
        if not copied.any():
            return ref, views, ref_tiles
        names = list(dict.fromkeys(owners[copied]))
        log.warning("%d reference(s) are also inputs: scored, not used as references, first: %s", len(names), names[0])
        keep = np.flatnonzero(~copied)
        if not len(keep):
            return None, None, None
        picked = torch.from_numpy(keep)
        layers = [x[picked.to(x.device)] for x in ref.layers]
        kept = FeatureSet(layers, ref.embedding[picked.to(ref.embedding.device)], [ref.images[i] for i in keep])
        return kept, None if views is None else views[keep], None if ref_tiles is None else ref_tiles[keep]

    def _store_references(self, items: list[ImageInput], progress: StageProgress | None) -> Detector:
        """Zero-shot fit: every view (support view, tile) of every reference joins later pools as an image of its
        own; its ``source`` names the reference it came from."""
        names = [os.fspath(x) if isinstance(x, (str, os.PathLike)) else f"reference {i}" for i, x in enumerate(items)]
        view_index = [0] * len(items)
        if self.scorer.augment_references:
            support = [support_views(item, self.view_spec.bit_depth) for item in items]
            names = [name for name, views in zip(names, support) for _ in views]
            view_index = [i for views in support for i in range(len(views))]
            items = [view for views in support for view in views]
        features = self.extract(items, progress=progress)
        self.training_aspects_ = aspect_range([d.size for d in features.images])
        self.training_smallest_ = smallest_side([d.size for d in features.images])
        self.training_colour_ = colour_of([d.chroma for d in features.images])
        rows = [_n_views(d) for d in features.images]  # tiles: several rows per image
        owners = np.repeat(names, rows)
        self.reference_tiles_ = None
        if self.config.preprocess.tile is not None:  # which rows are overlapping tiles of one image (_score_pool)
            origins = [np.reshape(d.layout.origins if d.layout else [(0, 0)], (-1, 2)) for d in features.images]
            image = np.repeat(np.arange(len(rows)), rows)
            self.reference_tiles_ = np.c_[image, np.concatenate(origins)].astype(np.int64)
        self.reference_views_ = np.repeat(view_index, rows).astype(np.int64)
        views = [DecodedImage(None, (0, 0), str(name)) for name in owners]
        self.reference_ = FeatureSet(features.layers, features.embedding, views)
        self._warned_references = set()
        return self

    def _floor_references(self, scores: NDArray[np.float64], owners: list[str]) -> NDArray[np.bool_]:
        """Which references (``scores``, one per reference named in ``owners``) set the pool threshold's floor: all
        but suspect ones (:func:`~anomaly.thresholds.suspect_references`), which then count as pool images; warned
        once each."""
        if not len(scores):
            return np.ones(0, dtype=bool)
        suspect = suspect_references(scores, owners)
        named = sorted({owners[i] for i in np.flatnonzero(suspect)} - self._warned_references)
        if named:
            self._warned_references.update(named)
            log.warning(
                "few-shot: reference(s) %s score like a defect among the other references (over %gx their median)"
                " and do not set the threshold's floor; check them",
                ", ".join(named),
                REFERENCE_RATIO,
            )
        return ~suspect

    def _score_pool(
        self,
        parts: list[FeatureSet],
        progress: Callable[[int, int], None] | None,
        n_ref: int,
        reference_tiles: NDArray[np.int64] | None = None,
    ) -> ScoreOutput:
        """One zero-shot ``score`` call over the concatenated features of ``parts`` (the ``n_ref`` reference views
        first: MuSc keeps them in every group of a pool it splits; ``reference_tiles``: their tiles, see
        ``reference_tiles_``)."""
        device = self.extractor.device
        layers = [torch.cat([x.to(device) for x in per_layer]) for per_layer in zip(*(p.layers for p in parts))]
        embedding = None
        # Unit-length descriptors: RsCIN's similarity is then a cosine. Not for tiles: a tile's nearest descriptors are
        # its own frame's other tiles, whose scores would dilute a defect's tile before the frame takes its peak.
        if self.scorer.uses_embeddings and self.config.preprocess.tile is None:
            embedding = torch.nn.functional.normalize(torch.cat([p.embedding.to(device) for p in parts]), dim=1)
        if isinstance(self.scorer, MuScScorer):
            exclude = self._pool_exclusions([d for p in parts for d in p.images], n_ref, reference_tiles)
            out = self.scorer.score(layers, embeddings=embedding, progress=progress, shared=n_ref, exclude=exclude)
        else:
            out = self.scorer.score(layers, embeddings=embedding, progress=progress)
        return out.checked(len(layers[0]), self.scorer.name)

    def _pool_exclusions(
        self, members: list[DecodedImage], n_ref: int, reference_tiles: NDArray[np.int64] | None
    ) -> list[NDArray[np.int64]] | None:
        """Per row of a zero-shot pool (``members``' views, the ``n_ref`` reference rows first), the rows it is not
        compared with: a frame's overlapping tiles, which share its pixels, and the views of the pool's copies of it
        (a file copied under another name), which would vouch for its defects; None when no row has any. Copies are
        compared after all when the pool holds nothing else (every input the same image, no references)."""
        layouts = [d.layout for d in members]
        prints: list[str | None] = [None if d.views is None else fingerprint(d.views) for d in members]
        if reference_tiles is not None and len(reference_tiles) == n_ref:  # a reference's rows: one each
            layouts = _reference_layouts(reference_tiles) + layouts[n_ref:]
            no_pixels: list[str | None] = [None] * (len(layouts) - len(members) + n_ref)  # references keep none
            prints = no_pixels + prints[n_ref:]
        exclude = overlapping_views(layouts, self.extractor.image_size)  # only a tiled frame's views overlap
        with_copies = [np.union1d(a, b) for a, b in zip(exclude, copied_views(prints, layouts))]
        # copies of one image and nothing else (references have no print): a tile of a copy still had its own frame's
        # far tiles, so counting rows alone compared those instead of the copies, as ``_warn_copies`` says
        if len(set(prints)) > 1 and all(len(rows) < len(with_copies) - 1 for rows in with_copies):
            exclude = with_copies
        return exclude if any(len(rows) for rows in exclude) else None

    def _progress_batches(
        self,
        items: Sequence[ImageInput],
        keep: bool,
        skip: bool,
        stage: str,
        progress: StageProgress | None,
        pixels: dict[int, NDArray[Any]] | None = None,
    ) -> Iterator[Any]:
        done = 0
        for batch in iter_batches(
            list(items),
            self.extractor.image_size,
            self.config.batch_size,
            keep_images=keep,
            skip_errors=skip,
            spec=self.view_spec,
            pixels=pixels,
        ):
            yield batch
            done += len(batch.items)
            if progress is not None:
                progress(stage, done, len(items))

    def _score_views(self, images: NDArray[np.uint8]) -> ScoreOutput:
        """A batch's views through the backbone and the trained scorer ``batch_size`` at a time: the hundreds of
        tiles of a large frame never hold their features at once (6000 x 4000 px in 256 px tiles: 651 views, their
        features about 1.9 GB)."""
        size = self.config.batch_size
        parts = []
        for start in range(0, len(images), size):
            layers = self.scorer.kept_features(self.extractor(images[start : start + size]).layers)
            parts.append(self.scorer.score(layers).checked(len(layers[0]), self.scorer.name))
        return ScoreOutput.concat(parts)

    def _extract_batch(self, images: NDArray[np.uint8], decoded: list[DecodedImage]) -> FeatureSet:
        size = self.config.batch_size  # tiles multiply the views of a batch: run them batch_size at a time
        parts = [self.extractor(images[i : i + size]) for i in range(0, len(images), size)]
        kept = [self.scorer.kept_features(p.layers) for p in parts]
        if len(parts) == 1:
            return FeatureSet(kept[0], parts[0].embedding, decoded)
        layers = [torch.cat(per_layer) for per_layer in zip(*kept)]
        return FeatureSet(layers, torch.cat([p.embedding for p in parts]), decoded)

    def map_peaks(self, out: ScoreOutput, images: Sequence[DecodedImage] | None = None) -> NDArray[np.float64]:
        """Peak of every image's post-processed map (the image scores of a scorer without maps).

        ``images`` gives the view layouts of the rows of ``out`` (None: one stretched view per row).
        """
        layouts = None if images is None else [d.layout for d in images]
        if out.patch_maps is None:
            return view_max(out.image_scores, layouts)
        return map_peaks(out.patch_maps, self.extractor.image_size, self.config.postprocess.blur_sigma, layouts)

    def input_profile(self) -> InputProfile:
        """What the training images (or references) were, against which scored inputs are checked: their aspect
        where inputs are stretched to the model input (not under ``keep_aspect`` or tiles), their smallest size
        where inputs are rescaled to it (not under tiles of a fixed size) and the bit depth
        (:mod:`anomaly.data.input_checks`). Nothing is checked before a fit."""
        pre = self.config.preprocess
        seen = "reference" if self.zero_shot else "training image"
        return InputProfile(
            aspects=self.training_aspects_ if self._stretched() else None,
            aspects_of=f"the {seen}s'",
            smallest=None if self._fixed_scale() else self.training_smallest_,
            smallest_of=f"the smallest {seen}'s",
            bit_depth=None if pre.bit_depth == "auto" else int(pre.bit_depth),  # auto: no fit or pool decided it
            colour=self.training_colour_,
            images=seen,
        )

    def _stretched(self) -> bool:
        """Whether images are stretched to the model input (their aspect lost)."""
        return self.config.preprocess.resize == "stretch" and self.config.preprocess.tile is None

    def _fixed_scale(self) -> bool:
        """Whether images keep their scale (tiles of N px): none is upscaled more than the others."""
        return self.config.preprocess.tile is not None and self.config.preprocess.tile.size is not None

    def input_check(self, pool: list[tuple[int, int]] | None = None) -> InputCheck:
        """An empty :class:`InputCheck` against :meth:`input_profile`, for one call's inputs.

        ``pool``: the sizes (H, W) of the zero-shot pool the inputs are judged with. From 8 images on, the aspects of
        its middle half count as normal too, beside any references' (a product cut at many sizes); a smaller pool
        cannot tell a rotated image from the product's spread, so it only stands in for missing references, by its
        median aspect. Without references, a pool of 3 or more images also gives the size a tiny image is named
        against: its median longer side.
        """
        profile = self.input_profile()
        if pool and profile.smallest is None and not self._fixed_scale() and (median := median_side(pool)) is not None:
            profile = replace(profile, smallest=round(median), smallest_of="the pool's median image's")
        if not pool or not self._stretched():
            return InputCheck(profile)
        if len(pool) >= POOL_ASPECTS_MIN:
            low, high = middle_aspects(pool)
            if profile.aspects is None:
                profile = replace(profile, aspects=(low, high), aspects_of="the middle half of the pool's")
            else:
                spanned = (min(profile.aspects[0], low), max(profile.aspects[1], high))
                whose = f"{profile.aspects_of} and the middle half of the pool's"
                profile = replace(profile, aspects=spanned, aspects_of=whose)
        elif profile.aspects is None:
            median = float(np.median([w / h for h, w in pool]))
            profile = replace(profile, aspects=(median, median), aspects_of="the pool's median")
        return InputCheck(profile)

    # ------------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the model to ``directory`` atomically: config.json, meta.json and the scorer's files."""
        if self.decision_ is None and not self.zero_shot:
            raise NotFittedError("Detector is not fitted: nothing to save")

        def write(tmp: Path) -> dict[str, Any]:
            if not self.zero_shot:
                self.scorer.save(tmp)
            if self.reference_ is not None:
                state = {f"layer{i}": t.cpu().numpy() for i, t in enumerate(self.reference_.layers)}
                state["embedding"] = self.reference_.embedding.cpu().numpy()
                save_tensors(state, tmp / _REFERENCES_FILE)
            (tmp / "config.json").write_text(json.dumps(self._resolved_config(), indent=2))
            return self._meta()

        return write_model_dir(directory, write)

    @classmethod
    def load(cls, directory: str | os.PathLike[str], device: str | None = None, weights: str | None = None) -> Detector:
        """Load a model written by :meth:`save`; a missing, tampered or incompatible directory raises DataError.

        ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) overrides the device saved with the model, so a
        model fitted on a GPU scores on a machine without one. ``weights`` points to the backbone weights file
        the model was fitted with when it has moved; it must hold the same weights (their SHA-256 is checked).
        """
        path = Path(directory)
        restore_interrupted(path)
        if not path.is_dir():
            raise DataError(
                f"{path}: {'a file, not a model directory' if path.exists() else 'model directory not found'}"
            )
        meta = read_meta(path)
        files = verified_files(path, meta)
        try:
            config = from_dict(json.loads(files["config.json"].read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise DataError(f"{files['config.json']}: unreadable ({exc})") from None
        if device is not None:
            config = replace(config, device=device)
        if weights is not None:
            if not _saved_weights_sha(meta):
                raise DataError(f"{path}: no weights checksum was saved with this model to check {weights} against")
            config = replace(config, backbone=replace(config.backbone, weights=weights))
        det = cls(config)
        try:
            if _REFERENCES_FILE in files:
                det.reference_ = _load_references(files[_REFERENCES_FILE], meta.get("references"))
                det.reference_views_ = _reference_views(meta.get("reference_views"), len(det.reference_))
                det.reference_tiles_ = _reference_tiles(meta.get("reference_tiles"), len(det.reference_))
            if not det.zero_shot:
                det.scorer.load(files)
                det.decision_ = Threshold.from_dict(meta.get("threshold"), f"{path}/meta.json threshold")
                det.excluded_training_ = [str(name) for name in meta.get("excluded_training_images", [])]
                det.normal_scores_ = _normal_values(meta.get("normal_scores"))  # absent from earlier models
                det.normal_peaks_ = _normal_values(meta.get("normal_peaks"))
        except AnomalyError:
            raise
        except (KeyError, ValueError, TypeError, RuntimeError, OSError) as exc:
            raise DataError(f"{path}: model state is incomplete or corrupt ({exc})") from None
        aspects, smallest = meta.get("training_aspects"), meta.get("training_smallest")  # absent from earlier models
        if _number_pair(aspects):
            det.training_aspects_ = (float(aspects[0]), float(aspects[1]))
        if isinstance(smallest, int) and not isinstance(smallest, bool) and smallest > 0:
            det.training_smallest_ = smallest
        if meta.get("training_colour") in ("gray", "colour"):
            det.training_colour_ = meta["training_colour"]
        try:
            det._check_weights(meta)
            det._check_channels(path, meta.get("channels"))
        except WeightsUnavailableError as exc:
            hint = (
                ""
                if weights is not None
                else (
                    " (the path saved with the model; if the file moved, give its new path: `anomaly score` or "
                    "`export` `--set backbone.weights=PATH`, or Detector.load(..., weights=PATH))"
                )
            )
            raise WeightsUnavailableError(f"{path}: {exc}{hint}") from None
        return det

    def _check_channels(self, path: Path, saved: Any) -> None:
        """Refuse a model whose saved state was learnt from features of other widths than the configured
        ``backbone.layers`` give (config.json edited and re-signed): the scorer otherwise fails on the first image
        with an error of its internals (FAISS's bare AssertionError), or scores with the wrong channels. ``saved``:
        the widths per layer in meta.json; models saved without them are checked by what their scorer's state and
        references show (layers of the same total width pass there). A zero-shot model without references has
        nothing to compare."""
        if self.zero_shot and self.reference_ is None:
            return
        channels = self.extractor.channels
        if isinstance(saved, list) and all(isinstance(c, int) for c in saved):
            if saved == channels:
                return
            mismatch: str | None = f"the model was fitted on {_widths(saved)}"
        else:
            mismatch = self.scorer.channel_mismatch(channels)
        if mismatch is None and self.reference_ is not None:
            saved = [int(layer.shape[1]) for layer in self.reference_.layers]
            if saved != channels:
                mismatch = f"the saved references have {' + '.join(map(str, saved))}"
        if mismatch is not None:
            raise DataError(
                f"{path}: config.json backbone.layers give {_widths(channels)} channels but {mismatch}; refit the model"
            )

    def _resolved_config(self) -> dict[str, Any]:
        """The config with ``weights: auto`` pinned to the source actually used, so a load elsewhere
        resolves the same weights (or fails) instead of silently picking others, and the scorer's parameters as it
        was built with them (a params dict edited after construction changed nothing the model computed)."""
        config = self.config.to_dict()
        built = self.scorer.get_params()
        config["scorer"]["params"] = {k: built[k] for k in config["scorer"]["params"] if k in built}
        source = self.extractor.source
        if config["backbone"]["weights"] == "auto" and source.kind != "random":
            config["backbone"]["weights"] = {"hub-cache": "hub", "file": source.location}.get(source.kind, source.kind)
        return config

    def _meta(self) -> dict[str, Any]:
        import faiss
        import timm

        source = self.extractor.source
        return {
            "anomaly_version": __version__,
            "torch_version": torch.__version__,
            "timm_version": timm.__version__,
            "faiss_version": faiss.__version__,
            "weights": {"kind": source.kind, "location": source.location, "sha256": source.sha256},
            "threshold": None if self.decision_ is None else self.decision_.to_dict(),
            "excluded_training_images": self.excluded_training_,
            "normal_scores": None if self.normal_scores_ is None else self.normal_scores_.tolist(),
            "normal_peaks": None if self.normal_peaks_ is None else self.normal_peaks_.tolist(),
            "references": [] if self.reference_ is None else [str(d.source) for d in self.reference_.images],
            "reference_views": [] if self.reference_views_ is None else self.reference_views_.tolist(),
            "reference_tiles": [] if self.reference_tiles_ is None else self.reference_tiles_.tolist(),
            "training_aspects": self.training_aspects_,
            "training_smallest": self.training_smallest_,
            "training_colour": self.training_colour_,
            "channels": self.extractor.channels,
        }

    def _check_weights(self, meta: dict[str, Any]) -> None:
        saved = _saved_weights_sha(meta)
        if saved and self.config.backbone.pretrained:
            current = self.extractor.source.sha256
            if current and current != saved:
                raise DataError(
                    f"backbone weights {self.extractor.source.location} differ from those the model was fitted "
                    f"with (sha256 {current[:12]} != {saved[:12]}); refit or restore the original weights"
                )


def _normal_values(saved: Any) -> NDArray[np.float64] | None:
    """Saved normal scores as an array; None where absent. Anything else is a ValueError (load's DataError)."""
    if saved is None:
        return None
    values = np.asarray(saved, dtype=np.float64)
    if values.ndim != 1 or not len(values) or not np.isfinite(values).all():
        raise ValueError("normal_scores / normal_peaks must be non-empty lists of finite numbers")
    return values


def _saved_weights_sha(meta: dict[str, Any]) -> str | None:
    weights = meta.get("weights")
    sha = weights.get("sha256") if isinstance(weights, dict) else None
    return sha if isinstance(sha, str) and sha else None


def _expand_training(images: Sequence[ImageInput] | ImageInput) -> list[ImageInput]:
    """Folders, globs and category roots become image paths (narrowed to train/good); the rest stays. One image
    given alone (a path, an array, a PIL image) is one image: a 3-D array is not iterated as rows of gray images."""
    items = many(images)
    if not items:
        raise DataError("fit: no training images")
    out: list[ImageInput] = []
    for item in items:
        if isinstance(item, (str, os.PathLike)) and not Path(item).is_file():
            out += training_paths([item])
        else:
            out.append(item)
    return out


@dataclass(frozen=True)
class _Measure:
    """What ``auto`` settings read from one image: its (H, W), the bits of its 16-bit values (None: 8-bit
    image), and its bright level at its own depth (None: not measured); the pixels decoded to measure them, where
    they are kept (:class:`_Keep`)."""

    size: tuple[int, int]
    bits: int | None = None
    level: float | None = None
    pixels: NDArray[Any] | None = None

    def level_at(self, bit_depth: int) -> float:
        """The bright level of the image once scaled to 8 bits as ``bit_depth`` says (a percentile commutes with
        the monotonic scaling)."""
        assert self.level is not None
        return self.level if self.bits is None else min(255.0, self.level / 2 ** (bit_depth - 8))


class _Keep:
    """A byte budget for decoded pixels, shared by the threads that decode the sample."""

    def __init__(self, budget: int) -> None:
        self._left = budget
        self._lock = threading.Lock()

    def take(self, pixels: NDArray[Any]) -> bool:
        """Whether ``pixels`` fit in what is left of the budget (then counted against it)."""
        with self._lock:
            if pixels.nbytes > self._left:
                return False
            self._left -= pixels.nbytes
            return True


def _measure(item: ImageInput, lighting: bool, depth: bool, keep: _Keep | None = None) -> _Measure | None:
    """Measure an input for ``resize``, ``standardize`` (``lighting``) and ``bit_depth`` (``depth``): files are
    decoded only when the lighting is measured or their header says 16 bits. The pixels of a decoded file (or
    encoded bytes) are kept with the measures while ``keep`` has room for them.

    None when the input cannot be read: the sample that decides ``auto`` skips it.
    """
    try:
        pixels = raw_pixels(item, header_first=not lighting) if lighting or depth else None
        if pixels is None:
            return _Measure(image_size(item))
        level = bright_level(pixels) if lighting else None
        encoded = isinstance(item, (str, os.PathLike, bytes, bytearray, memoryview)) or is_encoded_array(item)
        kept = pixels if encoded and keep is not None and keep.take(pixels) else None
        return _Measure((pixels.shape[0], pixels.shape[1]), significant_bits(pixels), level, kept)
    except DataError:
        return None


_POOL_RULES = {
    "pool-mixture": "the normal cluster of a mixture fitted to the pool's scores",
    "pool-small": "median + 3 MAD of the pool's scores",
    "pool-small-split": "the gap between the pool's two score groups",
    "pool-references": "median + 3 MAD of the references' scores",
    "pool-small-references": "median + 3 MAD of the references' scores",
    "pool-small-copies": "most scores are equal (copies of one image): every higher score stands out",
    "pool-top": "no group of scores stands apart: the highest score is flagged",
    "pool-degenerate": "no score stands out",
}


def _say_pool_decision(decision: Threshold, n_images: int, n_references: int) -> None:
    """Log how a zero-shot pool's threshold was chosen; warn when the pool is too small for it to be trusted."""
    log.info(
        "zero-shot pool of %d image(s) and %d reference(s): threshold %.6g, %s%s",
        n_images,
        n_references,
        decision.image,
        _POOL_RULES.get(decision.rule, decision.rule),
        ", never below a reference's score" if n_references else "",
    )
    if (
        decision.rule not in ("pool-references", "pool-small-references")
        and n_images + n_references < RELIABLE_POOL_SIZE
    ):
        log.warning(
            "a zero-shot pool of %d image(s)%s: with fewer than %d images in all, its threshold (is_anomalous) is "
            "unreliable; rank by score%s",
            n_images,
            f" and {n_references} reference(s)" if n_references else "",
            RELIABLE_POOL_SIZE,
            ", or give 4 or more good images as references (their scores then set it)"
            if n_references < MIN_REFERENCE_RULE
            else "",
        )


def _widths(channels: list[int]) -> str:
    """Channel widths as ``152 (40 + 112)``, or ``40`` for one layer."""
    return f"{sum(channels)}" + (f" ({' + '.join(map(str, channels))})" if len(channels) > 1 else "")


def _max_by(values: NDArray[np.float64], group: NDArray[np.int64], n: int) -> NDArray[np.float64]:
    """The largest of ``values`` in each of ``n`` groups (``group[i]``: the group of ``values[i]``)."""
    result = np.full(n, -np.inf)
    np.maximum.at(result, group, values)
    return result


def _patch_footprint(
    images: Sequence[DecodedImage], input_size: tuple[int, int], grid: tuple[int, int]
) -> tuple[int, int] | None:
    """Median (H, W) in original pixels that one patch of the ``grid`` covers: defects much smaller than it
    fade into their patch (a larger input or tiles resolve more)."""
    spans = [
        [input_size[i] / grid[i] * d.size[i] / (d.layout.frame[i] if d.layout else input_size[i]) for i in (0, 1)]
        for d in images
        if d.error is None
    ]
    if not spans:
        return None
    h, w = np.median(np.asarray(spans), axis=0)
    return max(1, round(h)), max(1, round(w))  # upscaled images: a patch still spans at least a pixel of them


def _shrunk_in_tiles(
    images: Sequence[DecodedImage], input_size: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """The median original (H, W) of ``images`` and their median frame (H, W) when tiles of a fixed size larger than
    them leave the median image on less than half of its one model-input view (the rest is mirrored padding: a tile
    size above the images' own scales them down instead of cutting them), else None."""
    sized = [(d.size, d.layout.frame) for d in images if d.error is None and d.layout is not None]
    if not sized:
        return None
    share = np.median([min(1.0, fh / input_size[0]) * min(1.0, fw / input_size[1]) for _, (fh, fw) in sized])
    if share >= 0.5:
        return None
    (h, w), (fh, fw) = (np.median([s for s, _ in sized], axis=0), np.median([f for _, f in sized], axis=0))
    return (round(h), round(w)), (round(fh), round(fw))


def _sample_positions(n: int) -> NDArray[np.int64]:
    """Up to ``_SAMPLE`` evenly spaced positions among ``n`` items."""
    return np.unique(np.linspace(0, n - 1, min(n, _SAMPLE)).round().astype(np.int64))


def _number_pair(value: Any) -> TypeGuard[list[int | float]]:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)


def _n_views(image: DecodedImage) -> int:
    return 1 if image.layout is None else image.layout.n_views


def in_input_order(
    decoded: list[DecodedImage], results: list[DetectionResult], decision: Threshold, *, has_maps: bool = True
) -> Iterator[tuple[DetectionResult, NDArray[np.uint8] | None]]:
    """Results in input order; inputs that failed to decode get an error result (NaN score; a scorer without maps
    gives no pixel threshold)."""
    scored = iter(results)
    for item in decoded:
        if item.error is not None:
            pixel = decision.pixel if has_maps else math.nan
            yield DetectionResult.unreadable(item.source, item.error, decision.image, pixel), None
        else:
            yield next(scored), item.original


def _load_references(path: Path, names: Any) -> FeatureSet:
    """The saved references; ``names`` (meta.json) names the reference of each row, else each row is its own."""
    state = {key: torch.from_numpy(array) for key, array in load_tensors(path).items()}
    layers = [state[f"layer{i}"] for i in range(sum(1 for k in state if k.startswith("layer")))]
    if not layers or "embedding" not in state:
        raise ValueError("references file lacks layers or embedding")
    n = len(state["embedding"])
    if not isinstance(names, list) or len(names) != n:
        names = [f"reference {i}" for i in range(n)]
    return FeatureSet(layers, state["embedding"], [DecodedImage(None, (0, 0), str(name)) for name in names])


def _reference_views(saved: Any, n: int) -> NDArray[np.int64] | None:
    """The saved support view of each of ``n`` reference rows; None (every row counts) for models saved before."""
    if isinstance(saved, list) and len(saved) == n and all(isinstance(v, int) for v in saved) and 0 in saved:
        return np.asarray(saved, dtype=np.int64)
    return None


def _reference_tiles(saved: Any, n: int) -> NDArray[np.int64] | None:
    """The saved (image, y, x) of each of ``n`` tiled reference rows; None for untiled ones and models saved before
    (their references' overlapping tiles are compared with each other)."""
    ok = isinstance(saved, list) and len(saved) == n > 0
    if not ok or not all(isinstance(r, list) and len(r) == 3 and all(type(v) is int for v in r) for r in saved):
        return None
    return np.asarray(saved, dtype=np.int64)


def _reference_layouts(tiles: NDArray[np.int64]) -> list[Layout | None]:
    """The layouts of the reference rows of ``tiles`` (see ``Detector.reference_tiles_``): one per run of rows of
    one image, holding their origins (the frame size is not needed by :func:`overlapping_views`)."""
    starts = np.flatnonzero(np.r_[True, tiles[1:, 0] != tiles[:-1, 0]])
    return [
        Layout((0, 0), tuple((int(y), int(x)) for y, x in tiles[a:b, 1:]))
        for a, b in zip(starts, np.r_[starts[1:], len(tiles)])
    ]


def _name(images: Sequence[DecodedImage] | None, index: int) -> str:
    """How a training image is named in logs: its path, else its position."""
    source = None if images is None else images[index].source
    return str(source) if source is not None else f"image {index}"


def _warn_copies(pool: list[DecodedImage], n_ref: int) -> None:
    """Name how many of a zero-shot pool's inputs have another input's pixels (a file copied under another name):
    they are not compared with each other (:meth:`Detector._pool_exclusions`), but where they are all the pool has."""
    counts = Counter(fingerprint(d.views) for d in pool)
    copies = sum(n - 1 for n in counts.values())
    if copies and len(counts) == 1 and not n_ref:
        log.warning("all %d pool images are copies of one image: compared with each other, as nothing else", len(pool))
    elif copies:
        log.warning(
            "%d of %d pool images repeat another one's pixels: copies are not compared with each other (a copy "
            "would vouch for its twin's defects)",
            copies,
            len(pool),
        )
