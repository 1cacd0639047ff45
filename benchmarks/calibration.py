"""Does the threshold hold its target false-positive rate on normal images that took no part in the fit?

Per category: a seeded share of train/good is held out; the detector is fitted on the rest with
``threshold.target_fpr``; the held-out images and test/good are scored. Reports the realised FPR on those
normal images, whether the flagged count lies in the central 95 % range of Binomial(n, target), and the
share of defective test images flagged.

    python benchmarks/calibration.py --category ../shared/datasets/mvtec_ad/bottle --category /tmp/devsuite/bsdata
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import binom

from anomaly import Detector
from anomaly.config import apply_overrides, load_config
from anomaly.data.datasets import load_mvtec


def run(root: Path, config: str, target: float, holdout: float, seed: int, overrides: list[str]) -> dict[str, object]:
    data = load_mvtec(root)
    train = [s.image_path for s in data.train]
    held = set(np.random.default_rng(seed).choice(len(train), round(holdout * len(train)), replace=False).tolist())
    fit_on = [p for i, p in enumerate(train) if i not in held]
    normal = [p for i, p in enumerate(train) if i in held] + [s.image_path for s in data.test if not s.label]
    defects = [s.image_path for s in data.test if s.label]
    det = Detector(apply_overrides(load_config(config), [f"threshold.target_fpr={target}", *overrides])).fit(fit_on)
    flagged = sum(r.is_anomalous for r in det.predict(normal, maps=False))
    caught = sum(r.is_anomalous for r in det.predict(defects, maps=False))
    lo, hi = binom.ppf(0.025, len(normal), target), binom.ppf(0.975, len(normal), target)
    assert det.decision_ is not None
    return {
        "category": root.name,
        "target_fpr": target,
        "fit_images": len(fit_on),
        "normal_images": len(normal),
        "flagged_normal": int(flagged),
        "realised_fpr": flagged / len(normal),
        "binomial_95": [int(lo), int(hi)],
        "within": bool(lo <= flagged <= hi),
        "defects_flagged": caught / max(1, len(defects)),
        "rule": det.decision_.rule,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--category", action="append", type=Path, required=True, help="MVTec-layout category root")
    parser.add_argument("--config", default="patchcore")
    parser.add_argument("--target", type=float, action="append", help="target FPR (repeatable; default 0.05)")
    parser.add_argument("--holdout", type=float, default=0.2, help="share of train/good held out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = [
        run(root, args.config, target, args.holdout, args.seed, args.overrides)
        for root in args.category
        for target in (args.target or [0.05])
    ]
    print("| category | target | normal images | flagged | realised FPR | binomial 95 % | within | defects flagged |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['category']} | {r['target_fpr']} | {r['normal_images']} | {r['flagged_normal']} | "
            f"{r['realised_fpr']:.3f} | {r['binomial_95'][0]}-{r['binomial_95'][1]} | {r['within']} | "
            f"{r['defects_flagged']:.3f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    sys.exit(0 if all(r["within"] for r in rows) else 1)


if __name__ == "__main__":
    main()
