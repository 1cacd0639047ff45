"""Evaluate `anomaly score` outputs (scores.csv + .npy maps) against MVTec-layout ground truth."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from anomaly._fs import OUTPUT_MARKER, atomic_write_text, check_output_dir, file_sha256, staged_dir
from anomaly.data.datasets import CategoryData, Sample, load_ground_truth
from anomaly.data.io import (
    SOFT_MASK_LEVELS,
    border_all_set,
    load_map,
    mask_level_count,
    read_image_size,
    read_mask_levels,
    resize_mask,
)
from anomaly.errors import DataError
from anomaly.metrics import pimo_curves
from anomaly.metrics.evaluate import evaluate_detailed, evaluate_pixels
from anomaly.metrics.pimo import AupimoResult
from anomaly.tables import is_flagged, read_scores, score_number

__all__ = [
    "EVALUATION_MARKER",
    "Evaluation",
    "check_evaluation_dir",
    "evaluate_samples",
    "evaluate_scores",
    "ground_truth_masks",
    "pimo_plot_data",
    "threshold_counts",
    "write_evaluation",
]

log = logging.getLogger(__name__)
EVALUATION_MARKER = "metrics.json"
"""The file that marks a folder as an evaluation (``anomaly evaluate --out``), which a later evaluation replaces."""
_EVALUATION_FILES = (EVALUATION_MARKER, "ground_truth.json", "aupimo.json", "pimo.json")
_MASK_ASPECT = 1.02  # a mask's aspect may differ from its image's by rounding, not more

_PLOT_THRESHOLDS = 10_000  # PIMO curves for plotting: enough resolution down to a shared FPR of ~1e-5
_PLOT_POINTS = 121  # points kept per curve, log-spaced in shared FPR


@dataclass
class Evaluation:
    """Metrics of one scored test set, with what they were computed from (masks read once)."""

    metrics: dict[str, Any]
    aupimo: AupimoResult | None  # per-image AUPIMO, None without maps or when undefined
    maps: list[NDArray[np.float32]] | None  # at the evaluation size
    masks: list[NDArray[np.bool_]] | None
    paths: list[str]
    labels: list[int]
    mask_files: list[str | None]  # each image's ground-truth mask file, None for normal images
    category: str | None = None  # the category's name, when the ground truth came from one
    scores_sha256: str | None = None  # of the scores.csv evaluated: a report tells an evaluation of other scores


def _truth(samples: list[Sample]) -> list[str | None]:
    """Each sample's mask file as an absolute path: a report reads them from wherever it runs."""
    return [None if s.mask_path is None else os.path.abspath(s.mask_path) for s in samples]


def evaluate_samples(
    scores: list[float],
    samples: list[Sample],
    maps: list[NDArray[np.float32]] | None,
    eval_size: tuple[int, int] | None = None,
    paths: list[str] | None = None,
) -> Evaluation:
    """All metrics for scored test samples in one pass; maps at the images' original size (or None).

    Samples without ground-truth masks (a category that has none) get image metrics alone.
    """
    labels = [s.label for s in samples]
    paths = paths if paths is not None else [str(s.image_path) for s in samples]
    unannotated = [s.image_path for s in samples if s.label and s.mask_path is None]
    if maps is not None and unannotated:
        folders = sorted({str(p.parent) for p in unannotated})
        more = f" (and {len(folders) - 1} more folder(s))" if len(folders) > 1 else ""
        log.warning("%s%s: defective images without masks, image metrics only", folders[0], more)
        maps = None
    if maps is None:
        return Evaluation(dict(evaluate_detailed(scores, labels)[0]), None, None, None, paths, labels, _truth(samples))
    masks = ground_truth_masks(samples, [m.shape for m in maps])
    drawn = [s.mask_path for s in samples if s.mask_path is not None]
    if drawn and not any(m.any() for m in masks):
        folder = Path(drawn[0]).parent.parent
        if set(labels) == {1}:
            raise DataError(f"{folder}: no mask has a defect pixel (above 0), and there is no normal image: "
                            "nothing to evaluate")  # fmt: skip
        log.warning("%s: no mask has a defect pixel (above 0): image metrics only", folder)
        return Evaluation(dict(evaluate_detailed(scores, labels)[0]), None, None, None, paths, labels, _truth(samples))
    if eval_size is not None:
        maps, masks = _resized(maps, masks, eval_size, samples)
    if set(labels) == {1}:  # defective images only: their normal pixels still rank against the defects'
        undefined: dict[str, float | str] = {key: math.nan for key in ("image_auroc", "image_ap", "image_f1max")}
        metrics, details = evaluate_pixels(maps, masks)
        metrics = {**undefined, **metrics}
    else:
        metrics, details = evaluate_detailed(scores, labels, maps, masks)
    # the resolution the pixel metrics were computed at
    size = {"eval_size": "original" if eval_size is None else f"{eval_size[0]}x{eval_size[1]}"}
    return Evaluation({**metrics, **size}, details, maps, masks, paths, labels, _truth(samples))


def check_evaluation_dir(out: str | os.PathLike[str]) -> None:
    """DataError now, before the metrics are computed, when ``out`` could not take an evaluation
    (:func:`_adopt_earlier_evaluation` first)."""
    _adopt_earlier_evaluation(Path(out))
    check_output_dir(Path(out), EVALUATION_MARKER)


def _adopt_earlier_evaluation(folder: Path) -> None:
    """An evaluation folder written before outputs listed their own files (its ``metrics.json`` holds an
    ``image_auroc``, no marker): its evaluation files are marked as ours, so that a new evaluation replaces them and
    keeps everything else in the folder, as for any later evaluation."""
    if not folder.is_dir() or (folder / OUTPUT_MARKER).exists():
        return
    try:
        earlier = json.loads((folder / EVALUATION_MARKER).read_text())
    except (OSError, ValueError):
        return
    if isinstance(earlier, dict) and "image_auroc" in earlier:
        owned = [name for name in _EVALUATION_FILES if (folder / name).is_file()]
        try:
            atomic_write_text(folder / OUTPUT_MARKER, json.dumps({"owned": owned}))
        except OSError as exc:
            raise DataError(f"{folder}: cannot write here ({exc.strerror or exc})") from None


def write_evaluation(evaluation: Evaluation, out: str | os.PathLike[str]) -> None:
    """The folder ``out``: metrics.json, ground_truth.json (each image's label and mask file, as the dataset's loader
    read them: a report takes its ground truth from there), and with maps aupimo.json (per-image values) and
    pimo.json (curves for plotting). The files are written together into a temp folder that then replaces ``out``
    (:func:`anomaly._fs.staged_dir`), so a killed run leaves the earlier evaluation whole, never a mix of the two;
    files a user added to an earlier evaluation folder are kept."""
    metrics = evaluation.metrics
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
    truth = {
        "category": evaluation.category,
        "paths": evaluation.paths,
        "labels": evaluation.labels,
        "masks": evaluation.mask_files,
        **({} if evaluation.scores_sha256 is None else {"scores_sha256": evaluation.scores_sha256}),
    }
    _adopt_earlier_evaluation(Path(out))
    with staged_dir(Path(out), EVALUATION_MARKER) as tmp:
        try:  # a full disk: one line naming the folder (`benchmark` calls this directly), and nothing left behind
            (tmp / EVALUATION_MARKER).write_text(json.dumps(clean, indent=2))
            (tmp / "ground_truth.json").write_text(json.dumps(truth, indent=2))
            if evaluation.aupimo is None or evaluation.maps is None or evaluation.masks is None:
                return
            result = evaluation.aupimo.to_dict()  # per-image values: compare models image by image
            result["paths"] = evaluation.paths
            (tmp / "aupimo.json").write_text(json.dumps(result, indent=2))
            curves = pimo_plot_data(evaluation.maps, evaluation.masks)
            curves["paths"] = [p for p, mask in zip(evaluation.paths, evaluation.masks) if mask.any()]  # as its rows
            (tmp / "pimo.json").write_text(json.dumps(curves))
        except OSError as exc:
            raise DataError(f"{out}: could not write the evaluation ({exc.strerror or exc})") from None


def _resized(
    maps: list[NDArray[np.float32]], masks: list[NDArray[np.bool_]], size: tuple[int, int], samples: list[Sample]
) -> tuple[list[NDArray[np.float32]], list[NDArray[np.bool_]]]:
    """Maps (bilinear) and masks (nearest, see :func:`_keep_defect`) at a fixed evaluation size (H, W)."""
    h, w = size
    # cv2's stubs drop the dtype
    maps = [cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR) for m in maps]  # type: ignore[misc]
    resized = [_keep_defect(m, size) for m in masks]
    kept = [str(s.mask_path) for s, (_, dropped) in zip(samples, resized) if dropped]
    if kept:
        log.warning(
            "%d ground-truth mask(s) lose every defect pixel at --eval-size %dx%d under nearest-neighbour sampling: "
            "they keep the pixels their defect covers, first: %s",
            len(kept),
            h,
            w,
            kept[0],
        )
    return maps, [m for m, _ in resized]


def _keep_defect(mask: NDArray[np.bool_], size: tuple[int, int]) -> tuple[NDArray[np.bool_], bool]:
    """``mask`` at ``size`` (H, W), nearest neighbour, and whether its defect was kept: one that sampling drops whole
    (a few pixels, scaled down) becomes the pixels it covers, so that its image stays defective (ALGORITHMS.md §5.6):
    an empty mask would count its image, defect included, as a normal one in AUPIMO's shared FPR."""
    resized = resize_mask(mask, size)
    if resized.any() or not mask.any():
        return resized, False
    covered = cv2.resize(mask.astype(np.float32), (size[1], size[0]), interpolation=cv2.INTER_AREA) > 0
    return covered, True


def ground_truth_masks(samples: list[Sample], shapes: list[tuple[int, ...]]) -> list[NDArray[np.bool_]]:
    """Masks at the given shapes (nearest neighbour, see :func:`_keep_defect`); all-zero for normal images. Masks of
    another aspect than their map (a mask drawn on a crop, or for another image) are stretched to it and named in one
    warning."""
    masks, skewed, empty, graded, inverted, kept = [], [], [], [], [], []
    for sample, shape in zip(samples, shapes):
        if sample.mask_path is None:
            masks.append(np.zeros(shape[:2], dtype=bool))
            continue
        levels = read_mask_levels(sample.mask_path)
        mask = levels > 0
        if abs(math.log((mask.shape[1] / mask.shape[0]) / (shape[1] / shape[0]))) > math.log(_MASK_ASPECT):
            skewed.append(f"{sample.mask_path} ({mask.shape[1]}x{mask.shape[0]} for {shape[1]}x{shape[0]})")
        if sample.label and not mask.any():
            empty.append(str(sample.mask_path))
        elif mask_level_count(levels) > SOFT_MASK_LEVELS:
            graded.append(str(sample.mask_path))
        if border_all_set(mask):
            inverted.append(str(sample.mask_path))
        resized, dropped = _keep_defect(mask, (shape[0], shape[1]))
        if dropped:
            kept.append(str(sample.mask_path))
        masks.append(resized)
    for found, what in (
        (skewed, "have another aspect than their image and are stretched to it"),
        (empty, "of defective images are empty (no pixel above 0): their images count as normal pixels only"),
        (graded, "have many levels (soft edges, or lossy JPEG noise): every pixel above 0 counts as defect"),
        (inverted, "mark their whole border as defect: inverted (a white background)? Every pixel above 0 counts as "
                   "defect"),
        (kept, "lose every defect pixel at their image's size under nearest-neighbour sampling: they keep the pixels "
               "their defect covers"),
    ):  # fmt: skip
        if found:
            log.warning("%d ground-truth mask(s) %s, first: %s", len(found), what, found[0])
    return masks


def evaluate_scores(
    scores_dir: str | os.PathLike[str],
    category_root: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    eval_size: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Metrics of a scores.csv (+ maps) against the test split of an MVTec-layout category.

    ``train/good`` is not needed. Without any ground-truth mask in the category, only image metrics are
    computed (the maps are not read); scores of defective images alone, with masks and maps (NEU-Seg has no normal
    image), get pixel metrics alone.
    """
    rows = read_scores(scores_dir)
    data = load_ground_truth(category_root)
    samples = data.match_test([r["path"] for r in rows], str(Path(scores_dir) / "scores.csv"))
    _warn_partial(rows, samples, data)
    scores = [score_number(r, "score", Path(scores_dir)) for r in rows]
    map_paths = [r.get("map_path", "") for r in rows]
    labels = {s.label for s in samples}
    unannotated = any(s.label == 1 and s.mask_path is None for s in samples)
    defects_only = labels == {1} and not unannotated and all(map_paths)  # NEU-Seg: pixel metrics alone
    if labels != {0, 1} and not defects_only:
        kind = "anomalous" if 1 not in labels else "normal"
        raise DataError(f"{scores_dir}/scores.csv: no {kind} image among the scored images; metrics need both")
    if defects_only:
        log.warning("no normal image among the scored images: image metrics are undefined (nan), pixel metrics only")
    maps = None
    if unannotated and any(map_paths):
        log.warning("%s has no ground_truth masks: image metrics only", category_root)
    if not any(map_paths) and any(s.mask_path is not None for s in samples):
        if all(r.get("threshold") for r in rows) and not any(r.get("pixel_threshold") for r in rows):
            log.warning("%s: its scorer gives image scores only (no maps): image metrics only", scores_dir)
        else:
            log.warning("%s has no maps (`anomaly score --maps` writes them): image metrics only", scores_dir)
    if any(map_paths) and not all(map_paths) and not unannotated:
        log.warning(
            "%d of the %d rows of scores.csv have no map: image metrics only", map_paths.count(""), len(map_paths)
        )
    if all(map_paths) and not unannotated:
        missing = [p for p in map_paths if not (Path(scores_dir) / p).is_file()]
        if missing:
            raise DataError(f"{Path(scores_dir) / missing[0]}: map file not found")
        maps = _at_image_size([load_map(Path(scores_dir) / p) for p in map_paths], samples)
    evaluation = evaluate_samples(scores, samples, maps, eval_size, [r["path"] for r in rows])
    evaluation.category = data.name
    evaluation.scores_sha256 = file_sha256(Path(scores_dir) / "scores.csv")
    evaluation.metrics["n_images"] = len(rows)
    if all((r.get("is_anomalous") or "").strip() for r in rows):  # a verdict per row (not scores from elsewhere)
        evaluation.metrics.update(threshold_counts([is_flagged(r) for r in rows], evaluation.labels))
    if out is not None:
        write_evaluation(evaluation, out)  # DataError (one line) for a folder it may not replace or a full disk
    return evaluation.metrics


def _at_image_size(maps: list[NDArray[np.float32]], samples: list[Sample]) -> list[NDArray[np.float32]]:
    """Maps at their test image's size, as `anomaly score --maps` writes them; others (written by another tool, or
    for a resized copy) are scaled to it (bilinear) and named in a warning, so that the pixel metrics are those of the
    original resolution that ``eval_size`` reports, not of each map's."""
    sized, other = [], []
    for amap, sample in zip(maps, samples):
        try:
            height, width = read_image_size(sample.image_path)
        except (DataError, OSError):  # scored from another copy, say: the map's own size stands
            height, width = amap.shape
        if amap.shape != (height, width):
            other.append(f"{sample.image_path} ({amap.shape[1]}x{amap.shape[0]} for {width}x{height})")
            amap = cv2.resize(amap, (width, height), interpolation=cv2.INTER_LINEAR)  # type: ignore[assignment]
        sized.append(amap)
    if other:
        log.warning("%d map(s) are not at their image's size and are scaled to it, first: %s", len(other), other[0])
    return sized


def threshold_counts(flags: list[bool], labels: list[int]) -> dict[str, Any]:
    """What the scores' own threshold did (``is_anomalous``): the count and share of normal and of anomalous images
    flagged (``flagged_normal``, ``realised_fpr``, ``flagged_anomalous``, ``realised_tpr``)."""
    counts: dict[str, Any] = {}
    for label, name in ((0, "normal"), (1, "anomalous")):
        flagged = [flag for flag, truth in zip(flags, labels) if truth == label]
        counts[f"flagged_{name}"] = sum(flagged)
        counts["realised_fpr" if label == 0 else "realised_tpr"] = sum(flagged) / len(flagged) if flagged else math.nan
    return counts


def pimo_plot_data(maps: list[NDArray[np.float32]], masks: list[NDArray[np.bool_]]) -> dict[str, Any]:
    """PIMO curves thinned for plotting: the shared FPR on a log grid and each anomalous image's TPR there."""
    curves = pimo_curves(maps, masks, num_thresholds=_PLOT_THRESHOLDS)
    fpr = curves.shared_fpr  # non-increasing along the thresholds
    lowest = float(fpr[fpr > 0].min())
    grid = np.geomspace(lowest, float(fpr[0]), _PLOT_POINTS)
    # for each grid level, the highest threshold whose shared FPR still reaches it
    index = np.clip(np.searchsorted(-fpr, -grid, side="right") - 1, 0, fpr.size - 1)
    index = np.unique(index)
    tpr = curves.per_image_tpr[curves.is_anomalous][:, index]
    return {
        "shared_fpr": [float(v) for v in fpr[index]],
        "per_image_tpr": [[round(float(v), 5) for v in row] for row in tpr],
    }


def _warn_partial(rows: list[dict[str, str]], samples: list[Sample], data: CategoryData) -> None:
    """Metrics of part of a test split, or of files that only share folder and name with it, read like the
    category's own: say so."""
    covered = len({s.image_path for s in samples})
    if covered < len(data.test):
        log.warning(
            "the scores cover %d of the %d test images of %s: the metrics are those of the %d",
            covered,
            len(data.test),
            data.root,
            covered,
        )
    elsewhere = [r["path"] for r, s in zip(rows, samples) if _other_file(Path(r["path"]), s.image_path)]
    if elsewhere:
        log.warning(
            "%d scored image(s) are not files of %s but share their folder and file name with them (matched on "
            "those), first: %s",
            len(elsewhere),
            data.root,
            elsewhere[0],
        )


def _other_file(scored: Path, sample: Path) -> bool:
    """True when ``scored`` is a file here and not ``sample`` (a path of another machine or working folder that
    does not exist here tells nothing)."""
    try:
        return scored.is_file() and not scored.samefile(sample)
    except OSError:
        return False
