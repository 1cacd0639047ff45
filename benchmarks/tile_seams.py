"""Seams of tiled maps: the map's gradient at tile borders against the same content inside a tile.

Builds 4000 x 3000 gray frames from a folder of real texture images (default: KolektorSDD's good training images of
the dev suite, benchmarks/README.md section 6): each image's middle cropped, upscaled 1.5x and mirror-stacked, the
columns side by side. Frame B is frame A shifted by ``--shift`` px, so each of A's tile borders lands inside a tile
of B, on the same image content. For every config, fitted with ``preprocess.tile.size`` on eight 2000 x 1500 frames
of the same texture (``musc``: zero-shot, a pool of A, B and three training frames), the printed ratio is the
largest mean column gradient within 2 px of each vertical tile border of A over that of the same content in B; its
control takes the columns midway between borders. A ratio near 1 is no seam.

    python benchmarks/tile_seams.py --out DIR [--source FOLDER] [--config patchcore padim musc] [--tile 512]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

_DEFAULT_SOURCE = "/tmp/devsuite/kolektor/train/good"


def _column(path: Path, height: int) -> NDArray[np.uint8]:
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    h, w = image.shape
    part = cv2.resize(image[int(h * 0.2) : int(h * 0.85), 20 : w - 20], None, fx=1.5, fy=1.5)
    stack = np.concatenate([part, part[::-1]] * math.ceil(height / (2 * len(part))), axis=0)
    return stack[:height]


def _frame(files: list[Path], height: int, width: int) -> NDArray[np.uint8]:
    columns, filled, k = [], 0, 0
    while filled < width:
        column = _column(files[k % len(files)], height)
        columns.append(column[:, ::-1] if k % 2 else column)
        filled, k = filled + column.shape[1], k + 1
    return np.concatenate(columns, axis=1)[:, :width]


def texture_files(source: Path) -> list[Path]:
    """The image files of a texture folder, sorted."""
    return sorted(p for p in source.iterdir() if p.suffix.lower() in (".png", ".jpg", ".bmp"))


def training_frames(files: list[Path]) -> list[NDArray[np.uint8]]:
    """Eight 2000 x 1500 frames of six random textures each (seed 0): what the tiled configs are fitted on."""
    rng = np.random.default_rng(0)
    return [_frame([files[j] for j in rng.choice(len(files), 6, replace=False)], 1500, 2000) for _ in range(8)]


def tile_borders(detector: object, shape: tuple[int, int]) -> list[int]:
    """The frame columns where a tile of ``detector`` starts or ends (its own layout of a frame of ``shape``)."""
    layout = detector.view_spec.layout(shape, detector.extractor.image_size)  # type: ignore[attr-defined]
    width = detector.extractor.image_size[1]  # type: ignore[attr-defined]
    scale = shape[1] / layout.frame[1]
    return sorted({int(e * scale) for _, x in layout.origins for e in (x, x + width) if 0 < e < layout.frame[1]})


def seam_ratio(a: NDArray[np.float64], b: NDArray[np.float64], shift: int, borders: list[int]) -> tuple[float, float]:
    """(mean over A's tile ``borders``, control midway between them) of the 5 px max column gradient, A over B."""
    width = a.shape[1]
    grad_a, grad_b = (np.abs(np.diff(m, axis=1)).mean(0) for m in (a, b))

    def ratios(columns: list[int]) -> list[float]:
        kept = [c for c in columns if c - shift - 3 >= 0 and c + 3 <= width - shift]
        return [grad_a[c - 3 : c + 2].max() / grad_b[c - shift - 3 : c - shift + 2].max() for c in kept]

    mids = [(borders[i] + borders[i + 1]) // 2 for i in range(len(borders) - 1)]
    return float(np.mean(ratios(borders))), float(np.mean(ratios(mids)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the frames")
    parser.add_argument("--source", type=Path, default=Path(_DEFAULT_SOURCE), help="folder of texture images")
    parser.add_argument("--config", nargs="+", default=["patchcore", "padim", "musc"])
    parser.add_argument("--tile", type=int, default=512, help="preprocess.tile.size")
    parser.add_argument("--shift", type=int, default=175, help="B = A shifted by this many px")
    args = parser.parse_args()

    from anomaly import Detector
    from anomaly.config import apply_overrides, load_config

    files = texture_files(args.source)
    train = training_frames(files)
    wide = _frame(files[:8], 3000, 4000 + args.shift)
    a, b = wide[:, :4000], wide[:, args.shift :]
    args.out.mkdir(parents=True, exist_ok=True)
    for name, image in (("A", a), ("B", b)):
        cv2.imwrite(str(args.out / f"{name}.png"), image)
    rgb = [np.repeat(x[..., None], 3, axis=2) for x in (*train, a, b)]
    for name in args.config:
        detector = Detector(apply_overrides(load_config(name), [f"preprocess.tile.size={args.tile}"]))
        if detector.zero_shot:
            out = detector.predict([rgb[-2], rgb[-1], *rgb[:3]])
        else:
            out = detector.fit(rgb[:-2]).predict(rgb[-2:])
        borders = tile_borders(detector, a.shape)
        border, control = seam_ratio(*(r.anomaly_map.astype(np.float64) for r in out[:2]), args.shift, borders)
        print(f"{name}: tile borders / same content inside a tile {border:.3f} (control, midway: {control:.3f})")


if __name__ == "__main__":
    main()
