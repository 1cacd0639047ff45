"""Peak memory of a `patchcore` fit by stage, on a category's train/good repeated to a larger set.

Each image is listed ``--repeat`` times (bottle's 209 images x 8: 1,672 training images at 256 px), so the fit
holds as many features as a set of that size would; a thread samples the resident set every 50 ms and keeps
the largest value seen during each stage of the fit's progress (``features``: decode + backbone; ``fit``: the
coreset cross-fit and the threshold). Peaks include what the allocator keeps after earlier stages.

    OMP_NUM_THREADS=1 python benchmarks/fit_memory.py [--category PATH] [--repeat 8]
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

from anomaly import Detector
from anomaly.data import list_images

DEFAULT_CATEGORY = Path(__file__).resolve().parents[2] / "shared/datasets/mvtec_ad/bottle"


def resident_mib() -> float:
    """The process's resident set now (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", type=Path, default=DEFAULT_CATEGORY)
    parser.add_argument("--repeat", type=int, default=8)
    parser.add_argument("--config", default="patchcore")
    args = parser.parse_args()
    files = list_images(args.category / "train" / "good")[0] * args.repeat
    stage, peaks = ["start"], {}

    def sample() -> None:
        while True:
            peaks[stage[0]] = max(peaks.get(stage[0], 0.0), resident_mib())
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    detector = Detector(args.config)
    detector.fit(files, progress=lambda name, done, total: stage.__setitem__(0, name))
    stage[0] = "end"
    time.sleep(0.2)
    print(
        f"{len(files)} training images, {args.config}: peak RSS (MiB) by stage "
        + ", ".join(f"{name} {mib:.0f}" for name, mib in peaks.items())
    )


if __name__ == "__main__":
    main()
