"""``anomaly fit --ray``: feature extraction and the memory bank's coresets spread over Ray actors.

Memory bank (``patchcore``): every fold of the cross-fit goes to an actor, which extracts its images'
features and builds the fold's coreset (:meth:`MemoryBankScorer.fold_candidates`); the driver merges
the folds' coresets into the bank (:meth:`~MemoryBankScorer.merge_candidates`, greedy k-center of
their union), then Ray tasks build each fold's held-out bank from it and score the fold against it
(:meth:`~MemoryBankScorer.score_held_out`). Same folds, same steps as the local cross-fit, so the same
bank and threshold up to the backbone's float rounding, which depends on how images are batched (about 2e-5 of a
feature): on near-tied textures that can turn a greedy pick, and the threshold moves a little (0.6 % seen).

Other trained scorers (``padim``, ``gaussian``): the actors extract features of contiguous shards
and the driver gathers them and fits as the local path does. Their statistics are cheap next to
the backbone, and gathering keeps Ledoit-Wolf shrinkage and PaDiM's fold refits exactly as they are.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from anomaly.config import DetectorConfig
from anomaly.data.inputs import training_paths
from anomaly.data.loader import DecodedImage
from anomaly.detector import Detector
from anomaly.distributed._cluster import cluster, require_ray, use_driver_cwd, use_reserved_cpus, workers
from anomaly.errors import AnomalyError, ConfigError, DataError
from anomaly.index import NNIndex
from anomaly.results import StageProgress
from anomaly.scorers import ScoreOutput
from anomaly.scorers.memory_bank import Candidates, MemoryBankScorer

__all__ = ["FitWorker", "fit"]

log = logging.getLogger(__name__)


def fit(
    config: DetectorConfig | str | os.PathLike[str],
    train: Sequence[str | os.PathLike[str]],
    *,
    address: str | None = None,
    progress: StageProgress | None = None,
) -> Detector:
    """Fit a trained detector on the normal images ``train`` with Ray; returns it ready to ``save``.

    ``address`` is a Ray cluster address; None starts a local instance (or uses the caller's session).
    """
    require_ray()
    detector = Detector(config)
    if detector.zero_shot:
        raise DataError(f"--ray fits trained scorers; {detector.scorer.name} is zero-shot and stores references only")
    if detector.config.preprocess.tile is not None:
        raise ConfigError("--ray fit does not split tiled models (preprocess.tile) yet; fit them without --ray")
    paths = training_paths(train)
    if len(paths) < detector.min_training_images():
        raise DataError(
            f"fit: the {detector.scorer.name} scorer needs at least {detector.min_training_images()} normal images "
            f"with threshold.folds={detector.config.threshold.folds}, got {len(paths)}"
        )
    detector.resolve_auto(paths)  # the actors get the decided config
    folds = detector.folds(len(paths))  # the local fit's folds, so both fits agree
    with cluster(address) as ray:
        plan = workers(ray, device=detector.config.device)
        actor = ray.remote(num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, max_restarts=3, max_task_retries=3)(
            FitWorker
        )
        count = min(plan.count, len(np.unique(folds)))
        pool = [actor.remote(detector.config, os.getcwd()) for _ in range(count)]
        log.info("fitting on %d Ray actors", count)
        if isinstance(detector.scorer, MemoryBankScorer):
            out, images = _memory_bank(ray, pool, detector, paths, folds, progress)
        else:
            layers, images = _gather_features(ray, pool, paths, detector.config.batch_size, progress)
            out = detector.scorer.cross_fit(layers, folds)
    return detector.calibrate(out, images)


class FitWorker:
    """Ray actor: one backbone; extracts features of image shards and runs the memory bank's fold steps."""

    def __init__(self, config: DetectorConfig, cwd: str) -> None:
        use_reserved_cpus()
        use_driver_cwd(cwd)  # relative training paths
        self.detector = Detector(config)

    def features(self, paths: list[str]) -> tuple[list[torch.Tensor], list[DecodedImage]]:
        """Per-layer features of ``paths`` (on the CPU, for the object store) and what was decoded of each."""
        found = self.detector.extract(paths)
        return [x.cpu() for x in found.layers], _described(found.images)

    def fold(
        self, paths: list[str], images: NDArray[np.int64], share: int
    ) -> tuple[Candidates, np.ndarray, list[DecodedImage]]:
        """A fold's coreset candidates, its patch embeddings (the queries of its held-out scores) and what was
        decoded of each image."""
        scorer = self.detector.scorer
        assert isinstance(scorer, MemoryBankScorer)
        found = self.detector.extract(paths)
        emb = scorer.embed(found.layers)
        picked = scorer.fold_candidates(emb, images, share)
        return Candidates(picked.vectors.cpu(), picked.images), emb.cpu().numpy(), _described(found.images)

    def held_out(
        self,
        candidates: list[Candidates],
        fold: int,
        bank_picks: np.ndarray,
        size: int,
        queries: np.ndarray,
        bank_index: np.ndarray,
    ) -> ScoreOutput:
        """Scores of fold ``fold`` against the bank built from the other folds' candidates.

        ``bank_index``: the full bank's serialised index, whose IVF lists the held-out bank reuses.
        """
        scorer = self.detector.scorer
        assert isinstance(scorer, MemoryBankScorer)
        lists = NNIndex(scorer.index, use_gpu=scorer.use_gpu).deserialize(bank_index)
        return scorer.score_held_out(candidates, fold, bank_picks, size, queries, lists)


def _memory_bank(
    ray: Any,
    pool: list[Any],
    detector: Detector,
    paths: list[Path],
    folds: NDArray[np.int64],
    progress: StageProgress | None,
) -> tuple[ScoreOutput, list[DecodedImage]]:
    scorer = detector.scorer
    assert isinstance(scorer, MemoryBankScorer)
    fold_ids = np.unique(folds)
    members = [np.flatnonzero(folds == fold) for fold in fold_ids]
    blank = np.zeros((*detector.extractor.image_size, 3), dtype=np.uint8)  # the patch grid of one image
    _, h, w, _ = scorer.embed(detector.extract([blank]).layers).shape
    plan = scorer.fold_plan(len(paths), h * w, [len(m) for m in members])
    calls = [
        pool[i % len(pool)].fold.options(num_returns=3).remote([str(paths[j]) for j in images], images, share)
        for i, (images, share) in enumerate(zip(members, plan.shares))
    ]
    candidates = _get_all(ray, [c for c, _, _ in calls], "features", len(paths), progress, members)
    bank_picks = scorer.merge_candidates(candidates, plan.total)  # on the driver; the held-out banks start from it
    assert scorer.index_ is not None
    shared, picks, index = ray.put(candidates), ray.put(bank_picks), ray.put(scorer.index_.serialize())
    scored = [
        pool[i % len(pool)].held_out.remote(shared, i, picks, plan.held_out[i], queries, index)
        for i, (_, queries, _) in enumerate(calls)
    ]
    outs = _get_all(ray, scored, "fit", len(fold_ids), progress)
    n, (h, w) = len(paths), outs[0].patch_maps.shape[1:]
    maps = np.empty((n, h, w), dtype=np.float32)
    scores = np.empty(n, dtype=np.float64)
    decoded: list[DecodedImage] = [None] * n  # type: ignore[list-item]  # filled in path order below
    for images, out, described in zip(members, outs, ray.get([d for _, _, d in calls])):
        maps[images], scores[images] = out.patch_maps, out.image_scores
        for j, image in zip(images, described, strict=True):
            decoded[j] = image
    return ScoreOutput(maps, scores), decoded


def _gather_features(
    ray: Any, pool: list[Any], paths: list[Path], batch_size: int, progress: StageProgress | None
) -> tuple[list[torch.Tensor], list[DecodedImage]]:
    """Features of all images in input order, extracted in shards (multiples of the batch size) by the actors,
    and what was decoded of each image."""
    per_shard = batch_size * max(1, math.ceil(len(paths) / (batch_size * len(pool) * 4)))
    shards = [[str(p) for p in paths[i : i + per_shard]] for i in range(0, len(paths), per_shard)]
    refs = [pool[i % len(pool)].features.remote(shard) for i, shard in enumerate(shards)]
    parts = _get_all(ray, refs, "features", len(paths), progress, shards)
    layers = [torch.cat(per_layer) for per_layer in zip(*(features for features, _ in parts))]
    return layers, [image for _, described in parts for image in described]


def _described(images: list[DecodedImage]) -> list[DecodedImage]:
    """``images`` without their pixels: the sizes and view layouts the driver's threshold and footprint need."""
    return [replace(image, views=None, original=None) for image in images]


def _get_all(
    ray: Any,
    refs: list[Any],
    stage: str,
    total: int,
    progress: StageProgress | None,
    sizes: Sequence[Any] | None = None,
) -> list[Any]:
    """``ray.get`` of every ref in order, reporting progress as they finish; user errors re-raised as such."""
    weight = {ref: (len(sizes[i]) if sizes is not None else 1) for i, ref in enumerate(refs)}
    pending, done = list(refs), 0
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        done += weight[ready[0]]
        if progress is not None:
            progress(stage, done, total)
    try:
        return ray.get(refs)
    except AnomalyError as exc:  # Ray raises a subclass of the worker's error; its text is the remote traceback
        cause: BaseException = getattr(exc, "cause", exc)
        raise type(cause)(str(cause)) from None
