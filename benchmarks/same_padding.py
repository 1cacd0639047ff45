"""Forward time of the backbone with TensorFlow "SAME" padding made static, against timm's per-call padding.

``FeatureExtractor`` replaces timm's ``Conv2dSame`` by plain convolutions for its fixed input size
(:func:`anomaly.features._static_same_padding`; identical outputs). This builds the extractor both ways in
one process, checks that the maps agree, and times the two alternately (median of five rounds each):

    OMP_WAIT_POLICY=PASSIVE python benchmarks/same_padding.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import anomaly.features as features  # noqa: E402

CASES = [  # (layers, batch, input size): patchcore's and musc's default layers, one streamed image, a large input
    (["blocks.2", "blocks.4"], 16, (256, 256)),
    (["blocks.2", "blocks.4"], 1, (256, 256)),
    (["blocks.2", "blocks.4", "blocks.6"], 16, (256, 256)),
    (["blocks.2", "blocks.4"], 4, (640, 640)),
]


def build(static: bool, layers: list[str], size: tuple[int, int]) -> features.FeatureExtractor:
    convert = features._static_same_padding
    if not static:
        features._static_same_padding = lambda *args: None  # type: ignore[assignment]
    try:
        return features.FeatureExtractor("tf_efficientnet_lite0", layers, image_size=size, device="cpu")
    finally:
        features._static_same_padding = convert


def main() -> None:
    for layers, batch, size in CASES:
        images = np.random.default_rng(0).integers(0, 255, (batch, *size, 3), dtype=np.uint8)
        static, dynamic = build(True, layers, size), build(False, layers, size)
        for a, b in zip(static(images).layers, dynamic(images).layers):
            assert (a - b).abs().max().item() <= 1e-5, "static padding changed the maps"
        seconds: dict[bool, list[float]] = {True: [], False: []}
        repeats = 20 if batch == 1 else 2
        for _ in range(5):
            for is_static, extractor in ((True, static), (False, dynamic)):
                start = time.perf_counter()
                for _ in range(repeats):
                    extractor(images)
                seconds[is_static].append((time.perf_counter() - start) / repeats)
        fast, slow = statistics.median(seconds[True]), statistics.median(seconds[False])
        print(
            f"{' + '.join(layers)}, batch {batch} at {size[0]}x{size[1]}: "
            f"{slow * 1000:.1f} -> {fast * 1000:.1f} ms per batch ({slow / fast:.2f}x)"
        )


if __name__ == "__main__":
    main()
