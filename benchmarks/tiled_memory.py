"""Peak memory and time of scoring one large frame with tiles (README, "Aspect ratio, resolution and tiling").

A synthetic blocky gray texture: eight 768 x 768 training images and one 6000 x 4000 frame with a 20 x 20 px
bright defect. ``patchcore`` is fitted with 256 px tiles (each tile seen at the 256 x 256 input: 651 tiles in the
frame), then the frame is scored in a fresh process; its peak RSS, time, score and whether the defect lies in the
map's top 1 % are printed. With ``--frames N`` the same frame is scored N times in one call (a folder of large
frames: the peak should stay at one frame's).

    python benchmarks/tiled_memory.py --out DIR [--tile 256] [--batch-size 16] [--frames 1]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SCORE = """
import sys, time
import numpy as np
from anomaly import Detector
from anomaly._runtime import peak_rss_mb
detector = Detector.load(sys.argv[1])
start = time.perf_counter()
result = detector.predict([sys.argv[2]] * int(sys.argv[3]))[-1]
seconds = time.perf_counter() - start
amap = result.anomaly_map
found = bool(amap[2000:2020, 3000:3020].max() >= np.quantile(amap, 0.99))
print(f"{sys.argv[3]} frame(s): score {result.image_score:.3f}; {seconds:.1f} s; peak RSS {peak_rss_mb():.0f} MiB; "
      f"defect in top 1 %: {found}")
"""


def texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """8 x 8 px blocks of random gray plus pixel noise."""
    blocks = rng.normal(128, 20, (height // 8 + 1, width // 8 + 1)).astype(np.float32)
    image = np.kron(blocks, np.ones((8, 8), np.float32))[:height, :width] + rng.normal(0, 6, (height, width))
    return np.clip(image, 0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--frames", type=int, default=1, help="score the frame this many times in one call")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    (args.out / "train").mkdir(parents=True, exist_ok=True)
    for i in range(8):
        Image.fromarray(texture(rng, 768, 768)).save(args.out / "train" / f"{i:02d}.png")
    frame = texture(rng, 4000, 6000)
    frame[2000:2020, 3000:3020] = 255
    Image.fromarray(frame).save(args.out / "frame.png")
    model = args.out / "model"
    sets = ["--set", f"preprocess.tile.size={args.tile}", "--set", f"batch_size={args.batch_size}"]
    fit = [sys.executable, "-m", "anomaly", "-q", "fit", "--out", str(model), *sets, str(args.out / "train")]
    subprocess.run(fit, check=True)
    score = [sys.executable, "-c", SCORE, str(model), str(args.out / "frame.png"), str(args.frames)]
    subprocess.run(score, check=True)


if __name__ == "__main__":
    main()
