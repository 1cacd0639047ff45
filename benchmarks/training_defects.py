"""Defective images in a "good" training folder: does the memory bank forget the ones the threshold leaves out?

Fits `patchcore` (the default config, or with `--set` overrides) on a category's train/good plus N seeded test
defects of one type, then scores the type's other defects and test/good twice: with the bank as the fit left it
(outlying images' rows dropped by `Scorer.forget`) and, as the ablation, with `forget` disabled during the fit
(the bank keeps every row; the threshold is the same in both arms). Prints flagged counts, image AUROC, pixel
AUROC (every 4th pixel of the maps at full size) and the median defect score in units of the threshold.
benchmarks/README.md section 13.

    python benchmarks/training_defects.py [--category PATH] [--type contamination] [--planted 3] [--seed 0]
        [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from unittest import mock

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BOTTLE  # noqa: E402

from anomaly import Detector  # noqa: E402
from anomaly.config import apply_overrides, load_config  # noqa: E402
from anomaly.data.io import IMAGE_SUFFIXES  # noqa: E402
from anomaly.scorers.memory_bank import MemoryBankScorer  # noqa: E402


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def mask_of(category: Path, image: Path, shape: tuple[int, int]) -> np.ndarray:
    """The MVTec-layout mask of a test image at ``shape``, all False for good images."""
    path = category / "ground_truth" / image.parent.name / f"{image.stem}_mask.png"
    if not path.is_file():
        return np.zeros(shape, dtype=bool)
    return np.array(Image.open(path).convert("L").resize(shape[::-1], Image.NEAREST)) > 127


def evaluate(det: Detector, category: Path, defects: list[Path], good: list[Path]) -> str:
    results = det.predict(defects + good)
    scores = np.array([r.image_score for r in results])
    labels = np.r_[np.ones(len(defects)), np.zeros(len(good))]
    maps = [r.anomaly_map for r in results]
    pixel_scores = np.concatenate([m[::4, ::4].ravel() for m in maps])
    masks = [mask_of(category, path, m.shape) for path, m in zip(defects + good, maps, strict=True)]
    pixel_labels = np.concatenate([mask[::4, ::4].ravel() for mask in masks])
    flagged = scores >= det.threshold_
    return (
        f"{int(flagged[: len(defects)].sum())} / {len(defects)} defects and {int(flagged[len(defects) :].sum())} / "
        f"{len(good)} good flagged, image AUROC {roc_auc_score(labels, scores):.4f}, pixel AUROC "
        f"{roc_auc_score(pixel_labels, pixel_scores):.4f}, median defect score / threshold "
        f"{np.median(scores[: len(defects)]) / det.threshold_:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--category", type=Path, default=BOTTLE, help="an MVTec-layout category root")
    parser.add_argument("--type", default="contamination", help="the defect type (test/<type>) planted")
    parser.add_argument("--planted", type=int, default=3, help="how many of its images join the training folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    args = parser.parse_args()
    config = apply_overrides(load_config("patchcore"), args.set)
    train = images_in(args.category / "train" / "good")
    defects = images_in(args.category / "test" / args.type)
    chosen = np.random.default_rng(args.seed).choice(len(defects), args.planted, replace=False)
    planted = [defects[i] for i in sorted(chosen)]
    others = [p for p in defects if p not in planted]
    good = images_in(args.category / "test" / "good")
    arms = {
        "bank keeps every row (ablation)": mock.patch.object(MemoryBankScorer, "forget", return_value=0),
        "bank as fitted (Scorer.forget)": contextlib.nullcontext(),
    }
    for name, patch in arms.items():
        with patch:
            det = Detector(config).fit(train + planted)
        left_out = ", ".join(Path(p).name for p in det.excluded_training_) or "none"
        print(f"{name}: threshold {det.threshold_:.2f}, left out: {left_out}, bank {len(det.scorer.bank_)} rows")
        print(f"  {evaluate(det, args.category, others, good)}")


if __name__ == "__main__":
    main()
