"""Score a discovery (clusters.csv) against the defect-type folders of an MVTec-layout category."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from anomaly._fs import atomic_write_text, refuse_non_folder
from anomaly.data.datasets import load_ground_truth
from anomaly.errors import DataError
from anomaly.metrics.clustering import clustering_metrics
from anomaly.tables import read_clusters

__all__ = ["evaluate_discovery"]


def evaluate_discovery(
    clusters_dir: str | os.PathLike[str],
    category_root: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """NMI, ARI and F1 (Hungarian-matched accuracy) of the clusters against the true defect types.

    Images are matched to the category's test samples by (defect folder, file name), as in
    `anomaly evaluate --scores`. Normal (``good``) images that were clustered are left out of the
    metrics, as AnomalyNCD scores defective images only; their count is reported.

    Raises:
        DataError: no clusters.csv, an image that is not a test image of the category, or no
            defective image to score.
    """
    if out is not None:  # before the metrics are computed, as `evaluate --scores --out` checks its folder
        refuse_non_folder(Path(out))
    csv_path = Path(clusters_dir) / "clusters.csv"
    rows = read_clusters(clusters_dir)
    data = load_ground_truth(category_root)
    truth, predicted, n_good = [], [], 0
    for row, sample in zip(rows, data.match_test([r["path"] for r in rows], str(csv_path))):
        if sample.label == 0:
            n_good += 1
            continue
        truth.append(sample.defect_type)
        predicted.append(row["cluster"])
    if not truth:
        raise DataError(f"{csv_path}: no defective image among the clustered images")
    result = clustering_metrics(truth, predicted)
    metrics: dict[str, Any] = {
        "nmi": result.nmi,
        "ari": result.ari,
        "f1": result.f1,
        "n_images": result.n,
        "n_good_excluded": n_good,
        "n_types": len(set(truth)),
        "n_clusters": len(set(predicted)),
        "mapping": {str(k): str(v) for k, v in result.mapping.items()},
    }
    if out is not None:
        try:
            Path(out).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(f"{out}: cannot write here ({exc.strerror or exc})") from None
        atomic_write_text(Path(out) / "discovery_metrics.json", json.dumps(metrics, indent=2))
    return metrics
