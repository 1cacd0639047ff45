"""Synthetic datasets in MVTec AD layout, for tests, demos and smoke benchmarks.

Normal images are a shaded disk on a dark background (``kind="object"``, a bottle seen from above) or oriented
stripes (``kind="texture"``), with small random jitter and noise. Defects are painted with flat colours and their
masks are exactly the painted pixels.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from numpy.typing import NDArray

from anomaly.errors import DataError

__all__ = ["DEFECT_TYPES", "make_synthetic_category"]

DEFECT_TYPES: tuple[str, ...] = ("blob", "missing", "scratch")
"""Defects the generator can paint: a filled ellipse, a missing piece (the object's edge or the texture cut
out), and a thick line."""

_SCRATCH_RGB = (235, 228, 205)
_BLOB_RGB = {"object": (170, 60, 35), "texture": (40, 90, 170)}
_HOLE_RGB = (12, 12, 14)
_STREAMS = {"train": 0, "test_good": 1, "test_defect": 2}


def make_synthetic_category(
    out_root: str | os.PathLike[str],
    name: str = "synthetic",
    *,
    n_train: int = 16,
    n_test_good: int = 8,
    n_test_defect: int = 12,
    size: int | tuple[int, int] = 256,
    seed: int = 0,
    kind: Literal["object", "texture"] = "object",
    defect_types: tuple[str, ...] = DEFECT_TYPES,
) -> Path:
    """Write a synthetic category in MVTec AD layout.

    Writes ``<out_root>/<name>/train/good/NNN.png``, ``test/good/NNN.png``, ``test/<defect>/NNN.png`` and
    ``ground_truth/<defect>/NNN_mask.png`` (single channel, 0/255). Defective images cycle through
    ``defect_types``. Each image is drawn from its own seeded generator, so the output is identical for a given
    ``seed`` and an image does not change when the counts change.

    Args:
        out_root: Folder to create the category in.
        name: Category folder name.
        n_train: Normal training images.
        n_test_good: Normal test images.
        n_test_defect: Defective test images, in total over all defect types.
        size: Image size ``(H, W)``, or one int for a square; each side at least 32.
        seed: Random seed.
        kind: ``"object"`` or ``"texture"``.
        defect_types: Defects to paint, a subset of :data:`DEFECT_TYPES`.

    Returns:
        The category folder ``<out_root>/<name>``, loadable with :func:`anomaly.data.load_mvtec`.

    Raises:
        DataError: The category folder already exists and is not empty.
        ValueError: Invalid counts, size, kind or defect types.
    """
    height, width = (size, size) if isinstance(size, int) else size
    if min(height, width) < 32:
        raise ValueError(f"size must be at least 32 pixels per side, got {size}")
    if kind not in ("object", "texture"):
        raise ValueError(f"kind must be 'object' or 'texture', got {kind!r}")
    if n_train < 1 or n_test_good < 0 or n_test_defect < 0:
        raise ValueError(
            f"need n_train >= 1 and n_test_good, n_test_defect >= 0, got {n_train}, {n_test_good}, {n_test_defect}"
        )
    unknown = [d for d in defect_types if d not in DEFECT_TYPES]
    if unknown or not defect_types:
        raise ValueError(f"defect_types must be a non-empty subset of {DEFECT_TYPES}, got {defect_types}")
    root = Path(out_root, name)
    if root.exists() and any(root.iterdir()):
        raise DataError(f"synthetic category folder already exists and is not empty: {root}")

    grid = np.mgrid[0:height, 0:width].astype(np.float32)
    for split, count in (("train", n_train), ("test", n_test_good)):
        for i in range(count):
            rng = np.random.default_rng([seed, _STREAMS["train" if split == "train" else "test_good"], i])
            image, _, _ = _normal_image(rng, grid, kind)
            _write_png(root / split / "good" / f"{i:03d}.png", image)
    counters = dict.fromkeys(defect_types, 0)
    for i in range(n_test_defect):
        defect = defect_types[i % len(defect_types)]
        rng = np.random.default_rng([seed, _STREAMS["test_defect"], i])
        image, background, region = _normal_image(rng, grid, kind)
        mask = _paint_defect(rng, image=image, background=background, region=region, defect=defect, kind=kind)
        stem = f"{counters[defect]:03d}"
        counters[defect] += 1
        _write_png(root / "test" / defect / f"{stem}.png", image)
        _write_png(root / "ground_truth" / defect / f"{stem}_mask.png", mask.astype(np.uint8) * 255)
    return root


def _normal_image(
    rng: np.random.Generator, grid: NDArray[np.float32], kind: str
) -> tuple[NDArray[np.uint8], NDArray[np.uint8], NDArray[np.bool_]]:
    """Draw a normal image; also return what lies behind the object and where defects may go (``(H, W)``)."""
    yy, xx = grid
    height, width = yy.shape
    side = min(height, width)
    noise = rng.normal(0.0, 3.0, (height, width, 3)).astype(np.float32)
    if kind == "texture":
        theta = np.pi / 4 + rng.uniform(-0.05, 0.05)
        period = side / 10 * rng.uniform(0.95, 1.05)
        stripes = 0.5 + 0.5 * np.sin(
            2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period + rng.uniform(0, 2 * np.pi)
        )
        dark, light = np.array([90, 70, 50], np.float32), np.array([170, 140, 100], np.float32)
        image = dark + stripes[..., None] * (light - dark) * rng.uniform(0.95, 1.05)
        background = np.full((height, width, 3), _HOLE_RGB, np.float32)
        margin = 0.15 * side
        region = (yy > margin) & (yy < height - margin) & (xx > margin) & (xx < width - margin)
    else:
        cy = height / 2 + rng.uniform(-0.03, 0.03) * side
        cx = width / 2 + rng.uniform(-0.03, 0.03) * side
        radius = side * rng.uniform(0.33, 0.36)
        dist = np.hypot(yy - cy, xx - cx) / radius
        background = np.array([40, 40, 46], np.float32) + (yy / height * 12)[..., None]
        shading = 0.75 + 0.35 * (1 - np.minimum(dist, 1) ** 2) + 0.25 * ((dist > 0.82) & (dist < 0.95))
        body = np.array([70, 120, 80], np.float32) * rng.uniform(0.95, 1.05) * shading[..., None]
        alpha = np.clip((1 - dist) * radius / 1.5, 0, 1)[..., None]
        image = alpha * body + (1 - alpha) * background
        region = dist < 1
    return _to_uint8(image + noise), _to_uint8(background + noise), region


def _paint_defect(
    rng: np.random.Generator,
    *,
    image: NDArray[np.uint8],
    background: NDArray[np.uint8],
    region: NDArray[np.bool_],
    defect: str,
    kind: str,
) -> NDArray[np.bool_]:
    """Paint ``defect`` into ``image`` in place and return its exact mask ``(H, W)``."""
    height, width = region.shape
    side = min(height, width)
    ys, xs = np.nonzero(region)
    centre = np.array([ys.mean(), xs.mean()])
    extent = min(ys.max() - ys.min(), xs.max() - xs.min()) / 2  # object radius / texture half-size
    canvas = np.zeros((height, width), np.uint8)
    angle = rng.uniform(0, 2 * np.pi)
    if defect == "missing" and kind == "object":
        cy, cx = centre + extent * np.array([np.sin(angle), np.cos(angle)])
    else:
        r = extent * (0.4 if kind == "object" else 0.6) * np.sqrt(rng.uniform())
        cy, cx = centre + r * np.array([np.sin(angle), np.cos(angle)])
    point = (round(cx), round(cy))
    if defect == "scratch":
        half = side * rng.uniform(0.10, 0.14)
        tilt = rng.uniform(0, np.pi)
        offset = np.array([np.cos(tilt), np.sin(tilt)]) * half
        start = tuple(round(v) for v in np.array(point) - offset)
        end = tuple(round(v) for v in np.array(point) + offset)
        cv2.line(canvas, start, end, 1, thickness=max(2, round(side * 0.025)), lineType=cv2.LINE_8)
    else:
        scale = (0.05, 0.09) if defect == "blob" else (0.10, 0.14)
        axes = (round(side * rng.uniform(*scale)), round(side * rng.uniform(*scale)))
        cv2.ellipse(canvas, point, axes, rng.uniform(0, 180), 0, 360, 1, thickness=-1)
    mask = canvas.astype(bool) & region
    if defect == "missing":
        image[mask] = background[mask]
    else:
        colour = _SCRATCH_RGB if defect == "scratch" else _BLOB_RGB[kind]
        image[mask] = _to_uint8(np.array(colour, np.float32) + rng.normal(0.0, 3.0, (int(mask.sum()), 3)))
    return mask


def _to_uint8(array: NDArray[np.float32 | np.float64]) -> NDArray[np.uint8]:
    return np.clip(np.rint(array), 0, 255).astype(np.uint8)


def _write_png(path: Path, array: NDArray[np.uint8]) -> None:
    """Write an RGB or single-channel uint8 array as PNG (unicode-safe)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if array.ndim == 3 else array
    ok, encoded = cv2.imencode(".png", pixels)
    if not ok:
        raise DataError(f"cannot encode PNG: {path}")
    encoded.tofile(path)
