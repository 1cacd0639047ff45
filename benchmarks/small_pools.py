"""The zero-shot pool rule on pools of 4-7 images (below the mixture's 8): the rule as shipped against median + 3 MAD.

Normal scores are log-normal (sigma ``--noise``); defects score ``--separation`` times higher (log-normal, sigma 0.1).
For each pool size and mix, the table gives the share of defects missed and of normal images flagged, averaged over
``--pools`` pools; pools without defects give the share of normal images flagged.

    python benchmarks/small_pools.py [--pools 300] [--separation 1.5 2.0]
"""

from __future__ import annotations

import argparse

import numpy as np

from anomaly.thresholds import pool_threshold


def _mad_rule(values: np.ndarray) -> float:
    median = float(np.median(values))
    mad = 1.4826 * float(np.median(np.abs(values - median)))
    return median + 3 * mad if mad > 0 else float(values.max()) * (1 + 1e-12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pools", type=int, default=300, help="pools per cell")
    parser.add_argument("--separation", type=float, nargs="+", default=[1.5, 2.0], help="defect / normal score")
    parser.add_argument("--noise", type=float, default=0.08, help="log-normal sigma of the normal scores")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    columns = "missed: shipped / median+3MAD | normal flagged: shipped / median+3MAD"
    print(f"| pool | normal + defective | separation | {columns} |")
    print("|---|---|---|---|---|")
    for n in range(4, 8):
        for n_bad in range(0, n - 1):
            for separation in args.separation if n_bad else [None]:
                missed, flagged = np.zeros(2), np.zeros(2)
                for _ in range(args.pools):
                    good = rng.lognormal(0, args.noise, n - n_bad)
                    bad = rng.lognormal(np.log(separation or 1.0), 0.1, n_bad)
                    pool = np.r_[good, bad]
                    for i, t in enumerate((pool_threshold(pool, 0.01).image, _mad_rule(pool))):
                        missed[i] += (bad < t).mean() if n_bad else 0.0
                        flagged[i] += (good >= t).mean()
                missed, flagged = missed / args.pools, flagged / args.pools
                sep = "-" if separation is None else f"{separation:.1f}x"
                miss = "-" if not n_bad else f"{missed[0]:.2f} / {missed[1]:.2f}"
                print(f"| {n} | {n - n_bad} + {n_bad} | {sep} | {miss} | {flagged[0]:.3f} / {flagged[1]:.3f} |")


if __name__ == "__main__":
    main()
