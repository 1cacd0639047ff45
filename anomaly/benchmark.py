"""`anomaly benchmark`: fit + score + evaluate per category, resumable, with tables and plots."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from anomaly._fs import atomic_write_text
from anomaly._runtime import peak_rss_mb
from anomaly.config import DetectorConfig
from anomaly.data.datasets import CategoryData, find_categories, load_folder, load_mvtec, load_visa
from anomaly.detector import Detector
from anomaly.errors import DataError
from anomaly.evaluation import ground_truth_masks, metrics_for
from anomaly.metrics import pimo_curves
from anomaly.outputs import PNG_FAST, overlay

__all__ = ["COLUMNS", "format_table", "run_benchmark"]

log = logging.getLogger(__name__)

COLUMNS = [
    "category",
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "aupimo",
    "image_ap",
    "pixel_ap",
    "image_f1max",
    "pixel_f1max",
    "realised_fpr",
    "fit_s",
    "ms_per_image",
    "peak_mem_mb",
    "peak_gpu_mb",
]
_N_OVERLAYS = 4


def run_benchmark(
    dataset: str,
    root: str | os.PathLike[str],
    categories: list[str],
    config: DetectorConfig,
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every category, skipping those with results unless ``force``; returns rows incl. ``mean``."""
    root, out_dir = Path(root), Path(out)
    if not root.is_dir():
        raise DataError(f"--root {root}: folder not found")
    names = categories or (find_categories(root, dataset) if dataset != "folder" else [root.name])  # type: ignore[arg-type]
    if not names:
        raise DataError(f"--root {root}: no {dataset} category found")
    rows = []
    for name in names:
        result_file = out_dir / name / "result.json"
        done = json.loads(result_file.read_text()) if result_file.is_file() and not force else None
        if done is not None and done.get("config") == config.to_dict():
            log.info("%s: already done, skipped (use --force to re-run)", name)
            rows.append(done["row"])
            continue
        log.info("%s: running", name)
        rows.append(_run_category(_load(dataset, root, name), config, out_dir / name, progress))
    rows.append(_mean_row(rows))
    _write_tables(rows, out_dir)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the main columns."""
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def _load(dataset: str, root: Path, name: str) -> CategoryData:
    if dataset == "mvtec":
        return load_mvtec(root / name)
    if dataset == "visa":
        return load_visa(root, name)
    defects = [d for d in sorted(root.iterdir()) if d.is_dir() and d.name not in ("good", "masks", "ground_truth")]
    mask_root = next((root / m for m in ("masks", "ground_truth") if (root / m).is_dir()), None)
    mask_dirs = [mask_root / d.name for d in defects] if mask_root is not None else None
    return load_folder(root / "good", defects, mask_dirs)  # type: ignore[arg-type]


def _run_category(data: CategoryData, config: DetectorConfig, out: Path, progress: Any) -> dict[str, Any]:
    detector = Detector(config)
    cuda = detector.extractor.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if not detector.zero_shot:
        detector.fit([s.image_path for s in data.train], progress=progress)
    fit_s = time.perf_counter() - start
    test = data.test
    start = time.perf_counter()
    results = [r for r, _ in detector.predict_stream([s.image_path for s in test], maps=True, progress=progress)]
    ms_per_image = (time.perf_counter() - start) / len(test) * 1000
    scores = [r.image_score for r in results]
    maps = [r.anomaly_map for r in results] if results[0].anomaly_map is not None else None
    metrics = metrics_for(scores, test, maps)  # type: ignore[arg-type]
    row = {
        "category": data.name,
        **{k: v for k, v in metrics.items() if not isinstance(v, str)},
        "realised_fpr": _realised_fpr(results, test),
        "fit_s": fit_s,
        "ms_per_image": ms_per_image,
        "peak_mem_mb": peak_rss_mb(),
    }
    if cuda:
        row["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    out.mkdir(parents=True, exist_ok=True)
    per_image = None
    if maps is not None:
        per_image = _pimo_plot(maps, test, out / "pimo.png", data.name)
        _overlays(results, test, out / "overlays")
    record = {
        "config": config.to_dict(),
        "row": row,
        "aupimo_error": metrics.get("aupimo_error"),
        "per_image": [
            {
                "path": str(s.image_path),
                "label": s.label,
                "score": r.image_score,
                "aupimo": None if per_image is None or math.isnan(per_image[i]) else float(per_image[i]),
            }
            for i, (s, r) in enumerate(zip(test, results))
        ],
    }
    atomic_write_text(out / "result.json", json.dumps(_nan_to_none(record), indent=2))
    return row


def _realised_fpr(results: list[Any], samples: list[Any]) -> float:
    """Share of the normal test images flagged anomalous at the detector's own threshold (NaN if none)."""
    flags = [r.is_anomalous for r, s in zip(results, samples) if s.label == 0]
    return float(np.mean(flags)) if flags else math.nan


def _pimo_plot(maps: list[np.ndarray], samples: list[Any], path: Path, title: str) -> np.ndarray | None:
    """Plot PIMO curves (per-image TPR vs shared FPR, log x) and return per-image AUPIMO."""
    from anomaly.metrics import aupimo

    masks = ground_truth_masks(samples, [m.shape for m in maps])
    try:
        result = aupimo(maps, masks)
        curves = pimo_curves(maps, masks, num_thresholds=10_000)  # enough points for a plot
    except (ValueError, RuntimeError) as exc:
        log.warning("%s: no PIMO plot (%s)", title, exc)
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    for i in np.flatnonzero(curves.is_anomalous):
        ax.plot(curves.shared_fpr, curves.per_image_tpr[i], lw=0.7, alpha=0.6)
    lo, hi = result.fpr_bounds
    ax.axvspan(lo, hi, color="grey", alpha=0.15, label=f"AUPIMO range, mean {result.mean:.3f}")
    ax.set(
        xscale="log",
        xlim=(lo / 10, 1),
        ylim=(0, 1.02),
        xlabel="shared FPR (normal images)",
        ylabel="per-image TPR",
        title=f"PIMO: {title}",
    )
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return result.per_image


def _overlays(results: list[Any], samples: list[Any], folder: Path) -> None:
    """A few overlays: the highest-scoring anomalous images and the highest-scoring normal one."""
    from anomaly.data.io import read_image

    folder.mkdir(parents=True, exist_ok=True)
    anomalous = sorted((i for i, s in enumerate(samples) if s.label), key=lambda i: -results[i].image_score)
    normal = sorted((i for i, s in enumerate(samples) if not s.label), key=lambda i: -results[i].image_score)
    for i in anomalous[: _N_OVERLAYS - 1] + normal[:1]:
        image = read_image(samples[i].image_path)
        name = f"{samples[i].defect_type}_{samples[i].image_path.stem}.png"
        cv2.imwrite(
            str(folder / name),
            overlay(image, results[i].anomaly_map, results[i].pixel_threshold),
            PNG_FAST,
        )


def _mean_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    mean: dict[str, Any] = {"category": "mean"}
    for col in COLUMNS[1:]:
        values = [r[col] for r in rows if isinstance(r.get(col), (int, float))]
        if values:
            mean[col] = float(np.max(values)) if col.startswith("peak_") else float(np.mean(values))
    return mean


def _write_tables(rows: list[dict[str, Any]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    tmp = out / ".results.csv.tmp"
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(out / "results.csv")
    atomic_write_text(out / "results.json", json.dumps(_nan_to_none(rows), indent=2))
    atomic_write_text(out / "results.md", format_table(rows) + "\n")


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}" if abs(value) <= 1 else f"{value:.1f}"
    return "" if value is None else str(value)
