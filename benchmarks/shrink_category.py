"""Re-encode an MVTec-layout category small enough to travel to a device machine (64 MiB in all).

Images are resized to ``--size`` x ``--size`` (INTER_AREA) and saved as JPEG (``--quality``); masks are resized
nearest-neighbour and stay PNG. Figures measured on the copy are not comparable with the original's.

    python benchmarks/shrink_category.py CATEGORY OUT [--size 384] [--quality 95]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("category", type=Path, help="MVTec-layout category root (train/, test/, ground_truth/)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--quality", type=int, default=95)
    args = parser.parse_args()
    count = 0
    for path in sorted(args.category.rglob("*.png")):
        rel = path.relative_to(args.category)
        target = args.out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if rel.parts[0] == "ground_truth":
            mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
            cv2.imwrite(str(target), cv2.resize(mask, (args.size, args.size), interpolation=cv2.INTER_NEAREST))
        else:
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            small = cv2.resize(image, (args.size, args.size), interpolation=cv2.INTER_AREA)
            cv2.imwrite(str(target.with_suffix(".jpg")), small, [cv2.IMWRITE_JPEG_QUALITY, args.quality])
        count += 1
    size_mib = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file()) / 2**20
    print(f"{count} files written to {args.out} ({size_mib:.1f} MiB)")


if __name__ == "__main__":
    main()
