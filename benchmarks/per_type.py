"""Per-defect-type image and pixel AUROC of one config on one category (issue 12 analysis).

    python benchmarks/per_type.py /tmp/devsuite/mtd_dev --set backbone.mean=[0.5,0.5,0.5] \
        --set backbone.std=[0.5,0.5,0.5] [--intensity image --target-std 48]

Fits on train/good, scores test, and prints per defect type: image AUROC (that type against every
test/good image), pooled pixel AUROC (that type's and the good images' pixels) and the mean per-image
pixel AUROC inside the defective images (localisation alone). ``--intensity`` is an exploratory
photometric step applied to every image before the Detector sees it (not a Detector option):
``image`` standardises each image's intensities to mean 128 and ``--target-std``, ``category`` to
the median mean and std of the training images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray
from PIL import Image
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from anomaly import Detector  # noqa: E402
from anomaly.config import apply_overrides, load_config  # noqa: E402
from anomaly.data.datasets import load_mvtec  # noqa: E402
from anomaly.data.io import read_mask  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("category", type=Path)
    parser.add_argument("--config", "-c", default="patchcore")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--intensity", choices=("raw", "image", "category"), default="raw")
    parser.add_argument("--target-std", type=float, default=48.0)
    args = parser.parse_args()
    data = load_mvtec(args.category)

    def read(path: Path) -> NDArray[np.float32]:
        return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)

    mean, std = 128.0, args.target_std
    if args.intensity == "category":
        train = [read(s.image_path) for s in data.train]
        mean, std = float(np.median([a.mean() for a in train])), float(np.median([a.std() for a in train]))

    def load(path: Path) -> NDArray[np.uint8]:
        a = read(path)
        if args.intensity != "raw":
            a = (a - a.mean()) / (a.std() + 1e-6) * std + mean
        return np.clip(a, 0, 255).astype(np.uint8)

    detector = Detector(apply_overrides(load_config(args.config), args.overrides))
    detector.fit([load(s.image_path) for s in data.train])
    results = detector.predict([load(s.image_path) for s in data.test])
    labels = np.array([s.label for s in data.test])
    scores = np.array([r.image_score for r in results])
    maps, masks = [], []
    for sample, result in zip(data.test, results, strict=True):
        amap = result.anomaly_map
        truth = read_mask(sample.mask_path) if sample.mask_path is not None else np.zeros(amap.shape, bool)
        if truth.shape != amap.shape:
            amap = cv2.resize(amap, (truth.shape[1], truth.shape[0]), interpolation=cv2.INTER_LINEAR)
        maps.append(amap.ravel())
        masks.append(truth.ravel() > 0)
    pixel = roc_auc_score(np.concatenate(masks), np.concatenate(maps))
    print(f"all: image {roc_auc_score(labels, scores):.3f} pixel {pixel:.3f}")
    good = [i for i, s in enumerate(data.test) if s.label == 0]
    for kind in sorted({s.defect_type for s in data.test} - {"good"}):
        idx = [i for i, s in enumerate(data.test) if s.defect_type == kind]
        both = good + idx
        image = roc_auc_score(labels[both], scores[both])
        pooled = roc_auc_score(np.concatenate([masks[i] for i in both]), np.concatenate([maps[i] for i in both]))
        inside = np.mean([roc_auc_score(masks[i], maps[i]) for i in idx if 0 < masks[i].sum() < masks[i].size])
        print(f"{kind}: n {len(idx)} image {image:.3f} pixel {pooled:.3f} in-image {inside:.3f}")


if __name__ == "__main__":
    main()
