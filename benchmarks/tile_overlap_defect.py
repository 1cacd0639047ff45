"""A defect inside a tile overlap, zero-shot: how far its map peak stands above a defect-free frame's.

Builds 4000 x 3000 gray frames from a folder of texture images as ``tile_seams.py`` does (default: KolektorSDD's good
training images of the dev suite, benchmarks/README.md section 6) and paints a dark disk of ``--radius`` px either
where four tiles overlap or inside one tile alone. Each defective frame is scored by ``musc`` zero-shot with
``preprocess.tile.size`` in a pool with one defect-free frame of other textures, through the CLI, as a user runs it.
The printed excess is the defect's map peak less the defect-free frame's map peak; an overlap that lets the two
tiles holding the defect vouch for each other shows as a smaller excess there than inside one tile.

    python benchmarks/tile_overlap_defect.py --out DIR [--source FOLDER] [--tile 512]
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
from tile_seams import _DEFAULT_SOURCE, _frame, texture_files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the frames and scores")
    parser.add_argument("--source", type=Path, default=Path(_DEFAULT_SOURCE), help="folder of texture images")
    parser.add_argument("--tile", type=int, default=512, help="preprocess.tile.size")
    parser.add_argument("--radius", type=int, default=10, help="disk radius in frame pixels")
    args = parser.parse_args()

    from anomaly import Detector
    from anomaly.config import apply_overrides, load_config

    files = texture_files(args.source)
    frame, clean = _frame(files[:8], 3000, 4000), _frame(files[8:16], 3000, 4000)
    tile = f"preprocess.tile={{size: {args.tile}}}"
    layout_of = Detector(
        apply_overrides(load_config("musc"), [tile, "preprocess.resize=stretch", "preprocess.bit_depth=8"])
    )
    layout = layout_of.view_spec.layout(frame.shape, layout_of.extractor.image_size)
    side = layout_of.extractor.image_size[0]
    ys, xs = sorted({y for y, _ in layout.origins}), sorted({x for _, x in layout.origins})
    scale = frame.shape[0] / layout.frame[0]
    places = {  # frame pixels: the middle of the overlap of tiles 2 and 3 of each axis; between two overlaps
        "overlap": (int((ys[3] + ys[2] + side) / 2 * scale), int((xs[3] + xs[2] + side) / 2 * scale)),
        "inside": (int((ys[2] + side + ys[4]) / 2 * scale), int((xs[2] + side + xs[4]) / 2 * scale)),
    }
    for name, (y, x) in places.items():
        pool = args.out / f"pool_{name}"
        pool.mkdir(parents=True, exist_ok=True)
        image = frame.copy()
        cv2.circle(image, (x, y), args.radius, 30, -1)
        cv2.imwrite(str(pool / "defect.png"), image)
        cv2.imwrite(str(pool / "clean.png"), clean)
        scores = args.out / f"scores_{name}"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "anomaly",
                "score",
                "--zero-shot",
                "--set",
                tile,
                "--maps",
                "--out",
                str(scores),
                str(pool),
            ],
            check=True,
        )
        rows = {Path(r["path"]).stem: r for r in csv.DictReader(open(scores / "scores.csv"))}
        peak = {k: float(np.load(scores / r["map_path"]).max()) for k, r in rows.items()}
        mask = np.zeros(frame.shape, np.uint8)
        cv2.circle(mask, (x, y), args.radius, 1, -1)
        defect_map = np.load(scores / rows["defect"]["map_path"])
        at_peak = bool(defect_map[mask > 0].max() >= peak["defect"])
        print(
            f"{name} (y {y}, x {x}): defect's map peak {peak['defect']:.4f} (at the defect: {at_peak}), "
            f"defect-free frame's {peak['clean']:.4f}, excess {peak['defect'] - peak['clean']:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
