"""The CSV files the commands hand each other: scores.csv (`anomaly score`) and clusters.csv (`anomaly discover`).

Both keep file names exactly as the file system has them (UTF-8, raw bytes of other names kept as surrogate
escapes) and spreadsheet-safe (a cell that would start a formula gets a leading apostrophe, removed on reading).
Every reader here raises one :class:`DataError` line naming the file.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import TypedDict

from anomaly._fs import restore_interrupted
from anomaly.errors import DataError

__all__ = [
    "CLUSTER_COLUMNS",
    "CSV_COLUMNS",
    "CSV_ENCODING",
    "escape_cell",
    "find_scored_image",
    "is_flagged",
    "read_clusters",
    "read_scores",
    "score_number",
    "unescape_cell",
    "write_clusters",
    "write_scores",
]

CSV_COLUMNS = ["path", "score", "is_anomalous", "threshold", "pixel_threshold", "map_path", "overlay_path"]
CLUSTER_COLUMNS = ["path", "cluster", "confidence", "n_regions"]


class _TextEncoding(TypedDict):
    """The ``encoding`` and ``errors`` keyword arguments of ``open``."""

    encoding: str
    errors: str


# UTF-8; file names that are not valid UTF-8 keep their raw bytes, so every path reads back as the file system has it
CSV_ENCODING: _TextEncoding = {"encoding": "utf-8", "errors": "surrogateescape"}
# Cells starting with these are formulas to spreadsheet tools: written with a leading apostrophe
# (OWASP's CSV-injection advice); the readers remove it again.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def escape_cell(text: str) -> str:
    """Make a text cell safe to open in a spreadsheet (see :data:`_FORMULA_START`); a cell that starts with the
    apostrophe itself gets one more, so that ``'=x.png`` and ``=x.png`` stay two names."""
    return "'" + text if text.startswith((*_FORMULA_START, "'")) else text


def unescape_cell(text: str) -> str:
    """Undo :func:`escape_cell`."""
    return text[1:] if text.startswith("'") and text[1:].startswith((*_FORMULA_START, "'")) else text


def write_scores(path: Path, rows: list[dict[str, str]]) -> None:
    """Write scores.csv rows (the columns of :data:`CSV_COLUMNS`, paths made spreadsheet-safe)."""
    _write(path, CSV_COLUMNS, rows)


def write_clusters(path: Path, rows: list[dict[str, str]]) -> None:
    """Write clusters.csv rows (the columns of :data:`CLUSTER_COLUMNS`, paths made spreadsheet-safe)."""
    _write(path, CLUSTER_COLUMNS, rows)


def read_scores(out_dir: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Rows of OUT_DIR/scores.csv: columns path and score at least, each path once."""
    return _read(Path(out_dir) / "scores.csv", ["path", "score"], "anomaly score")


def read_clusters(out_dir: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Rows of OUT_DIR/clusters.csv: columns path and cluster at least, each path once."""
    return _read(Path(out_dir) / "clusters.csv", ["path", "cluster"], "anomaly discover")


def is_flagged(row: dict[str, str]) -> bool:
    """The ``is_anomalous`` cell of a scores.csv row (``true`` in any case: a spreadsheet saves ``TRUE``)."""
    return (row.get("is_anomalous") or "").strip().lower() == "true"


def score_number(row: dict[str, str], key: str, scores_dir: Path) -> float:
    """The finite number in column ``key`` of a scores.csv row, or DataError naming the file, the image and the key."""
    where = scores_dir / "scores.csv"
    try:
        value = float(row[key])
    except (TypeError, ValueError):
        raise DataError(f"{where}: {row['path']}: {key} {row.get(key)!r} is not a number") from None
    if not math.isfinite(value):
        raise DataError(f"{where}: {row['path']}: {key} is {value}")
    return value


def find_scored_image(path: str, scores_dir: Path) -> Path | None:
    """The image file of a scores.csv path: absolute, or relative to the cwd or else to SCORES_DIR; None if absent."""
    for candidate in (Path(path), scores_dir / path):
        if candidate.is_file():
            return candidate
    return None


def _write(path: Path, columns: list[str], rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="", **CSV_ENCODING) as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows({**row, "path": escape_cell(row["path"])} for row in rows)


def _read(path: Path, required: list[str], command: str) -> list[dict[str, str]]:
    if path.parent.is_file():  # the table itself given where its folder is asked for
        raise DataError(f"{path.parent}: a file; give the folder that holds it (the output folder of `{command}`)")
    restore_interrupted(path.parent)  # a run killed between its two renames left the previous folder as .<name>.old
    if not path.is_file():
        raise DataError(f"{path}: not found (run `{command}` first)")
    try:
        # utf-8-sig: a spreadsheet's "CSV UTF-8" starts with a byte-order mark, which would stick to the first column
        with path.open(newline="", encoding="utf-8-sig", errors=CSV_ENCODING["errors"]) as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            columns = reader.fieldnames or []  # read while the file is open: an empty file has no header to cache
    except (OSError, csv.Error) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None
    if not rows or not set(required) <= set(rows[0]):
        found = ",".join(str(c) for c in columns) or "none"
        raise DataError(f"{path}: expected columns {','.join(required)} and at least one row (found columns: "
                        f"{found[:200]}; {len(rows)} row(s))")  # fmt: skip
    seen: set[str] = set()
    for row in rows:
        row["path"] = unescape_cell(row["path"] or "")
        if row["path"] in seen:  # it would count twice in every metric, gallery and clustering
            raise DataError(f"{path}: {row['path']} is listed twice")
        seen.add(row["path"])
        flag = (row.get("is_anomalous") or "").strip().lower()
        if flag not in ("", "true", "false"):  # read as "not flagged" it would change verdicts without a word
            raise DataError(f"{path}: {row['path']}: is_anomalous {row['is_anomalous']!r} is not true or false")
    return rows
