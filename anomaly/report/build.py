"""`anomaly report`: a self-contained HTML folder to review a scored image set in a browser.

The folder holds ``index.html`` (rendered by Jinja2), ``report-data.js`` (the numbers the page scripts use),
``assets/`` (CSS, JS, icon), ``thumbs/`` and ``views/`` (pictures). It opens from disk (file://): nothing is
fetched from outside it, so no server and no network are needed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from anomaly._fs import staged_dir
from anomaly.report.charts import aupimo_chart, pimo_chart, score_histogram
from anomaly.report.content import ReportContent, load_content, true_label
from anomaly.report.images import Rendered, render_item

__all__ = ["DATA_FILE", "build_report"]

DATA_FILE = "report-data.js"  # also marks a folder as a report that a rebuild may replace
_HERE = Path(__file__).parent
_WORKERS = min(8, os.cpu_count() or 1)  # OpenCV decode/resize/encode release the GIL
log = logging.getLogger(__name__)


def build_report(
    scores_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    evaluation_dir: str | os.PathLike[str] | None = None,
    discovery_dir: str | os.PathLike[str] | None = None,
    *,
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Write the report of an ``anomaly score`` output folder to ``out_dir`` (atomically) and return it.

    Args:
        scores_dir: Folder written by ``anomaly score`` (scores.csv, maps/, overlays/).
        out_dir: Report folder to create or replace (a folder holding something else is refused).
        evaluation_dir: Folder written by ``anomaly evaluate --out`` (metrics.json, ground_truth.json: the labels
            and masks shown, aupimo.json, pimo.json).
        discovery_dir: Folder written by ``anomaly discover`` (clusters.csv).
        progress: Called as ``progress("report", done, total)`` while pictures are written.

    Raises:
        DataError: a missing or malformed input, or an ``out_dir`` that is not a report.
    """
    content = load_content(
        Path(scores_dir),
        Path(evaluation_dir) if evaluation_dir is not None else None,
        Path(discovery_dir) if discovery_dir is not None else None,
    )
    out = Path(out_dir)
    with staged_dir(out, DATA_FILE) as tmp:
        rendered = _render_pictures(content, tmp, progress)
        page = _page(content, rendered)
        data = json.dumps(page["data"], separators=(",", ":"), allow_nan=False, ensure_ascii=False)
        (tmp / DATA_FILE).write_text(_utf8(f"window.ANOMALY_REPORT = {data};\n"), encoding="utf-8")
        shutil.copytree(_HERE / "static", tmp / "assets")
        env = Environment(loader=FileSystemLoader(_HERE / "templates"), autoescape=True, undefined=StrictUndefined)
        html = env.get_template("index.html.j2").render(**page)
        (tmp / "index.html").write_text(_utf8(html), encoding="utf-8")  # as the page declares, whatever the locale
    return out


def _utf8(text: str) -> str:
    """``text`` with each byte of a file name that is not UTF-8 (kept as a surrogate escape, as scores.csv keeps its
    bytes) as U+FFFD: the same in the page and in its data, whose folder and cluster names the filters compare."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _render_pictures(
    content: ReportContent, out: Path, progress: Callable[[str, int, int], None] | None
) -> list[Rendered]:
    total = len(content.items)
    width = len(str(total))
    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        futures = [pool.submit(render_item, it, out, f"{i:0{width}d}") for i, it in enumerate(content.items)]
        rendered = []
        try:
            for done, future in enumerate(futures, 1):
                rendered.append(future.result())
                if progress is not None:
                    progress("report", done, total)
        except BaseException:  # a damaged map, Ctrl-C, SIGTERM: the pictures not yet started are dropped, not all
            pool.shutdown(cancel_futures=True)  # rendered before the error comes (minutes for thousands of images)
            raise
    regenerated = sum(it.overlay is None and "overlay" in r.views for it, r in zip(content.items, rendered))
    if regenerated:
        log.info("%d overlay(s) regenerated from the maps (none in the scores folder)", regenerated)
    unreadable = [it.image for it, r in zip(content.items, rendered) if it.image is not None and "image" not in r.views]
    if unreadable:
        log.warning("%d image file(s) could not be decoded (first: %s): the report shows their overlays and maps only",
                    len(unreadable), unreadable[0])  # fmt: skip
    return rendered


def _slider_range(content: ReportContent) -> tuple[float, float]:
    """Score range of the slider: every score and the model threshold, plus a step above the top score."""
    scores = [it.score for it in content.items]
    lo, hi = min(min(scores), content.threshold), max(max(scores), content.threshold)
    pad = (hi - lo) * 0.01 or max(abs(hi) * 0.01, 1e-6)  # above the top score nothing is flagged
    return lo, hi + pad


def _page(content: ReportContent, rendered: list[Rendered]) -> dict[str, Any]:
    """Template variables; ``data`` goes to report-data.js for the page scripts."""
    items = content.items
    lo, hi = _slider_range(content)
    evaluation = content.evaluation
    folders: dict[str, int] = {}
    for it in items:
        folders[it.folder] = folders.get(it.folder, 0) + 1
    data = {
        "title": content.title,
        "threshold": content.threshold,
        "range": [lo, hi],
        "hasLabels": content.has_labels,
        "items": [
            {
                "path": it.path,
                "name": it.name,
                "folder": it.folder,
                "score": it.score,
                "label": it.label,
                "aupimo": it.aupimo,
                "cluster": it.cluster,
                "confidence": it.confidence,
                "views": r.views,
                "size": list(r.view_size),
            }
            for it, r in zip(items, rendered)
        ],
    }
    return {
        "data": data,
        "title": content.title,
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "n": len(items),
        "n_flagged": sum(it.score >= content.threshold for it in items),
        "threshold": content.threshold,
        "range": (lo, hi),
        "has_labels": content.has_labels,
        "labels_from": content.labels_from,
        "all_good": all(true_label(it.path) == 0 for it in items),
        "all_defective": all(
            true_label(it.path) == 1 and Path(it.path).parent.parent.name in ("test", "test_public") for it in items
        ),
        "n_anomalous": sum(it.label == 1 for it in items),
        "n_normal": sum(it.label == 0 for it in items),
        "cards": [{"item": it, "thumb": r, "rank": i + 1} for i, (it, r) in enumerate(zip(items, rendered))],
        "folders": sorted(folders.items()),
        "histogram": score_histogram(items, lo, hi, content.has_labels),
        "metrics": _metrics_rows(evaluation.metrics) if evaluation else [],
        "aupimo": aupimo_chart(evaluation, items) if evaluation else None,
        "pimo": pimo_chart(evaluation, items) if evaluation else None,
        "aupimo_error": evaluation.metrics.get("aupimo_error") if evaluation else None,
        "clusters": _clusters(content, rendered) if content.has_clusters else None,
        "data_file": DATA_FILE,
    }


_METRIC_NAMES = {
    "image_auroc": "Image AUROC",
    "image_ap": "Image AP",
    "image_f1max": "Image F1-max",
    "pixel_auroc": "Pixel AUROC",
    "pixel_ap": "Pixel AP",
    "pixel_f1max": "Pixel F1-max",
    "aupro": "AUPRO",
    "aupimo": "AUPIMO (mean)",
    "realised_fpr": "Normal images flagged (share)",
    "realised_tpr": "Anomalous images flagged (share)",
}


def _metrics_rows(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for key, label in _METRIC_NAMES.items():
        value = metrics.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            rows.append((label, f"{value:.4f}"))
    return rows


def _clusters(content: ReportContent, rendered: list[Rendered]) -> list[dict[str, Any]]:
    """Clusters by size: members (gallery indices, most confident first) and mean score/confidence."""
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(content.items):
        if it.cluster is not None:
            groups.setdefault(it.cluster, []).append(i)
    result = []
    for name, members in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        conf = [c for i in members if (c := content.items[i].confidence) is not None]
        folders: dict[str, int] = {}
        for i in members:
            folders[content.items[i].folder] = folders.get(content.items[i].folder, 0) + 1
        members.sort(key=lambda i: -(content.items[i].confidence or 0.0))
        result.append(
            {
                "name": name,
                "n": len(members),
                "confidence": sum(conf) / len(conf) if conf else None,
                "score": sum(content.items[i].score for i in members) / len(members),
                "folders": sorted(folders.items(), key=lambda kv: -kv[1]),
                "samples": [{"index": i, "item": content.items[i], "thumb": rendered[i]} for i in members[:6]],
            }
        )
    return result
