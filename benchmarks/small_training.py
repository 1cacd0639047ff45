"""Does the threshold hold its target when a model is fitted on 20 or 40 good images?

Below 99 training images a 1 % target lies beyond the cross-fitted scores, so the threshold extrapolates a
generalised Pareto tail fitted to the top scores (``tail-gpd`` in anomaly.thresholds). Per category, n and seed:
default ``patchcore`` fitted on a seeded n of train/good; scored: up to 60 of the remaining train/good plus
test/good (normal), and up to 80 defective test images. Each rule is replayed on the same recorded scores:

* ``tail-gpd``: the shipped rule (its cross-fitted scores captured from the fit);
* ``above all``: flag what scores above every cross-fitted training score;
* ``log tail-gpd``: the same tail fitted to the log scores.

    python benchmarks/small_training.py --out /tmp/small --category ../shared/datasets/mvtec_ad/bottle \
        --category /tmp/devsuite/bsdata [--n 20 --n 40 --seeds 3]
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import numpy as np

import anomaly.detector
from anomaly import Detector
from anomaly.data.datasets import load_mvtec
from anomaly.thresholds import calibrate

TARGET = 0.01


def record(root: Path, n: int, seed: int, out: Path) -> dict[str, list[float]]:
    """Cross-fitted training scores, held-out normal and defect scores of one fit (cached in ``out``)."""
    path = out / f"{root.name}_n{n}_s{seed}.json"
    if path.is_file():
        return json.loads(path.read_text())
    data = load_mvtec(root)
    train = [s.image_path for s in data.train]
    rng = random.Random(seed)
    picked = rng.sample(train, n)
    rest = [p for p in train if p not in set(picked)]
    normal = rng.sample(rest, min(60, len(rest))) + [s.image_path for s in data.test if not s.label]
    defects = rng.sample([s.image_path for s in data.test if s.label], min(80, sum(s.label for s in data.test)))
    seen: dict[str, list[float]] = {}
    real = anomaly.detector.calibrate

    def keep(scores, target, peaks=None):  # type: ignore[no-untyped-def]
        seen["training"] = np.asarray(scores, dtype=float).tolist()  # the fit exposes only their threshold
        return real(scores, target, peaks)

    anomaly.detector.calibrate = keep
    try:
        det = Detector("patchcore").fit(picked)
    finally:
        anomaly.detector.calibrate = real
    result = {
        "training": seen["training"],
        "normal": [r.image_score for r in det.predict(normal, maps=False)],
        "defect": [r.image_score for r in det.predict(defects, maps=False)],
    }
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return result


def _above_all(scores: np.ndarray) -> float:
    return float(np.nextafter(scores.max(), np.inf))


def _log_tail(scores: np.ndarray) -> float:
    return max(math.exp(calibrate(np.log(scores), TARGET).image), _above_all(scores))


RULES = {"tail-gpd": lambda s: calibrate(s, TARGET).image, "above all": _above_all, "log tail-gpd": _log_tail}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", type=Path, action="append", required=True, help="MVTec-layout category root")
    parser.add_argument("--n", type=int, action="append", help="training images (repeatable; default 20 and 40)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True, help="folder for the recorded scores (reused)")
    args = parser.parse_args()
    sizes = args.n or [20, 40]
    print(f"realised FPR / defects flagged / threshold over the highest training score; target {TARGET}")
    print("| category | n | " + " | ".join(RULES) + " |")
    print("|---|---|" + "---|" * len(RULES))
    totals: dict[tuple[int, str], list[tuple[float, float, float]]] = {}
    for root in args.category:
        for n in sizes:
            if n + 10 > len(load_mvtec(root).train):
                continue  # too few good images to hold any out
            cells = []
            for name, rule in RULES.items():
                runs = []
                for seed in range(args.seeds):
                    rec = record(root, n, seed, args.out)
                    training = np.asarray(rec["training"])
                    t = rule(training)
                    runs.append(
                        (
                            np.mean(np.asarray(rec["normal"]) >= t),
                            np.mean(np.asarray(rec["defect"]) >= t),
                            t / training.max(),
                        )
                    )
                totals.setdefault((n, name), []).extend(runs)
                fpr, caught, over = np.mean(runs, axis=0)
                cells.append(f"{fpr:.3f} / {caught:.2f} / {over:.2f}")
            print(f"| {root.name} | {n} | " + " | ".join(cells) + " |")
    for n in sizes:
        cells = [
            "{:.3f} / {:.2f} / {:.2f}".format(*np.mean(totals[(n, name)], axis=0))
            for name in RULES
            if (n, name) in totals
        ]
        print(f"| mean | {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
