"""Score-level ensembles of detector configs on the dev suite: is two backbones' verdict better than one?

Each variant (`patchcore` plus `--set`-style overrides) is fitted per category and scores the test split; its
image scores and maps are divided by its own threshold (the cross-fitted 1 - target_fpr quantile of normal
scores), so every member speaks in "times its threshold". Members are then combined per image, as `mean` (maps
and image scores averaged), `max` (pixel-wise and score-wise maximum) or `geomean`, and evaluated like
`dev_suite.py`. The normalised outputs are cached under OUT, so combinations of cached variants cost nothing.

    python benchmarks/score_ensemble.py --out /tmp/ens --category bsdata --category bottle \
        --variant in= --variant n05="backbone.mean=[0.5,0.5,0.5];backbone.std=[0.5,0.5,0.5]"

Not a Detector option (benchmarks/README.md section 6, round 7): the figures decide whether one is worth it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dev_suite import BOTTLE, category_arg, suite_paths  # noqa: E402

from anomaly.config import apply_overrides, load_config  # noqa: E402
from anomaly.data.datasets import load_mvtec  # noqa: E402
from anomaly.detector import Detector  # noqa: E402
from anomaly.evaluation import evaluate_samples  # noqa: E402

COMBINE = {
    "mean": lambda parts: np.mean(parts, axis=0),
    "max": lambda parts: np.max(parts, axis=0),
    "geomean": lambda parts: np.exp(np.mean(np.log(np.maximum(parts, 1e-12)), axis=0)),
}


def normalised_outputs(root: Path, overrides: list[str], cache: Path) -> tuple[np.ndarray, list[np.ndarray]]:
    """Image scores and maps of the test split, divided by the variant's threshold (cached as .npz)."""
    if not cache.exists():
        data = load_mvtec(root)
        detector = Detector(apply_overrides(load_config("patchcore"), overrides))
        detector.fit([s.image_path for s in data.train])
        results = detector.predict([s.image_path for s in data.test], maps=True)
        t = results[0].threshold
        cache.parent.mkdir(parents=True, exist_ok=True)
        maps = {f"map{i}": r.anomaly_map / t for i, r in enumerate(results)}
        partial = cache.with_suffix(".partial.npz")  # an interrupted run leaves no cache entry behind
        np.savez(partial, scores=np.array([r.image_score / t for r in results]), **maps)  # type: ignore[arg-type]
        os.replace(partial, cache)
    stored = np.load(cache)
    return stored["scores"], [stored[f"map{i}"] for i in range(len(stored["scores"]))]


def _cache_name(category: str, name: str, overrides: list[str]) -> str:
    """One cache file per category, variant name and overrides (a reused name with new overrides runs anew)."""
    return f"{category}_{name}_{hashlib.sha1(';'.join(overrides).encode()).hexdigest()[:10]}.npz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/tmp/devsuite"))
    parser.add_argument("--bottle", type=Path, default=BOTTLE)
    parser.add_argument("--category", action="append", type=category_arg, required=True)
    parser.add_argument(
        "--variant", action="append", required=True, metavar="NAME=KEY=VALUE;KEY=VALUE", help="'NAME=' is patchcore"
    )
    parser.add_argument("--out", type=Path, required=True, help="cache of normalised outputs")
    args = parser.parse_args()
    variants = {}
    for spec in args.variant:
        name, _, rest = spec.partition("=")
        variants[name] = [s for s in rest.split(";") if s]
    for category, root in suite_paths(args.root, args.bottle, args.category).items():
        test = load_mvtec(root).test
        outputs = {
            name: normalised_outputs(root, sets, args.out / _cache_name(category, name, sets))
            for name, sets in variants.items()
        }
        rows = dict(outputs)
        if len(outputs) > 1:
            for how, combine in COMBINE.items():
                scores = combine(np.stack([s for s, _ in outputs.values()]))
                maps = [combine(np.stack(parts)) for parts in zip(*(m for _, m in outputs.values()))]
                rows[f"{'+'.join(outputs)} {how}"] = (scores, maps)
        for name, (scores, maps) in rows.items():
            m = evaluate_samples(list(scores), test, maps).metrics
            auroc = f"{m['image_auroc']:.4f} | {m['pixel_auroc']:.4f}"
            print(f"| {category} | {name} | {auroc} | {m['aupro']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
