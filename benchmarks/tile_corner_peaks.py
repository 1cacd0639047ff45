"""A defect where four tiles overlap against the same defect on the same content inside one tile.

Frame A (4000 x 3000) and frame B, the same texture shifted by ``--shift`` px down and right, are built from a folder
of real texture images as ``tile_seams.py`` builds them (default: KolektorSDD's good training images of the dev suite,
benchmarks/README.md section 6). A dark disk of ``--radius`` px is painted in the middle of several four-tile overlaps
of A and on the same content in B, where it lies inside one tile. ``patchcore`` is fitted with
``preprocess.tile.size`` on eight 2000 x 1500 frames of the texture; the printed ratio is each disk's map peak in A
over the same disk's in B (1: the overlap costs nothing; benchmarks/README.md section 6, round 32).

    python benchmarks/tile_corner_peaks.py --out DIR [--source FOLDER] [--tile 512]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
from tile_seams import _DEFAULT_SOURCE, _frame, texture_files, training_frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the frames")
    parser.add_argument("--source", type=Path, default=Path(_DEFAULT_SOURCE), help="folder of texture images")
    parser.add_argument("--tile", type=int, default=512, help="preprocess.tile.size")
    parser.add_argument("--shift", type=int, default=175, help="B = A shifted by this many px down and right")
    parser.add_argument("--radius", type=int, default=10, help="disk radius in frame pixels")
    args = parser.parse_args()

    from anomaly import Detector
    from anomaly.config import apply_overrides, load_config

    files = texture_files(args.source)
    train = training_frames(files)
    wide = _frame(files[:8], 3000 + args.shift, 4000 + args.shift)
    a, b = wide[:3000, :4000].copy(), wide[args.shift :, args.shift :].copy()
    config = apply_overrides(load_config("patchcore"), [f"preprocess.tile.size={args.tile}"])
    detector = Detector(config)
    detector.fit([np.repeat(x[..., None], 3, axis=2) for x in train])
    layout = detector.view_spec.layout(a.shape, detector.extractor.image_size)
    side, scale = detector.extractor.image_size[0], a.shape[0] / layout.frame[0]
    ys, xs = sorted({y for y, _ in layout.origins}), sorted({x for _, x in layout.origins})
    sites = [  # the middle of the overlap of tiles i - 1, i (rows) and j - 1, j (columns), in frame pixels
        (int((ys[i] + ys[i - 1] + side) / 2 * scale), int((xs[j] + xs[j - 1] + side) / 2 * scale))
        for i in range(2, len(ys) - 1, 2)
        for j in range(2, len(xs) - 1, 3)
    ]
    for y, x in sites:
        cv2.circle(a, (x, y), args.radius, 30, -1)
        cv2.circle(b, (x - args.shift, y - args.shift), args.radius, 30, -1)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, image in (("A", a), ("B", b)):
        cv2.imwrite(str(args.out / f"{name}.png"), image)
    map_a, map_b = (r.anomaly_map for r in detector.predict([np.repeat(x[..., None], 3, axis=2) for x in (a, b)]))
    r = args.radius + 2
    ratios = [
        map_a[y - r : y + r + 1, x - r : x + r + 1].max()
        / map_b[y - args.shift - r : y - args.shift + r + 1, x - args.shift - r : x - args.shift + r + 1].max()
        for y, x in sites
    ]
    print(
        "a disk where four tiles overlap / the same disk inside one tile "
        f"{np.mean(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}, {len(ratios)} sites)"
    )


if __name__ == "__main__":
    main()
