"""16-bit images from a camera of fewer bits: a category re-written as a B-bit camera would store it, scored twice.

Every image of an MVTec-layout category is written to ``--out/data`` as a 16-bit PNG holding its 8-bit values
times 2^(B - 8) (B = ``--bits``, 12 by default: 0..4080), the masks as they are. Then, through the CLI as a user
runs it, ``patchcore`` (fit + score + evaluate) and ``musc`` zero-shot (score + evaluate) with
``preprocess.bit_depth`` at ``auto`` (the default: the bits decided from the images, B) and at 16 (the images read
as full-range 16-bit data, as before the option existed). With ``auto`` the figures are those of the 8-bit
category, to every digit. benchmarks/README.md section 14.

    python benchmarks/bit_depth.py --out DIR [--category PATH] [--bits 12]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BOTTLE, anomaly_cli, run_process  # noqa: E402


def write_copy(category: Path, out: Path, bits: int) -> None:
    """The category's images as ``bits``-bit data in 16-bit PNGs; masks copied unchanged."""
    for path in sorted(category.rglob("*.png")):
        target = out / path.relative_to(category)
        target.parent.mkdir(parents=True, exist_ok=True)
        if "ground_truth" in path.relative_to(category).parts:
            target.write_bytes(path.read_bytes())
            continue
        pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if pixels.dtype != np.uint8:
            raise SystemExit(f"{path}: expected an 8-bit image, got {pixels.dtype}")
        cv2.imwrite(str(target), pixels.astype(np.uint16) << (bits - 8))


def metrics(scores: Path, root: Path, out: Path) -> dict[str, float]:
    run_process([*anomaly_cli(), "evaluate", "--scores", str(scores), "--root", str(root), "--out", str(out)]).check()
    result = json.loads((out / "metrics.json").read_text())
    return {k: result[k] for k in ("image_auroc", "pixel_auroc", "aupro", "aupimo")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--category", type=Path, default=BOTTLE)
    parser.add_argument("--bits", type=int, default=12, choices=range(9, 16))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    data = args.out / "data"
    if not data.is_dir():
        write_copy(args.category, data, args.bits)
    cli = anomaly_cli()
    rows = []
    for depth in ("auto", "16"):
        run = args.out / f"depth_{depth}"
        setting = ["--set", f"preprocess.bit_depth={depth}"]
        model, scored, pool = run / "model", run / "scores", run / "zero_shot"
        run_process([*cli, "-q", "fit", "--config", "patchcore", "--out", str(model), *setting, str(data)]).check()
        decided = json.loads((model / "config.json").read_text())["preprocess"]["bit_depth"]
        score_cmd = [*cli, "-q", "score", "--model", str(model), "--out", str(scored), "--maps", str(data / "test")]
        run_process(score_cmd).check()
        patchcore = metrics(scored, data, run / "eval_patchcore")
        zero_cmd = [*cli, "-q", "score", "--zero-shot", "--out", str(pool), "--maps", *setting, str(data / "test")]
        run_process(zero_cmd).check()
        musc = metrics(pool, data, run / "eval_musc")
        rows.append((depth, decided, patchcore, musc))
    print(
        f"| {args.category.name}, {args.bits}-bit data | bit_depth (decided) | patchcore image / pixel AUROC, AUPRO, "
        "AUPIMO | musc zero-shot image / pixel AUROC |"
    )
    print("|---|---|---|---|")
    for depth, decided, p, m in rows:
        print(
            f"| `{depth}` | {decided} | {p['image_auroc']:.3f} / {p['pixel_auroc']:.4f}, {p['aupro']:.3f}, "
            f"{p['aupimo']:.3f} | {m['image_auroc']:.3f} / {m['pixel_auroc']:.3f} |"
        )


if __name__ == "__main__":
    main()
