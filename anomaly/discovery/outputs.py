"""Reading `anomaly score --maps` outputs and writing discovery results (clusters.csv, sheets, summary)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from anomaly._fs import staged_dir
from anomaly.data.io import as_rgb8, load_map, read_pixels, significant_bits
from anomaly.discovery.pipeline import DiscoveryResult
from anomaly.errors import DataError
from anomaly.tables import find_scored_image, is_flagged, read_scores, score_number, write_clusters

__all__ = ["ScoredImages", "read_scored_images", "write_discovery"]

THUMB = 160  # contact-sheet thumbnail side in pixels
SHEET_COLUMNS = 8
SHEET_MAX = 64  # thumbnails per sheet, most confident first
_FONT, _FONT_SCALE = cv2.FONT_HERSHEY_PLAIN, 0.9


@dataclass(frozen=True)
class ScoredImages:
    """Images of a scores folder selected for discovery: paths as in scores.csv, image files, maps, pixel thresholds.

    ``images`` are the files the paths name (:func:`anomaly.tables.find_scored_image`); ``n_left_out`` counts the
    folder's images that were not selected (not flagged, without ``--all``).
    """

    paths: list[str]
    images: list[Path]
    map_files: list[Path]
    pixel_thresholds: list[float | None]
    n_left_out: int = 0

    def maps(self) -> Iterator[NDArray[np.float32]]:
        """The maps, loaded one at a time."""
        for path in self.map_files:
            yield load_map(path)


def read_scored_images(scores_dir: str | os.PathLike[str], all_images: bool = False) -> ScoredImages:
    """The flagged images (or all, with ``all_images``) of an `anomaly score --maps` output folder.

    Raises:
        DataError: no scores.csv, a score that is not a finite number, no maps (scored without --maps, or an
            image-level scorer), a missing image or map file, or no image flagged anomalous when ``all_images``
            is false.
    """
    folder = Path(scores_dir)
    csv_path = folder / "scores.csv"
    rows = read_scores(folder)
    for row in rows:  # refused as `anomaly report` refuses it
        score_number(row, "score", folder)
    if "is_anomalous" not in rows[0] and not all_images:
        raise DataError(f"{csv_path}: no is_anomalous column; use --all to cluster every image")
    if not any(r.get("map_path") for r in rows):
        raise DataError(
            f"{folder}: no anomaly maps in scores.csv; run `anomaly score --maps` with a map-producing model"
        )
    selected = rows if all_images else [r for r in rows if is_flagged(r)]
    if not selected:
        raise DataError(f"{csv_path}: no image is flagged anomalous; use --all to cluster every image")
    missing = [r["path"] for r in selected if not r.get("map_path")]
    if missing:
        raise DataError(f"{csv_path}: {missing[0]} has no map ({len(missing)} images without one)")
    files = [folder / r["map_path"] for r in selected]
    absent = [f for f in files if not f.is_file()]
    if absent:
        raise DataError(f"{absent[0]}: map file not found")
    paths = [r["path"] for r in selected]
    return ScoredImages(
        paths, _image_files(paths, folder), files, [_threshold(r, folder) for r in selected], len(rows) - len(selected)
    )


def _image_files(paths: list[str], folder: Path) -> list[Path]:
    """The image file of each path, as `anomaly report` finds it, or DataError naming the first missing one."""
    found = [find_scored_image(p, folder) for p in paths]
    missing = [p for p, f in zip(paths, found) if f is None]
    if missing:
        raise DataError(
            f"{folder / 'scores.csv'}: image {missing[0]} not found ({len(missing)} missing); relative paths are "
            f"read from the current folder and from {folder}: run where `anomaly score` ran"
        )
    return [f for f in found if f is not None]


def _threshold(row: dict[str, str], folder: Path) -> float | None:
    """The map value a pixel must reach: the row's pixel_threshold, else its image threshold; a value that is not a
    finite number is refused as ``report`` refuses it."""
    for key in ("pixel_threshold", "threshold"):
        if row.get(key):
            return score_number(row, key, folder)
    return None


def write_discovery(
    out_dir: str | os.PathLike[str], result: DiscoveryResult, paths: list[str], images: list[Path] | None = None
) -> Path:
    """Write OUT_DIR atomically: clusters.csv (``paths``, as in scores.csv), summary.json and
    sheets/cluster_<i>.png per cluster (thumbnails of the ``images`` files; default: the ``paths``)."""
    out = Path(out_dir)
    images = [Path(p) for p in paths] if images is None else images
    with staged_dir(out, "clusters.csv") as tmp:
        write_clusters(
            tmp / "clusters.csv",
            [
                {"path": path, "cluster": str(int(label)), "confidence": f"{conf:.4f}", "n_regions": str(int(n))}
                for path, label, conf, n in zip(paths, result.labels, result.confidence, result.n_regions)
            ],
        )
        (tmp / "sheets").mkdir()
        for cluster in range(result.k):
            members = np.flatnonzero(result.labels == cluster)
            members = members[np.argsort(-result.confidence[members], kind="stable")][:SHEET_MAX]
            if len(members):
                sheet = _contact_sheet(result, members, [paths[i] for i in members], [images[i] for i in members])
                cv2.imwrite(str(tmp / "sheets" / f"cluster_{cluster}.png"), sheet)
        (tmp / "summary.json").write_text(json.dumps(result.summary(), indent=2))
    return out


def _contact_sheet(
    result: DiscoveryResult, members: NDArray[np.intp], paths: list[str], files: list[Path]
) -> NDArray[np.uint8]:
    """BGR grid of thumbnails of ``files``, each region outlined in red, its name (``paths``) and confidence below."""
    images = _thumbnails(files)
    rows = math.ceil(len(members) / SHEET_COLUMNS)
    cols = min(len(members), SHEET_COLUMNS)
    sheet = np.full((rows * (THUMB + 18), cols * THUMB, 3), 255, np.uint8)
    for slot, (index, image) in enumerate(zip(members, images)):
        thumb = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        for region in (r for r in result.regions if r.image == index):
            mask = cv2.resize(region.mask.view(np.uint8), thumb.shape[1::-1], interpolation=cv2.INTER_NEAREST)
            contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(thumb, contours, -1, (0, 0, 255), 2)
        y, x = divmod(slot, SHEET_COLUMNS)
        top, left = y * (THUMB + 18), x * THUMB
        sheet[top : top + thumb.shape[0], left : left + thumb.shape[1]] = thumb
        label = f"{Path(paths[slot]).parent.name}/{Path(paths[slot]).stem} {result.confidence[index]:.2f}"
        label = label.encode("ascii", "replace").decode("ascii")  # Hershey fonts are ASCII; undecodable names crashed
        cv2.putText(sheet, _fit_label(label), (left + 2, top + THUMB + 13), _FONT, _FONT_SCALE, (0, 0, 0), 1)
    return sheet


def _fit_label(label: str) -> str:
    """The end of ``label`` (the name's stem and the confidence) that fits under its thumbnail, not over the next."""
    while len(label) > 1 and cv2.getTextSize(label, _FONT, _FONT_SCALE, 1)[0][0] > THUMB - 4:
        label = label[1:]
    return label


def _thumbnails(files: list[Path]) -> list[NDArray[np.uint8]]:
    """RGB thumbnails of ``files``, each shrunk as soon as it is decoded (64 camera frames held at once took
    gigabytes). 16-bit images share the depth the largest of them needs, as :func:`read_images` gives them: a
    12-bit frame is not black, and a dark one stays darker than a bright one."""
    thumbs, depths = [], []
    for file in files:
        pixels = read_pixels(file)
        depths.append(significant_bits(pixels))
        thumbs.append(_fit(pixels))  # cv2 shrinks uint16 as it does uint8
    shared = max((bits for bits in depths if bits is not None), default=16)
    return [as_rgb8(thumb, shared) for thumb in thumbs]


def _fit(image: NDArray[Any]) -> NDArray[Any]:
    h, w = image.shape[:2]
    scale = THUMB / max(h, w)
    # cv2's stubs drop the dtype
    return cv2.resize(  # type: ignore[return-value]
        image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA
    )
