"""What a report shows: the scored images with their labels, AUPIMO and clusters, read from the output folders.

Inputs are the folders other commands write: ``anomaly score`` (scores.csv), ``anomaly evaluate --out``
(metrics.json, ground_truth.json, aupimo.json, pimo.json) and ``anomaly discover`` (clusters.csv). Ground truth
comes from the evaluation (the labels and masks its dataset loader read: VisA's split file, a folder dataset's
masks), else from the MVTec layout of the scored paths: an image is normal iff its parent folder is named ``good``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anomaly._fs import file_sha256
from anomaly.errors import DataError
from anomaly.tables import find_scored_image, is_flagged, read_clusters, read_scores, score_number

__all__ = ["Evaluation", "Item", "ReportContent", "load_content", "true_label"]

NORMAL_FOLDER = "good"
log = logging.getLogger(__name__)


@dataclass
class Item:
    """One scored image. ``label`` is 0 normal / 1 anomalous, or None without ground truth."""

    path: str
    score: float
    pixel_threshold: float  # a map pixel at or above it is in the predicted mask
    flagged: bool  # score >= the model's image threshold: only a flagged image has a predicted mask
    label: int | None
    image: Path | None  # the original image file, when it can be found
    map: Path | None  # float32 .npy map
    overlay: Path | None  # heatmap overlay PNG written by `anomaly score`
    ground_truth: Path | None  # ground-truth mask file (from the evaluation, else by the MVTec layout)
    aupimo: float | None = None
    cluster: str | None = None
    confidence: float | None = None

    @property
    def folder(self) -> str:
        """Parent folder name: the defect type in MVTec layout."""
        return Path(self.path).parent.name

    @property
    def name(self) -> str:
        """Short display name: ``folder/file``."""
        p = Path(self.path)
        return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


@dataclass
class Evaluation:
    """What ``anomaly evaluate --out`` wrote; absent files give empty fields."""

    metrics: dict[str, Any] = field(default_factory=dict)
    aupimo: dict[str, Any] | None = None  # aupimo.json: mean, ci95, fpr_bounds, ...
    pimo: dict[str, Any] | None = None  # pimo.json: shared_fpr, per_image_tpr, paths


@dataclass
class ReportContent:
    """Items sorted by score (highest first) and what is known about them."""

    title: str
    items: list[Item]
    threshold: float  # the model's image threshold: flagged iff score >= threshold
    has_labels: bool
    labels_from: str  # where the ground truth came from: "the evaluation" or "folder names"
    evaluation: Evaluation | None
    has_clusters: bool


@dataclass
class _GroundTruth:
    """An evaluation's ground truth: the category's name and each scored path's label and mask file."""

    category: str | None
    by_path: dict[str, tuple[int, Path | None]]


def true_label(path: str) -> int:
    """0 if the image's parent folder is ``good`` (MVTec layout; ``Good`` too, as the loaders read it), else 1."""
    return 0 if Path(path).parent.name.lower() == NORMAL_FOLDER else 1


def load_content(
    scores_dir: Path, evaluation_dir: Path | None = None, discovery_dir: Path | None = None
) -> ReportContent:
    """Read the output folders into items sorted by descending score (ties by path)."""
    rows = read_scores(scores_dir)
    truth = _read_truth(evaluation_dir, rows, scores_dir) if evaluation_dir is not None else None
    if truth is not None:
        labels = [truth.by_path[r["path"]][0] for r in rows]
        masks = [truth.by_path[r["path"]][1] for r in rows]
    else:
        labels = [true_label(r["path"]) for r in rows]
        masks = [None] * len(rows)
    # Ground truth is known when an evaluation was run, or when the paths hold both `good` and defect folders.
    has_labels = evaluation_dir is not None or len(set(labels)) == 2
    threshold = _model_threshold(rows, scores_dir)
    images = [find_scored_image(r["path"], scores_dir) for r in rows]
    items = [
        Item(
            path=r["path"],
            score=score_number(r, "score", scores_dir),
            pixel_threshold=score_number(r, "pixel_threshold", scores_dir) if r.get("pixel_threshold") else threshold,
            flagged=score_number(r, "score", scores_dir) >= threshold,
            label=y if has_labels else None,
            image=image,
            map=_output_file(scores_dir, r.get("map_path", "")),
            overlay=_output_file(scores_dir, r.get("overlay_path", "")),
            ground_truth=(mask or _mvtec_mask(image or Path(r["path"]))) if y else None,
        )
        for r, y, image, mask in zip(rows, labels, images, masks)
    ]
    _warn_missing(rows, items, scores_dir)
    evaluation = _read_evaluation(evaluation_dir, items) if evaluation_dir is not None else None
    if discovery_dir is not None:
        _read_clusters(discovery_dir, items)
    items.sort(key=lambda it: (-it.score, it.path))
    return ReportContent(
        title=(truth.category if truth is not None else None) or _title(rows),
        items=items,
        threshold=threshold,
        has_labels=has_labels,
        labels_from="the evaluation" if truth is not None else "folder names",
        evaluation=evaluation,
        has_clusters=discovery_dir is not None,
    )


def _model_threshold(rows: list[dict[str, str]], where: Path) -> float:
    """The image threshold of scores.csv; without one, the lowest flagged score (or above every score)."""
    values = {r.get("threshold") or "" for r in rows} - {""}
    if len(values) > 1:
        raise DataError(f"{where / 'scores.csv'}: several thresholds ({len(values)}); report one pool at a time")
    if values:
        return score_number({"path": rows[0]["path"], "threshold": values.pop()}, "threshold", where)
    scores = [score_number(r, "score", where) for r in rows]
    flagged = [s for s, r in zip(scores, rows) if is_flagged(r)]
    return min(flagged) if flagged else math.nextafter(max(scores), math.inf)


def _warn_missing(rows: list[dict[str, str]], items: list[Item], scores_dir: Path) -> None:
    """Say which listed files the report cannot show (it still shows what it has; a mask not found is dropped)."""
    lost = [it.path for it in items if it.image is None]
    if lost:
        log.warning(
            "%d of the %d scored images are not found here (first: %s); relative paths in scores.csv are read from "
            "the folder `anomaly report` runs in and from %s: run it where `anomaly score` ran",
            len(lost),
            len(items),
            lost[0],
            scores_dir,
        )
    if "map_path" not in rows[0] and (scores_dir / "maps").is_dir():
        log.warning(
            "%s: no map_path column, though %s exists: the report shows no maps",
            scores_dir / "scores.csv",
            scores_dir / "maps",
        )
    gone = [scores_dir / r["map_path"] for r, it in zip(rows, items) if r.get("map_path") and it.map is None]
    if gone:
        log.warning("%d map file(s) listed in scores.csv are missing, first: %s", len(gone), gone[0])
    truthless = [it for it in items if it.ground_truth is not None and not it.ground_truth.exists()]
    if truthless:
        log.warning("%d ground-truth mask(s) are not found here (first: %s): their images show no outline",
                    len(truthless), truthless[0].ground_truth)  # fmt: skip
        for it in truthless:
            it.ground_truth = None


def _output_file(scores_dir: Path, rel: str) -> Path | None:
    path = scores_dir / rel
    return path if rel and path.is_file() else None


def _mvtec_mask(path: Path) -> Path | None:
    """``<cat>/ground_truth/<defect>/<stem>_mask.png`` (or ``<stem>.png``, or MVTec LOCO's folder ``<stem>/``) of
    ``<cat>/test/<defect>/<file>``; MVTec AD 2's ``<cat>/test_public/ground_truth/<defect>/`` likewise."""
    split = path.parent.parent
    folder = (split if split.name == "test_public" else split.parent) / "ground_truth" / path.parent.name
    for name in (f"{path.stem}_mask.png", f"{path.stem}.png", path.stem):
        if (folder / name).is_file() or (name == path.stem and (folder / name).is_dir()):
            return folder / name
    return None


def _title(rows: list[dict[str, str]]) -> str:
    """The category name: the folder above ``test`` (MVTec layout), else the common parent folder."""
    parents = [Path(r["path"]).parent for r in rows]
    if len({p.is_absolute() for p in parents}) > 1:  # absolute and relative inputs scored together
        parents = [p.absolute() for p in parents]
    common = Path(os.path.commonpath([str(p) for p in parents])) if parents else Path()
    if common.name == "test" or (common.parent.name == "test" and len(set(parents)) == 1):
        common = common.parent if common.name == "test" else common.parent.parent
    return common.name or "scores"


def _read_evaluation(folder: Path, items: list[Item]) -> Evaluation:
    if not folder.is_dir():
        raise DataError(f"--evaluation {folder}: folder not found")
    metrics = _json(folder / "metrics.json")
    if metrics is None:
        raise DataError(f"{folder / 'metrics.json'}: not found (run `anomaly evaluate --out {folder}`)")
    result = Evaluation(metrics=metrics, aupimo=_json(folder / "aupimo.json"), pimo=_json(folder / "pimo.json"))
    _check_curves(folder, result)
    by_path = {it.path: it for it in items}
    for name, curves in (("pimo.json", result.pimo), ("aupimo.json", result.aupimo)):
        foreign = [p for p in (curves or {}).get("paths", []) if p not in by_path]
        if foreign:
            raise DataError(f"{folder / name}: {foreign[0]} is not in the scores.csv (an evaluation of other scores?)")
    if result.aupimo is not None:
        for path, value in zip(result.aupimo.get("paths", []), result.aupimo.get("per_image", [])):
            by_path[path].aupimo = value
    evaluated = metrics.get("n_images")
    if isinstance(evaluated, int) and evaluated != len(items):
        log.warning(
            "%s evaluated %d images and the scores.csv holds %d: its metrics may be of another scores run "
            "(re-run `anomaly evaluate --scores` on this one)",
            folder,
            evaluated,
            len(items),
        )
    return result


def _read_truth(folder: Path, rows: list[dict[str, str]], scores_dir: Path) -> _GroundTruth | None:
    """The evaluation's ground_truth.json; None where it has none (written before it existed, or no folder)."""
    path = folder / "ground_truth.json"
    data = _json(path)
    if data is None:
        return None
    try:
        cells = zip(data["paths"], data["labels"], data["masks"], strict=True)
        by_path = {str(p): (int(y), None if m is None else Path(m)) for p, y, m in cells}
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: malformed ({type(exc).__name__}: {exc})") from None
    foreign = [r["path"] for r in rows if r["path"] not in by_path]
    if foreign:
        log.warning("%d image(s) of the scores.csv are not in %s (first: %s): their labels are read from folder names",
                    len(foreign), path, foreign[0])  # fmt: skip
        by_path.update({p: (true_label(p), None) for p in foreign})
    evaluated = data.get("scores_sha256")  # (absent from evaluations written before it was recorded)
    if isinstance(evaluated, str) and evaluated != file_sha256(scores_dir / "scores.csv"):
        log.warning(
            "%s is the evaluation of another scores.csv than %s (the same images scored again, by another model?): "
            "its metrics, per-image AUPIMO and PIMO curves are not of these scores; re-run `anomaly evaluate "
            "--scores %s --out ...` for them",
            folder,
            scores_dir / "scores.csv",
            scores_dir,
        )
    category = data.get("category")
    return _GroundTruth(category if isinstance(category, str) and category else None, by_path)


def _json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path`` (every file ``anomaly evaluate --out`` writes holds one); None without the file."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise DataError(f"{path}: expected a JSON object (as `anomaly evaluate --out` writes), got {kind}")
    return data


def _check_curves(folder: Path, evaluation: Evaluation) -> None:
    """DataError naming the file where aupimo.json or pimo.json do not hold what the charts read: numbers in [0, 1]
    (a per-image AUPIMO may be null: a normal image), paths as text, one TPR curve per path over the shared FPR."""

    def fractions(value: Any, what: str, *, nulls: bool = False) -> list[float | None]:
        if not isinstance(value, list):
            raise ValueError(f"{what}: expected a list")
        for v in value:
            if v is None and nulls:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ValueError(f"{what}: {v!r} is not a number in [0, 1]")
        return value

    def texts(value: Any, what: str) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{what}: expected a list of paths")
        return value

    name = "aupimo.json"
    try:
        if (aupimo := evaluation.aupimo) is not None:
            paths = texts(aupimo.get("paths", []), "paths")
            values = fractions(aupimo.get("per_image", []), "per_image", nulls=True)
            if "paths" in aupimo and len(values) != len(paths):
                raise ValueError(f"{len(values)} per_image values for {len(paths)} paths")
            if any(v is not None for v in values):
                fractions([aupimo.get("mean")], "mean")
                bounds = aupimo.get("fpr_bounds")
                if not isinstance(bounds, list) or len(fractions(bounds, "fpr_bounds")) != 2 or not 0 < bounds[0]:
                    raise ValueError(f"fpr_bounds: expected two FPRs in (0, 1], got {bounds!r}")
        name = "pimo.json"
        if (pimo := evaluation.pimo) is not None:
            paths = texts(pimo.get("paths", []), "paths")
            fpr = fractions(pimo.get("shared_fpr", []), "shared_fpr")
            curves = pimo.get("per_image_tpr", [])
            if not isinstance(curves, list) or ("paths" in pimo and len(curves) != len(paths)):
                raise ValueError(f"per_image_tpr: expected one curve for each of the {len(paths)} paths")
            for curve in curves:
                if len(fractions(curve, "per_image_tpr")) != len(fpr):
                    raise ValueError(f"per_image_tpr: a curve of {len(curve)} points for {len(fpr)} shared FPRs")
    except ValueError as exc:
        raise DataError(f"{folder / name}: malformed ({exc})") from None


def _read_clusters(folder: Path, items: list[Item]) -> None:
    path = folder / "clusters.csv"
    by_path = {it.path: it for it in items}
    for row in read_clusters(folder):
        item = by_path.get(row["path"])
        if item is None:
            raise DataError(f"{path}: {row['path']} is not in the scores.csv")
        item.cluster = row["cluster"]
        conf = (row.get("confidence") or "").strip()
        try:
            item.confidence = float(conf) if conf else None
        except ValueError:
            item.confidence = math.nan
        if item.confidence is not None and not 0 <= item.confidence <= 1:
            raise DataError(f"{path}: {row['path']}: confidence {conf!r} is not a number in [0, 1]")
