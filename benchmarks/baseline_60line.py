"""The naive baseline of issue 12, run on the dev suite: what default `patchcore` must beat.

tf_efficientnet_lite0 (packaged weights) blocks.2 + blocks.4, each 3x3-mean aggregated, blocks.4 upsampled to
the blocks.2 grid and concatenated; images squashed to 256x256 with timm's 0.5/0.5 normalisation; a random 25 %
of the training patches as the bank; exact FAISS L2 1-NN; the patch map upsampled to 256x256, Gaussian blur
sigma 4, image score = max of the blurred map; maps resized to each image's size for the pixel metrics. No
threshold, so no realised FPR.

    python benchmarks/baseline_60line.py --out /tmp/devsuite/results/baseline
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import faiss
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dev_suite import BOTTLE, category_arg, mean_row, suite_paths, write_tables  # noqa: E402

from anomaly.data.datasets import load_mvtec  # noqa: E402
from anomaly.data.io import read_images  # noqa: E402
from anomaly.evaluation import evaluate_samples  # noqa: E402
from anomaly.features import FeatureExtractor  # noqa: E402

SIZE, BANK_SHARE, SIGMA, BATCH = 256, 0.25, 4.0, 16


def patches(extractor: FeatureExtractor, paths: list[Path]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(N, h, w, C) patch features at the blocks.2 grid and the original (H, W) of each image."""
    feats, shapes = [], []
    for i in range(0, len(paths), BATCH):
        images = read_images(paths[i : i + BATCH])
        shapes += [im.shape[:2] for im in images]
        batch = np.stack([cv2.resize(im, (SIZE, SIZE), interpolation=cv2.INTER_AREA) for im in images])
        fine, coarse = (F.avg_pool2d(f, 3, 1, 1) for f in extractor(batch).layers)
        coarse = F.interpolate(coarse, size=fine.shape[-2:], mode="bilinear", align_corners=False)
        feats.append(torch.cat([fine, coarse], 1).permute(0, 2, 3, 1).numpy())
    return np.concatenate(feats), shapes


def run_category(extractor: FeatureExtractor, root: Path, seed: int) -> dict[str, float]:
    data = load_mvtec(root)
    start = time.perf_counter()
    train, _ = patches(extractor, [s.image_path for s in data.train])
    train = train.reshape(-1, train.shape[-1])
    keep = np.random.default_rng(seed).choice(len(train), round(BANK_SHARE * len(train)), replace=False)
    index = faiss.IndexFlatL2(train.shape[1])
    index.add(np.ascontiguousarray(train[keep]))
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    test, shapes = patches(extractor, [s.image_path for s in data.test])
    n, h, w, c = test.shape
    dist = np.sqrt(np.maximum(index.search(np.ascontiguousarray(test.reshape(-1, c)), 1)[0], 0)).reshape(n, h, w)
    scores, maps = [], []
    for d, (H, W) in zip(dist, shapes):
        blurred = cv2.GaussianBlur(cv2.resize(d, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR), (0, 0), SIGMA)
        scores.append(float(blurred.max()))
        maps.append(cv2.resize(blurred, (W, H), interpolation=cv2.INTER_LINEAR))
    ms = (time.perf_counter() - start) / n * 1000
    metrics = evaluate_samples(scores, data.test, maps).metrics
    return {**{k: v for k, v in metrics.items() if not isinstance(v, str)}, "fit_s": fit_s, "ms_per_image": ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/tmp/devsuite"))
    parser.add_argument("--bottle", type=Path, default=BOTTLE)
    parser.add_argument("--category", action="append", type=category_arg, help="suite name or category folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    extractor = FeatureExtractor(
        "tf_efficientnet_lite0", ["blocks.2", "blocks.4"], image_size=(SIZE, SIZE), mean=(0.5,) * 3, std=(0.5,) * 3
    )
    rows, seconds = [], {}
    for name, path in suite_paths(args.root, args.bottle, args.category).items():
        start = time.perf_counter()
        rows.append({"category": name, **run_category(extractor, path, args.seed)})
        seconds[name] = time.perf_counter() - start
        print(f"{name}: {seconds[name]:.0f} s", flush=True)
    rows.append(mean_row(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    print(write_tables(rows, args.out, {"script": "baseline_60line.py", "seed": args.seed, "wall_s": seconds}))
    print(f"total {sum(seconds.values()):.0f} s")


if __name__ == "__main__":
    main()
