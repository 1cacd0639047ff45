"""The zero-shot pool rule under harder pools than pool_rule.py: more families, clustered defects, 75 % shares.

Normal scores from a Gaussian, an exponential, a log-normal or a gamma(2); defects either spread exponentially beyond
the normal 99.9 % quantile (as pool_rule.py) or clustered 4 normal SDs above the normal median; 0, 5, 25, 50 or 75 %
of a pool (``--shares``). Each row is ``--pools`` pools seeded by their row, so two versions of the rule see the same
pools. Prints per target the mean realised false-positive share over the target, the rows beyond 2x, the worst pool
and the mean share of defects flagged.

    python benchmarks/pool_rule_stress.py --size 83 [--pools 12] [--rows] [--shares 0.85 0.9]
"""

from __future__ import annotations

import argparse
import zlib
from collections.abc import Callable

import numpy as np

from anomaly.thresholds import pool_threshold

Draw = Callable[[np.random.Generator, int], np.ndarray]
FAMILIES: dict[str, Draw] = {
    "gaussian": lambda r, n: r.normal(10, 1, n),
    "exponential": lambda r, n: r.exponential(1, n) + 0.01,
    "lognormal": lambda r, n: r.lognormal(0, 0.5, n),
    "gamma2": lambda r, n: r.gamma(2, 1, n) + 0.01,
}


def spread(r: np.random.Generator, draw: Draw, n: int) -> np.ndarray:
    q50, q999 = np.quantile(draw(r, 100_000), [0.5, 0.999])
    return q999 + r.exponential(q999 - q50, n)


def clustered(r: np.random.Generator, draw: Draw, n: int) -> np.ndarray:
    sample = draw(r, 100_000)
    return np.median(sample) + 4 * sample.std() + r.normal(0, sample.std(), n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=83, help="images per pool")
    parser.add_argument("--pools", type=int, default=12, help="pools per row")
    parser.add_argument("--rows", action="store_true", help="also print the rows beyond 2x or with a pool over 0.3")
    parser.add_argument(
        "--shares", type=float, nargs="+", default=[0.0, 0.05, 0.25, 0.5, 0.75], help="defective shares of a pool"
    )
    args = parser.parse_args()
    for target in (0.01, 0.05):
        rows = []
        for family, draw in FAMILIES.items():
            for kind, defects in (("spread", spread), ("clustered", clustered)):
                for share in args.shares:
                    if share == 0 and kind == "clustered":
                        continue
                    fps, caught = [], []
                    for pool_id in range(args.pools):
                        r = np.random.default_rng(zlib.crc32(repr((args.size, family, kind, share, pool_id)).encode()))
                        n_bad = int(args.size * share)
                        pool = np.concatenate([draw(r, args.size - n_bad), defects(r, draw, n_bad)])
                        threshold = pool_threshold(pool, target).image
                        fps.append(float(np.mean(draw(r, 4000) >= threshold)))
                        if n_bad:
                            caught.append(float(np.mean(pool[args.size - n_bad :] >= threshold)))
                    rows.append((family, kind, share, np.mean(fps), np.max(fps), np.mean(caught) if caught else None))
        ratio = np.array([row[3] / target for row in rows])
        worst = np.array([row[4] for row in rows])
        flagged = np.mean([row[5] for row in rows if row[5] is not None])
        print(
            f"target {target}: {len(rows)} rows, mean FP share / target {ratio.mean():.2f}, rows beyond 2x "
            f"{int(np.sum(ratio > 2))}, worst pool {worst.max():.3f}, rows with a pool over 0.3 "
            f"{int(np.sum(worst > 0.3))}, defects flagged {flagged:.3f}"
        )
        if args.rows:
            for family, kind, share, fp, top, hit in rows:
                if fp > 2 * target or top > 0.3:
                    print(f"  {family} {kind} {share:.0%}: FP {fp:.3f} / worst {top:.3f}, flagged {hit}")


if __name__ == "__main__":
    main()
