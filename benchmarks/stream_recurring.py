"""A production line with a recurring defect, through `StreamingDetector` (README "Python API").

The stream: good training images of a category, then the same synthetic defect (a dark smudge at one fixed
spot, as a dirty lens or a roller mark would leave) on the next images, then good images again, two per call.
For each `admit` policy it prints how many images of each phase were flagged, by tens.

    python benchmarks/stream_recurring.py [--category PATH] [--good 40] [--smudged 50] [--after 20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BOTTLE  # noqa: E402

from anomaly import Detector, StreamingDetector  # noqa: E402
from anomaly.data.io import read_image  # noqa: E402


def smudge(image: np.ndarray) -> np.ndarray:
    """Darken a soft elliptical spot (60 % at its centre) at the same place on every image."""
    h, w = image.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    blob = np.exp(-(((yy - 0.35 * h) / (h / 30)) ** 2 + ((xx - 0.6 * w) / (w / 20)) ** 2))
    return (image * (1 - 0.6 * blob[..., None])).astype(np.uint8)


def run(category: Path, n_good: int, n_smudged: int, n_after: int, n_references: int, pool_size: int) -> None:
    paths = sorted((category / "train" / "good").iterdir())
    order = np.random.default_rng(0).permutation(len(paths))
    need = n_good + n_smudged + n_after + n_references
    if len(paths) < need:
        raise SystemExit(f"{category}: {len(paths)} training images, the stream needs {need}")
    images = [read_image(paths[i]) for i in order[:need]]
    references = images[need - n_references :]
    phases = [("good", images[:n_good])]
    phases.append(("smudged", [smudge(im) for im in images[n_good : n_good + n_smudged]]))
    phases.append(("good after", images[n_good + n_smudged : need - n_references]))
    stream = [(name, image) for name, part in phases for image in part]
    for admit in ("normal", "all"):
        line = StreamingDetector(Detector("musc").fit(references), pool_size=pool_size, admit=admit)
        flags: dict[str, list[bool]] = {}
        for start in range(0, len(stream), 2):
            batch = stream[start : start + 2]
            for (name, _), result in zip(batch, line.predict([image for _, image in batch]), strict=True):
                flags.setdefault(name, []).append(result.is_anomalous)
        for name, got in flags.items():
            tens = [sum(got[i : i + 10]) for i in range(0, len(got), 10)]
            print(f"admit={admit:6s} {name:10s} {sum(got):3d} / {len(got)} flagged; by tens {tens}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", type=Path, default=BOTTLE, help="category root with train/good")
    parser.add_argument("--good", type=int, default=40, help="good images before the defect recurs")
    parser.add_argument("--smudged", type=int, default=50, help="images carrying the recurring defect")
    parser.add_argument("--after", type=int, default=20, help="good images after it")
    parser.add_argument("--references", type=int, default=4, help="good references (few-shot)")
    parser.add_argument("--pool-size", type=int, default=64)
    args = parser.parse_args()
    run(args.category, args.good, args.smudged, args.after, args.references, args.pool_size)


if __name__ == "__main__":
    main()
