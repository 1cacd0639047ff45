"""Why `anomaly discover` never estimates K = 1: the eigengaps of each category (benchmarks/README.md section 8).

For each category: the default `patchcore` fitted on train/good, every defective test image predicted (at most
120, seeded), regions and image descriptors made as `anomaly discover` makes them, and the gaps between the first
eleven eigenvalues of the same normalised Laplacian the eigengap estimate reads. Prints the first gap (what K = 1
would be chosen by), the largest later one and the K chosen now.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/discovery_first_gap.py CATEGORY_ROOT [CATEGORY_ROOT ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from anomaly import Detector
from anomaly.data import list_images
from anomaly.discovery.cluster import cluster_descriptors, laplacian_eigenvalues, pool_by_image
from anomaly.discovery.describe import RegionDescriber
from anomaly.discovery.pipeline import _describe
from anomaly.discovery.regions import find_regions

MAX_IMAGES = 120


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("categories", nargs="+", type=Path)
    args = parser.parse_args()
    print("| category (defect types) | first gap | largest later gap (at K) | K chosen now |\n|---|---|---|---|")
    for root in args.categories:
        detector = Detector("patchcore").fit(str(root / "train" / "good"))
        defective = [p for p in list_images(root / "test")[0] if p.parent.name != "good"]
        if len(defective) > MAX_IMAGES:
            picked = np.random.default_rng(0).choice(len(defective), MAX_IMAGES, replace=False)
            defective = sorted(defective[i] for i in picked)
        results = detector.predict(defective)
        regions, _ = find_regions([r.anomaly_map for r in results], [r.pixel_threshold for r in results])
        descriptors = _describe(RegionDescriber(), list(defective), regions, None)
        owner = np.array([r.image for r in regions])
        fraction = np.array([r.area / r.mask.size for r in regions])
        pooled = pool_by_image(descriptors, owner, fraction, len(defective)).astype(np.float64)
        gaps = np.diff(laplacian_eigenvalues(pooled, 11))  # from K = 1 on, where eigengaps() starts at K = 2
        later = int(np.argmax(gaps[1:])) + 2
        types = len({p.parent.name for p in defective})
        chosen = cluster_descriptors(pooled).k
        print(f"| {root.name} ({types}) | {gaps[0]:.3f} | {gaps[later - 1]:.3f} ({later}) | {chosen} |", flush=True)


if __name__ == "__main__":
    main()
