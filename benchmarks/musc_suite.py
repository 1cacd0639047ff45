"""MuSc on the dev suite (issue 12): zero-shot and few-shot (1, 2, 4 references) side by side.

    python benchmarks/musc_suite.py --out /tmp/devsuite/results/musc [--set scorer.params.augment_references=true]

Per category, the pool is a seeded subset of the test split (``--per-class`` normal and as many defective
images, so that every pool is the same mix; or, with ``--natural N``, N test images drawn at the split's own
mix, all of them when it has fewer, like a user scoring a whole test folder); ``k`` shots fit the detector on the
first ``k`` train/good images (references stay in the pool, with VisionAD's 6 support views when
``augment_references`` is on).
Metrics as ``dev_suite.py``; ``realised_fpr`` is the share of the pool's normal images flagged by the pool
threshold, ``defects_flagged`` (in ``suite.json`` and the progress lines) the share of its defective images
flagged; ``pools`` in ``suite.json`` keeps each pool's image scores, labels and paths, and the references' paths.
One table per shot count and their means in ``suite.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dev_suite import BOTTLE, category_arg, format_rows, mean_row, suite_paths  # noqa: E402

from anomaly import Detector  # noqa: E402
from anomaly.config import apply_overrides, load_config  # noqa: E402
from anomaly.data.datasets import load_mvtec  # noqa: E402
from anomaly.evaluation import evaluate_samples  # noqa: E402


def pool_subset(test: list, per_class: int, seed: int) -> list:  # type: ignore[type-arg]
    """``per_class`` normal and ``per_class`` defective test samples (fewer if a class is smaller), seeded."""
    rng = np.random.default_rng(seed)
    picked = []
    for label in (0, 1):
        group = [s for s in test if s.label == label]
        if len(group) < per_class:
            kind = "defective" if label else "normal"
            print(f"only {len(group)} {kind} test images (--per-class {per_class}): the pool takes them all")
        picked += [group[i] for i in sorted(rng.permutation(len(group))[:per_class])]
    return picked


def natural_subset(test: list, size: int, seed: int) -> list:  # type: ignore[type-arg]
    """``size`` test samples drawn without regard to label (all of them when there are fewer), seeded."""
    if len(test) <= size:
        return list(test)
    return [test[i] for i in sorted(np.random.default_rng(seed).permutation(len(test))[:size])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "-c", default="musc")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--root", type=Path, default=Path("/tmp/devsuite"))
    parser.add_argument("--category", action="append", type=category_arg, help="suite name or category folder")
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--natural", type=int, metavar="N", help="pools of N test images at the split's own mix")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    config = apply_overrides(load_config(args.config), args.overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    tables, all_rows, pools = [], {}, {}
    for shots in args.shots:
        rows = []
        for name, path in suite_paths(args.root, BOTTLE, args.category).items():
            data = load_mvtec(path)
            pool = (
                natural_subset(data.test, args.natural, seed=1)
                if args.natural
                else pool_subset(data.test, args.per_class, seed=0)
            )
            det = Detector(config)
            start = time.perf_counter()
            if shots:
                det.fit([s.image_path for s in data.train[:shots]])
            results = det.predict([s.image_path for s in pool])
            seconds = time.perf_counter() - start
            evaluation = evaluate_samples([r.image_score for r in results], pool, [r.anomaly_map for r in results])
            flagged = [r.is_anomalous for r, s in zip(results, pool) if not s.label]
            caught = [r.is_anomalous for r, s in zip(results, pool) if s.label]
            rows.append(
                {
                    "category": name,
                    **{k: v for k, v in evaluation.metrics.items() if not isinstance(v, str)},
                    "realised_fpr": float(np.mean(flagged)),
                    "defects_flagged": float(np.mean(caught)),
                    "fit_s": 0.0,
                    "ms_per_image": seconds / len(pool) * 1000,
                }
            )
            pools.setdefault(shots, {})[name] = {  # for replaying threshold rules on real pools
                "scores": [r.image_score for r in results],
                "labels": [s.label for s in pool],
                "paths": [str(s.image_path) for s in pool],
                "references": [str(s.image_path) for s in data.train[:shots]],
                "threshold": results[0].threshold,
                "n_reference": shots,
            }
            print(f"shots={shots} {name}: {seconds:.0f} s, defects flagged {np.mean(caught):.2f}", flush=True)
        rows.append(mean_row(rows))
        all_rows[shots] = rows
        tables.append(f"**{shots}-shot** ({config.scorer.params})\n\n{format_rows(rows)}")
    text = "\n\n".join(tables)
    (args.out / "suite.md").write_text(text + "\n")
    meta = {"overrides": args.overrides, "per_class": args.per_class, "natural": args.natural}
    meta["config_dict"] = config.to_dict()
    (args.out / "suite.json").write_text(
        json.dumps({"meta": meta, "rows": all_rows, "pools": pools}, indent=2, default=str)
    )
    print(text)


if __name__ == "__main__":
    main()
