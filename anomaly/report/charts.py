"""Geometry of the report's SVG charts, computed here so that the templates only draw.

Every chart is a dict of plain numbers in SVG user units (a ``W`` x ``H`` view box): bars, polylines, ticks.
The score histogram also carries its axis (``x0, x1`` scores at ``px0, px1``) so the page can move the
threshold line without redrawing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import to_hex
from matplotlib.ticker import LogLocator, MaxNLocator

from anomaly.report.content import Evaluation, Item

__all__ = ["aupimo_chart", "pimo_chart", "score_histogram"]

W, H = 560, 240
LEFT, RIGHT, TOP, BOTTOM = 46, 14, 10, 38
_BINS = 40


class _Scale:
    """Linear map from data values [lo, hi] to pixels [p0, p1]."""

    def __init__(self, lo: float, hi: float, p0: float, p1: float) -> None:
        self.lo, self.hi, self.p0, self.p1 = lo, hi, p0, p1

    def __call__(self, v: float) -> float:
        return round(self.p0 + (v - self.lo) / (self.hi - self.lo or 1.0) * (self.p1 - self.p0), 2)


def _ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    return [float(t) for t in MaxNLocator(nbins=n).tick_values(lo, hi) if lo - 1e-12 <= t <= hi + 1e-12]


def _frame(w: int = W, h: int = H) -> tuple[float, float, float, float]:
    return LEFT, w - RIGHT, h - BOTTOM, TOP  # x0, x1, y0 (bottom), y1 (top)


def _bars(values: Sequence[float], edges: np.ndarray, x: _Scale, y: _Scale) -> list[dict[str, Any]]:
    counts, _ = np.histogram(values, bins=edges)
    return [
        {
            "x": x(edges[i]),
            "w": max(x(edges[i + 1]) - x(edges[i]) - 0.6, 0.6),
            "y": y(int(c)),
            "h": round(y(0) - y(int(c)), 2),
            "count": int(c),
            "lo": float(edges[i]),
            "hi": float(edges[i + 1]),
        }
        for i, c in enumerate(counts)
        if c
    ]


def score_histogram(items: Sequence[Item], lo: float, hi: float, has_labels: bool) -> dict[str, Any]:
    """Image-score histograms over [lo, hi]: normal vs anomalous with ground truth, else all images."""
    x0, x1, y0, y1 = _frame()
    edges = np.linspace(lo, hi, _BINS + 1)
    groups = (
        [("normal", "Normal (good)", [it.score for it in items if it.label == 0]),
         ("anomalous", "Anomalous", [it.score for it in items if it.label == 1])]
        if has_labels
        else [("all", "All images", [it.score for it in items])]
    )  # fmt: skip
    top = max(int(np.histogram(v, bins=edges)[0].max(initial=0)) for _, _, v in groups) or 1
    x = _Scale(lo, hi, x0, x1)
    y = _Scale(0, top, y0, y1)
    return {
        "w": W, "h": H, "x0": x0, "x1": x1, "y0": y0, "y1": y1,
        "axis": {"lo": lo, "hi": hi, "px0": x0, "px1": x1},
        "series": [{"key": k, "name": n, "n": len(v), "bars": _bars(v, edges, x, y)} for k, n, v in groups],
        "xticks": [{"x": x(t), "label": f"{t:g}"} for t in _ticks(lo, hi)],
        "yticks": [{"y": y(t), "label": f"{t:g}"} for t in _ticks(0, top, 4) if t == int(t)],
    }  # fmt: skip


def pimo_chart(evaluation: Evaluation, items: Sequence[Item]) -> dict[str, Any] | None:
    """PIMO curves (per-image TPR vs shared FPR, log x), coloured by AUPIMO, with the integration range."""
    pimo, summary = evaluation.pimo, evaluation.aupimo
    if not pimo or not summary or not pimo.get("shared_fpr"):
        return None
    fpr = np.asarray(pimo["shared_fpr"], dtype=float)
    lower, upper = summary["fpr_bounds"]
    lo_exp = math.floor(math.log10(lower)) - 1  # a decade below the integration range
    keep = fpr >= 10.0**lo_exp
    x0, x1, y0, y1 = _frame()
    x = _Scale(lo_exp, 0.0, x0, x1)
    y = _Scale(0.0, 1.0, y0, y1)
    xs = [x(math.log10(f)) for f in fpr[keep]]
    by_path = {it.path: it for it in items}
    cmap = colormaps["viridis"]
    curves = []
    for path, tpr in zip(pimo.get("paths", []), pimo["per_image_tpr"]):
        item = by_path.get(path)
        value = item.aupimo if item is not None else None
        ys = [y(float(t)) for t, k in zip(tpr, keep) if k]
        curves.append(
            {
                "points": " ".join(f"{a},{b}" for a, b in zip(xs, ys)),
                "color": to_hex(cmap(value if value is not None else 0.0)),
                "title": f"{item.name if item else path}: AUPIMO {value:.3f}" if value is not None else path,
            }
        )
    curves.sort(key=lambda c: c["color"])  # a stable draw order
    ticks = [t for t in LogLocator(base=10).tick_values(10.0**lo_exp, 1.0) if 10.0**lo_exp <= t <= 1.0]
    return {
        "w": W, "h": H, "x0": x0, "x1": x1, "y0": y0, "y1": y1,
        "curves": curves,
        "band": {"x": x(math.log10(lower)), "w": round(x(math.log10(upper)) - x(math.log10(lower)), 2)},
        "xticks": [{"x": x(math.log10(t)), "label": f"1e{round(math.log10(t))}" if t < 1 else "1"} for t in ticks],
        "yticks": [{"y": y(t), "label": f"{t:g}"} for t in _ticks(0, 1, 5)],
        "gradient": [to_hex(cmap(v)) for v in np.linspace(0, 1, 6)],
    }  # fmt: skip


def aupimo_chart(evaluation: Evaluation, items: Sequence[Item]) -> dict[str, Any] | None:
    """Per-image AUPIMO histogram on [0, 1] with the mean and its 95 % interval, plus the mean per folder."""
    summary = evaluation.aupimo
    values = [it.aupimo for it in items if it.aupimo is not None]
    if not summary or not values:
        return None
    w, h = 360, 200  # shown in a narrow panel: a smaller view box keeps the text legible
    x0, x1, y0, y1 = _frame(w, h)
    edges = np.linspace(0.0, 1.0, 21)
    top = int(np.histogram(values, bins=edges)[0].max())
    x = _Scale(0.0, 1.0, x0, x1)
    y = _Scale(0, top, y0, y1)
    mean = float(summary["mean"])
    ci = summary.get("ci95") or [None, None]
    has_ci = all(isinstance(c, (int, float)) and math.isfinite(c) for c in ci)
    folders: dict[str, list[float]] = {}
    for it in items:
        if it.aupimo is not None:
            folders.setdefault(it.folder, []).append(it.aupimo)
    return {
        "w": w, "h": h, "x0": x0, "x1": x1, "y0": y0, "y1": y1,
        "bars": _bars(values, edges, x, y),
        "mean": mean, "mean_x": x(mean),
        "ci": ci if has_ci else None,
        "ci_x": x(ci[0]) if has_ci else None,
        "ci_w": round(x(ci[1]) - x(ci[0]), 2) if has_ci else None,
        "n": len(values),
        "xticks": [{"x": x(t), "label": f"{t:g}"} for t in _ticks(0, 1, 5)],
        "yticks": [{"y": y(t), "label": f"{t:g}"} for t in _ticks(0, top, 4) if t == int(t)],
        "folders": [
            {"name": k, "n": len(v), "mean": float(np.mean(v)), "min": float(np.min(v))}
            for k, v in sorted(folders.items())
        ],
    }  # fmt: skip
