"""A defective image among the few-shot references of `musc` (README "Thresholds", benchmarks/README.md section 13).

For each category and seed: 4 random training images as references, then 3 of them plus one random test defect
(`--defect` picks it), each scored with a pool of test images. Prints the highest reference score (a reference's
score is that of the image as given, not of its rotated or flipped support views) over the median of the other
three, and the threshold and flagged counts with the suspect-reference rule as shipped and with it disabled (the
highest reference score is then always the floor).

    python benchmarks/defective_reference.py [--category PATH ...] [--seeds 3] [--pool 10] [--defect TYPE/NAME]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BOTTLE  # noqa: E402
from training_defects import images_in  # noqa: E402

import anomaly.detector as detector_module  # noqa: E402
from anomaly import Detector  # noqa: E402

_shipped = detector_module.suspect_references
_captured: dict[str, float] = {}


def _spy(scores: np.ndarray, owners: list[str]) -> np.ndarray:
    """The shipped rule, recording the highest reference score over the median of the others'."""
    per = np.array([max(s for s, o in zip(scores, owners) if o == name) for name in dict.fromkeys(owners)])
    top = int(per.argmax())
    _captured["ratio"] = float(per[top] / np.median(np.delete(per, top)))
    return _shipped(scores, owners)


def run(category: Path, seed: int, n_pool: int, defect: str | None) -> None:
    rng = np.random.default_rng(seed)
    train = images_in(category / "train" / "good")
    good = images_in(category / "test" / "good")
    defects = [p for d in sorted((category / "test").iterdir()) if d.name != "good" for p in images_in(d)]
    references = [train[i] for i in rng.choice(len(train), 4, replace=False)]
    bad = category / "test" / defect if defect else defects[rng.integers(len(defects))]
    pool = [good[i] for i in rng.choice(len(good), min(n_pool, len(good)), replace=False)] if n_pool else good
    others = [p for p in defects if p != bad]
    pool += [others[i] for i in rng.choice(len(others), n_pool, replace=False)] if n_pool else others
    is_defect = np.array([p.parent.name != "good" for p in pool])
    for kind, chosen in (("4 good", references), ("3 good + 1 defective", references[:3] + [bad])):
        det = Detector("musc").fit([str(p) for p in chosen])
        line = f"{category.name} seed {seed}, {kind}:"
        for rule, patch in (
            ("rule", mock.patch.object(detector_module, "suspect_references", _spy)),
            (
                "no rule",
                mock.patch.object(detector_module, "suspect_references", lambda s, o: np.zeros(len(s), dtype=bool)),
            ),
        ):
            with patch:
                results = det.predict([str(p) for p in pool], maps=False)
            if rule == "rule":
                line += f" highest reference / others' median {_captured['ratio']:.2f};"
            flagged = np.array([r.is_anomalous for r in results])
            line += (
                f" {rule}: threshold {results[0].threshold:.3f}, {flagged[is_defect].sum()} / {is_defect.sum()}"
                f" defects and {flagged[~is_defect].sum()} / {(~is_defect).sum()} good flagged;"
            )
        print(line.rstrip(";"), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--category", type=Path, action="append", help="MVTec-layout category roots (default bottle)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pool", type=int, default=10, help="good and defective test images in the pool (0: all)")
    parser.add_argument("--defect", help="the defective reference, test/<TYPE/NAME> (default: a random one)")
    args = parser.parse_args()
    for category in args.category or [BOTTLE]:
        for seed in range(args.seeds):
            run(category, seed, args.pool, args.defect)


if __name__ == "__main__":
    main()
