"""A new normal look on a production line, through `StreamingDetector`: does confirming flagged frames stop a runaway?

Per category and seed: a few good references drawn from train/good, then good training images (not the
references), one frame per call. Two operators: one who never answers, and one who, when the stream reports a
burst of flags in its log, looks at the frames flagged among the last 40 and passes them to `confirm_normal` (they
are all good here). Prints the good frames flagged, in total and by twenty, for each.

    python benchmarks/stream_confirm.py [--category PATH ...] [--seeds 2] [--references 4] [--good 120]
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BOTTLE  # noqa: E402

from anomaly import Detector, StreamingDetector  # noqa: E402
from anomaly.streaming import _BURST_FRAMES  # noqa: E402

DEVSUITE = Path("/tmp/devsuite")


class BurstSeen(logging.Handler):
    """Notes that the stream reported a burst of flags (its one warning)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen = False

    def emit(self, record: logging.LogRecord) -> None:
        self.seen = self.seen or "frames flagged" in record.getMessage()


def stream(references: list[Path], frames: list[Path], answers: bool) -> list[bool]:
    """Verdicts of one stream; ``answers``: the operator confirms the recent flagged frames after a burst report."""
    burst = BurstSeen()
    logger = logging.getLogger("anomaly.streaming")
    logger.addHandler(burst)
    try:
        line = StreamingDetector(Detector("musc").fit(references), pool_size=64)
        recent: deque[tuple[Path, bool]] = deque(maxlen=_BURST_FRAMES)
        verdicts = []
        for frame in frames:
            flagged = line.predict([frame])[0].is_anomalous
            verdicts.append(flagged)
            recent.append((frame, flagged))
            if answers and burst.seen:
                line.confirm_normal([f for f, was_flagged in recent if was_flagged])
                recent.clear()
                burst.seen = False
        return verdicts
    finally:
        logger.removeHandler(burst)


def by_twenty(verdicts: list[bool]) -> str:
    return ", ".join(str(sum(verdicts[i : i + 20])) for i in range(0, len(verdicts), 20))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", type=Path, action="append", help="category root (repeatable)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--references", type=int, default=4, help="good references (few-shot)")
    parser.add_argument("--good", type=int, default=120, help="good frames per stream")
    args = parser.parse_args()
    logging.getLogger("anomaly").setLevel(logging.WARNING)
    logging.getLogger("anomaly").propagate = False  # the handler above sees the warning; the terminal need not
    categories = args.category or [DEVSUITE / "kolektor", DEVSUITE / "bsdata", DEVSUITE / "mtd_dev", BOTTLE]
    for category in categories:
        train = sorted((category / "train" / "good").iterdir())
        for seed in range(args.seeds):
            picked = random.Random(seed).sample(train, args.references + args.good)
            references, frames = picked[: args.references], picked[args.references :]
            for answers in (False, True):
                verdicts = stream(references, frames, answers)
                who = "confirms after a burst report" if answers else "never answers"
                print(
                    f"{category.name} seed {seed}, operator {who}: {sum(verdicts)} / {len(verdicts)} good frames "
                    f"flagged (by twenty: {by_twenty(verdicts)})",
                    flush=True,
                )


if __name__ == "__main__":
    main()
