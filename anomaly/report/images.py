"""The picture files of a report: a gallery thumbnail and the full-size views of one scored image."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

from anomaly.data.io import load_map, read_image, read_mask
from anomaly.errors import DataError
from anomaly.outputs import overlay
from anomaly.report.content import Item

__all__ = ["THUMB_SIZE", "VIEW_SIZE", "Rendered", "render_item"]

THUMB_SIZE = 192  # longest side of a gallery thumbnail, pixels
VIEW_SIZE = 2048  # the viewer shows images at their own size up to this longest side (MVTec AD, VisA, KolektorSDD
# frames); larger ones are scaled to it, or a report of a thousand 12 MP frames would take gigabytes
_JPEG = [cv2.IMWRITE_JPEG_QUALITY, 88]
_TRUTH_BGR = (80, 220, 60)  # ground-truth outline on the mask view


@dataclass
class Rendered:
    """Report-relative file names (POSIX) of one item's pictures and their pixel sizes (width, height)."""

    thumb: str
    thumb_size: tuple[int, int]
    view_size: tuple[int, int] = (0, 0)
    views: dict[str, str] = field(default_factory=dict)  # image, overlay, map, mask -> file


def render_item(item: Item, out: Path, key: str) -> Rendered:
    """Write ``thumbs/<key>.jpg`` and ``views/<key>-<kind>.<ext>`` under ``out``; missing inputs are skipped."""
    image = _read(item.image)
    amap = load_map(item.map) if item.map is not None else None
    over = _read(item.overlay)
    if over is None and image is not None and amap is not None:
        over = overlay(image, _fit(amap, image.shape[:2]), item.pixel_threshold)[..., ::-1]  # BGR -> RGB
    base = next((x for x in (image, over, amap) if x is not None), None)
    if base is None:  # nothing to show: a neutral tile keeps the gallery's grid
        tile = np.full((THUMB_SIZE, THUMB_SIZE, 3), 60, np.uint8)
        return Rendered(_write(out, f"thumbs/{key}.jpg", tile), (THUMB_SIZE, THUMB_SIZE))
    view_hw = _scaled(base.shape[:2], VIEW_SIZE)
    thumb_src = over if over is not None else image if image is not None else _heat(amap, item.pixel_threshold)  # type: ignore[arg-type]
    thumb = _resize(thumb_src, _scaled(thumb_src.shape[:2], THUMB_SIZE))
    result = Rendered(
        _write(out, f"thumbs/{key}.jpg", thumb), (thumb.shape[1], thumb.shape[0]), (view_hw[1], view_hw[0])
    )
    views: dict[str, NDArray[np.uint8]] = {}
    if image is not None:
        views["image"] = _resize(image, view_hw)
    if over is not None:
        views["overlay"] = _resize(over, view_hw)
    if amap is not None:
        views["map"] = _heat(_resize(amap, view_hw), item.pixel_threshold)
    mask = _mask_view(amap, item, view_hw)
    if mask is not None:
        views["mask"] = mask
    for kind, pixels in views.items():
        ext = "png" if kind == "mask" else "jpg"
        result.views[kind] = _write(out, f"views/{key}-{kind}.{ext}", pixels)
    return result


def _read(path: Path | None) -> NDArray[np.uint8] | None:
    if path is None:
        return None
    try:
        return read_image(path, bit_depth=None)  # 16-bit images at their own depth: a 12-bit frame is not black
    except DataError:
        return None


def _scaled(hw: tuple[int, ...], longest: int) -> tuple[int, int]:
    h, w = hw[:2]
    factor = min(1.0, longest / max(h, w))
    return max(1, round(h * factor)), max(1, round(w * factor))


def _resize(pixels: NDArray, hw: tuple[int, int]) -> NDArray:  # type: ignore[type-arg]
    if pixels.shape[:2] == hw:
        return pixels
    return cv2.resize(pixels, (hw[1], hw[0]), interpolation=cv2.INTER_AREA)


def _fit(amap: NDArray[np.float32], hw: tuple[int, ...]) -> NDArray[np.float32]:
    """A map at the image's size (maps are written at original resolution, but be lenient)."""
    if amap.shape == hw[:2]:
        return amap
    # cv2's stubs drop the dtype
    return cv2.resize(amap, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)  # type: ignore[return-value]


def _heat(amap: NDArray[np.float32], threshold: float) -> NDArray[np.uint8]:
    """JET colours on the scale of :func:`anomaly.outputs.overlay` (the threshold mid-scale), RGB."""
    lo, hi = 0.5 * threshold, 1.5 * threshold
    scaled = np.clip((amap - lo) / max(hi - lo, 1e-12) * 255, 0, 255).astype(np.uint8)
    return cv2.applyColorMap(scaled, cv2.COLORMAP_JET)[..., ::-1]


def _mask_view(amap: NDArray[np.float32] | None, item: Item, hw: tuple[int, int]) -> NDArray[np.uint8] | None:
    """Predicted mask (map >= pixel threshold, empty for an image that passes: ``DetectionResult.mask``) in white,
    with the ground-truth mask outlined in green."""
    if amap is None and item.ground_truth is None:
        return None
    view = np.zeros((*hw, 3), np.uint8)
    if amap is not None and item.flagged:
        predicted = _resize((amap >= item.pixel_threshold).astype(np.uint8) * 255, hw)
        view[...] = predicted[..., None]
    if item.ground_truth is not None:
        truth = read_mask(item.ground_truth, hw)
        contours, _ = cv2.findContours(truth.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(view, contours, -1, _TRUTH_BGR[::-1], max(1, max(hw) // 256))
    return view


def _write(out: Path, rel: str, rgb: NDArray[np.uint8]) -> str:
    """Encode RGB pixels (JPEG or PNG by suffix) to ``out/rel``; returns ``rel``."""
    path = out / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    ext = path.suffix
    ok, data = cv2.imencode(ext, np.ascontiguousarray(rgb[..., ::-1]), _JPEG if ext == ".jpg" else [])
    if not ok:
        raise DataError(f"{path}: could not encode the image")
    path.write_bytes(data.tobytes())
    return rel
