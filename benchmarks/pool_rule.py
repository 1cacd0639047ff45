"""The zero-shot pool rule on synthetic pools: realised false-positive share and share of defects flagged.

Normal scores from a Gaussian, an exponential or a log-normal; by default none, 5, 25 or 50 % (``--shares``) of a
pool of ``--size`` (default 200) are separable defects (beyond the normal 99.9 % quantile, spread exponentially).
The realised share is measured on 4,000 fresh normal scores per pool. ``--window`` judges each pool as a production
line's window of recent scores (``expect_defects=False``, as ``StreamingDetector`` does), not as a batch.

``--offset`` adds a floor to the normal scores (``1`` makes the exponential ones ``1.01 + Exp(1)``).

    python benchmarks/pool_rule.py --pools 8 [--size 83] [--shares 0.75] [--window] [--offset 1]
"""

from __future__ import annotations

import argparse

import numpy as np

from anomaly.thresholds import pool_threshold


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pools", type=int, default=8, help="pools per setting")
    parser.add_argument("--size", type=int, default=200, help="images per pool")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--shares", type=float, nargs="+", default=[0.0, 0.05, 0.25, 0.5], help="anomalous shares of a pool"
    )
    parser.add_argument("--window", action="store_true", help="judge pools as a stream's window of recent scores")
    parser.add_argument("--offset", type=float, default=0.0, help="a floor added to every normal score")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    families = {
        "gaussian": lambda n: rng.normal(10, 1, n) + args.offset,
        "exponential": lambda n: rng.exponential(1, n) + 0.01 + args.offset,
        "lognormal": lambda n: rng.lognormal(0, 0.5, n) + args.offset,
    }
    print("| target | normal scores | anomalous | realised FP share (mean / worst pool) | defects flagged |")
    print("|---|---|---|---|---|")
    for target in (0.01, 0.05):
        for name, draw in families.items():
            for share in args.shares:
                fps, caught = [], []
                for _ in range(args.pools):
                    n_anomalous = int(args.size * share)
                    q50, q999 = np.quantile(draw(100_000), [0.5, 0.999])
                    anomalous = q999 + rng.exponential(q999 - q50, n_anomalous)
                    pool = np.concatenate([draw(args.size - n_anomalous), anomalous])
                    threshold = pool_threshold(pool, target, expect_defects=not args.window).image
                    fps.append(np.mean(draw(4000) >= threshold))
                    if n_anomalous:
                        caught.append(np.mean(anomalous >= threshold))
                fp = f"{np.mean(fps):.4f} / {np.max(fps):.3f}"
                flagged = f"{np.mean(caught):.3f}" if caught else "-"
                print(f"| {target} | {name} | {share:.0%} | {fp} | {flagged} |")


if __name__ == "__main__":
    main()
