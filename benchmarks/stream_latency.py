"""Seconds per frame of a production line (`StreamingDetector`, one frame per call) and the pool threshold's share.

The line: `musc` with 4 good references and a rolling pool of 64, fed good training images of a category one at
a time. After a warm-up that fills the pool, it times the calls and, apart, `pool_threshold` on windows of recent
scores as the line computes them (mostly good, `expect_defects=False`).

    python benchmarks/stream_latency.py [--category PATH] [--warmup 30] [--frames 40]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BOTTLE  # noqa: E402

from anomaly import Detector, StreamingDetector  # noqa: E402
from anomaly.thresholds import pool_threshold  # noqa: E402


def run(category: Path, warmup: int, frames: int) -> None:
    paths = sorted((category / "train" / "good").iterdir())
    if len(paths) < 4 + warmup + frames:
        raise SystemExit(f"{category}: {len(paths)} training images, the run needs {4 + warmup + frames}")
    line = StreamingDetector(Detector("musc").fit(paths[:4]), pool_size=64)
    stream = paths[4 : 4 + warmup + frames]
    scores = [line.predict(path).image_score for path in stream[:warmup]]
    start = time.perf_counter()
    scores += [line.predict(path).image_score for path in stream[warmup:]]
    per_frame = (time.perf_counter() - start) / frames
    windows = [np.asarray(scores[: warmup + i + 1]) for i in range(frames)]
    start = time.perf_counter()
    for window in windows:
        pool_threshold(window, line.detector.config.threshold.target_fpr, expect_defects=False)
    per_threshold = (time.perf_counter() - start) / frames
    print(f"{category.name}: {per_frame:.3f} s a frame, of which the pool threshold about {per_threshold:.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--category", type=Path, default=BOTTLE)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--frames", type=int, default=40)
    args = parser.parse_args()
    run(args.category, args.warmup, args.frames)


if __name__ == "__main__":
    main()
