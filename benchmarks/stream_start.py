"""The start of a production line, through `StreamingDetector`: are defects among the very first frames flagged?

Per category and seed: a few good references drawn from train/good, then ``--defects`` distinct defective test
images in a row (the first frames), then good training images (not the references), one frame per call. Prints
how many of those defective frames were flagged and how many of the good frames after them, per stream.

    python benchmarks/stream_start.py [--category PATH ...] [--seeds 4] [--references 4] [--defects 1] [--good 20]
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BOTTLE  # noqa: E402

from anomaly import Detector, StreamingDetector  # noqa: E402

DEVSUITE = Path("/tmp/devsuite")


def run(category: Path, seeds: int, n_references: int, n_defects: int, n_good: int) -> None:
    train = sorted((category / "train" / "good").iterdir())
    defects = sorted(p for p in (category / "test").glob("*/*") if p.parent.name != "good")
    defects_flagged, good_flagged = 0, []
    for seed in range(seeds):
        rng = random.Random(seed)
        picked = rng.sample(train, n_references + n_good)
        line = StreamingDetector(Detector("musc").fit(picked[:n_references]), pool_size=64)
        defects_flagged += sum(line.predict([image])[0].is_anomalous for image in rng.sample(defects, n_defects))
        good_flagged.append(sum(line.predict([image])[0].is_anomalous for image in picked[n_references:]))
    print(
        f"{category.name}: defective first frames flagged {defects_flagged} / {seeds * n_defects}; "
        f"good frames flagged of {n_good} per stream {good_flagged}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", type=Path, action="append", help="category root (repeatable)")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--references", type=int, default=4, help="good references (few-shot)")
    parser.add_argument("--defects", type=int, default=1, help="defective frames in a row at the start")
    parser.add_argument("--good", type=int, default=20, help="good frames after them")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the burst warning is not what is measured here
    for category in args.category or [BOTTLE, DEVSUITE / "transistor", DEVSUITE / "bsdata"]:
        run(category, args.seeds, args.references, args.defects, args.good)


if __name__ == "__main__":
    main()
