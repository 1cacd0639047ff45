"""Type discovery on NEU-Seg with ground-truth regions: checks the describe + cluster steps alone.

NEU-Seg (github.com/DHW-Master/NEU_Seg): 200x200 grey steel-strip images, masks with classes 1-3
(inclusion, patches, scratches), no normal images. Every (image, class) mask is one region; the
regions are described and clustered with K=3 and scored region by region (NMI, ARI, F1 as
AnomalyNCD computes them).

    git clone https://github.com/DHW-Master/NEU_Seg /tmp/neu   # data is never committed
    python benchmarks/discovery_neu.py --root /tmp/neu [--split test] [--limit N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np

from anomaly.data.io import read_image
from anomaly.discovery import Region, RegionDescriber, cluster_descriptors
from anomaly.metrics.clustering import clustering_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="NEU_Seg checkout (images/, annotations/)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=0, help="about N images, evenly spaced (0 = all)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    masks = sorted((args.root / "annotations" / args.split).glob("*.png"))
    if args.limit:
        masks = masks[:: -(-len(masks) // args.limit)]
    images, regions, truth = [], [], []
    for path in masks:
        labels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        index = len(images)
        images.append(read_image(args.root / "images" / args.split / f"{path.stem}.jpg"))
        for cls in (c for c in np.unique(labels) if c > 0):
            mask = labels == cls
            ys, xs = np.nonzero(mask)
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            regions.append(Region(index, mask, box, int(mask.sum())))
            truth.append(int(cls))
    start = time.perf_counter()
    descriptors = RegionDescriber()(images, regions)
    described = time.perf_counter() - start
    given = cluster_descriptors(descriptors, k=3, unit="regions")
    estimated = cluster_descriptors(descriptors, unit="regions")
    metrics = clustering_metrics(truth, given.labels)
    result = {
        "images": len(images),
        "regions": len(regions),
        "per_class": {str(c): truth.count(c) for c in sorted(set(truth))},
        "k3": {"nmi": metrics.nmi, "ari": metrics.ari, "f1": metrics.f1},
        "k_estimated": estimated.k,
        "k_method": estimated.k_method,
        "k_confidence": estimated.k_confidence,
        "describe_s": described,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
